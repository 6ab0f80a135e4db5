"""The daemon's log is one JSON object per line even when several worker processes write to one
stderr pipe at once: each line must reach the pipe in one write (a line written in two pieces,
the text and then its newline, interleaves with another process's and both lines are lost)."""

from __future__ import annotations

import json
import subprocess
import sys

WRITER = """
import sys
from broker import logs
import structlog
logs.configure("info")
log = structlog.get_logger("t")
for i in range(3000):
    log.info("worker.line", worker=int(sys.argv[1]), i=i)
"""


def test_lines_from_concurrent_processes_on_one_pipe_stay_whole() -> None:
    """Four processes share the reader's one pipe as their stderr, as workers do."""
    cmd = ("import subprocess, sys\n"
           f"procs = [subprocess.Popen([sys.executable, '-c', {WRITER!r}, str(n)]) "
           "for n in range(4)]\n"
           "sys.exit(max(p.wait() for p in procs))\n")
    r = subprocess.run([sys.executable, "-c", cmd], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.splitlines()
    events = [json.loads(line) for line in lines]  # raises on a torn or joined line
    assert len(events) == 4 * 3000
    assert {(e["worker"], e["i"]) for e in events} == {(w, i) for w in range(4)
                                                       for i in range(3000)}
