"""Capacity: one broker with N concurrent recorded interactive sessions (default 1,000).

Every session is a PTY shell on the demo's real sshd target, on its own client connection as its
own demo user (password + TOTP), opened by asyncssh clients in ``--load-procs`` load processes
(1,000 OpenSSH client processes would not fit beside 1,000 sshd sessions). The mix: most shells
idle at their prompt, ``--typing`` of them typing a command line at about 5 keys a second, and
``--bulk`` of them printing ``--bulk-rate`` bytes a second of base64 (a copy through the
terminal). Once every shell is up, the activity runs for ``--seconds`` while this process

* times keystroke echo in one more interactive session (the real OpenSSH client, ``stty raw
  -echo; cat`` on the target: one byte in, the same byte back; ``bench/run.py``'s probe),
* samples the broker's memory (RSS and PSS summed over its processes), CPU and open files, and
  its ``bastion_broker_recording_sync_lag_seconds`` (age of the oldest recorded byte that may
  not be fsynced yet; a byte reaches the file before the client sees it, by design),

then every shell exits, and what each client received (SHA-256 and length, stdout and stderr
apart) is compared with the OUTPUT and ERROR frames of its session's recording.

    .venv/bin/python bench/capacity.py [--sessions 1000] [--workers 1] [--seconds 60]

Needs root (the demo creates the target's login accounts) and OpenSSH. Prints a JSON summary and
a Markdown table row; the JSON also goes to ``bench/results/`` (not committed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.recording_load import common_prefix
from bench.run import (
    CIPHER,
    KEX,
    UserPool,
    _KbdClient,
    _on_sigterm,
    cpu_seconds,
    descendants,
    echo_samples,
    machine_busy_seconds,
    mem_kib,
    percentile,
)
from broker.domain import recording as fmt
from tests.conftest import Demo, start_demo, stop_demo

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TARGET = "web01"
SAMPLE_EVERY = 0.5  # seconds between memory / metrics samples
ECHO_GAP = 0.02  # seconds between probe keystrokes


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- load process (asyncssh clients) -----------------------------------------------------------

class _Shell(asyncssh.SSHClientSession[bytes]):
    """Hashes what it receives, and keeps it unless ``bulk`` (megabytes are never held)."""

    def __init__(self, bulk: bool = False) -> None:
        self.out = hashlib.sha256()
        self.err = hashlib.sha256()
        self.out_n = self.err_n = 0
        self.kept: tuple[bytearray, bytearray] | None = None if bulk else (bytearray(),
                                                                             bytearray())
        self.prompt = asyncio.Event()
        self.closed = asyncio.Event()
        self.exit: int | None = None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.err.update(data)
            self.err_n += len(data)
        else:
            self.out.update(data)
            self.out_n += len(data)
        if self.kept is not None:
            self.kept[datatype == asyncssh.EXTENDED_DATA_STDERR].extend(data)
        self.prompt.set()

    def exit_status_received(self, status: int) -> None:
        self.exit = status

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


@dataclass
class _Client:
    user: str
    kind: str  # idle, typing, bulk
    shell: _Shell = field(default_factory=_Shell)

    def __post_init__(self) -> None:
        self.shell = _Shell(bulk=self.kind == "bulk")
    conn: asyncssh.SSHClientConnection | None = None
    chan: asyncssh.SSHClientChannel[bytes] | None = None
    error: str = ""


async def _open(c: _Client, pool: UserPool, port: int, gate: asyncio.Semaphore) -> None:
    async with gate:  # paced logins, below the broker's per-source startup limit
        try:
            login = pool.take()  # a user's first code, made just before it is used
            c.user = login.user
            c.conn, _ = await asyncssh.create_connection(
                lambda: _KbdClient(login), "127.0.0.1", port,
                username=f"{login.user}+{TARGET}", client_keys=None,
                preferred_auth=["keyboard-interactive"], known_hosts=None, agent_path=None,
                config=None, encryption_algs=[CIPHER], kex_algs=[KEX])
            c.chan, _ = await c.conn.create_session(lambda: c.shell, term_type="xterm",
                                                    term_size=(80, 24), encoding=None)
            await asyncio.wait_for(c.shell.prompt.wait(), 60)
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            c.error = f"{type(exc).__name__}: {exc}"


async def _typing(c: _Client, stop: asyncio.Event) -> None:
    """A person at the prompt: one key about every 0.2 s, Enter at the end of each line."""
    rng = random.Random(c.user)
    n = 0
    while not stop.is_set():
        n += 1
        for ch in f"echo typed line {n} by {c.user}\r":
            if stop.is_set() or c.chan is None:
                return
            c.chan.write(ch.encode())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(2.0, rng.expovariate(5.0)))


BULK_TICKS = 64  # a bulk shell prints its rate in this many lines a second: a steady stream


def bulk_command(rate: int) -> str:
    """A copy through the terminal at ``rate`` bytes a second: base64 lines of random bytes,
    ``BULK_TICKS`` a second (one process; a ``head | base64`` a second would be one burst)."""
    raw = max(3, rate // BULK_TICKS * 3 // 4)
    return ("perl -MMIME::Base64 -e 'open my $r, \"<\", \"/dev/urandom\"; $| = 1; "
            f"while (1) {{ read $r, my $b, {raw}; print encode_base64($b, \"\"), \"\\n\"; "
            f"select undef, undef, undef, 1 / {BULK_TICKS} }}'\r")


async def _sockets(clients: list[_Client]) -> list[str]:
    """``ss`` lines (queues) of these clients' TCP connections: bytes in the client's receive
    queue mean this process did not read them, bytes in the broker's send queue that the
    kernel did not deliver them, neither that the broker did not send them."""
    ports = {str(c.conn.get_extra_info("sockname")[1]) for c in clients if c.conn is not None}
    if not ports:
        return []
    proc = await asyncio.create_subprocess_exec("ss", "-tnH", stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    return [line for line in out.decode().splitlines()
            if any(f":{p} " in line or line.endswith(f":{p}") for p in ports)][:100]


async def _child(spec: dict[str, Any]) -> None:
    os.nice(spec["nice"])  # clients are other machines on a real bastion
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(**event: Any) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    users = spec["users"]
    pool = UserPool(users)
    clients = [_Client(u["user"], u["kind"]) for u in users]
    gate = asyncio.Semaphore(spec["login_concurrency"])
    t0 = time.monotonic()
    await asyncio.gather(*(_open(c, pool, spec["port"], gate) for c in clients))
    say(event="ready", seconds=time.monotonic() - t0,
        failed=[f"{c.user}: {c.error}" for c in clients if c.error])
    await reader.readline()  # go
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_typing(c, stop)) for c in clients if c.kind == "typing"]
    rate = spec["bulk_rate"]
    for c in clients:
        if c.kind == "bulk" and c.chan is not None:
            c.chan.write(bulk_command(rate).encode())
    await reader.readline()  # stop
    stop.set()
    await asyncio.gather(*tasks)
    for c in clients:
        if c.chan is not None:
            # Ctrl-C ends a bulk loop (and clears a half-typed line), then the shell exits
            c.chan.write(b"\x03")
    await asyncio.sleep(1.0)
    for c in clients:
        if c.chan is not None:
            c.chan.write(b"exit 0\r")
    stuck: list[str] = []
    for round_ in range(3):  # a shell that missed its exit (rare, on a loaded machine) is told again
        pending = [c for c in clients if c.chan is not None and not c.shell.closed.is_set()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.shell.closed.wait() for c in pending)), 60)
        if round_ == 0:
            stuck = await _sockets([c for c in pending if not c.shell.closed.is_set()])
        for c in pending:
            if c.chan is not None and not c.shell.closed.is_set():
                c.chan.write(b"\x03exit 0\r")
    for c in clients:
        if c.conn is not None:
            c.conn.close()
    say(event="done", stuck_sockets=stuck, sessions=[
        {"user": c.user, "kind": c.kind, "error": c.error, "exit": c.shell.exit,
         "closed": c.shell.closed.is_set(),
         "out_n": c.shell.out_n, "out_sha": c.shell.out.hexdigest(),
         "err_n": c.shell.err_n, "err_sha": c.shell.err.hexdigest(),
         "kept": None if c.shell.kept is None else [base64.b64encode(b).decode()
                                                    for b in c.shell.kept]}
        for c in clients])


# -- the broker's processes --------------------------------------------------------------------

def broker_pids(root: int) -> list[int]:
    """The demo process and its broker workers (forks of it), not its sshd targets."""
    out = [root]
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            if b"bastion-broker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
    return out


def target_mem(root: int) -> tuple[int, int, int]:
    """(RSS, PSS, processes) of everything below the demo that is not the broker (sshd, shells)."""
    mine = set(broker_pids(root))
    rss = pss = n = 0
    for pid in descendants(root):
        if pid not in mine:
            r, p = mem_kib(pid)
            rss, pss, n = rss + r, pss + p, n + 1
    return rss, pss, n


def renice(pid: int, value: int) -> None:
    """Every thread of ``pid`` (Linux applies niceness per thread; new ones inherit it)."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(tid), value)


