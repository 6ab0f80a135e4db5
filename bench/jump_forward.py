"""Benchmark: a port forward *inside* a ProxyJump (VS Code Remote-SSH's path), OpenSSH vs broker.

``ssh -J BASTION -N -L PORT:127.0.0.1:SINK web01``: the forward goes to the target's own
loopback. (a) Through an OpenSSH sshd bastion the inner connection ends at web01's sshd, which
opens the forward itself. (b) Through the broker the inner connection is terminated (recorded
jump) and the broker opens the forward from web01 over its own forwarding connection
(``broker/ssh/via_target.py``), one per client connection. Measured in one run, paths
alternating: the time to open a forwarded TCP connection, send a request and get its answer (what
every new VS Code or browser connection waits for; median and p90 of CONNECTS), then SIZE bytes down
and up per round (medians of ROUNDS). The section is written to ``docs/benchmarks.md``.

Usage (repository root, as root: the demo creates its target accounts)::

    .venv/bin/python bench/jump_forward.py               # 256 MiB, 5 rounds, 200 connects
    .venv/bin/python bench/jump_forward.py --size 32M --rounds 1 --connects 20 --no-docs
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forward as fw
from run import free_port, log, parse_size

BEGIN = "<!-- BEGIN jump_forward.py -->"
END = "<!-- END jump_forward.py -->"


def start_forward(procs: fw.Procs, work: Path, name: str, config: Path,
                  env: dict[str, str] | None, sink: int) -> int:
    """``ssh -F config -N -L LP:127.0.0.1:SINK web01`` in the background; returns LP."""
    lp = free_port()
    log_path = work / f"ssh-{name}.log"
    procs.start(["ssh", "-F", str(config), "-N", "-v", "-o", "ExitOnForwardFailure=yes",
                 "-L", f"127.0.0.1:{lp}:127.0.0.1:{sink}", "web01"], log_path, env=env)
    deadline = time.monotonic() + 60
    while f"forwarding listening on 127.0.0.1 port {lp}" not in log_path.read_text(
            errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} forward did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    fw.transfer(lp, "D", 1)  # the first connection also opens the broker's forwarding link
    return lp


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=256 << 20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connects", type=int, default=200)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    if args.rounds < 1 or args.connects < 1:
        ap.error("--rounds and --connects must be at least 1")
    procs = fw.Procs()
    srv = subprocess.Popen([sys.executable, fw.__file__, "--sink"], stdout=subprocess.PIPE,
                           stdin=subprocess.DEVNULL)
    if srv.stdout is None:
        raise RuntimeError("no sink")
    sink = int(srv.stdout.readline())
    paths = ("openssh", "broker")
    connect: dict[str, list[float]] = {p: [] for p in paths}
    secs: dict[str, dict[str, list[float]]] = {p: {"D": [], "U": []} for p in paths}
    with tempfile.TemporaryDirectory(prefix="bb-jumpfwd-") as tmp:
        try:
            work = Path(tmp)
            _, bastion_port = fw.openssh_forward(work, procs, sink)
            _, broker_port, info = fw.broker_forward(work, procs, sink)
            os_cfg, bb_cfg = fw.jump_configs(work, broker_port, bastion_port, info)
            cfg, env = fw.JumpLogins(work, info, bb_cfg).next()
            ports = {"openssh": start_forward(procs, work, "openssh", os_cfg, None, sink),
                     "broker": start_forward(procs, work, "broker", cfg, env, sink)}
            for i in range(args.connects):  # alternating, one connection at a time
                for p in paths if i % 2 == 0 else paths[::-1]:
                    connect[p].append(fw.transfer(ports[p], "U", 1))  # 10 bytes, then "K"
            for r in range(args.rounds):
                for p in paths if r % 2 == 0 else paths[::-1]:
                    for d in ("D", "U"):
                        t = fw.transfer(ports[p], d, args.size)
                        secs[p][d].append(t)
                        log(f"round {r + 1} {p:8} {'down' if d == 'D' else 'up':4} "
                            f"{args.size / t / 1e6:8.1f} MB/s")
        finally:
            procs.stop_all()
            srv.terminate()
            srv.wait()
    ms = {p: (statistics.median(v) * 1e3, pct(v, 0.9) * 1e3) for p, v in connect.items()}
    mbps = {p: {d: args.size / statistics.median(v) / 1e6 for d, v in dirs.items()}
            for p, dirs in secs.items()}
    size = f"{args.size >> 20} MiB"
    rows = [f"| open a forwarded connection, request and answer (median / p90 of {args.connects}) "
            f"| {ms['openssh'][0]:.2f} / {ms['openssh'][1]:.2f} ms "
            f"| {ms['broker'][0]:.2f} / {ms['broker'][1]:.2f} ms "
            f"| {ms['broker'][0] / ms['openssh'][0]:.2f}x the time |"]
    for d, name in (("D", "down (target's loopback -> client)"), ("U", "up (client -> target)")):
        rows.append(f"| {size} {name} | {mbps['openssh'][d]:.0f} MB/s | "
                    f"{mbps['broker'][d]:.0f} MB/s | {mbps['broker'][d] / mbps['openssh'][d]:.2f}x |")
    section = (
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on this machine "
        f"({os.cpu_count()} cores, Python {platform.python_version()}): `ssh -J BASTION -N -L "
        "PORT:127.0.0.1:SINK web01`, a forward to the target's own loopback inside the jump "
        f"(VS Code Remote-SSH's path), {fw.CIPHER}; connections one at a time, then {size} "
        f"each way per round, median of {args.rounds} alternating rounds.\n\n"
        "Command: `.venv/bin/python bench/jump_forward.py`\n\n"
        "| measure | (a) OpenSSH bastion (forward opened by the target's sshd) | (b) broker "
        "(recorded jump, forward opened from the target by the broker) | b/a |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        + fw.rounds(args.size, secs, "DU"))
    print(section)
    if not args.no_docs:
        fw.write_block(section, BEGIN, END, "## SFTP file-transfer audit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
