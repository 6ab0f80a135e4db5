"""Benchmark: Active Directory logins through ``ADDirectory`` against a real Samba AD DC.

Provisions and starts a Samba AD DC on loopback (tests/ad/samba.py, the same code as the AD test
fixture), adds ``--users`` accounts, then measures with ``--clients`` concurrent callers:

* ``authenticate``, right password (users taken in turn): logins/s, latency p50/p99;
* ``lookup`` (the registered-SSH-key path, no password): lookups/s, p50/p99;
* wrong password vs unknown user, one caller at a time and under load: medians (must be
  indistinguishable: the unknown-user timing padding).

Each scenario runs ``--runs`` times; the table shows the best and the median run. With
``--compare REF`` the same scenarios also run against ``broker/identity/ldap.py`` as of git
``REF`` (e.g. the commit before the connection pool), interleaved on the same DC, so "before" and
"after" see the same machine load. ``uptime`` load is recorded before and after.

Usage (from the repository root, as root, with the project's virtualenv)::

    .venv/bin/python bench/ad_logins.py                       # writes bench/ad_logins.md
    .venv/bin/python bench/ad_logins.py --compare 99c70c4 --runs 3   # 99c70c4: before the pool
    .venv/bin/python bench/ad_logins.py --quick --no-write

Everything listens on loopback; the DC is stopped and its temp dir removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.ad.samba import PASSWORD, SambaDC, ad_settings_dict, running_dc  # noqa: E402

OUT = REPO / "bench" / "ad_logins.md"
WRONG = "Wrong!Passw0rd-bench"
CALL_TIMEOUT = 30.0  # per login; a hung DC must not hang the benchmark


@dataclass
class Run:
    n: int
    ok: int
    wall: float
    lat: list[float]

    @property
    def rate(self) -> float:
        return self.n / self.wall if self.wall > 0 else 0.0

    def q(self, p: int) -> float:
        if len(self.lat) < 2:
            return self.lat[0] if self.lat else 0.0
        return statistics.quantiles(self.lat, n=100, method="inclusive")[p - 1]


def load_impl(ref: str | None) -> ModuleType:
    """``broker.identity.ldap`` as checked out, or the file as of git ``ref`` (loaded separately)."""
    if ref is None:
        import broker.identity.ldap as mod

        return mod
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:broker/identity/ldap.py"],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    path = Path(tempfile.mkdtemp(prefix="bb-bench-")) / f"ldap_{ref.replace('~', '_')}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"bench_ldap_{abs(hash(ref))}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_directory(mod: ModuleType, dc: SambaDC, **over: Any) -> Any:
    return mod.ADDirectory(mod.ADSettings.model_validate(ad_settings_dict(dc, **over)))


async def drive(call: Callable[[int], Awaitable[Any]], total: int, clients: int,
                expect_ok: bool | None) -> Run:
    """``total`` calls spread over ``clients`` concurrent callers."""
    lat: list[float] = []
    ok = 0
    counter = iter(range(total))

    async def caller() -> None:
        nonlocal ok
        for i in counter:
            t = time.perf_counter()
            out = await asyncio.wait_for(call(i), CALL_TIMEOUT)
            lat.append(time.perf_counter() - t)
            ok += out.ok
            if expect_ok is not None and out.ok != expect_ok:
                raise AssertionError(f"call {i}: {out}")

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(clients)))
    return Run(total, ok, time.perf_counter() - t0, lat)


def load() -> str:
    try:
        a, b, c = Path("/proc/loadavg").read_text().split()[:3]
        return f"{a} {b} {c}"
    except OSError:
        return "?"


async def scenarios(mod: ModuleType, dc: SambaDC, users: list[str], args: argparse.Namespace,
                    label: str) -> dict[str, Run]:
    d = make_directory(mod, dc, max_concurrency=args.max_concurrency)
    res: dict[str, Run] = {}
    try:
        # warm-up (and, for the pooled version, fills the pools)
        await drive(lambda i: d.authenticate(users[i % len(users)], None, PASSWORD), 40,
                    args.clients, True)
        res["authenticate"] = await drive(
            lambda i: d.authenticate(users[i % len(users)], None, PASSWORD), args.logins,
            args.clients, True)
        if hasattr(d, "lookup"):
            res["lookup"] = await drive(lambda i: d.lookup(users[i % len(users)], None),
                                        args.logins, args.clients, True)
        # Timing: wrong password vs unknown user, alternating, one at a time, then under load.
        # Wrong passwords go to users that never log in right here ("tim" has no lockout policy).
        wrong = await drive(lambda i: d.authenticate("tim", None, WRONG), 6, 1, False)
        unknown = await drive(lambda i: d.authenticate(f"ghost-{i}", None, WRONG), 6, 1, False)
        w_lat: list[float] = []
        u_lat: list[float] = []
        for i in range(args.timing):
            w_lat += (await drive(lambda _i: d.authenticate("tim", None, WRONG), 1, 1, False)).lat
            u_lat += (await drive(lambda _i, i=i: d.authenticate(f"nobody-{label}-{i}", None,
                                                                  WRONG), 1, 1, False)).lat
        res["wrong password, 1 client"] = Run(len(w_lat), 0, sum(w_lat), w_lat)
        res["unknown user, 1 client"] = Run(len(u_lat), 0, sum(u_lat), u_lat)
        del wrong, unknown
        # Under load: 20 clients, half wrong passwords, half unknown users, interleaved.
        wl: list[float] = []
        ul: list[float] = []

        async def mixed(i: int) -> Any:
            t = time.perf_counter()
            if i % 2:
                out = await d.authenticate("wendy", None, WRONG)
                wl.append(time.perf_counter() - t)
            else:
                out = await d.authenticate(f"nobody-{label}-load-{i}", None, WRONG)
                ul.append(time.perf_counter() - t)
            return out

        await drive(mixed, args.logins // 2, args.clients, False)
        res[f"wrong password, {args.clients} clients mixed"] = Run(len(wl), 0, 0.0, wl)
        res[f"unknown user, {args.clients} clients mixed"] = Run(len(ul), 0, 0.0, ul)
    finally:
        d.close()
    return res


def fmt_ms(x: float) -> str:
    return f"{x * 1000:.0f}" if x >= 0.01 else f"{x * 1000:.1f}"


def table(results: dict[str, list[dict[str, Run]]], clients: int) -> list[str]:
    lines = [
        "| implementation | scenario | runs | rate/s best | rate/s median | p50 ms (median run) "
        "| p99 ms (median run) | p99 ms best |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, runs in results.items():
        for sc in ("authenticate", "lookup"):
            rs = [r[sc] for r in runs if sc in r]
            if not rs:
                continue
            by_rate = sorted(rs, key=lambda r: r.rate)
            med = by_rate[len(by_rate) // 2]
            lines.append(
                f"| {label} | {sc}, {clients} clients | {len(rs)} | {by_rate[-1].rate:.1f} | "
                f"{med.rate:.1f} | {fmt_ms(med.q(50))} | {fmt_ms(med.q(99))} | "
                f"{fmt_ms(min(r.q(99) for r in rs))} |")
    lines += ["", "Wrong password vs unknown user (medians over all runs, ms; the goal is a "
              "difference under 5 ms):", "",
              "| implementation | case | wrong password | unknown user | difference |",
              "|---|---|---:|---:|---:|"]
    for label, runs in results.items():
        for case in ("1 client", f"{clients} clients mixed"):
            w = [x for r in runs for x in r[f"wrong password, {case}"].lat]
            u = [x for r in runs for x in r[f"unknown user, {case}"].lat]
            mw, mu = statistics.median(w), statistics.median(u)
            lines.append(f"| {label} | {case} | {mw * 1000:.1f} | {mu * 1000:.1f} | "
                         f"{(mu - mw) * 1000:+.1f} |")
    return lines


@contextlib.contextmanager
def _dc(args: argparse.Namespace) -> Iterator[SambaDC]:
    if args.reuse_dc is None:
        with running_dc(model=args.model) as dc:
            yield dc
        return
    root = args.reuse_dc  # a DC someone else started (development only; users already added)
    yield SambaDC(root=root, ca_file=root / "certs" / "bb-test-ca.pem",
                  other_ca_file=root / "other" / "unrelated-ca.pem")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--logins", type=int, default=400, help="logins per run and scenario")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timing", type=int, default=30, help="wrong/unknown pairs per run")
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--model", default=None, help="samba process model (default: prefork)")
    ap.add_argument("--compare", metavar="REF", default=None,
                    help="also run broker/identity/ldap.py as of this git ref")
    ap.add_argument("--quick", action="store_true", help="1 run, 200 logins, 10 timing pairs")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--reuse-dc", type=Path, default=None, help=argparse.SUPPRESS)  # dev: DC root
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.logins, args.timing = 1, 200, 10
    cmd = "python bench/ad_logins.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    impls: dict[str, ModuleType] = {}
    if args.compare:
        impls[f"before ({args.compare})"] = load_impl(args.compare)
    impls["after (working tree)" if args.compare else "ADDirectory"] = load_impl(None)

    load_before = load()
    results: dict[str, list[dict[str, Run]]] = {k: [] for k in impls}
    t_all = time.monotonic()
    with _dc(args) as dc:
        users = [f"bench{i:03d}" for i in range(args.users)]
        if args.reuse_dc is None:
            dc.add_users(users, ["bastion-users"])
        for run in range(args.runs):
            for label, mod in impls.items():
                r = asyncio.run(scenarios(mod, dc, users, args, f"{run}{len(results[label])}"
                                          f"{abs(hash(label)) % 1000}"))
                results[label].append(r)
                a = r["authenticate"]
                print(f"run {run + 1}/{args.runs} {label}: authenticate {a.rate:.1f}/s "
                      f"p50 {fmt_ms(a.q(50))} ms p99 {fmt_ms(a.q(99))} ms"
                      + (f"; lookup {r['lookup'].rate:.1f}/s p99 {fmt_ms(r['lookup'].q(99))} ms"
                         if "lookup" in r else "") + f"  (load {load()})", flush=True)
    load_after = load()

    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in
                    Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
                   "")
    samba_v = subprocess.run(["samba", "--version"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    lines = [
        "# AD logins: ADDirectory against a real Samba AD DC",
        "",
        f"Generated by `{cmd.strip()}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC "
        f"({time.monotonic() - t_all:.0f} s).",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu or platform.machine()}), Python "
        f"{platform.python_version()}, {samba_v}, process model {args.model or 'prefork (default)'}"
        f"; DC and broker on the same machine, LDAPS on 127.0.0.1 with a validated certificate. "
        f"Load average (1/5/15 min) before: {load_before}, after: {load_after} (other jobs may "
        "share the machine; compare implementations within one run).",
        "",
        f"{args.users} users, {args.clients} concurrent callers, {args.logins} calls per scenario "
        f"and run, {args.runs} runs, max_concurrency {args.max_concurrency}. A login is "
        "`ADDirectory.authenticate` (find the user, check the password with a bind, list nested "
        "groups); `lookup` is the registered-key path (find the user, check the account state, "
        "list nested groups).",
        "",
        *table(results, args.clients),
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        args.out.write_text(text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
