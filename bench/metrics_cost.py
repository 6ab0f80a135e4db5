"""Benchmark (issue 16): what the diagnostics listener and its metrics cost on the relay path.

One run starts ``bastion-broker demo`` for its targets, users, TOTP secrets and grants, then three
more brokers sharing that state via ``bastion-broker --config COPY serve``: the same copy of the
demo's ``broker.toml`` (port 0, no web API, recording on, recordings and audit file of their
own), two with ``[diag] enabled = false`` (the second one an A/A control: how much two
identical broker processes differ here), one with ``[diag] enabled = true``, whose ``/metrics`` a
thread here scrapes every second for the whole run. OpenSSH straight to an sshd target (key
authentication) is the reference. Interleaved rounds (order rotated) measure bulk
copies (``head -c SIZE /dev/zero`` down, ``cat > /dev/null`` up) over OpenSSH ControlMaster
connections and the keystroke echo through a raw-mode PTY (``cat``). The section
``## Metrics cost (issue 16)`` of docs/benchmarks.md is replaced (or appended) with the results.

Usage (from the repository root, with the project's virtualenv; needs OpenSSH and root)::

    .venv/bin/python bench/metrics_cost.py            # 1 GiB, 5 rounds, 200 echoes, docs
    .venv/bin/python bench/metrics_cost.py --quick    # 256 MiB, 3 rounds, 100 echoes, no docs
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
import threading
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recording_cost as rc  # bench/recording_cost.py: the broker's log, docs sections
import run as base  # bench/run.py: processes, TOTP pool, ssh, transfers, echo

from broker.config import load_config
from broker.runtime import free_port

SECTION = "## Metrics cost (issue 16)"
PATHS = ("off", "off2", "on", "openssh")
BROKERS = ("off", "off2", "on")
LABEL = {"off": "broker A, [diag] off", "off2": "broker B, [diag] off",
         "on": "broker C, [diag] on + scraped 1/s", "openssh": "OpenSSH direct (reference)"}
KINDS = ("download", "upload")
log = base.log


def broker_config(state: Path, work: Path, name: str, diag_port: int | None) -> Path:
    """The demo's broker.toml with port 0, web off, its own recordings and audit file, and
    ``[diag]`` on (``diag_port``) or off. Written beside the original (same relative paths)."""
    src = state / "broker.toml"
    text = src.read_text()
    raw = tomllib.loads(text)
    for key in ("recordings", "audit"):
        if key in raw:
            raise RuntimeError(f"{src} already has a [{key}] section: extend this benchmark")
    if "diag" not in raw:
        raise RuntimeError(f"{src} has no [diag] section: this benchmark expects the demo's")
    rec, audit = work / f"rec-{name}", work / f"audit-{name}" / "audit.jsonl"
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
        if section == "diag" and stripped.startswith(("enabled", "listen_port")):
            continue
        if section == "diag" and stripped.startswith("listen_host"):
            out.append(f"enabled = {'true' if diag_port else 'false'}")
            if diag_port:
                out.append(f"listen_port = {diag_port}")
        out.append(line)
    out += ["", "[recordings]", f"dir = {json.dumps(str(rec))}", "",
            "[audit]", f"path = {json.dumps(str(audit))}", ""]
    cfg = state / f"broker-metrics-{name}.toml"
    cfg.write_text("\n".join(out))
    loaded = load_config(cfg)  # fail here, not in the broker, if the copy is wrong
    if (loaded.diag.enabled != bool(diag_port) or loaded.web.enabled
            or loaded.ssh.listen_port != 0 or not loaded.recordings.enabled
            or loaded.state_dir != load_config(src).state_dir):
        raise RuntimeError(f"{cfg}: the copy did not come out as intended")
    return cfg


@dataclass
class Scraper:
    """GET /metrics every ``interval`` seconds until stopped; counts and times the scrapes."""

    url: str
    interval: float = 1.0
    ok: int = 0
    failed: int = 0
    ms: list[float] = field(default_factory=list)
    size: int = 0
    last: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def scrape(self) -> str:
        t0 = time.perf_counter()
        with urllib.request.urlopen(self.url, timeout=10) as r:  # noqa: S310 - loopback
            body = r.read().decode()
        self.ms.append((time.perf_counter() - t0) * 1000)
        self.size = len(body)
        return body

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.last = self.scrape()
                self.ok += 1
            except OSError:
                self.failed += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)


def sample(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


@dataclass
class Bench:
    work: Path
    envs: dict[str, base.Env]
    scraper: Scraper
    pids: dict[str, int]


def setup(args: argparse.Namespace, procs: base.Procs) -> Bench:
    work = Path(tempfile.mkdtemp(prefix="bb-metricscost-"))
    os.chmod(work, 0o755)  # noqa: S103 - the target login reads authorized_keys
    log(f"work directory {work}")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    state = work / "demo-state"
    info = base.start_demo(procs, work, state, "--users", str(args.users), "--workers", "1")
    broker_bin = Path(sys.executable).parent / "bastion-broker"
    ports: dict[str, int] = {}
    pids: dict[str, int] = {}
    diag_port = free_port()
    for name in BROKERS:
        cfg = broker_config(state, work, name, diag_port if name == "on" else None)
        serve_log = work / f"broker-{name}.log"
        serve_log.touch()
        proc = procs.start(f"broker {name}", [str(broker_bin), "--config", str(cfg), "serve"],
                           serve_log)
        ports[name] = rc._listening_port(serve_log, proc)
        pids[name] = proc.pid
        log(f"broker [diag] {name} on port {ports[name]}, pid {proc.pid}")

    key = work / "client_key"
    base._keygen(key, "bench client")
    (work / "authorized_keys").write_text((work / "client_key.pub").read_text())
    os.chmod(work / "authorized_keys", 0o644)
    direct_port = free_port()
    target_pid = base.start_sshd(work, procs, "target", direct_port, forwarding=False)
    login = str(info["read_only_login"])

    askpass = work / "askpass.sh"
    askpass.write_text('#!/bin/sh\ncase "$1" in\n  *erification*) printf \'%s\\n\' "$BB_CODE" ;;\n'
                       '  *) printf \'%s\\n\' "$BB_PASSWORD" ;;\nesac\n')
    os.chmod(askpass, 0o700)
    pool = base.UserPool(info["users"])
    envs: dict[str, base.Env] = {}
    for name in PATHS:
        port = direct_port if name == "openssh" else ports[name]
        cfg = work / f"ssh_config_{name}"
        host = ["Host direct", "  HostName 127.0.0.1", f"  Port {port}", f"  User {login}",
                f"  IdentityFile {key}", "  IdentitiesOnly yes",
                "  PreferredAuthentications publickey", "  BatchMode yes"] \
            if name == "openssh" else \
            ["Host broker", "  HostName 127.0.0.1", f"  Port {port}",
             "  PreferredAuthentications keyboard-interactive", "  BatchMode no"]
        cfg.write_text("\n".join([
            *host, "Host *", f"  UserKnownHostsFile {work / 'known_hosts'}",
            "  StrictHostKeyChecking accept-new", f"  Ciphers {base.CIPHER}",
            f"  KexAlgorithms {base.KEX}", "  Compression no", "  LogLevel ERROR",
            "  ServerAliveInterval 0", "  ConnectTimeout 30", ""]))
        envs[name] = base.Env(
            work=work, procs=procs, ssh_config=cfg, key=key, login=login,
            broker_pid=target_pid if name == "openssh" else pids[name],
            broker_port=port, broker_target=str(info["targets"][0]),
            recordings=work / f"rec-{name}", jump_pid=0, direct_port=direct_port, jump_port=0,
            askpass=askpass, pool=pool, target_pids={})
    scraper = Scraper(f"http://127.0.0.1:{diag_port}/metrics")
    return Bench(work, envs, scraper, pids)


def wire(name: str) -> str:
    return "direct" if name == "openssh" else "broker"


def start_master(env: base.Env, name: str) -> None:
    """One authenticated ControlMaster connection per path, reused by every measurement."""
    path = wire(name)
    sock = env.work / f"mux-{name}"
    env.mux[path] = sock
    cmd, penv = env.ssh(path, login=None if path == "direct" else env.pool.take())
    cmd[-1:-1] = ["-N", "-o", "ControlMaster=yes", "-o", f"ControlPath={sock}"]
    proc = env.procs.start(f"ssh master {name}", cmd, env.work / f"master-{name}.log", env=penv)
    for _ in range(600):
        if sock.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    check = base.run(["ssh", "-F", str(env.ssh_config), "-o", f"ControlPath={sock}",
                      "-O", "check", path], 10)
    if check.returncode != 0:
        raise RuntimeError(f"ControlMaster for {name} did not come up: "
                           f"{(env.work / f'master-{name}.log').read_text()[-500:]}")


@dataclass
class Results:
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, metric: str, path: str, value: float) -> None:
        self.values.setdefault(metric, {}).setdefault(path, []).append(value)

    def med(self, metric: str, path: str) -> float | None:
        vals = self.values.get(metric, {}).get(path)
        return statistics.median(vals) if vals else None


def run_all(args: argparse.Namespace) -> Results:
    res = Results()
    res.extra["load_before"] = os.getloadavg()
    procs = base.Procs()
    bench: Bench | None = None
    try:
        bench = setup(args, procs)
        for name, env in bench.envs.items():
            start_master(env, name)
        before = bench.scraper.scrape()
        bench.scraper.start()
        # idle, scraped: what a scrape costs the broker (CPU), against an idle broker unscraped
        cpu0 = {n: base.cpu_seconds(bench.pids[n]) for n in BROKERS}
        n0 = bench.scraper.ok
        time.sleep(args.idle_seconds)
        idle = {n: base.cpu_seconds(bench.pids[n]) - cpu0[n] for n in BROKERS}
        scrapes = max(1, bench.scraper.ok - n0)
        res.extra.update(idle_seconds=args.idle_seconds, idle_scrapes=scrapes,
                         idle_cpu_ms={n: v * 1000 for n, v in idle.items()},
                         scrape_cpu_ms=(idle["on"] - (idle["off"] + idle["off2"]) / 2)
                         * 1000 / scrapes)
        log(f"idle {args.idle_seconds:g} s: broker CPU ms "
            + ", ".join(f"{n} {v * 1000:.0f}" for n, v in idle.items())
            + f"; {res.extra['scrape_cpu_ms']:.2f} ms per scrape")
        moved = 0
        for r in range(args.rounds):
            k = r % len(PATHS)
            order = PATHS[k:] + PATHS[:k]
            log(f"round {r + 1}/{args.rounds}: order {', '.join(order)}")
            for name in order:
                env = bench.envs[name]
                echoes = base.echo_samples(env, wire(name), args.echo_samples, args.echo_gap)
                res.add("echo_p50", name, base.percentile(echoes, 50))
                res.add("echo_p99", name, base.percentile(echoes, 99))
            for kind in KINDS:
                for name in order:
                    env = bench.envs[name]
                    base.check_disk(env, args.size)
                    secs, cpu = base.transfer(env, wire(name), kind, args.size)
                    res.add(kind, name, args.size / secs / (1 << 20))
                    if name != "openssh":
                        res.add(f"{kind}_cpu_s_gib", name, cpu * (1 << 30) / args.size)
                        env.clear_recordings()
                    if name == "on":
                        moved += args.size
                    log(f"  {kind:8s} {name:8s} {args.size / secs / (1 << 20):8.1f} MiB/s"
                        + (f"  broker CPU {cpu / secs:.0%}" if name != "openssh" else ""))
            log("  echo p50 ms: " + ", ".join(
                f"{p} {res.values['echo_p50'][p][-1]:.3f}" for p in PATHS))
        bench.scraper.stop()
        after = bench.scraper.scrape()
        relayed = sum(sample(after, "bastion_broker_relayed_bytes_total", direction=d, kind="exec")
                      - sample(before, "bastion_broker_relayed_bytes_total", direction=d,
                               kind="exec") for d in ("in", "out"))
        if relayed < moved:
            raise RuntimeError(f"the scraped broker counted {relayed} relayed bytes, "
                               f"at least {moved} went through it")
        res.extra.update(
            scrapes=bench.scraper.ok, scrape_failures=bench.scraper.failed,
            scrape_ms_p50=statistics.median(bench.scraper.ms),
            scrape_ms_max=max(bench.scraper.ms), scrape_bytes=bench.scraper.size,
            relayed_counted=relayed, moved=moved,
            sessions_counted=sample(after, "bastion_broker_sessions_total", kind="exec",
                                    outcome="ok")
            - sample(before, "bastion_broker_sessions_total", kind="exec", outcome="ok"),
            totp_logins=bench.envs["on"].pool.used,
            lost_exit_status={n: dict(e.lost_status) for n, e in bench.envs.items()},
            load_after=os.getloadavg())
    finally:
        if bench is not None:
            bench.scraper.stop()
        procs.stop_all()
        if bench is not None and not args.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
    return res


def render(res: Results, args: argparse.Namespace, command: str) -> str:
    f = base.fmt

    def ratio(metric: str, a: str = "on", b: str = "off") -> str:
        x, y = res.med(metric, a), res.med(metric, b)
        return f(x / y, 3) if x is not None and y else "n/a"

    def ratios(metric: str) -> str:
        return f"{ratio(metric)} | {ratio(metric, 'on', 'off2')} | {ratio(metric, 'off2')}"

    def row(title: str, metric: str, digits: int) -> str:
        return (f"| {title} | " + " | ".join(f(res.med(metric, p), digits) for p in PATHS)
                + f" | {ratios(metric)} |")

    def spread(metric: str, path: str) -> str:
        vals = res.values.get(metric, {}).get(path) or []
        return f"{f(min(vals), 1)}-{f(max(vals), 1)}" if vals else "n/a"

    size = base.human_size(args.size)
    per_round = [
        f"- {metric}: " + "; ".join(
            f"{p} " + " / ".join(f(x, 3 if metric.startswith('echo') else 1)
                                 for x in res.values.get(metric, {}).get(p, []))
            for p in PATHS)
        for metric in ("download", "upload", "echo_p50")
    ]
    x = res.extra
    lost = {m: v for m, v in (x.get("lost_exit_status") or {}).items() if v}
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        SECTION,
        "",
        f"Generated {now} by `{command}` (replaced on every run).",
        "",
        f"Machine: {base.machine()}. Clients, brokers and targets on this machine (loopback); "
        "the machine is shared, so absolute rates move with its load: compare the columns of "
        "one run, not runs.",
        "",
        "Three `bastion-broker --config COPY serve` processes from one copy of the demo's "
        "broker.toml (port 0, web API off, recording on, each its own recordings directory and "
        "audit file, all on the demo's store, users, grants and targets), differing only in "
        "`[diag] enabled`: A and B off (B/A is an A/A control: how much two identical broker "
        "processes differ on this machine), C on and scraped (`GET /metrics`) every second for "
        "the whole run. OpenSSH straight to an sshd target (key authentication) is the "
        f"reference. {args.rounds} rounds, order rotated; each round per path "
        f"{args.echo_samples} keystroke echoes (one byte through `cat` in a raw-mode PTY, "
        f"{args.echo_gap * 1000:g} ms apart), then a {size} download (`head -c` of zeros) and "
        f"upload (`cat > /dev/null`), over one OpenSSH ControlMaster connection per path "
        f"({base.CIPHER}). Medians of the rounds.",
        "",
        "| | " + " | ".join(LABEL[p] for p in PATHS) + " | C / A | C / B | B / A (A/A) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        row(f"Download {size}, MiB/s", "download", 1),
        row(f"Upload {size}, MiB/s", "upload", 1),
        row("Echo p50, ms", "echo_p50", 3),
        row("Echo p99, ms", "echo_p99", 3),
        "| Broker CPU s per GiB, download | " + " | ".join(
            f(res.med("download_cpu_s_gib", p), 2) if p != "openssh" else "-" for p in PATHS)
        + f" | {ratios('download_cpu_s_gib')} |",
        "| Broker CPU s per GiB, upload | " + " | ".join(
            f(res.med("upload_cpu_s_gib", p), 2) if p != "openssh" else "-" for p in PATHS)
        + f" | {ratios('upload_cpu_s_gib')} |",
        "",
        "Round-to-round spread (min-max) of the download rate: "
        + ", ".join(f"{p} {spread('download', p)} MiB/s" for p in BROKERS)
        + "; of the upload rate: "
        + ", ".join(f"{p} {spread('upload', p)} MiB/s" for p in BROKERS) + ".",
        "",
        f"Scrapes during the run: {x.get('scrapes')} answered, {x.get('scrape_failures')} "
        f"failed; one took {f(x.get('scrape_ms_p50'), 2)} ms (median, max "
        f"{f(x.get('scrape_ms_max'), 1)} ms) for {x.get('scrape_bytes')} bytes. Before the "
        f"rounds, {f(x.get('idle_seconds'), 0)} s idle: broker CPU "
        + ", ".join(f"{n} {f(v, 0)} ms" for n, v in (x.get("idle_cpu_ms") or {}).items())
        + f" ({x.get('idle_scrapes')} scrapes of C), so one scrape costs the broker about "
        f"{f(x.get('scrape_cpu_ms'), 2)} ms of CPU. The scraped "
        f"broker's `bastion_broker_relayed_bytes_total{{kind=\"exec\"}}` grew by "
        f"{int(x.get('relayed_counted', 0)):,} bytes for {int(x.get('moved', 0)):,} bytes "
        f"copied through it (checked: not less), and "
        f"`bastion_broker_sessions_total{{kind=\"exec\",outcome=\"ok\"}}` by "
        f"{int(x.get('sessions_counted', 0))}. TOTP logins used: {x.get('totp_logins')}. Exit "
        f"status lost (rc 255 with the success marker): {lost or 'none'}. Load average "
        f"(1 / 5 / 15 min) {' / '.join(f'{v:.2f}' for v in x['load_before'])} before, "
        f"{' / '.join(f'{v:.2f}' for v in x['load_after'])} after.",
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
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    base.DOCS.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="256 MiB, 3 rounds, no docs update")
    p.add_argument("--size", type=base.parse_size, help="bytes per transfer (1G; quick 256M)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 3)")
    p.add_argument("--echo-samples", type=int, help="echoes per path and round (200; quick 100)")
    p.add_argument("--echo-gap", type=float, default=0.01, help="seconds between echoes")
    p.add_argument("--idle-seconds", type=float, default=30.0,
                   help="idle time, scraped, to measure the CPU of a scrape")
    p.add_argument("--users", type=int, default=50, help="demo users (TOTP codes are single use)")
    p.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                   help="update docs/benchmarks.md (default: yes, except with --quick)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    args = p.parse_args(argv)
    args.size = args.size or (256 << 20 if args.quick else 1 << 30)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.echo_samples = args.echo_samples or (100 if args.quick else 200)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    docs = (not args.quick) if args.docs is None else args.docs
    command = " ".join([".venv/bin/python bench/metrics_cost.py",
                        *(argv if argv is not None else sys.argv[1:])])
    signal.signal(signal.SIGTERM, base._on_sigterm)

    res = run_all(args)
    base.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = base.RESULTS / f"metrics_cost-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "command": command, "values": res.values,
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
