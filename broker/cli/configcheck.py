"""``config check``: validate the configuration as the broker would read it, like ``sshd -t``.

The same reading a start or a reload does (the config file, then the inventory and static users
files it names, the AD bind password and notification secret files), without starting anything
or touching the state directory: run it before ``systemctl reload`` to see the file/key/problem
message on the terminal instead of in the log.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from broker.cli.common import config_of, config_path, leaf
from broker.cli.output import out


def cmd_check(args: argparse.Namespace) -> int:
    from broker.wiring import build_directory, build_inventory

    path = config_path(args)
    config = config_of(args)
    inventory = build_inventory(config)
    directory = build_directory(config)
    close = getattr(directory, "close", None)
    if close is not None:
        close()
    r = config.recordings
    if r.input == "sealed" and r.input_seal_key is not None:
        from broker.recordings.sealed import load_public_key

        load_public_key(r.input_seal_key)  # the break-glass key must load, or no session starts
    detail = [f"identity: {config.identity.backend}", f"store: {config.store.backend}",
              f"inventory: {config.inventory.backend}"]
    if config.inventory.backend == "static":
        instances = asyncio.run(_count(inventory))
        detail[-1] += f" ({instances} instance{'s' if instances != 1 else ''})"
    detail.append(f"input not echoed: {r.input}")
    from broker.notify.channels import check_files

    channels = check_files(config.notify)  # secret files are read at start: missing ones fail
    if channels:
        detail.append(f"notify: {channels} channel{'s' if channels != 1 else ''}")
    out(f"{path}: OK ({', '.join(detail)})")
    return 0


async def _count(inventory: Any) -> int:
    return len(await inventory.instances())


def register(sub: Any) -> None:
    c = sub.add_parser("config", help="the broker's configuration").add_subparsers(
        dest="sub", required=True)
    s = c.add_parser("check", parents=leaf(),
                     help="validate the config and the files it names (exit 2 with the problem)")
    s.set_defaults(func=cmd_check)
