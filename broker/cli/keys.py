"""``key add|list|remove``: SSH keys that may replace the password (never the code)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from broker.cli.common import account, actor, config_of, leaf, run_async
from broker.cli.output import out, table
from broker.errors import BrokerError, NotFoundError, UsageError


async def _key_add(args: argparse.Namespace) -> int:
    from broker.ssh.keys import parse_public_key
    from broker.stores import connect_stores

    config = config_of(args)
    acct = account(config, args.user)
    line = sys.stdin.readline().strip() if args.public_key == "-" else args.public_key
    try:
        parse_public_key(line)
    except BrokerError as exc:
        raise UsageError(str(exc)) from None
    stores = await connect_stores(config)
    try:
        fp = await stores.keys.add(acct, line, args.comment or "")
        stores.audit.emit("key.added", user=acct, fingerprint=fp, actor=actor())
    finally:
        await stores.close()
    out(f"{fp} registered for {acct}")
    if not config.identity.public_keys:
        out("note: [identity] public_keys = false in the config: keys are not accepted yet")
    return 0


async def _key_list(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    config = config_of(args)
    acct = account(config, args.user) if args.user else None
    stores = await connect_stores(config, "read")
    try:
        listing = await stores.keys.listing(acct)
    finally:
        await stores.close()
    rows = [{"account": a, "fingerprint": f, "comment": c} for a, f, c in listing]
    if args.json:
        out(json.dumps(rows, indent=2))
    else:
        table(rows, ["account", "fingerprint", "comment"])
    return 0


async def _key_remove(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    config = config_of(args)
    acct = account(config, args.user)
    stores = await connect_stores(config)
    try:
        if not await stores.keys.remove(acct, args.fingerprint):
            raise NotFoundError(f"no key {args.fingerprint} registered for {acct}")
        stores.audit.emit("key.removed", user=acct, fingerprint=args.fingerprint, actor=actor())
    finally:
        await stores.close()
    out(f"{args.fingerprint} removed from {acct}")
    return 0


def register(sub: Any) -> None:
    k = sub.add_parser("key", help="SSH keys that may replace the password (never the code)"
                       ).add_subparsers(dest="sub", required=True)
    s = k.add_parser("add", parents=leaf(), help="register a public key for USER")
    s.add_argument("user")
    s.add_argument("public_key", help="an OpenSSH public key line, or - to read it from stdin")
    s.add_argument("--comment")
    s.set_defaults(func=run_async(_key_add))
    s = k.add_parser("list", parents=leaf(), help="registered keys")
    s.add_argument("user", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_key_list))
    s = k.add_parser("remove", parents=leaf(), help="unregister a key by its SHA256 fingerprint")
    s.add_argument("user")
    s.add_argument("fingerprint")
    s.set_defaults(func=run_async(_key_remove))
