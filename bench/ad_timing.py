"""Benchmark: how long a failed AD login takes by why it failed, as a prober timing it would see.

Three kinds of failed ``ADDirectory.authenticate`` against a real Samba AD DC (tests/ad/samba.py,
the same code as the AD test fixture), all with a wrong password, interleaved in a shuffled
order each round so that the machine's drift hits all three alike:

* **wrong password**: an enabled account that exists (``tim``, no lockout policy);
* **unknown user**: a name that does not exist (a new one each time), so the broker binds a
  dummy DN and pads the wait (see ``_FailureCost`` in broker/identity/ldap.py);
* **disabled**: a disabled account (``disabled-dan``) with a wrong password.

One call at a time, timed around the whole ``authenticate`` (``time.perf_counter``). Reported per
kind: median, p90, p99; per pair against the wrong password: the difference of medians with a
percentile-bootstrap 95% interval, the Mann-Whitney U statistic as P(X > Y) (0.5: neither is
slower) with its two-sided p-value, and the two-sample Kolmogorov-Smirnov distance D with its
asymptotic p-value. D bounds what one timed attempt tells: no threshold on the time names the
kind right more often than 0.5 + D/2 (equal priors).

Usage (from the repository root, as root: Samba binds its fixed ports 389/636 on loopback)::

    .venv/bin/python bench/ad_timing.py                 # 300 of each: ~10 s, after ~10 s provisioning
    .venv/bin/python bench/ad_timing.py --samples 3000  # a tighter bound (~1 min)
    .venv/bin/python bench/ad_timing.py --json raw.json # also the raw samples

Prints a Markdown report. The DC is stopped and its temp dir removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker.identity.ldap import ADDirectory  # noqa: E402
from tests.ad.samba import SambaDC, ad_settings, running_dc  # noqa: E402

WRONG = "Wrong!Passw0rd-timing"
KINDS = ("wrong password", "unknown user", "disabled")
EXPECTED = {"wrong password": "bad password", "unknown user": "unknown user",
            "disabled": "bad password"}  # AD answers a wrong password before the account state


def who(kind: str, i: int) -> str:
    return {"wrong password": "tim", "unknown user": f"ghost-{i}-{os.getpid()}",
            "disabled": "disabled-dan"}[kind]


async def measure(dc: SambaDC, samples: int, warmup: int, rng: random.Random,
                  ) -> dict[str, list[float]]:
    d = ADDirectory(ad_settings(dc))
    out: dict[str, list[float]] = {k: [] for k in KINDS}
    try:
        for i in range(-warmup, samples):
            order = list(KINDS)
            rng.shuffle(order)
            for kind in order:
                t = time.perf_counter()
                res = await d.authenticate(who(kind, i), None, WRONG)
                took = time.perf_counter() - t
                if res.ok or res.reason != EXPECTED[kind]:
                    raise AssertionError(f"{kind} #{i}: {res}")
                if i >= 0:
                    out[kind].append(took)
    finally:
        d.close()
    return out


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bootstrap_median_diff(x: list[float], y: list[float], rng: random.Random,
                          rounds: int) -> tuple[float, float]:
    """95% percentile interval of median(x) - median(y), resampling each group."""
    diffs = sorted(statistics.median(rng.choices(x, k=len(x)))
                   - statistics.median(rng.choices(y, k=len(y))) for _ in range(rounds))
    return quantile(diffs, 0.025), quantile(diffs, 0.975)


def mann_whitney(x: list[float], y: list[float]) -> tuple[float, float]:
    """(P(X > Y) + P(X = Y)/2, two-sided p-value), normal approximation with tie correction."""
    pooled = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    n = len(pooled)
    ranks = [0.0] * n
    ties = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    n1, n2 = len(x), len(y)
    r1 = sum(r for r, (_, g) in zip(ranks, pooled, strict=True) if g == 0)
    u1 = r1 - n1 * (n1 + 1) / 2
    sd = math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
    z = (u1 - n1 * n2 / 2) / sd if sd else 0.0
    return u1 / (n1 * n2), math.erfc(abs(z) / math.sqrt(2))


def kolmogorov_smirnov(x: list[float], y: list[float]) -> tuple[float, float]:
    """(D, asymptotic two-sided p-value) of the two-sample test."""
    xs, ys = sorted(x), sorted(y)
    i = j = 0
    d = 0.0
    while i < len(xs) and j < len(ys):
        v = min(xs[i], ys[j])
        while i < len(xs) and xs[i] == v:
            i += 1
        while j < len(ys) and ys[j] == v:
            j += 1
        d = max(d, abs(i / len(xs) - j / len(ys)))
    ne = len(xs) * len(ys) / (len(xs) + len(ys))
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    if lam < 0.3:  # the series does not converge there; Q(0.3) = 0.99999
        return d, 1.0
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, min(1.0, max(0.0, p))


def load() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


def report(res: dict[str, list[float]], args: argparse.Namespace, cmd: str, took: float,
           load_before: str, load_after: str, rng: random.Random) -> list[str]:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in
                    Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
                   "")
    samba_v = subprocess.run(["samba", "--version"], capture_output=True, text=True,
                             timeout=10).stdout.strip().replace("Version", "Samba")
    lines = [
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{cmd}` ({took:.0f} s).",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu or platform.machine()}), Python "
        f"{platform.python_version()}, {samba_v} (prefork); DC and broker on the same machine, "
        f"LDAPS on 127.0.0.1. {args.samples} of each kind after {args.warmup} warm-up rounds, "
        f"interleaved in a shuffled order per round, one call at a time. Load average "
        f"(1 / 5 / 15 min) {load_before} before, {load_after} after.",
        "",
        "| failed login | n | median ms | p90 ms | p99 ms | mean ms | min - max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in KINDS:
        xs = res[kind]
        lines.append(f"| {kind} | {len(xs)} | {ms(statistics.median(xs))} | "
                     f"{ms(quantile(xs, 0.9))} | {ms(quantile(xs, 0.99))} | "
                     f"{ms(statistics.fmean(xs))} | {ms(min(xs))} - {ms(max(xs))} |")
    lines += [
        "",
        "| against a wrong password | difference of medians ms (95% bootstrap) | "
        "Mann-Whitney P(slower) | p | Kolmogorov-Smirnov D | p | best single-try guess |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    w = res["wrong password"]
    for kind in KINDS[1:]:
        x = res[kind]
        diff = statistics.median(x) - statistics.median(w)
        lo, hi = bootstrap_median_diff(x, w, rng, args.bootstrap)
        auc, p_mw = mann_whitney(x, w)
        d, p_ks = kolmogorov_smirnov(x, w)
        lines.append(f"| {kind} | {diff * 1000:+.2f} ({lo * 1000:+.2f} to {hi * 1000:+.2f}) | "
                     f"{auc:.3f} | {p_mw:.2g} | {d:.3f} | {p_ks:.2g} | {0.5 + d / 2:.0%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=300, help="timed calls of each kind")
    ap.add_argument("--warmup", type=int, default=30, help="untimed rounds first")
    ap.add_argument("--bootstrap", type=int, default=4000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=1, help="for the order and the bootstrap")
    ap.add_argument("--json", type=Path, default=None, help="write the raw samples here")
    args = ap.parse_args(argv)
    cmd = ".venv/bin/python bench/ad_timing.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    rng = random.Random(args.seed)
    load_before = load()
    t0 = time.monotonic()
    with running_dc() as dc:
        t1 = time.monotonic()
        res = asyncio.run(measure(dc, args.samples, args.warmup, rng))
        took = time.monotonic() - t1
    print(f"provisioning {t1 - t0:.0f} s, measuring {took:.0f} s", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(res))
    print("\n".join(report(res, args, cmd.strip(), took, load_before, load(), rng)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
