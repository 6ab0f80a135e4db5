"""``notify deliveries [--status S] [--limit N]`` (the delivery log) and ``notify test
[--channel NAME]`` (a test event for a channel, or each one, of this config's ``[notify]``).

Both work on the store the brokers share: a test event is queued like any other and sent by a
running broker's dispatcher (within a second), so ``notify deliveries`` then shows how it went.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from broker.cli import when
from broker.cli.common import config_of, leaf, run_async, unix_user
from broker.cli.output import out, printable, table
from broker.domain.notify import STATUSES, delivery_json
from broker.errors import UsageError


async def _deliveries(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    if not 1 <= args.limit <= 1000:
        raise UsageError("--limit must be 1 to 1000")
    stores = await connect_stores(config_of(args), "read")  # writes nothing
    try:
        rows = await stores.notify.listing(status=args.status, limit=args.limit)
    finally:
        await stores.close()
    if args.json:
        out(json.dumps([delivery_json(d) for d in rows], indent=2))
        return 0
    table([{"id": d.id, "event": d.event, "channel": d.channel, "status": d.status,
            "attempts": str(d.attempts), "created": when.show(d.created_at),
            "next": when.show(d.next_attempt_at) if d.status == "pending" else "-",
            "answer": str(d.last_status or "-"), "error": d.last_error or ""}
           for d in rows],
          ("id", "event", "channel", "status", "attempts", "created", "next", "answer",
           "error"))
    return 0


async def _test(args: argparse.Namespace) -> int:
    from broker.notify.channels import notifier
    from broker.stores import connect_stores

    config = config_of(args)
    n = config.notify
    names = [c.name for c in n.webhooks] + [c.name for c in n.email]
    if not names:
        raise UsageError("no channels: add [[notify.webhooks]] or [[notify.email]] to the "
                         "configuration")
    if args.channel is not None and args.channel not in names:
        raise UsageError(f"no channel {args.channel!r} in [notify] (channels: "
                         f"{', '.join(names)})")
    chosen = [args.channel] if args.channel is not None else names
    stores = await connect_stores(config)
    by = f"operator:{unix_user()}"
    try:
        service = notifier(n, stores.notify, stores.audit, stores.clock)
        queued: list[dict[str, Any]] = []
        for name in chosen:
            if await service.test(name, by):
                queued.append({"channel": name})
                stores.audit.emit("notify.test", user=by, channel=name)
    finally:
        await stores.close()
    if len(queued) != len(chosen):
        raise UsageError("the test could not be queued (the store refused it; see the log)")
    if args.json:
        out(json.dumps(queued, indent=2))
        return 0
    for q in queued:
        out(printable(f"test notification queued for {q['channel']}"))
    out("a running broker sends it; see: bastion-broker notify deliveries")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("notify", parents=leaf(),
                       help="notifications: the delivery log, a test event")
    ns = p.add_subparsers(dest="notify_sub", required=True, metavar="{deliveries,test}")
    s = ns.add_parser("deliveries", parents=leaf(),
                      help="the delivery log (newest first): status, attempts, last answer")
    s.add_argument("--status", choices=STATUSES)
    s.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_deliveries))
    s = ns.add_parser("test", parents=leaf(), help="queue a test event for a channel (default:"
                      " every channel of [notify])")
    s.add_argument("--channel", help="a channel's name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_test))
