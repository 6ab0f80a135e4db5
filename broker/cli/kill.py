"""``sessions kill SESSION --reason TEXT``: end one live session on whichever bastion holds it.

The request goes to the shared store (audited ``session.kill_requested``, who and why); the
bastion holding the session ends it at its next enforcement pass, shows the user the reason and
audits ``session.killed``. The command waits for the end to reach the session index.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from broker.cli import resolve
from broker.cli.common import config_of, leaf, run_async, unix_user
from broker.cli.output import out, printable
from broker.services.locks import LockService


async def _kill(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    config = config_of(args)
    stores = await connect_stores(config)
    try:
        rec = await resolve.session(stores.sessions, args.session_id)
        service = LockService(stores.locks, stores.audit, stores.clock)
        req = await service.kill(f"operator:{unix_user()}", rec, args.reason)
        ended = None
        if not args.no_wait:
            # a pass every enforce_interval_seconds on the bastion holding it, then the end
            deadline = time.monotonic() + 2 * config.grants.enforce_interval_seconds + 15
            while time.monotonic() < deadline:
                now = await stores.sessions.get(rec.id)
                if now is not None and now.ended_at is not None:
                    ended = now
                    break
                await asyncio.sleep(0.25)
    finally:
        await stores.close()
    if args.json:
        doc: dict[str, Any] = {"kill_id": req.id, "session_id": rec.id, "reason": req.reason,
                               "ended": ended is not None,
                               "exit_status": ended.exit_status if ended else None}
        out(json.dumps(doc, indent=2))
    elif ended is not None:
        out(printable(f"session {rec.id} ({rec.user} on {rec.target_name or rec.target}) "
                      f"ended: {ended.exit_status}"))
    elif args.no_wait:
        out(f"kill {req.id} requested: the bastion holding session {rec.id} ends it within "
            "its enforcement interval")
    else:
        out(f"kill {req.id} requested, but session {rec.id} has not ended yet (is the bastion "
            "holding it running?); it ends when that bastion next checks")
        return 1
    return 0


def register(ss: Any) -> None:
    s = ss.add_parser("kill", parents=leaf(), help="end a live session on whichever bastion "
                      "holds it; the user sees the reason (audited)")
    s.add_argument("session_id", help="session id or a unique prefix of it")
    s.add_argument("--reason", required=True, help="why: audited and shown to the user")
    s.add_argument("--no-wait", action="store_true",
                   help="return once the request is stored, without waiting for the end")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_kill))
