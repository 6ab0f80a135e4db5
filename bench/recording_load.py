"""Recording under load: N concurrent recorded shells, each printing ~1 KB/s, through the broker.

Each client is the real OpenSSH client (``ssh -tt``, one process per session) logging in as its
own demo user; once every shell is up, each runs a loop that prints 768 random bytes as base64
(1 KiB + newline) every second for ``--seconds``. When every client has exited, what each client
received on stdout/stderr is compared byte for byte with the OUTPUT/ERROR frames of its session's
recording. The goal is 0 bytes missing from any recording.

    .venv/bin/python bench/recording_load.py [--sessions 200] [--seconds 120]

Logins are paced (``--login-concurrency``, below the broker's per-source MaxStartups); the
report says how long all sessions printed together and how much CPU the broker used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.domain import recording as fmt
from tests.conftest import Demo, start_demo, stop_demo


@dataclass
class Result:
    user: str
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    code: int | None = None
    started: float = 0.0  # first byte received (logged in, shell up)
    ended: float = 0.0


def script(seconds: int) -> bytes:
    # PTY echo of this line is part of the session output, and so of the comparison
    # waits for one line (sent once every shell is up), so that all print at the same time
    return (f"read -r _; i=0; while [ $i -lt {seconds} ]; do head -c 768 /dev/urandom | "
            f"base64 -w0; echo; sleep 1; i=$((i+1)); done; exit\n").encode()


async def _read(stream: asyncio.StreamReader, into: bytearray, first: asyncio.Event) -> None:
    while chunk := await stream.read(65536):
        into += chunk
        first.set()


@dataclass
class Start:
    """All shells up -> ``go`` is set and every client sends the line its loop waits for."""

    total: int
    go: asyncio.Event = field(default_factory=asyncio.Event)
    up: int = 0
    at: float = 0.0

    def ready(self) -> None:
        self.up += 1
        if self.up == self.total:
            self.at = time.monotonic()
            self.go.set()


async def one(demo: Demo, user: str, seconds: int, gate: asyncio.Semaphore,
              start: Start) -> Result:
    res = Result(user)
    first = asyncio.Event()
    async with gate:  # paced logins: released once the shell answers
        proc = await asyncio.create_subprocess_exec(
            *demo.ssh_args(f"{user}+web01", "-tt", "-q"), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=demo.env(user))
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        readers = [asyncio.create_task(_read(proc.stdout, res.out, first)),
                   asyncio.create_task(_read(proc.stderr, res.err, first))]
        proc.stdin.write(script(seconds))  # stdin stays open: EOF would end the shell early
        await proc.stdin.drain()
        await asyncio.wait_for(first.wait(), 120)
        res.started = time.monotonic()
    start.ready()
    await asyncio.wait_for(start.go.wait(), 1800)
    proc.stdin.write(b"\n")
    await proc.stdin.drain()
    res.code = await asyncio.wait_for(proc.wait(), seconds * 3 + 300)
    await asyncio.gather(*readers)
    res.ended = time.monotonic()
    proc.stdin.close()
    return res


def common_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix (bisection on slices: fast for equal megabytes)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compare(demo: Demo, results: list[Result]) -> dict[str, object]:
    rows = {str(r["user"]).split("@")[0]: r for r in demo.sessions()}
    missing_total = 0
    extra_total = 0
    bad: list[str] = []
    recorded_total = 0
    for res in results:
        row = rows.get(res.user)
        if row is None:
            bad.append(f"{res.user}: no session in the index")
            missing_total += len(res.out) + len(res.err)
            continue
        parsed = fmt.parse(Path(str(row["recording"])).read_bytes())
        for got, kinds in ((bytes(res.out), frozenset({fmt.OUTPUT})),
                           (bytes(res.err), frozenset({fmt.ERROR}))):
            rec = fmt.output_bytes(parsed.frames, kinds)
            recorded_total += len(rec)
            common = common_prefix(got, rec)
            missing_total += len(got) - common  # received but not (or not so) recorded
            extra_total += len(rec) - common
            if got != rec:
                bad.append(f"{res.user}: client {len(got)} B, recording {len(rec)} B, "
                           f"equal prefix {common} B")
        if parsed.truncated:
            bad.append(f"{res.user}: recording has a torn last frame")
    return {"bytes_missing": missing_total, "bytes_extra_in_recording": extra_total,
            "bytes_recorded": recorded_total, "mismatches": bad}


async def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bb-recload-") as tmp:
        demo = start_demo(Path(tmp) / "state", users=args.sessions + 1)
        try:
            users = [demo.take_user() for _ in range(args.sessions)]
            cpu0, t0 = cpu_seconds(demo.proc.pid), time.monotonic()
            gate = asyncio.Semaphore(args.login_concurrency)
            start = Start(len(users))
            results = await asyncio.gather(*(one(demo, u, args.seconds, gate, start)
                                             for u in users))
            wall = time.monotonic() - t0
            cpu = cpu_seconds(demo.proc.pid) - cpu0
            overlap = min(r.ended for r in results) - start.at
            logins = start.at - t0
            summary = compare(demo, list(results))
            codes: dict[str, int] = {}
            for r in results:
                codes[str(r.code)] = codes.get(str(r.code), 0) + 1
            received = sum(len(r.out) + len(r.err) for r in results)
            return {
                "sessions": args.sessions, "seconds_per_session": args.seconds,
                "client_exit_codes": codes, "bytes_received_by_clients": received,
                **summary, "logins_s": round(logins, 1),
                "all_sessions_printing_together_s": round(max(0.0, overlap), 1),
                "wall_s": round(wall, 1), "broker_cpu_s": round(cpu, 1),
                "broker_cpu_percent": round(100 * cpu / wall, 1),
            }
        finally:
            stop_demo(demo)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--login-concurrency", type=int, default=6)
    args = ap.parse_args()
    if not 1 <= args.sessions <= 2000 or not 1 <= args.seconds <= 3600:
        ap.error("--sessions must be 1..2000 and --seconds 1..3600")
    if not 1 <= args.login_concurrency <= 9:
        ap.error("--login-concurrency must be 1..9 (the broker allows 10 per source)")
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    ok = result["bytes_missing"] == 0 and not result["mismatches"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
