"""Cost of one audit append (``JsonlAuditLog.emit``) with and without rotation.

Each append takes the lock, checks the chain head and writes one line; rotation adds a
``stat`` of the path (has another process rotated the file?) and a size comparison. This
measures emit() per event, p50/p99 over ``--events`` appends of a typical event, in rounds that
alternate between the variants (a shared, noisy machine drifts): the code before rotation
(``--baseline REV``: ``broker/audit/jsonl.py`` at that git revision), rotation off
(``rotate_bytes = 0``), the default (256 MiB, never reached here) and a tiny size that rotates
every ~64 events (the rotation's own cost spread over the events, checkpoints included).

    .venv/bin/python bench/audit_append.py [--events 20000] [--rounds 5] [--baseline REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.audit.jsonl import JsonlAuditLog  # noqa: E402
from broker.integrity.keys import load_or_create_signing_key  # noqa: E402
from broker.services.clock import SystemClock  # noqa: E402


def _baseline(rev: str, tmp: Path) -> Any:
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:broker/audit/jsonl.py"],
                         capture_output=True, check=True).stdout
    path = tmp / "jsonl_baseline.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location("jsonl_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.JsonlAuditLog


def _run(cls: Any, path: Path, key: Any, events: int, **kw: Any) -> list[float]:
    log = cls(path, SystemClock(), signer=key, **kw)
    times = []
    for i in range(events):
        t = time.perf_counter()
        log.emit("session.start", session_id=f"{i:08d}-1111-2222-3333-444444444444",
                 user="alice@corp.example.com", target="web01", peer="10.0.0.1:50000",
                 grant_id="g-123456", kind="shell")
        times.append(time.perf_counter() - t)
    log.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", help="git revision of the code before rotation")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        key = load_or_create_signing_key(tmp / "key")
        variants: dict[str, tuple[Any, dict[str, Any]]] = {}
        if args.baseline:
            variants["before rotation"] = (_baseline(args.baseline, tmp), {})
        variants.update({
            "rotate_bytes = 0 (off)": (JsonlAuditLog, {"rotate_bytes": 0}),
            "rotate_bytes = 256 MiB (default)": (JsonlAuditLog, {"rotate_bytes": 256 << 20}),
            "rotate_bytes = 16 KiB (rotating)": (JsonlAuditLog, {"rotate_bytes": 16 << 10}),
        })
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, (cls, kw) in variants.items():
                path = tmp / f"r{r}-{abs(hash(name))}" / "audit.jsonl"
                samples[name] += _run(cls, path, key, args.events, **kw)
        result = {}
        for name, xs in samples.items():
            xs.sort()
            result[name] = {"p50_us": round(statistics.median(xs) * 1e6, 1),
                            "p99_us": round(xs[int(len(xs) * 0.99)] * 1e6, 1),
                            "mean_us": round(statistics.fmean(xs) * 1e6, 1)}
            print(f"{name:34} p50 {result[name]['p50_us']:6.1f} us  "
                  f"p99 {result[name]['p99_us']:6.1f} us  mean {result[name]['mean_us']:6.1f} us")
        print(json.dumps({"events": args.events, "rounds": args.rounds, "results": result}))


if __name__ == "__main__":
    main()
