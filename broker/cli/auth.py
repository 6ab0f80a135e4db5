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

    from broker.stores import connect_stores

    stores = await connect_stores(config_of(args), read_only=True)
    try:
        listing = await stores.throttle.listing()
    finally:
        await stores.close()
    now = datetime.now(UTC).timestamp()
    rows = [
        {"account": st.account, "failures": st.failures, "locked": st.locked,
         "wait_s": max(0.0, round(st.next_allowed - now, 1))}
        for st in listing
    ]
    if args.json:
        out(json.dumps(rows, indent=2))
    else:
        table(rows, ["account", "failures", "locked", "wait_s"])
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
                      help="accounts with recent failed logins, locked first")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_auth_status))
    s = a.add_parser("unlock", parents=leaf(),
                      help="clear the failures and the lock of an account")
    s.add_argument("user", help="alice, CORP\\alice or alice@corp.example.com")
    s.set_defaults(func=run_async(_auth_unlock))
