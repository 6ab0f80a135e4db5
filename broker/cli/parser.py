"""The argument parser: global options, then one ``register`` per command group."""

from __future__ import annotations

import argparse

from broker import __version__
from broker.cli import (
    auth,
    bastions,
    ca,
    configcheck,
    drain,
    grants,
    keys,
    knownhosts,
    locks,
    notify,
    serve,
    sessions,
    shipping,
    tokens,
    totp,
    users,
    verify,
)
from broker.cli.common import add_global_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bastion-broker",
        description="run the broker or the demo, and operate it (grants, sessions, TOTP, users)")
    add_global_options(p, top=True)
    p.add_argument("--version", action="version", version=f"bastion-broker {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(sub)      # serve, demo
    drain.register(sub)      # drain: SIGQUIT to the running broker (rolling upgrades)
    bastions.register(sub)   # bastions: the fleet's heartbeats
    grants.register(sub)     # grant request|approve|...|list|show|add, login, logout
    verify.register(sub)     # verify SESSION_ID | --audit
    shipping.register(sub)   # shipping status
    sessions.register(sub)   # sessions list|files, play, export
    totp.register(sub)
    auth.register(sub)
    keys.register(sub)
    ca.register(sub)
    knownhosts.register(sub)  # known-hosts --api URL (engineers; no login)
    users.register(sub)
    configcheck.register(sub)  # config check
    tokens.register(sub)     # tokens list|revoke, web-sessions list|revoke (operator)
    locks.register(sub)      # lock --user|--target|--stack, lock list, lock remove
    notify.register(sub)     # notify deliveries, notify test
    return p