def autogroup_nice(pid: int, value: int) -> None:
    """The niceness of ``pid``'s scheduler autogroup (its session's). With autogroups on, the
    kernel first shares the CPU between sessions, then by niceness inside each: on a machine
    shared with other jobs, only this lets a process go ahead of the others' sessions."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(value))


def target_listeners(root: int) -> list[int]:
    """The demo's sshd listeners (their session processes inherit their niceness)."""
    out = []
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            if b"[listener]" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
    return out


def unnice_probe(root: int, deadline: float, value: int) -> bool:
    """Give the probe's client and target side (its ``ssh``, its ``cat`` and the sshd processes
    above it) niceness ``value``: on a real bastion they are other machines, not ones sharing
    the load's CPU."""
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "ssh":
                renice(pid, value)
                autogroup_nice(pid, value)  # this process's session (the load is niced in it)
    listeners = set(target_listeners(root))
    while time.monotonic() < deadline:
        for pid in descendants(root):
            with contextlib.suppress(OSError, ValueError):
                if Path(f"/proc/{pid}/comm").read_text().strip() != "cat":
                    continue
                p = pid
                for _ in range(10):
                    if p in listeners or p <= 1:
                        return True
                    renice(p, value)
                    autogroup_nice(p, value)  # sshd starts a session per connection
                    stat = Path(f"/proc/{p}/stat").read_text()
                    p = int(stat[stat.rindex(")") + 2:].split()[1])
        time.sleep(0.02)
    return False


