"""Benchmark (issue 6): what session recording costs in exec-stream throughput.

One run starts ``bastion-broker demo`` (recording on) and, sharing its state (users, TOTP, grants,
inventory, targets), a second broker via ``bastion-broker --config COPY serve`` whose config is the
demo's ``broker.toml`` with another port, no web API, its own audit file and the benchmark-only
switch ``[recordings] enabled = false`` / ``allow_unrecorded = true``. Both are measured in
alternating rounds (order rotated) with 1 GiB downloads (``head -c 1G /dev/zero``) and uploads
(``cat > /dev/null``) over OpenSSH ControlMaster connections; the goal is recording <= 15% cost.
The section ``## Recording cost (issue 6)`` of docs/benchmarks.md is replaced with the results.

Usage (from the repository root, with the project's virtualenv; needs OpenSSH and root)::

    .venv/bin/python bench/recording_cost.py            # 1 GiB, 5 rounds, updates the docs
    .venv/bin/python bench/recording_cost.py --quick    # 256 MiB, 3 rounds, no docs update
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base  # bench/run.py: processes, TOTP pool, ssh, transfers

from broker.config import load_config

SECTION = "## Recording cost (issue 6)"
MODES = ("recorded", "unrecorded")
KINDS = ("download", "upload")
GOAL = 0.15  # recording may cost at most this share of throughput
log = base.log


@dataclass
class Bench:
    work: Path
    procs: base.Procs
    envs: dict[str, base.Env] = field(default_factory=dict)
    audit_unrecorded: Path = Path()


def _files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file()] if d.is_dir() else []


def _ssh_config(work: Path, name: str, port: int) -> Path:
    """An OpenSSH client config whose host ``broker`` is the broker on ``port``."""
    cfg = work / f"ssh_config_{name}"
    cfg.write_text("\n".join([
        "Host broker", "  HostName 127.0.0.1", f"  Port {port}",
        "  PreferredAuthentications keyboard-interactive", "  BatchMode no",
        f"  UserKnownHostsFile {work / 'known_hosts'}", "  StrictHostKeyChecking accept-new",
        f"  Ciphers {base.CIPHER}", f"  KexAlgorithms {base.KEX}", "  Compression no",
        "  LogLevel ERROR", "  ServerAliveInterval 0", "  ConnectTimeout 30", "",
    ]))
    return cfg


def unrecorded_config(state: Path, work: Path) -> tuple[Path, Path, Path]:
    """The demo's broker.toml with port 0, web off, recording off and its own audit file.

    Written next to the original so that its relative paths (users, inventory) stay the same.
    Returns (config, recordings dir, audit file).
    """
    src = state / "broker.toml"
    text = src.read_text()
    raw = tomllib.loads(text)
    for key in ("recordings", "audit"):
        if key in raw:
            raise RuntimeError(f"{src} already has a [{key}] section: extend this benchmark")
    rec_dir, audit = work / "unrecorded-recordings", work / "unrecorded-audit" / "audit.jsonl"
    out, section = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped.strip("[]")
            out.append(line)
            if section == "web":
                out.append("enabled = false")
            continue
        if section == "ssh" and stripped.startswith("listen_port"):
            line = "listen_port = 0"
        out.append(line)
    if "web" not in raw:
        out += ["", "[web]", "enabled = false"]
    out += ["", "# benchmark only: the same broker without recording",
            "[recordings]", "enabled = false", "allow_unrecorded = true",
            f"dir = {json.dumps(str(rec_dir))}", "", "[audit]", f"path = {json.dumps(str(audit))}",
            ""]
    cfg = state / "broker-unrecorded.toml"
    cfg.write_text("\n".join(out))
    loaded = load_config(cfg)  # fail here, not in the broker, if the copy is wrong
    if (loaded.recordings.enabled or not loaded.recordings.allow_unrecorded or loaded.web.enabled
            or loaded.ssh.listen_port != 0 or loaded.state_dir != load_config(src).state_dir):
        raise RuntimeError(f"{cfg}: the unrecorded config did not come out as intended")
    return cfg, rec_dir, audit


def _listening_port(log_path: Path, proc: Any, timeout: float = 60) -> int:
    """The port from the broker's ``broker.listening`` log line."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        if proc.poll() is not None:
            raise RuntimeError(f"the unrecorded broker exited: {log_path.read_text()[-2000:]}")
        for line in log_path.read_text(errors="replace").splitlines():
            if '"broker.listening"' in line:
                return int(json.loads(line)["port"])
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the unrecorded broker did not listen; see {log_path}")


