"""Grant evaluation cost on the login path, with 10,000 grants in the store.

Measures ``AccessService.decide`` (the store query for the user's grants + the pure evaluation)
against SQLite and a real PostgreSQL 15 started here, p50/p99 over many calls.

    .venv/bin/python bench/grant_eval.py [--grants 10000] [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.domain.models import Grant, GrantState, Instance, Level, Principal, Trigger
from broker.ports import GrantStore
from broker.services.access import AccessService
from broker.services.clock import SystemClock

USERS = 500
STACKS = 200


class OneInstance:
    def __init__(self, inst: Instance) -> None:
        self.inst = inst

    async def resolve(self, name: str) -> Instance | None:
        return self.inst if name == self.inst.id else None

    async def instances(self) -> list[Instance]:
        return [self.inst]


def make_grants(n: int) -> list[Grant]:
    rnd = random.Random(7)
    now = datetime.now(UTC)
    states = [GrantState.APPROVED] * 6 + [GrantState.REVOKED, GrantState.REJECTED,
                                          GrantState.PENDING, GrantState.WITHDRAWN]
    out = []
    for i in range(n):
        start = now - timedelta(hours=rnd.uniform(0, 48))
        out.append(Grant(
            id=f"g-{i:06d}", username=f"user{rnd.randrange(USERS):04d}", domain="corp.example.com",
            stack_ids=tuple(f"stack-{rnd.randrange(STACKS):03d}" for _ in range(rnd.randint(1, 3))),
            vpc_id="vpc-0bench", level=rnd.choice([Level.ADMIN, Level.READ_ONLY]),
            state=rnd.choice(states), starts_at=start, expires_at=start + timedelta(hours=8),
            trigger=Trigger.INCIDENT, ticket=f"INC-{i}", reason="bench", requested_by="bench",
            approved_by="bench", created_at=start))
    return out


async def measure(store: GrantStore, grants: list[Grant], calls: int) -> tuple[float, float]:
    for g in grants:
        await store.add(g)
    inst = Instance("i-0bench", "bench01", "stack-007", "vpc-0bench", "127.0.0.1")
    access = AccessService(OneInstance(inst), store, SystemClock())  # type: ignore[arg-type]
    rnd = random.Random(11)
    samples = []
    for _ in range(calls):
        p = Principal("corp.example.com", f"user{rnd.randrange(USERS):04d}")
        t0 = time.perf_counter()
        await access.decide(p, "i-0bench")
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grants", type=int, default=10_000)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    grants = make_grants(args.grants)
    from broker.store.sqlite import SqliteDatabase, SqliteGrantStore

    with tempfile.TemporaryDirectory() as d:
        db = SqliteDatabase(Path(d) / "bench.db")
        sq = await measure(SqliteGrantStore(db), grants, args.calls)
        db.close()

    from broker.store.postgres import PostgresDatabase, PostgresGrantStore
    from tests.contract.pgserver import PgServer

    server = PgServer()
    try:
        server.start()
        pdb = await PostgresDatabase.connect(server.dsn())
        pg = await measure(PostgresGrantStore(pdb), grants, args.calls)
        await pdb.close()
    finally:
        server.destroy()

    print(f"Grant evaluation on the login path, {args.grants} grants in the store, "
          f"{args.calls} calls (command: .venv/bin/python bench/grant_eval.py)\n")
    print("| store | p50 ms | p99 ms | goal p99 <= 5 ms |")
    print("|---|---:|---:|---|")
    for name, (p50, p99) in (("SQLite", sq), ("PostgreSQL 15", pg)):
        print(f"| {name} | {p50:.3f} | {p99:.3f} | {'met' if p99 <= 5 else 'missed'} |")


if __name__ == "__main__":
    asyncio.run(main())