def cpu_of(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = cpu_seconds(pid)
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two ``cpu_of`` of the processes alive at both (the shells, their
    sshd and the load processes live through the window)."""
    return sum(after[p] - before[p] for p in before.keys() & after.keys())


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


@dataclass
class Sample:
    rss_kib: int
    pss_kib: int
    fds: int
    threads: int


def sample(pids: list[int]) -> Sample:
    rss = pss = fds = threads = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            r, p = mem_kib(pid)
            rss, pss = rss + r, pss + p
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            threads += status_field(pid, "Threads")
    return Sample(rss, pss, fds, threads)


def broker_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def sync_lag(diag_url: str, workers: int) -> float | None:
    """The largest ``bastion_broker_recording_sync_lag_seconds`` over the workers' /metrics."""
    base, port = diag_url.rsplit(":", 1)
    worst: float | None = None
    for i in range(workers):
        try:
            with urllib.request.urlopen(f"{base}:{int(port) + i}/metrics", timeout=5) as r:  # noqa: S310
                text = r.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("bastion_broker_recording_sync_lag_seconds "):
                v = float(line.split()[1])
                worst = v if worst is None else max(worst, v)
    return worst


# -- bytes: clients against recordings ---------------------------------------------------------

def recordings_by_user(root: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for rec in root.rglob("*.rec"):
        with open(rec, "rb") as f:
            meta = fmt.FrameReader(f, os.fstat(f.fileno()).st_size).meta
        out.setdefault(str(meta["user"]).split("@")[0], []).append(rec)
    return out


def recorded(rec: Path, keep: bool) -> tuple[int, str, int, str, bool, tuple[bytes, bytes]]:
    """(OUTPUT bytes, their SHA-256, ERROR bytes, theirs, torn last frame, with ``keep`` the
    OUTPUT and ERROR bytes themselves), frame by frame."""
    out, err = hashlib.sha256(), hashlib.sha256()
    out_n = err_n = 0
    kept: tuple[list[bytes], list[bytes]] = ([], [])
    with open(rec, "rb") as f:
        reader = fmt.FrameReader(f, os.fstat(f.fileno()).st_size)
        for frame in reader.frames:
            if frame.kind == fmt.OUTPUT:
                out.update(frame.data)
                out_n += len(frame.data)
            elif frame.kind == fmt.ERROR:
                err.update(frame.data)
                err_n += len(frame.data)
            if keep and frame.kind in (fmt.OUTPUT, fmt.ERROR):
                kept[frame.kind == fmt.ERROR].append(frame.data)
    return (out_n, out.hexdigest(), err_n, err.hexdigest(), reader.truncated,
            (b"".join(kept[0]), b"".join(kept[1])))


def compare(recordings: Path, sessions: list[dict[str, Any]]) -> dict[str, Any]:
    by_user = recordings_by_user(recordings)
    received = recorded_total = lost = 0
    bad: list[str] = []
    for s in sessions:
        if s["error"]:
            continue
        received += s["out_n"] + s["err_n"]
        recs = by_user.get(s["user"], [])
        if len(recs) != 1:
            bad.append(f"{s['user']}: {len(recs)} recordings")
            lost += s["out_n"] + s["err_n"]
            continue
        out_n, out_sha, err_n, err_sha, torn, rec_bytes = recorded(recs[0], bool(s["kept"]))
        recorded_total += out_n + err_n
        if (out_n, out_sha, err_n, err_sha) != (s["out_n"], s["out_sha"], s["err_n"],
                                                s["err_sha"]) or torn:
            if s["kept"]:  # what the client got that the recording does not hold, in order
                got = [base64.b64decode(b) for b in s["kept"]]
                common = [common_prefix(g, r) for g, r in zip(got, rec_bytes, strict=True)]
                missing = sum(len(g) - c for g, c in zip(got, common, strict=True))
                extra = sum(len(r) - c for r, c in zip(rec_bytes, common, strict=True))
            else:  # a hash cannot say which bytes differ: what the client had beyond the file
                missing = max(0, s["out_n"] - out_n) + max(0, s["err_n"] - err_n)
                extra = -1
            lost += missing
            bad.append(f"{s['user']} ({s['kind']}, closed {s['closed']}): client "
                       f"{s['out_n']}+{s['err_n']} B, recording {out_n}+{err_n} B, missing "
                       f"{missing}, recording beyond the client {extra}, torn {torn}")
    return {"bytes_received": received, "bytes_recorded": recorded_total,
            "bytes_lost": lost, "mismatches": bad}


# -- orchestration -----------------------------------------------------------------------------

class _ProbeEnv:
    """What ``bench.run.echo_samples`` asks of its environment: the OpenSSH command for a PTY
    session through the broker, as one more demo user."""

    def __init__(self, demo: Demo, user: str) -> None:
        self._demo, self._user = demo, user

    def ssh(self, _path: str, **_kw: Any) -> tuple[list[str], dict[str, str]]:
        args = self._demo.ssh_args(f"{self._user}+{TARGET}", "-tt", "-q",
                                   "-o", f"Ciphers={CIPHER}", "-o", f"KexAlgorithms={KEX}")
        return args, self._demo.env(self._user)


def mix(n: int, typing: float, bulk: int) -> list[str]:
    kinds = ["bulk"] * min(bulk, n) + ["typing"] * round(n * typing)
    kinds = kinds[:n] + ["idle"] * (n - len(kinds))
    random.Random(0).shuffle(kinds)
    return kinds


def _child_proc(spec: dict[str, Any]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, __file__, "--child"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.flush()
    return proc


def _event(proc: subprocess.Popen[str], want: str) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"load process {proc.pid} exited ({proc.wait()}) before {want!r}")
    event: dict[str, Any] = json.loads(line)
    if event.get("event") != want:
        raise RuntimeError(f"load process: expected {want!r}, got {event!r}")
    return event


def _tell(procs: list[subprocess.Popen[str]], word: str) -> None:
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(word + "\n")
        p.stdin.flush()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"sessions": args.sessions, "workers": args.workers,
                           "seconds": args.seconds, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bb-capacity-") as tmp:
        demo = start_demo(Path(tmp) / "state", users=args.sessions + 10, workers=args.workers,
                          new_session=True)
        children: list[subprocess.Popen[str]] = []
        listeners: list[int] = []
        try:
            time.sleep(2.0)
            pids = broker_pids(demo.proc.pid)
            for pid in pids:
                renice(pid, args.broker_nice)
            autogroup_nice(demo.proc.pid, args.broker_nice)  # the broker's session: its own
            listeners = target_listeners(demo.proc.pid)
            fresh = sample(pids)
            res["fresh"] = vars(fresh)
            res["broker_processes"] = len(pids)
            users = [u for u in demo.info["users"] if u["user"] != "alice"]
            probe_user = users.pop()["user"]
            kinds = mix(args.sessions, args.typing, args.bulk)
            load = [{**u, "kind": k} for u, k in zip(users, kinds, strict=False)]
            per = max(1, args.login_concurrency // args.load_procs)
            for pid in listeners:
                renice(pid, args.nice)
            t0, cpu0 = time.monotonic(), broker_cpu(pids)
            for i in range(args.load_procs):
                children.append(_child_proc({
                    "users": load[i::args.load_procs], "port": demo.port,
                    "login_concurrency": per, "bulk_rate": args.bulk_rate,
                    "nice": args.nice}))
            failed: list[str] = []
            for p in children:
                failed += _event(p, "ready")["failed"]
            login_s = time.monotonic() - t0
            res["login_seconds"] = round(login_s, 1)
            res["logins_per_second"] = round((args.sessions - len(failed)) / login_s, 1)
            res["login_broker_cpu_ms"] = round(
                (broker_cpu(pids) - cpu0) * 1000 / max(1, args.sessions - len(failed)), 1)
            res["open_failed"] = failed
            log(f"{args.sessions - len(failed)} shells up in {login_s:.0f} s "
                f"({len(failed)} failed)")
            time.sleep(5.0)
            pids = broker_pids(demo.proc.pid)
            idle = sample(pids)
            res["idle"] = vars(idle)
            trss, tpss, tn = target_mem(demo.proc.pid)
            res["target"] = {"rss_kib": trss, "pss_kib": tpss, "processes": tn}
            log(f"idle: broker RSS {idle.rss_kib} KiB, PSS {idle.pss_kib} KiB, {idle.fds} fds, "
                f"{idle.threads} threads; target side {tn} processes, PSS {tpss} KiB")

            echo: list[float] = []
            echo_err: list[str] = []

            def probe() -> None:
                try:
                    echo.extend(echo_samples(cast(Any, _ProbeEnv(demo, probe_user)), "broker",
                                             int(args.seconds / (ECHO_GAP + 0.003)), ECHO_GAP))
                except (RuntimeError, OSError) as exc:
                    echo_err.append(str(exc))

            _tell(children, "go")
            thread = threading.Thread(target=probe, daemon=True)
            thread.start()
            if args.nice or args.broker_nice:
                res["probe_reniced"] = unnice_probe(demo.proc.pid, time.monotonic() + 30,
                                                    args.broker_nice)
            time.sleep(1.0)  # the bulk shells' printers have started
            others = [p for p in descendants(demo.proc.pid) if p not in set(pids)]
            load_pids = [c.pid for c in children]
            t1, cpu1, busy1 = time.monotonic(), broker_cpu(pids), machine_busy_seconds()
            others1, load1 = cpu_of(others), cpu_of(load_pids)
            samples: list[Sample] = []
            lags: list[float] = []
            # the window: --seconds, and until the probe has taken its samples
            for _ in range(int((args.seconds + 120) / SAMPLE_EVERY)):
                if time.monotonic() - t1 >= args.seconds and not thread.is_alive():
                    break
                samples.append(sample(pids))
                lag = sync_lag(str(demo.info["diag_url"]), args.workers)
                if lag is not None:
                    lags.append(lag)
                time.sleep(SAMPLE_EVERY)
            wall = time.monotonic() - t1
            res["window_seconds"] = round(wall, 1)
            res["cpu_percent_of_core"] = round(100 * (broker_cpu(pids) - cpu1) / wall, 1)
            res["target_cpu_percent_of_core"] = round(
                100 * cpu_delta(others1, cpu_of(others)) / wall, 1)
            res["load_procs_cpu_percent_of_core"] = round(
                100 * cpu_delta(load1, cpu_of(load_pids)) / wall, 1)
            res["machine_busy_percent"] = round(
                100 * (machine_busy_seconds() - busy1) / wall / (os.cpu_count() or 1), 1)
            res["load_during"] = os.getloadavg()
            _tell(children, "stop")
            res["active_max"] = {
                "rss_kib": max(s.rss_kib for s in samples),
                "pss_kib": max(s.pss_kib for s in samples),
                "fds": max(s.fds for s in samples),
                "threads": max(s.threads for s in samples)}
            res["sync_lag_s"] = ({"p50": round(percentile(lags, 50), 3),
                                  "p99": round(percentile(lags, 99), 3),
                                  "max": round(max(lags), 3), "samples": len(lags)}
                                 if lags else None)
            res["echo_ms"] = ({"p50": round(percentile(echo, 50), 3),
                               "p99": round(percentile(echo, 99), 3),
                               "max": round(max(echo), 3), "samples": len(echo)}
                              if echo else None)
            res["echo_errors"] = echo_err
            res["echo_samples_ms"] = [round(v, 3) for v in echo]
            sessions: list[dict[str, Any]] = []
            res["stuck_sockets"] = []
            for p in children:
                done = _event(p, "done")
                sessions += done["sessions"]
                res["stuck_sockets"] += done["stuck_sockets"]
                p.wait(60)
            res["exit_codes"] = {}
            for s in sessions:
                key = str(s["exit"]) if s["closed"] else "not closed"
                res["exit_codes"][key] = res["exit_codes"].get(key, 0) + 1
            res["bytes"] = compare(demo.state_dir / "recordings", sessions)
            res["bytes_by_kind"] = {k: sum(s["out_n"] + s["err_n"] for s in sessions
                                           if s["kind"] == k) for k in ("idle", "typing", "bulk")}
            res["kinds"] = {k: kinds.count(k) for k in ("idle", "typing", "bulk")}
            res["load_after"] = os.getloadavg()
            broker_log = demo.broker_log()
            res["traceback_in_log"] = "Traceback" in broker_log
            res["broker_log_problems"] = [line for line in broker_log.splitlines()
                                          if '"level": "error"' in line
                                          or '"level": "warning"' in line][:30]
        finally:
            for p in children:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
            stop(demo, listeners)
    return res


def stop(demo: Demo, listeners: list[int]) -> None:
    """Stop the demo; it may take minutes after 1,000 sessions (each ended session's recording
    is rendered and sealed in the background), more than ``stop_demo`` waits before it kills
    the demo, which would leave its sshd targets behind: those are stopped here too."""
    demo.proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        demo.proc.wait(300)
    stop_demo(demo)
    for pid in listeners:
        with contextlib.suppress(OSError):
            if b"[listener]" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)


def row(r: dict[str, Any]) -> str:
    echo, lag = r["echo_ms"] or {}, r["sync_lag_s"] or {}
    mib = 1 << 10
    return (f"| {r['sessions']} | {r['workers']} | {r['idle']['rss_kib'] / mib:.0f} / "
            f"{r['idle']['pss_kib'] / mib:.0f} | {r['active_max']['rss_kib'] / mib:.0f} / "
            f"{r['active_max']['pss_kib'] / mib:.0f} | {r['cpu_percent_of_core']} | "
            f"{echo.get('p50')} / {echo.get('p99')} | {lag.get('p99')} / {lag.get('max')} | "
            f"{r['bytes']['bytes_lost']} of {r['bytes']['bytes_received']:,} | "
            f"{r['idle']['fds']} | {r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sessions", type=int, default=1000, help="concurrent shells (1000)")
    ap.add_argument("--workers", type=int, default=1, help="[ssh] workers of the broker (1)")
    ap.add_argument("--seconds", type=float, default=60.0, help="activity window (60)")
    ap.add_argument("--typing", type=float, default=0.05,
                    help="share of the shells typing, ~5 keys/s each (0.05)")
    ap.add_argument("--bulk", type=int, default=10, help="shells printing bulk output (10)")
    ap.add_argument("--bulk-rate", type=int, default=1 << 20,
                    help="bytes a second each bulk shell prints (1 MiB)")
    ap.add_argument("--load-procs", type=int, default=2, help="asyncssh load processes (2)")
    ap.add_argument("--login-concurrency", type=int, default=8,
                    help="logins in flight, all processes together (8; the broker allows 10 "
                         "per source address)")
    ap.add_argument("--nice", type=int, default=10,
                    help="niceness of the load processes and the target's sshd (10; 0: none): "
                         "clients and targets are other machines on a real bastion")
    ap.add_argument("--broker-nice", type=int, default=0,
                    help="niceness of the broker and the echo probe's client and target, and "
                         "of their scheduler autogroups (0; -10 approximates a broker with a "
                         "machine of its own on a machine shared with other jobs)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(sys.stdin.readline())
        asyncio.run(_child(spec))
        return 0
    if not 1 <= args.sessions <= 5000 or not 1 <= args.login_concurrency <= 9:
        ap.error("--sessions must be 1..5000 and --login-concurrency 1..9")
    signal.signal(signal.SIGTERM, _on_sigterm)  # unwinds through measure's cleanup
    res = measure(args)
    res["command"] = ".venv/bin/python bench/capacity.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"capacity-{stamp}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(row(res))
    ok = (res["bytes"]["bytes_lost"] == 0 and not res["bytes"]["mismatches"]
          and not res["open_failed"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
