"""The demo's Windows-like RDP target (``bastion-broker demo --rdp``): FreeRDP's shadow server
with NLA (a SAM file made by ``winpr-hash``) on an Xvfb display of its own, on loopback.

It starts before the demo writes its inventory, so a port another process took meanwhile costs a
retry on another port, not an inventory pointing at the wrong service. Both processes run in a
session of their own (a Ctrl-C reaches the demo, which stops them in order) and get SIGTERM when
the demo dies, however it dies (``PR_SET_PDEATHSIG``): no Xvfb or shadow server outlives it.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import ConfigError
from broker.runtime import free_port

NAME = "win01"
INSTANCE_ID = "i-0win01"
USER = "Administrator"  # the Windows account, not a bastion user: RDP credentials are the target's
RDP_PORT = 3389  # what users forward to; the inventory maps it to the shadow server's real port
# tool -> Debian package (scripts/bootstrap installs them)
TOOLS = {"Xvfb": "xvfb", "freerdp-shadow-cli": "freerdp2-shadow-x11", "winpr-hash": "winpr-utils"}
START_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1


def tools() -> dict[str, str]:
    """Each tool's path; one error naming every missing package, before anything starts."""
    found = {tool: shutil.which(tool) for tool in TOOLS}
    missing = [tool for tool, path in found.items() if path is None]
    if missing:
        raise ConfigError(
            f"--rdp needs {', '.join(missing)}: install the Debian packages "
            f"{' '.join(TOOLS[t] for t in missing)} (scripts/bootstrap does)")
    return {tool: path for tool, path in found.items() if path is not None}


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the demo exits, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None,
           pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    # preexec_fn is safe here: the demo starts these before it has any thread
    with open(log, "ab") as out:
        return subprocess.Popen(  # noqa: S603 - fixed tools, arguments from this module
            args, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL, pass_fds=pass_fds,
            start_new_session=True, preexec_fn=_die_with_parent)


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    """Terminate and reap ``proc`` (kill it after ``timeout`` seconds)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_xvfb(xvfb: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """An Xvfb on a display number it picks itself (``-displayfd``); returns it and ``:N``."""
    r, w = os.pipe()
    try:
        proc = _spawn([xvfb, "-displayfd", str(w), "-nolisten", "tcp", "-screen", "0",
                       "1280x800x24"], log, pass_fds=(w,))
    finally:
        os.close(w)
    num = b""
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while not num.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                break
            chunk = os.read(r, 16)
            if not chunk:  # Xvfb exited
                break
            num += chunk
    finally:
        os.close(r)
    if not num.strip().isdigit():
        stop(proc)
        raise ConfigError(f"Xvfb did not start a display; see {log}")
    return proc, ":" + num.decode().strip()


def listening(port: int) -> bool:
    """Whether 127.0.0.1:``port`` is in LISTEN state (a probe would be an RDP connection the
    server logs as a failed client)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(p[1] == want and p[3] == "0A"
                   for p in (line.split() for line in f.readlines()[1:]))


@dataclass
class RdpTarget:
    """A running ``win01``: where it listens and what logs in."""

    dir: Path
    port: int
    password: str
    display: str
    xvfb: subprocess.Popen[bytes] | None = None
    shadow: subprocess.Popen[bytes] | None = None
    user: str = USER
    name: str = NAME
    id: str = INSTANCE_ID
    pids: dict[str, int] = field(default_factory=dict)

    def stop(self) -> None:
        stop(self.shadow)  # first, so it never sees its display vanish
        stop(self.xvfb)

    def describe(self) -> dict[str, object]:
        """The ``rdp`` entry of ``demo.json``."""
        return {"target": self.name, "id": self.id, "port": RDP_PORT, "user": self.user,
                "password": self.password, "target_port": self.port, "display": self.display,
                "pids": self.pids, "log": str(self.dir / "shadow.log")}


def _start_shadow(shadow: str, t: RdpTarget, sam: Path,
                  env: dict[str, str]) -> subprocess.Popen[bytes]:
    """freerdp-shadow-cli on a free port; retried, on another port and after a pause, if it exits
    at start: the port was taken meanwhile, or the new Xvfb refused its first connections
    ("failed to open display", seen for a moment after another Xvfb on the same display number
    exited)."""
    log = t.dir / "shadow.log"
    last = "no output"
    for attempt in range(6):
        time.sleep(0.2 * attempt)
        t.port = free_port()
        start = log.stat().st_size if log.exists() else 0
        proc = _spawn([shadow, "/bind-address:127.0.0.1", f"/port:{t.port}", "/sec:nla",
                       f"/sam-file:{sam}"], log, env)
        deadline = time.monotonic() + START_TIMEOUT
        while proc.poll() is None and not listening(t.port):
            if time.monotonic() > deadline:
                stop(proc)
                raise ConfigError(f"freerdp-shadow-cli did not listen in {START_TIMEOUT:.0f} s; "
                                  f"see {log}")
            time.sleep(0.05)
        if proc.poll() is None:
            return proc
        with open(log, "rb") as f:
            f.seek(start)
            tail = f.read()[-300:].decode(errors="replace").strip().splitlines()
        last = tail[-1] if tail else last
    raise ConfigError(f"freerdp-shadow-cli exited at start six times (last: {last}); see {log}")


def _write_sam(winpr_hash: str, t: RdpTarget) -> Path:
    """The NLA account database: one user, its NT hash, readable by the demo only."""
    sam = t.dir / "sam"
    fd = os.open(sam, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        done = subprocess.run(  # noqa: S603 - fixed tool and arguments
            [winpr_hash, "-u", t.user, "-p", t.password, "-f", "sam"],
            stdout=f, stderr=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise ConfigError(f"winpr-hash failed (status {done.returncode})")
    return sam


@contextmanager
def running(target_dir: Path) -> Iterator[RdpTarget]:
    """Start ``win01`` under ``target_dir`` (SAM file, logs, the shadow server's own certificate
    under its HOME) with a new password, and stop it on the way out."""
    paths = tools()
    target_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    t = RdpTarget(target_dir, 0, secrets.token_urlsafe(12), "")
    try:
        sam = _write_sam(paths["winpr-hash"], t)
        t.xvfb, t.display = start_xvfb(paths["Xvfb"], target_dir / "xvfb.log")
        # its own HOME: the shadow server keeps its TLS key in ~/.config/freerdp
        env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
        env.update(DISPLAY=t.display, HOME=str(target_dir))
        t.shadow = _start_shadow(paths["freerdp-shadow-cli"], t, sam, env)
        t.pids = {"xvfb": t.xvfb.pid, "shadow": t.shadow.pid}
        yield t
    finally:
        t.stop()
