"""``auth status|unlock``: login throttling, as an operator sees and clears it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from broker.cli.common import account, actor, config_of, leaf, run_async
from broker.cli.output import out, table
from broker.errors import NotFoundError


async def _auth_status(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from broker.domain.ratelimit import known_device
    from broker.stores import connect_stores

    config = config_of(args)
    stores = await connect_stores(config, "read")
    try:
        accounts = await stores.throttle.listing()
        pairs = await stores.throttle.source_listing()
    finally:
        await stores.close()
    now = datetime.now(UTC).timestamp()
    days = config.limits.known_source_days
    # per account: its rule for unknown devices ("*"), then each address with failures
    rows: list[dict[str, Any]] = [
        {"account": st.account, "source": "*", "failures": st.failures, "locked": st.locked,
         "wait_s": max(0.0, round(st.next_allowed - now, 1)), "known_device": None}
        for st in accounts
    ]
    rows += [
        {"account": p.account, "source": p.source, "failures": p.failures, "locked": p.locked,
         "wait_s": max(0.0, round(p.next_allowed - now, 1)),
         "known_device": known_device(p.last_success, now, days)}
        for p in pairs
    ]
    rows.sort(key=lambda r: (not r["locked"], r["account"], r["source"] != "*", r["source"]))
    if args.json:
        out(json.dumps(rows, indent=2))
    else:
        table([{**r, "locked": "yes" if r["locked"] else "no",
                "known_device": {None: "-", True: "yes", False: "no"}[r["known_device"]]}
               for r in rows],
              ["account", "source", "failures", "wait_s", "locked", "known_device"])
    return 0


async def _auth_unlock(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    config = config_of(args)
    stores = await connect_stores(config)
    try:
        key = account(config, args.user)
        if not await stores.throttle.unlock(key):
            raise NotFoundError(f"{key} has no failed logins on record")
        stores.audit.emit("account.unlocked", user=key, actor=actor())
    finally:
        await stores.close()
    out(f"{key} unlocked")
    return 0


def register(sub: Any) -> None:
    a = sub.add_parser("auth", help="login throttling").add_subparsers(dest="sub", required=True)
    s = a.add_parser("status", parents=leaf(),
                      help="failed logins per account (source *: the rule for unknown "
                           "devices) and per source address, locked first")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_auth_status))
    s = a.add_parser("unlock", parents=leaf(),
                      help="clear the failures and locks of an account and its addresses")
    s.add_argument("user", help="alice, CORP\\alice or alice@corp.example.com")
    s.set_defaults(func=run_async(_auth_unlock))
