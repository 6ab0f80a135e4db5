"""``ca known-hosts``: the ``@cert-authority`` line that makes OpenSSH accept recorded
``ssh -J`` targets. Reads the host CA's public key; never creates a key."""

from __future__ import annotations

import argparse
from typing import Any

from broker.cli.common import config_of, leaf, run_async
from broker.cli.output import out


async def _ca_known_hosts(args: argparse.Namespace) -> int:
    from broker.ssh.jump import host_ca_path, jump_patterns
    from broker.ssh.keys import read_public_key
    from broker.wiring import build_inventory

    cfg = config_of(args)
    pub = read_public_key(host_ca_path(cfg), "the host CA")
    patterns = list(args.pattern or [])
    if not patterns:
        patterns = jump_patterns(await build_inventory(cfg).instances())
    out(f"@cert-authority {','.join(patterns) or '*'} {pub}")
    return 0


def register(sub: Any) -> None:
    c = sub.add_parser("ca", help="the broker's certificate authorities"
                       ).add_subparsers(dest="sub", required=True)
    s = c.add_parser("known-hosts", parents=leaf(),
                     help="the @cert-authority line for recorded ssh -J")
    s.add_argument("--pattern", action="append",
                   help="host pattern (repeatable; default: the inventory's Linux ids and names)")
    s.set_defaults(func=run_async(_ca_known_hosts))
