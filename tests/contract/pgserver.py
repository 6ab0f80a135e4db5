"""A throwaway PostgreSQL 15 server for tests: initdb into a temp dir, pg_ctl on a free port.

initdb refuses to run as root, so as root every server command runs as the ``postgres`` user
(``runuser``) on a data dir it owns; as any other user it runs as that user. The server listens
on 127.0.0.1 only, with its socket in the temp dir, and durability switched off for speed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PG_BIN = Path(os.environ.get("BB_PG_BIN", "/usr/lib/postgresql/15/bin"))
# generous: other test suites may be using every core
START_TIMEOUT = 120
RUN_TIMEOUT = 180


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One cluster; ``start``/``stop`` may be repeated (the port stays the same)."""

    def __init__(self) -> None:
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not (PG_BIN / tool).exists():
                raise RuntimeError(f"{PG_BIN / tool} not found: run scripts/bootstrap "
                                   "(installs postgresql-15) or set BB_PG_BIN")
        self.root = Path(tempfile.mkdtemp(prefix="bb-pg-"))
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self.running = False
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--locale=C", "--no-sync")

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(PG_BIN / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT, env={**os.environ, "LC_ALL": "C"},
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip()}\n"
                               f"{self.log_tail()}")
        return proc

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> None:
        """Start on the current port, or on a fresh free port the first time (retrying if
        someone else grabs it between the probe and the bind)."""
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            port = self.port or free_port()
            opts = (f"-k {self.root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
                    " -c full_page_writes=off -c synchronous_commit=off -c max_connections=200")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                          "-t", str(START_TIMEOUT), "-o", opts, "start")
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2)
                continue
            self.port = port
            self.running = True
            return

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w",
                      "-t", str(START_TIMEOUT), "stop")
            self.running = False

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@contextlib.contextmanager
def running() -> Iterator[PgServer]:
    """A started server, destroyed at the end of the block (module fixtures of fleet tests)."""
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