def setup(args: argparse.Namespace, procs: base.Procs) -> Bench:
    work = Path(tempfile.mkdtemp(prefix="bb-reccost-"))
    os.chmod(work, 0o755)  # noqa: S103 - like bench/run.py
    log(f"work directory {work}")
    state = work / "demo-state"
    info = base.start_demo(procs, work, state, "--users", str(args.users), "--workers", "1")
    broker_bin = Path(sys.executable).parent / "bastion-broker"
    log(f"recorded broker (demo) on port {info['ssh_port']}, pid {info['pid']}")

    cfg, rec_dir, audit = unrecorded_config(state, work)
    serve_log = work / "unrecorded.log"
    serve_log.touch()
    serve = procs.start("broker unrecorded", [str(broker_bin), "--config", str(cfg), "serve"],
                        serve_log)
    port = _listening_port(serve_log, serve)
    log(f"unrecorded broker on port {port}, pid {serve.pid}")

    askpass = work / "askpass.sh"
    askpass.write_text('#!/bin/sh\ncase "$1" in\n  *erification*) printf \'%s\\n\' "$BB_CODE" ;;\n'
                       '  *) printf \'%s\\n\' "$BB_PASSWORD" ;;\nesac\n')
    os.chmod(askpass, 0o700)
    pool = base.UserPool(info["users"])  # one pool: both brokers share the TOTP replay state
    bench = Bench(work, procs, audit_unrecorded=audit)
    for mode, pid, p, rec in (("recorded", int(info["pid"]), int(info["ssh_port"]),
                               state / "recordings"),
                              ("unrecorded", serve.pid, port, rec_dir)):
        # base.Env drives the "broker" path only here: the OpenSSH baseline fields stay unused
        bench.envs[mode] = base.Env(
            work=work, procs=procs, ssh_config=_ssh_config(work, mode, p), key=work / "unused",
            login=str(info["read_only_login"]), broker_pid=pid, broker_port=p,
            broker_target=str(info["targets"][0]), recordings=rec, jump_pid=0, direct_port=0,
            jump_port=0, askpass=askpass, pool=pool, target_pids={})
    return bench


def start_master(env: base.Env, mode: str) -> None:
    """One authenticated ControlMaster connection to a broker, reused by every transfer."""
    sock = env.work / f"mux-{mode}"
    env.mux["broker"] = sock
    cmd, penv = env.ssh("broker", login=env.pool.take())
    cmd[-1:-1] = ["-N", "-o", "ControlMaster=yes", "-o", f"ControlPath={sock}"]
    proc = env.procs.start(f"ssh master {mode}", cmd, env.work / f"master-{mode}.log", env=penv)
    for _ in range(600):
        if sock.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    check = base.run(["ssh", "-F", str(env.ssh_config), "-o", f"ControlPath={sock}",
                      "-O", "check", "x"], 10)
    if check.returncode != 0:
        raise RuntimeError(f"ControlMaster for {mode} did not come up: "
                           f"{(env.work / f'master-{mode}.log').read_text()[-500:]}")


def sanity(env: base.Env, mode: str) -> None:
    """The broker returns exactly the bytes asked for."""
    n = 1 << 20
    cmd, penv = env.ssh("broker", mux=True)
    rc, out, err = base.run_held([*cmd, f"head -c {n} /dev/zero"], penv, 60)
    if rc != 0 or len(out) != n:
        raise RuntimeError(f"{mode}: sanity download got {len(out)} bytes, rc {rc}: {err[-300:]!r}")


def check_recording(bench: Bench, mode: str) -> int:
    """After a transfer: the recorded broker wrote a recording (its byte count is returned), the
    unrecorded one wrote none, neither in its own directory nor in the demo's."""
    rec, unrec = bench.envs["recorded"].recordings, bench.envs["unrecorded"].recordings
    if mode == "unrecorded":
        stray = _files(unrec) + _files(rec)
        if stray:
            raise RuntimeError(f"the unrecorded broker left recording files: {stray[:3]}")
        return 0
    size = sum(p.stat().st_size for p in _files(rec))
    if size == 0:
        raise RuntimeError(f"the recorded broker wrote no recording into {rec}")
    return size


def wait_sealed(env: base.Env, timeout: float = 300) -> float:
    """Wait until the recording's manifest is written (the broker seals it after the session has
    ended; deleting earlier makes the seal fail); returns the broker CPU seconds meanwhile."""
    cpu0 = base.cpu_seconds(env.broker_pid)
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        if any(p.name.endswith(".manifest.json") for p in _files(env.recordings)):
            return base.cpu_seconds(env.broker_pid) - cpu0
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RuntimeError(f"no sealed recording (manifest) in {env.recordings} after {timeout}s")


