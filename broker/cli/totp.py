"""``totp enroll|reset|code``: the second factor, set up by an operator on the bastion."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from broker.cli.common import account, actor, config_of, leaf, run_async
from broker.cli.output import out
from broker.domain import totp
from broker.errors import NotFoundError, UsageError


async def _enroll(args: argparse.Namespace, *, reset: bool = False) -> int:
    import qrcode

    from broker.stores import connect_stores

    config = config_of(args)
    stores = await connect_stores(config)
    try:
        key = account(config, args.user)
        if reset and await stores.totp.get_secret(key) is None:
            raise NotFoundError(f"no TOTP enrolled for {key}")
        secret = totp.new_secret()
        await stores.totp.set_secret(key, secret)
        stores.audit.emit("totp.reset" if reset else "totp.enrolled", user=key, actor=actor())
    finally:
        await stores.close()
    uri = totp.provisioning_uri(secret, key, config.totp.issuer)
    out(f"TOTP enrolled for {key}. Scan this with an authenticator app, or enter the URI:")
    out(uri)
    qr = qrcode.QRCode(border=1)
    qr.add_data(uri)
    qr.make(fit=True)
    qr.print_ascii(out=sys.stdout, invert=True)
    return 0


async def _totp_enroll(args: argparse.Namespace) -> int:
    return await _enroll(args)


async def _totp_reset(args: argparse.Namespace) -> int:
    return await _enroll(args, reset=True)


def cmd_totp_code(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    try:
        out(totp.code_at_step(args.secret, totp.current_step(datetime.now(UTC))))
    except (ValueError, TypeError):
        raise UsageError("--secret is not a base32 TOTP secret") from None
    return 0


def register(sub: Any) -> None:
    t = sub.add_parser("totp", help="TOTP second factor").add_subparsers(dest="sub", required=True)
    s = t.add_parser("enroll", parents=leaf(),
                     help="create a TOTP secret for USER; prints URI and QR code")
    s.add_argument("user")
    s.set_defaults(func=run_async(_totp_enroll))
    s = t.add_parser("reset", parents=leaf(),
                     help="replace USER's TOTP secret (lost device); prints the new one")
    s.add_argument("user")
    s.set_defaults(func=run_async(_totp_reset))
    s = t.add_parser("code", parents=leaf(),
                     help="print the current code for a secret (like oathtool)")
    s.add_argument("--secret", required=True)
    s.set_defaults(func=cmd_totp_code)
