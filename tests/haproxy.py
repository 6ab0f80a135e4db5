"""A real HAProxy (Debian ``haproxy``, installed by scripts/bootstrap) for the fleet tests.

The caller writes the frontends and backends; ``running`` adds the global and default sections
(TCP mode, log to stderr, an admin stats socket), starts ``haproxy -db`` in the foreground, waits
until every given port listens, and stops it at the end. ``server_states`` reads what HAProxy's
health checks decided, so a test waits for "all UP" or "b2 DOWN" instead of sleeping.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from broker.demo_rdp import stop

HEADER = """global
  maxconn 500
  log stderr format raw local0
  stats socket {sock} mode 600 level admin
defaults
  mode tcp
  log global
  option tcplog
  timeout connect 5s
  timeout client 10m
  timeout server 10m
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HAProxy:
    proc: subprocess.Popen[bytes]
    config: Path
    log: Path
    sock: Path

    def command(self, line: str) -> str:
        """One command on the stats socket (``show stat``, ``disable server b/s``...)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.sock))
            s.sendall(line.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def server_states(self, backend: str) -> dict[str, str]:
        """Server name -> health state of ``backend`` as HAProxy sees it (UP, DOWN, ...)."""
        lines = self.command("show stat").splitlines()
        head = lines[0].lstrip("# ").split(",")
        px, sv, st = head.index("pxname"), head.index("svname"), head.index("status")
        rows = [line.split(",") for line in lines[1:] if line]
        return {r[sv]: r[st] for r in rows
                if r[px] == backend and r[sv] not in ("FRONTEND", "BACKEND")}

    def wait_states(self, backend: str, want: dict[str, str], timeout: float = 30) -> float:
        """Poll until the servers named in ``want`` are in those states; the seconds it took."""
        t0 = time.monotonic()
        while True:
            got = self.server_states(backend)
            # "DOWN 1/2" / "UP 1/2": on the way, not there yet
            if all(got.get(name) == state for name, state in want.items()):
                return time.monotonic() - t0
            assert self.proc.poll() is None, f"haproxy exited:\n{self.text()[-3000:]}"
            assert time.monotonic() - t0 < timeout, f"{backend}: {got}, waited for {want}"
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "haproxy exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"haproxy is not listening on {port}")


def _wait_stats_socket(h: HAProxy, timeout: float = 15) -> None:
    """The TCP listeners may accept before the stats socket is in place (HAProxy binds it as a
    temporary file and renames it)."""
    deadline = time.monotonic() + timeout
    while True:
        assert h.proc.poll() is None, f"haproxy exited:\n{h.text()[-3000:]}"
        try:
            if "Pid:" in h.command("show info"):
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no stats socket at {h.sock}"
        time.sleep(0.05)


@contextlib.contextmanager
def running(workdir: Path, sections: str, ports: Iterable[int]) -> Iterator[HAProxy]:
    """HAProxy with ``sections`` (frontends, backends) in ``workdir``, listening on ``ports``."""
    cfg = workdir / "haproxy.cfg"
    sock = workdir / "haproxy.sock"
    if len(str(sock)) > 100:  # a unix socket path has room for about 107 bytes
        sock = Path(tempfile.mkdtemp(prefix="bb-haproxy-")) / "stats.sock"
    cfg.write_text(HEADER.format(sock=sock) + sections)
    log = workdir / "haproxy.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=err, stdin=subprocess.DEVNULL)
    h = HAProxy(proc, cfg, log, sock)
    try:
        for p in ports:
            wait_listening(p, proc)
        _wait_stats_socket(h)
        yield h
    finally:
        stop(proc)
