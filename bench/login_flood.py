"""A flood of stalled connections against real logins: the broker, and OpenSSH's sshd with its
defaults as the reference, under the same flood in the same run; then the web listener.

The flood: ``--flood`` (300) connections from ``--sources`` (30) loopback addresses 127.0.0.x,
each held open for as long as the server lets it: half send nothing at all, half send an SSH
version line and never a KEXINIT. A connection the server closes is opened again at once (after
``--reopen`` seconds), so the flood stays at full size for the whole measurement.

Under it, ``--logins`` (20) real OpenSSH client logins, one after the other, each timed from
start to exit of ``ssh ... true`` (exit 0 required; a refused or timed-out login counts as a
failure, timeout 30 s): to the broker (password + TOTP code through ``SSH_ASKPASS``, a fresh demo
user per login, the command run on the target behind it) and to sshd (a key, ``root@``; the
sshd_config sets only port, host key, key file and ``StrictModes no``, everything else is
OpenSSH's default: ``MaxStartups 10:30:100``, ``LoginGraceTime 120``). The same logins without a
flood first, as the baseline.

Then the web API: the same flood shape, but each connection sends half an HTTP request header;
``--logins`` real requests (``GET /api/openapi.json``) are timed under it, and how many flood
connections the listener cut is counted.

    .venv/bin/python bench/login_flood.py [--flood 300] [--sources 30] [--logins 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import Demo, start_demo, stop_demo

SSH_BANNER = b"SSH-2.0-OpenSSH_9.2\r\n"
HTTP_HALF = b"GET /api/openapi.json HTTP/1.1\r\nHost: bastion\r\nUser-Agent: flood\r\n"


@dataclass
class Flood:
    """``size`` connections from ``sources`` addresses, reopened whenever the server closes one."""

    port: int
    size: int
    sources: int
    kind: str  # "ssh" or "http"
    reopen: float
    opened: int = 0
    closed_by_server: int = 0
    refused: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    open_now: int = 0

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._slot(i)) for i in range(self.size)]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _slot(self, i: int) -> None:
        source = f"127.0.0.{100 + i % self.sources}"
        while True:
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, local_addr=(source, 0))
            except OSError:
                self.refused += 1
                await asyncio.sleep(self.reopen)
                continue
            self.opened += 1
            self.open_now += 1
            try:
                if self.kind == "ssh" and i % 2:
                    writer.write(SSH_BANNER)  # a version line, then never a KEXINIT
                elif self.kind == "http":
                    writer.write(HTTP_HALF)  # half a request header
                with contextlib.suppress(OSError):
                    while await reader.read(65536):
                        pass
                self.closed_by_server += 1
            finally:
                self.open_now -= 1
                writer.close()
            await asyncio.sleep(self.reopen)


def _stats(times: list[float], failures: int) -> str:
    if not times:
        return f"all {failures} failed"
    q = (statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1
         else [times[0]] * 9)
    return (f"p50 {statistics.median(times) * 1000:.0f} ms, p90 {q[8] * 1000:.0f} ms, "
            f"max {max(times) * 1000:.0f} ms, {failures} failed of {len(times) + failures}")


async def _timed(args: list[str], env: dict[str, str] | None) -> tuple[float | None, str]:
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=env)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None, "timeout"
    elapsed = time.monotonic() - t0
    return (elapsed if proc.returncode == 0 else None), err.decode(errors="replace").strip()


Login = Callable[[], tuple[list[str], dict[str, str] | None]]


async def logins(n: int, make: Login) -> str:
    times: list[float] = []
    failures = 0
    errors: dict[str, int] = {}
    for _ in range(n):
        args, env = make()  # a fresh code right before the login
        took, err = await _timed(args, env)
        if took is None:
            failures += 1
            key = err.splitlines()[-1][:80] if err else "?"
            errors[key] = errors.get(key, 0) + 1
        else:
            times.append(took)
        await asyncio.sleep(0.2)
    text = _stats(times, failures)
    if errors:
        text += "; " + "; ".join(f"{v}x {k!r}" for k, v in errors.items())
    return text


def start_sshd(work: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "host")],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "user")],
                   check=True)
    (work / "authorized_keys").write_text((work / "user.pub").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = work / "sshd_config"
    cfg.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {work / 'host'}\n"
                   f"PidFile {work / 'sshd.pid'}\nAuthorizedKeysFile {work / 'authorized_keys'}\n"
                   "StrictModes no\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = open(work / "sshd.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f",
                             str(cfg)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    for _ in range(500):
        if f"port {port}".encode() in (work / "sshd.log").read_bytes():
            return proc, port, work / "user"
        time.sleep(0.01)
    raise RuntimeError("sshd did not start")


def sshd_login(port: int, key: Path) -> list[str]:
    return ["ssh", "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "root@127.0.0.1", "true"]


def broker_login(demo: Demo) -> tuple[list[str], dict[str, str] | None]:
    user = demo.take_user()
    return [*demo.ssh_args(f"{user}+web01"), "true"], demo.env(user)


async def http_requests(url: str, n: int) -> str:
    times: list[float] = []
    failures = 0

    def get() -> None:
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - loopback
            resp.read()

    for _ in range(n):
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(get)
            times.append(time.monotonic() - t0)
        except OSError:
            failures += 1
        await asyncio.sleep(0.2)
    return _stats(times, failures)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flood", type=int, default=300)
    ap.add_argument("--sources", type=int, default=30)
    ap.add_argument("--logins", type=int, default=20)
    ap.add_argument("--reopen", type=float, default=0.05)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="login-flood-"))
    demo = start_demo(work / "state", users=3 * a.logins + 5)
    sshd, sshd_port, key = start_sshd(work)
    lines = [f"flood: {a.flood} connections from {a.sources} addresses (half silent, half a "
             f"version line only), reopened {a.reopen} s after the server closes one; "
             f"{a.logins} logins each"]
    try:
        runs: list[tuple[str, int, Login]] = [
            ("broker", demo.port, lambda: broker_login(demo)),
            ("sshd (OpenSSH defaults)", sshd_port, lambda: (sshd_login(sshd_port, key), None))]
        for name, port, make in runs:
            base = await logins(a.logins, make)
            flood = Flood(port, a.flood, a.sources, "ssh", a.reopen)
            flood.start()
            await asyncio.sleep(3)  # the flood at full size
            under = await logins(a.logins, make)
            held = flood.open_now
            await flood.stop()
            lines.append(f"{name}: no flood: {base}")
            lines.append(f"{name}: under the flood: {under}")
            lines.append(f"{name}: flood connections opened {flood.opened}, closed by the "
                         f"server {flood.closed_by_server}, open at the end {held}")
            print("\n".join(lines[-3:]), flush=True)
            await asyncio.sleep(2)
        web_url = str(demo.info["web_url"])
        web_port = int(web_url.rsplit(":", 1)[1])
        url = f"{web_url}/api/openapi.json"
        base = await http_requests(url, a.logins)
        flood = Flood(web_port, a.flood, a.sources, "http", a.reopen)
        flood.start()
        await asyncio.sleep(3)
        under = await http_requests(url, a.logins)
        held = flood.open_now
        await asyncio.sleep(12)  # past the header timeout (10 s): every half header was cut
        lines.append(f"web: no flood: {base}")
        lines.append(f"web: under a flood of half headers: {under}")
        lines.append(f"web: flood connections opened {flood.opened}, closed by the server "
                     f"{flood.closed_by_server} (open {held} during the requests)")
        await flood.stop()
        print("\n".join(lines[-3:]), flush=True)
    finally:
        sshd.terminate()
        sshd.wait(10)
        stop_demo(demo)
    print("\n".join(lines))


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root: the reference sshd logs in as root with a key")
    asyncio.run(main())
