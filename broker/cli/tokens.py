"""``tokens list|revoke`` and ``web-sessions list|revoke``: anyone's API tokens and web sessions,
as an operator on the bastion host (``--config``) sees and ends them, acting as
``operator:<unix user>``; every revoke is audited. A revoke holds on every bastion sharing the
store at the next request."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from broker.cli.common import account, config_of, leaf, run_async, unix_user
from broker.cli.output import out, table
from broker.errors import NotFoundError


def _owner(args: argparse.Namespace) -> str | None:
    return account(config_of(args), args.user) if args.user else None


async def _tokens_list(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    owner = _owner(args)
    stores = await connect_stores(config_of(args), "read")
    try:
        recs = await stores.tokens.listing(owner)
    finally:
        await stores.close()
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = [
        {"id": r.id, "owner": r.owner, "name": r.name, "scopes": list(r.scopes),
         "roles": list(r.roles), "created_at": r.created_at.isoformat(),
         "expires_at": r.expires_at.isoformat(),
         "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
         "state": "revoked" if r.revoked_at else "expired" if now >= r.expires_at else "active"}
        for r in recs]
    if args.json:
        out(json.dumps(rows, indent=2))
    else:
        for row in rows:
            row["scopes"] = ",".join(row["scopes"])
            row["expires_at"] = row["expires_at"][:19].replace("T", " ")
        table(rows, ["id", "owner", "name", "scopes", "expires_at", "state"])
    return 0


async def _tokens_revoke(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    stores = await connect_stores(config_of(args))
    try:
        if not await stores.tokens.revoke(args.token_id, None, datetime.now(UTC)):
            raise NotFoundError(f"no active token {args.token_id}")
        stores.audit.emit("api_token.revoked", user=f"operator:{unix_user()}",
                          token_id=args.token_id, via="operator")
    finally:
        await stores.close()
    out(f"token {args.token_id} revoked")
    return 0


async def _sessions_list(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    owner = _owner(args)
    stores = await connect_stores(config_of(args), "read")
    try:
        recs = await stores.tokens.sessions(owner, now=datetime.now(UTC))
    finally:
        await stores.close()
    rows: list[dict[str, Any]] = [
        {"id": r.sid, "owner": r.owner, "peer": r.peer, "created_at": r.created_at.isoformat(),
         "expires_at": r.expires_at.isoformat()} for r in recs]
    if args.json:
        out(json.dumps(rows, indent=2))
    else:
        for row in rows:
            for k in ("created_at", "expires_at"):
                row[k] = row[k][:19].replace("T", " ")
        table(rows, ["id", "owner", "peer", "created_at", "expires_at"])
    return 0


async def _sessions_revoke(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    stores = await connect_stores(config_of(args))
    try:
        if not await stores.tokens.revoke_session(args.session_id, datetime.now(UTC)):
            raise NotFoundError(f"no live web session {args.session_id}")
        stores.audit.emit("web.session_ended", user=f"operator:{unix_user()}",
                          session=args.session_id, reason="revoked by an operator")
    finally:
        await stores.close()
    out(f"web session {args.session_id} ended")
    return 0


def register(sub: Any) -> None:
    t = sub.add_parser("tokens", help="API tokens of every user (operator)"
                       ).add_subparsers(dest="sub", required=True)
    s = t.add_parser("list", parents=leaf(), help="API tokens, oldest first")
    s.add_argument("--user", help="only this owner (alice, CORP\\alice, alice@corp...)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_tokens_list))
    s = t.add_parser("revoke", parents=leaf(), help="revoke anyone's API token (audited)")
    s.add_argument("token_id", help="t-... as 'tokens list' shows it")
    s.set_defaults(func=run_async(_tokens_revoke))

    w = sub.add_parser("web-sessions", help="live web (cookie) sessions of every user (operator)"
                       ).add_subparsers(dest="sub", required=True)
    s = w.add_parser("list", parents=leaf(), help="live web sessions, oldest first")
    s.add_argument("--user", help="only this owner (alice, CORP\\alice, alice@corp...)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_sessions_list))
    s = w.add_parser("revoke", parents=leaf(), help="end anyone's web session (audited)")
    s.add_argument("session_id", help="as 'web-sessions list' shows it")
    s.set_defaults(func=run_async(_sessions_revoke))
