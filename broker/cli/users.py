"""``user add``: a user of the static directory, stored with an argon2id password hash."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from broker.cli.common import config_of, leaf
from broker.cli.output import out
from broker.errors import UsageError


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        # getpass would fall back to echoing input (or fail on EOF): refuse clearly instead
        raise UsageError("standard input is not a terminal: give the password with "
                         "--password-stdin")
    try:
        password = getpass.getpass(f"Password for {args.user}: ")
        again = getpass.getpass("Again: ")
    except EOFError:
        raise UsageError("no password given") from None
    if again != password:
        raise UsageError("passwords differ")
    return password


def cmd_user_add(args: argparse.Namespace) -> int:
    from broker.identity.passwords import hash_password
    from broker.identity.static import load_users

    config = config_of(args)
    path = config.identity.users_file
    existing = load_users(path) if path.exists() else None
    if existing and any(u.name.casefold() == args.user.casefold() for u in existing.users):
        raise UsageError(f"user {args.user} already exists in {path}")
    password = _read_password(args)
    if len(password) < 8:
        raise UsageError("password must have at least 8 characters")
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f'\n[[users]]\nname = {json.dumps(args.user)}\n'
                    f'password_hash = {json.dumps(hash_password(password))}\n')
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    out(f"user {args.user} added to {path}; reload the broker to load it "
        "(systemctl reload bastion-broker, or SIGHUP)")
    return 0


def register(sub: Any) -> None:
    u = sub.add_parser("user", help="static directory users").add_subparsers(dest="sub",
                                                                            required=True)
    s = u.add_parser("add", parents=leaf(), help="add a user with an argon2id password hash")
    s.add_argument("user")
    s.add_argument("--password-stdin", action="store_true")
    s.set_defaults(func=cmd_user_add)