def unrecorded_session_starts(audit: Path) -> tuple[int, int]:
    """(session.start events saying recorded=false, all session.start events) in an audit file."""
    unrecorded = total = 0
    for line in audit.read_text(errors="replace").splitlines() if audit.exists() else ():
        if "session.start" not in line:
            continue
        event = json.loads(line)
        if "session.start" in (event.get("event"), event.get("type"), event.get("action")):
            total += 1
            unrecorded += event.get("recorded") is False
    return unrecorded, total


@dataclass
class Results:
    mibs: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # kind -> mode -> MiB/s
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # share of one core
    cpu_s_gib: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # CPU s per GiB
    seal_cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # CPU s, seal wait
    extra: dict[str, Any] = field(default_factory=dict)

    def med(self, table: str, kind: str, mode: str) -> float | None:
        vals = getattr(self, table).get(kind, {}).get(mode)
        return statistics.median(vals) if vals else None


def run_all(args: argparse.Namespace) -> Results:
    res = Results()
    res.extra["load_before"] = os.getloadavg()
    procs = base.Procs()
    bench: Bench | None = None
    try:
        bench = setup(args, procs)
        for mode, env in bench.envs.items():
            start_master(env, mode)
            sanity(env, mode)
        for env in bench.envs.values():
            env.clear_recordings()
        rec_bytes: list[int] = []
        for r in range(args.rounds):
            order = MODES[r % 2:] + MODES[:r % 2]
            log(f"round {r + 1}/{args.rounds}: order {', '.join(order)}")
            for kind in KINDS:
                for mode in order:
                    env = bench.envs[mode]
                    base.check_disk(env, args.size)
                    secs, cpu = base.transfer(env, "broker", kind, args.size)
                    speed = args.size / secs / (1 << 20)
                    res.mibs.setdefault(kind, {}).setdefault(mode, []).append(speed)
                    res.cpu.setdefault(kind, {}).setdefault(mode, []).append(cpu / secs)
                    res.cpu_s_gib.setdefault(kind, {}).setdefault(mode, []).append(
                        cpu * (1 << 30) / args.size)
                    seal = wait_sealed(env) if mode == "recorded" else 0.0
                    size = check_recording(bench, mode)
                    if size:
                        rec_bytes.append(size)
                        res.seal_cpu.setdefault(kind, {}).setdefault(mode, []).append(seal)
                    env.clear_recordings()
                    log(f"  {kind:8s} {mode:10s} {speed:8.1f} MiB/s  broker CPU {cpu / secs:.0%}"
                        + (f"  recording {size >> 20} MiB" if size else ""))
        unrec, starts = unrecorded_session_starts(bench.audit_unrecorded)
        if starts == 0 or unrec != starts:
            raise RuntimeError(f"unrecorded broker audit: {unrec} of {starts} session.start "
                               "events say recorded=false")
        res.extra.update(
            recording_mib_max=max(rec_bytes) / (1 << 20), unrecorded_starts=starts,
            totp_logins=bench.envs["recorded"].pool.used,
            lost_exit_status={m: dict(e.lost_status) for m, e in bench.envs.items()},
            load_after=os.getloadavg())
    finally:
        procs.stop_all()
        if bench is not None and not args.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
    return res


