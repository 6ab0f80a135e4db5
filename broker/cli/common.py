"""What every command group shares: the config, the acting operator, account names, asyncio."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from broker.config import BrokerConfig, load_config
from broker.errors import UsageError

DEFAULT_CONFIG = "/etc/bastion-broker/broker.toml"

Command = Callable[[argparse.Namespace], int]


def config_path(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "config", None) or os.environ.get("BASTION_BROKER_CONFIG")
                or DEFAULT_CONFIG)


def config_of(args: argparse.Namespace) -> BrokerConfig:
    """The config named by ``--config`` (before or after the command), the environment, or the
    default path."""
    return load_config(config_path(args))


def unix_user() -> str:
    """Who runs the CLI on the bastion (the sudo caller, not root), for operator actions."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def actor() -> str:
    return unix_user()


def account(config: BrokerConfig, user: str) -> str:
    """``alice`` or ``CORP\\alice`` or ``alice@corp.example.com`` -> ``alice@fqdn`` casefolded."""
    domain = config.identity.effective_default_domain
    if "\\" in user:
        netbios, _, user = user.partition("\\")
        domain = config.identity.effective_aliases.get(netbios.upper(), netbios)
    elif "@" in user:
        user, _, domain = user.rpartition("@")
    if not user:
        raise UsageError("empty user name")
    return f"{user}@{domain}".casefold()


def run_async(fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]) -> Command:
    """A command written as a coroutine, run on a fresh event loop."""
    return lambda args: asyncio.run(fn(args))


def add_global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """``--config`` and ``--api`` work before the command and after it (``bastion-broker --api
    URL login`` and ``bastion-broker login --api URL``). Below the top level they default to
    ``SUPPRESS`` so an absent option there never overwrites one given before the command."""
    default: Any = None if top else argparse.SUPPRESS
    p.add_argument("--config", default=default,
                   help=f"config file (default: $BASTION_BROKER_CONFIG or {DEFAULT_CONFIG})")
    p.add_argument("--api", default=default,
                   help="API base URL: remote mode for grant/login/logout (default: "
                        "$BASTION_BROKER_API unless --config is given)")


def leaf() -> list[argparse.ArgumentParser]:
    """``parents=`` for every command's own parser: the global options, accepted after it too."""
    p = argparse.ArgumentParser(add_help=False)
    add_global_options(p, top=False)
    return [p]
