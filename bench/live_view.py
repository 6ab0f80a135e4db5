"""Benchmark (issue 19): what watching live sessions costs the relay.

One run starts ``bastion-broker demo`` (one broker process: the web API, the live view and the
relay share its event loop, the worst case for the relay), logs 20 demo users in once each over
an OpenSSH ControlMaster connection, and the demo auditor into the API. Each round runs 20
concurrent bulk sessions (exec: ``yes TEXT | head -c SIZE``, text like a ``cat`` of a big log)
through the broker, every client reading its stdout to the end, with 0 or 20 live watchers (one
WebSocket client per session, ``GET /api/sessions/{id}/live``, reading every message). Rounds
alternate the two modes; the report gives medians: aggregate relay throughput (bytes the clients
received, from the first byte of the round to the last), the broker's CPU per GiB relayed (its
process's user + system time over the round), their ratios, and what the watchers received.

Usage (from the repository root, with the project's virtualenv; needs OpenSSH and root)::

    .venv/bin/python bench/live_view.py                  # 20 x 200 MiB, 5 rounds per mode
    .venv/bin/python bench/live_view.py --docs           # ... and write docs/benchmarks.md
    .venv/bin/python bench/live_view.py --quick          # 20 x 32 MiB, 2 rounds per mode
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import Demo, start_demo, stop_demo  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Live view (issue 19)"
TEXT = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklm"  # + newline: 60 bytes a line
MiB = 1024 * 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system time of one process (not its children: the targets' sshd are those)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Round:
    watchers: int
    bytes: int
    seconds: float
    cpu: float
    watched_bytes: int = 0
    messages: int = 0
    skip_markers: int = 0
    skipped: int = 0
    max_lag: float = 0.0
    ended: int = 0

    @property
    def rate(self) -> float:
        return self.bytes / MiB / self.seconds

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu / (self.bytes / (1024 * MiB))


@dataclass
class Bench:
    demo: Demo
    work: Path
    users: list[str]
    socks: list[Path] = field(default_factory=list)
    masters: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def login_all(self) -> None:
        """One authenticated ControlMaster per user, reused by every session of the run."""
        for user in self.users:
            sock = self.work / f"cm-{user}"
            args = self.demo.ssh_args(f"{user}+web01", "-N", "-o", "ControlMaster=yes",
                                      "-o", f"ControlPath={sock}", "-o", "ServerAliveInterval=0")
            self.masters.append(subprocess.Popen(args, env=self.demo.env(user),
                                                 stdin=subprocess.DEVNULL,
                                                 stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL))
            self.socks.append(sock)
        deadline = time.monotonic() + 60
        for sock in self.socks:
            while not sock.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ControlMaster {sock.name} did not come up")
                time.sleep(0.1)

    def session_args(self, i: int, size: int) -> list[str]:
        return [*self.demo.ssh_args(f"{self.users[i]}+web01", "-o", "ControlMaster=no",
                                    "-o", f"ControlPath={self.socks[i]}"),
                f"sleep 1; yes {TEXT} | head -c {size}"]

    def close(self) -> None:
        for p in self.masters:
            p.terminate()
        for p in self.masters:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


async def _client(args: list[str], times: list[float]) -> int:
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    n = 0
    while chunk := await proc.stdout.read(1 << 20):
        if not n:
            times.append(time.monotonic())
        n += len(chunk)
    times.append(time.monotonic())
    if await proc.wait() != 0:
        raise RuntimeError(f"a bulk session failed ({proc.returncode})")
    return n


async def _watch(http: aiohttp.ClientSession, base: str, sid: str, r: Round) -> None:
    url = base.replace("http://", "ws://") + f"/api/sessions/{sid}/live"
    async with http.ws_connect(url, origin=base, max_msg_size=0) as ws:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            r.messages += 1
            r.watched_bytes += len(msg.data)
            doc = json.loads(msg.data)
            if isinstance(doc, list) and doc[1] == "o" and "[live view skipped " in doc[2]:
                r.skip_markers += 1
                r.skipped += int(doc[2].split("[live view skipped ")[1].split(" bytes]")[0])
            elif isinstance(doc, dict) and "lag" in doc:
                r.max_lag = max(r.max_lag, float(doc["lag"]))
            elif isinstance(doc, dict) and "end" in doc:
                r.ended += 1


async def _live_ids(http: aiohttp.ClientSession, base: str, users: set[str]) -> list[str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        resp = await http.get(base + "/api/sessions?status=live&kind=exec&limit=200")
        rows = (await resp.json())["items"]
        ids = [r["id"] for r in rows if r["user"].split("@")[0] in users]
        if len(ids) == len(users):
            return ids
        await asyncio.sleep(0.05)
    raise RuntimeError("the bulk sessions did not all show as live")


async def one_round(b: Bench, http: aiohttp.ClientSession, size: int, watchers: int) -> Round:
    base = b.demo.info["web_url"]
    pid = int(b.demo.info["pid"])
    times: list[float] = []
    cpu0 = cpu_seconds(pid)
    clients = [asyncio.create_task(_client(b.session_args(i, size), times))
               for i in range(len(b.users))]
    r = Round(watchers, 0, 0.0, 0.0)
    watches: list[asyncio.Task[None]] = []
    if watchers:
        ids = await _live_ids(http, base, set(b.users))
        watches = [asyncio.create_task(_watch(http, base, sid, r)) for sid in ids[:watchers]]
    sizes = await asyncio.gather(*clients)
    cpu = cpu_seconds(pid) - cpu0
    await asyncio.wait_for(asyncio.gather(*watches), 60)
    r.bytes, r.seconds, r.cpu = sum(sizes), max(times) - min(times), cpu
    if r.bytes != size * len(b.users):
        raise RuntimeError(f"clients received {r.bytes} bytes, not {size * len(b.users)}")
    return r


async def run(b: Bench, args: argparse.Namespace) -> list[Round]:
    rounds: list[Round] = []
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        a = b.demo.info["auditor"]
        resp = await http.post(b.demo.info["web_url"] + "/api/login", json={
            "user": a["user"], "password": a["password"],
            "code": b.demo.next_code(a["user"])})
        if resp.status != 200:
            raise RuntimeError(f"auditor login: {resp.status} {await resp.text()}")
        await one_round(b, http, 4 * MiB, 0)  # warm-up: caches, first sessions
        for i in range(args.rounds):
            for watchers in ((0, args.watchers) if i % 2 == 0 else (args.watchers, 0)):
                r = await one_round(b, http, args.size * MiB, watchers)
                log(f"round {i + 1}, {watchers:2d} watchers: {r.rate:7.1f} MiB/s, "
                    f"{r.cpu_per_gib:.2f} CPU s/GiB, watchers got {r.watched_bytes} bytes "
                    f"in {r.messages} messages, {r.skip_markers} skip markers, "
                    f"max lag {r.max_lag:.2f} s")
                rounds.append(r)
    return rounds


def render(rounds: list[Round], args: argparse.Namespace, command: str) -> str:
    def med(w: int, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in rounds if r.watchers == w))

    w = args.watchers
    rate0, rate1 = med(0, "rate"), med(w, "rate")
    cpu0, cpu1 = med(0, "cpu_per_gib"), med(w, "cpu_per_gib")
    watched = [r for r in rounds if r.watchers]
    per = "; ".join(f"{r.watchers}: {r.rate:.1f}" for r in rounds)
    cores = os.cpu_count()
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    return "\n".join([
        SECTION, "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command}` (replaced on every "
        "run).", "",
        f"Machine: {cores} cores, Linux {platform.release()}, {ssh}, Python "
        f"{platform.python_version()}. Clients, broker, targets and the watchers' WebSocket "
        "clients on this machine (loopback); the machine is shared, so compare the columns of "
        "one run.", "",
        f"The demo broker (one process: relay, web API and live view on one event loop), "
        f"{len(args.users)} demo users each on an OpenSSH ControlMaster connection; per round "
        f"{len(args.users)} concurrent exec sessions `yes TEXT | head -c {args.size} MiB` (text "
        f"lines, like a `cat` of a log), each client reading to the end, with 0 or {w} watchers "
        "(the auditor's WebSocket on `/api/sessions/{id}/live`, one per session, reading every "
        f"message). {args.rounds} rounds per mode, alternating; medians.", "",
        f"| | 0 watchers | {w} watchers | ratio |",
        "|---|---:|---:|---:|",
        f"| Aggregate relay throughput, MiB/s | {rate0:.1f} | {rate1:.1f} | "
        f"{rate1 / rate0:.3f} |",
        f"| Broker CPU s per GiB relayed | {cpu0:.2f} | {cpu1:.2f} | {cpu1 / cpu0:.3f} |",
        "",
        f"Throughput cost of {w} watchers: **{(1 - rate1 / rate0) * 100:.1f}%** (goal: at most "
        f"5%); CPU per GiB {(cpu1 / cpu0 - 1) * 100:+.1f}%.", "",
        f"What the watchers got, per round (median over rounds, all {w} together): "
        f"{statistics.median(r.watched_bytes for r in watched) / MiB:.2f} MiB in "
        f"{statistics.median(r.messages for r in watched):.0f} messages for "
        f"{statistics.median(r.bytes for r in watched) / MiB:.0f} MiB relayed; "
        f"{statistics.median(r.skip_markers for r in watched):.0f} skip markers naming "
        f"{statistics.median(r.skipped for r in watched) / MiB:.0f} MiB passed over; largest "
        f"lag reported {max(r.max_lag for r in watched):.2f} s; every watch ended with its "
        f"session: {all(r.ended == r.watchers for r in watched)}.", "",
        f"Per round (watchers: MiB/s): {per}.", "",
    ])


def write_docs(section: str) -> None:
    """Replace this benchmark's section (up to the next ``## `` heading) or append it."""
    text = DOCS.read_text()
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--watchers", type=int, default=20)
    p.add_argument("--size", type=int, default=200, help="MiB per session per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds per mode")
    p.add_argument("--quick", action="store_true", help="32 MiB, 2 rounds, no docs")
    p.add_argument("--docs", action="store_true", help=f"write {SECTION!r} in {DOCS.name}")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds, args.docs = 32, 2, False
    command = "python " + " ".join(["bench/live_view.py", *(argv or sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        work = Path(tmp)
        demo = start_demo(work / "state", users=args.sessions + 5)
        bench = Bench(demo, work, [])
        try:
            bench.users = [u["user"] for u in demo.info["users"]
                           if u["user"] != "alice"][:args.sessions]
            args.users = bench.users
            log(f"logging {len(bench.users)} users in (ControlMaster)")
            bench.login_all()
            rounds = asyncio.run(run(bench, args))
        finally:
            bench.close()
            stop_demo(demo)
    section = render(rounds, args, command)
    print(section)
    if args.docs:
        write_docs(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