def _size_arg(n: int) -> str:
    """``n`` as ``head -c`` would be written by hand (1G, 256M)."""
    for suffix, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def render(res: Results, args: argparse.Namespace, command: str) -> str:
    size = base.human_size(args.size)
    rows = []
    for kind in KINDS:
        rec, unrec = res.med("mibs", kind, "recorded"), res.med("mibs", kind, "unrecorded")
        ratio = rec / unrec if rec is not None and unrec else None
        cost = 1 - ratio if ratio is not None else None
        met = "n/a" if cost is None else ("yes" if cost <= GOAL else "**no**")
        crec, cunrec = res.med("cpu", kind, "recorded"), res.med("cpu", kind, "unrecorded")
        rows.append(
            f"| {kind.capitalize()} {size} zeros | {base.fmt(rec)} | {base.fmt(unrec)} | "
            f"{base.fmt(ratio, 3)} | {base.fmt(None if cost is None else cost * 100)}% | "
            f"{met} | {base.fmt((crec or 0) * 100, 0)}% / {base.fmt((cunrec or 0) * 100, 0)}% | "
            f"{base.fmt(res.med('cpu_s_gib', kind, 'recorded'), 2)} / "
            f"{base.fmt(res.med('cpu_s_gib', kind, 'unrecorded'), 2)} |")
    per_round = [
        f"- {kind} MiB/s: " + "; ".join(
            f"{mode} " + " / ".join(base.fmt(v) for v in res.mibs.get(kind, {}).get(mode, []))
            for mode in MODES)
        for kind in KINDS
    ]
    lost = {m: v for m, v in (res.extra.get("lost_exit_status") or {}).items() if v}
    load_b, load_a = res.extra["load_before"], res.extra["load_after"]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        SECTION,
        "",
        f"Generated {now} by `{command}` (replaced on every run; bench/run.py's block is separate).",
        "",
        f"Machine: {base.machine()}. Client, both brokers and the targets on this machine "
        "(loopback); the machine is shared, so absolute rates move with its load.",
        "",
        "The same run measures the demo broker (recording on) and a second broker process "
        "(`bastion-broker --config COPY serve`, COPY = the demo's broker.toml with another port, "
        "no web API, its own audit file, and the benchmark-only `[recordings] enabled = false`, "
        "`allow_unrecorded = true`) sharing the demo's users, TOTP secrets, grants, inventory "
        f"and targets. {args.rounds} rounds, order alternated; each round one exec-channel "
        f"download (`head -c {_size_arg(args.size)} /dev/zero` to /dev/null) and one upload (`cat > "
        "/dev/null`) per broker over an OpenSSH ControlMaster connection "
        f"({base.CIPHER}). Medians. Broker CPU is user + system of the broker process during the "
        "transfer, as a share of one core (divided by wall time) and per GiB moved; CPU per GiB "
        "depends less on the machine's other load than the rates do.",
        "",
        "| Exec stream | Recorded, MiB/s | Unrecorded, MiB/s | Recorded / unrecorded | "
        "Recording cost | Goal <= 15% met | Broker CPU, share of a core | Broker CPU s per GiB |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
        *rows,
        "",
        "Checked during the run: after every recorded transfer a recording existed (largest "
        f"{base.fmt(res.extra.get('recording_mib_max'))} MiB; deleted before the next transfer); "
        "after every unrecorded transfer no recording file existed, and all "
        f"{res.extra.get('unrecorded_starts', 0)} session.start events of the unrecorded broker "
        f"say `recorded: false`. Broker CPU from the end of a recorded transfer until its "
        "recording was sealed (manifest written; not in the table), median: "
        + ", ".join(f"{k} {base.fmt(res.med('seal_cpu', k, 'recorded'), 2)} s" for k in KINDS)
        + f". TOTP logins used: {res.extra.get('totp_logins', 0)}. Exit "
        f"status lost (rc 255 with the success marker): {lost or 'none'}. Load average (1 / 5 / "
        f"15 min) {' / '.join(f'{x:.2f}' for x in load_b)} before, "
        f"{' / '.join(f'{x:.2f}' for x in load_a)} after.",
        "",
        "Per round:",
        "",
        *per_round,
        "",
    ])


def write_docs(section: str) -> None:
    """Replace this benchmark's section (up to the next ``## `` heading) or append it."""
    text = base.DOCS.read_text()
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
        if base.BEGIN in rest[:nxt if nxt >= 0 else len(rest)]:
            raise RuntimeError("the generated block of bench/run.py is inside this section")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    base.DOCS.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="256 MiB, 3 rounds, no docs update")
    p.add_argument("--size", type=base.parse_size, help="bytes per transfer (1G; quick 256M)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 5; quick 3)")
    p.add_argument("--users", type=int, default=50, help="demo users (TOTP codes are single use)")
    p.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                   help="update docs/benchmarks.md (default: yes, except with --quick)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    args = p.parse_args(argv)
    args.size = args.size or (256 << 20 if args.quick else 1 << 30)
    args.rounds = args.rounds or (3 if args.quick else 5)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    docs = (not args.quick) if args.docs is None else args.docs
    command = " ".join([".venv/bin/python bench/recording_cost.py",
                        *(argv if argv is not None else sys.argv[1:])])
    signal.signal(signal.SIGTERM, base._on_sigterm)

    res = run_all(args)
    base.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = base.RESULTS / f"recording_cost-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "command": command, "mibs": res.mibs,
                               "cpu_share": res.cpu, "cpu_s_per_gib": res.cpu_s_gib,
                               "seal_cpu_s": res.seal_cpu,
                               "extra": res.extra}, indent=2))
    section = render(res, args, command)
    print(section)
    log(f"raw results in {out.relative_to(base.REPO)}")
    if docs:
        write_docs(section)
        log(f"updated {base.DOCS.relative_to(base.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
