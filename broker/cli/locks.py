"""``lock --user U | --target T | --stack S [--ttl 1h] --reason TEXT``, ``lock list`` and
``lock remove ID``: stop a person or a host everywhere during an incident, as ``tctl lock``.

A lock is stored where every bastion of the store reads it: each ends the matching live
sessions at its next enforcement pass (the user sees the reason), and refuses a locked user's
logins and new sessions or tunnels to a locked target or stack until the lock expires or is
removed. Audited ``lock.created`` and ``lock.removed``; each refusal names the lock.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from broker.cli import when
from broker.cli.common import account, config_of, leaf, run_async, unix_user
from broker.cli.output import out, printable, table
from broker.domain.locks import Lock, LockKind
from broker.errors import UsageError
from broker.services.locks import LockService, parse_ttl


def lock_json(lk: Lock, now: datetime) -> dict[str, Any]:
    return {"id": lk.id, "kind": lk.kind.value, "value": lk.value, "reason": lk.reason,
            "state": lk.state(now), "created_by": lk.created_by,
            "created_at": when.iso(lk.created_at), "expires_at": when.iso(lk.expires_at),
            "removed_at": when.iso(lk.removed_at), "removed_by": lk.removed_by}


async def _service(args: argparse.Namespace, access: str = "command"
                   ) -> tuple[Any, LockService]:
    from broker.stores import connect_stores

    config = config_of(args)
    stores = await connect_stores(config, "read" if access == "read" else "command")
    from broker.notify.channels import notifier

    return stores, LockService(stores.locks, stores.audit, stores.clock,
                               notifier(config.notify, stores.notify, stores.audit, stores.clock))


async def _create(args: argparse.Namespace) -> int:
    named = [(k, v) for k, v in (("user", args.user), ("target", args.target),
                                 ("stack", args.stack)) if v is not None]
    if len(named) != 1:
        raise UsageError("give exactly one of --user, --target and --stack (or: lock list, "
                         "lock remove ID)")
    if args.reason is None:
        raise UsageError("--reason is required: it is audited and shown to the user")
    kind, value = LockKind(named[0][0]), named[0][1]
    ttl = parse_ttl(args.ttl) if args.ttl is not None else None
    if kind is LockKind.USER:
        value = account(config_of(args), value)
    stores, service = await _service(args)
    try:
        lock = await service.create(f"operator:{unix_user()}", kind, value, args.reason, ttl)
        now = stores.clock.now()
    finally:
        await stores.close()
    if args.json:
        out(json.dumps(lock_json(lock, now), indent=2))
        return 0
    until = when.show(lock.expires_at) if lock.expires_at else "removed (lock remove ID)"
    out(printable(f"lock {lock.id}: {lock.kind.value} {lock.value}, until {until}"))
    out("live sessions it matches end on every bastion within the enforcement interval")
    return 0


async def _list(args: argparse.Namespace) -> int:
    stores, service = await _service(args, "read")  # writes nothing, not even the audit log
    try:
        rows = await service.listing(include_inactive=args.all)
        now = stores.clock.now()
    finally:
        await stores.close()
    if args.json:
        out(json.dumps([lock_json(lk, now) for lk in rows], indent=2))
        return 0
    table([{"id": lk.id, "kind": lk.kind.value, "value": lk.value, "state": lk.state(now),
            "until": when.show(lk.expires_at) if lk.expires_at else "-",
            "by": lk.created_by, "reason": lk.reason} for lk in rows],
          ("id", "kind", "value", "state", "until", "by", "reason"))
    return 0


async def _remove(args: argparse.Namespace) -> int:
    stores, service = await _service(args)
    try:
        lock = await service.remove(f"operator:{unix_user()}", args.lock_id)
    finally:
        await stores.close()
    out(printable(f"lock {lock.id} removed ({lock.kind.value} {lock.value})"))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("lock", parents=leaf(), help="lock a user, target or stack on every "
                       "bastion (ends live sessions, refuses new ones); list, remove")
    p.add_argument("--user", help="alice, alice@corp.example.com or CORP\\alice")
    p.add_argument("--target", help="instance id or name")
    p.add_argument("--stack", help="stack id")
    p.add_argument("--ttl", help="how long: 30m, 1h, 2d, 1w (default: until removed)")
    p.add_argument("--reason", help="why: audited and shown to the user whose session ends")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_async(_create))
    ls = p.add_subparsers(dest="lock_sub", required=False, metavar="{list,remove}")
    s = ls.add_parser("list", parents=leaf(), help="active locks")
    s.add_argument("--all", action="store_true", help="removed and expired locks too")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_list))
    s = ls.add_parser("remove", parents=leaf(), help="remove an active lock")
    s.add_argument("lock_id")
    s.set_defaults(func=run_async(_remove))
