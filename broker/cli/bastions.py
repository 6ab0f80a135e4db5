"""``bastions``: the bastions sharing this store, as their heartbeats say (``[fleet]``).

What an operator checks before and during a rolling upgrade or after losing an instance: each
bastion's last heartbeat, whether it is ``alive``, ``late`` (missed two beats) or ``lost``
(silent past ``lost_after_seconds``: the others close its open sessions), and how many session
rows are still open on it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from broker.cli import when
from broker.cli.common import config_of, leaf, run_async
from broker.cli.output import out, table
from broker.services.fleet import FleetWatch, bastion_json


async def _bastions(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    config = config_of(args)
    stores = await connect_stores(config, "read")
    try:
        f = config.fleet
        watch = FleetWatch(stores.fleet, stores.audit, stores.clock, config.node_name,
                           heartbeat=lambda: f.heartbeat_seconds,
                           lost_after=lambda: f.lost_after_seconds)
        found = await watch.listing()
        now = stores.clock.now()
    finally:
        await stores.close()
    rows = [bastion_json(b, state, now, config.node_name) for b, state in found]
    if args.json:
        out(json.dumps(rows, indent=2))
        return 0
    table([{**r, "name": r["name"] + (" (this)" if r["this"] else ""),
            "seen": f"{when.duration(r['silent_s'])} ago", "up since": when.show(b.started_at),
            "live": str(r["live_sessions"])} for r, (b, _) in zip(rows, found, strict=True)],
          ["name", "state", "seen", "up since", "live"])
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("bastions", parents=leaf(), help="the bastions sharing this store: last "
                       "heartbeat, alive/late/lost, open sessions")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_bastions))
