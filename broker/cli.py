"""``bastion-broker``: run the broker or the demo, and operate it (grants, sessions, TOTP, users).

Errors are printed as one line (``bastion-broker: error: ...``), never as a traceback. Every
listing has ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from broker import __version__
from broker.cli_output import out as _out
from broker.cli_output import table as _table
from broker.config import BrokerConfig, load_config
from broker.domain import recording as fmt
from broker.domain import totp
from broker.errors import BrokerError, NotFoundError, UsageError

DEFAULT_CONFIG = "/etc/bastion-broker/broker.toml"





def _config(args: argparse.Namespace) -> BrokerConfig:
    path = args.config or os.environ.get("BASTION_BROKER_CONFIG") or DEFAULT_CONFIG
    return load_config(Path(path))


# -- serve / demo ------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from broker import logs
    from broker.app import run

    config = _config(args)
    logs.configure(config.log_level)
    return run(config)


def cmd_demo(args: argparse.Namespace) -> int:
    from broker.demo import run_demo

    if args.users < 1 or args.users > 5000:
        raise UsageError("--users must be between 1 and 5000")
    if not 0 <= args.workers <= 64:
        raise UsageError("--workers must be between 0 (one per core) and 64")
    return run_demo(Path(args.state_dir), args.ssh_port, args.users, args.workers,
                    public_keys=args.public_keys)


# -- sessions / play / export ------------------------------------------------------------------
async def _sessions_list(args: argparse.Namespace) -> int:
    from broker.app import connect_stores

    stores = await connect_stores(_config(args))
    recs = await stores.sessions.list(user=args.user, limit=args.limit)
    rows: list[dict[str, Any]] = []
    for r in recs:
        dur = (r.ended_at - r.started_at).total_seconds() if r.ended_at else None
        rows.append({
            "id": r.id, "user": r.user, "target": r.target, "login": r.login,
            "level": r.level, "kind": r.kind, "command": r.command, "peer": r.peer,
            "grant_id": r.grant_id, "started_at": r.started_at.isoformat(),
            "ended_at": r.ended_at.isoformat() if r.ended_at else None,
            "duration_s": round(dur, 3) if dur is not None else None,
            "exit_status": r.exit_status, "bytes_in": r.bytes_in, "bytes_out": r.bytes_out,
            "recording": r.recording,
        })
    if args.json:
        _out(json.dumps(rows, indent=2))
    else:
        for row in rows:
            row["started_at"] = row["started_at"][:19].replace("T", " ")
            row["what"] = row["command"] or row["kind"]
            row["status"] = row["exit_status"] if row["ended_at"] else "live"
        _table(rows, ["id", "started_at", "user", "target", "level", "what", "status",
                      "bytes_out"])
    return 0


async def _open_recording(args: argparse.Namespace) -> tuple[fmt.FrameReader, BinaryIO]:
    """The session's recording as a ``FrameReader`` over its open file (the caller closes the
    file): replay and export hold one frame at a time, not the whole session."""
    from broker.app import connect_stores

    stores = await connect_stores(_config(args))
    rec = await stores.sessions.get(args.session_id)
    if rec is None:
        raise NotFoundError(f"no session {args.session_id}")
    if not rec.recording:
        raise NotFoundError(f"session {rec.id} was not recorded")
    f = stores.recordings.open_read(rec.recording)
    try:
        return fmt.FrameReader(f, os.fstat(f.fileno()).st_size), f
    except fmt.RecordingFormatError as exc:
        f.close()
        raise NotFoundError(f"recording of {rec.id} is unreadable: {exc}") from None


def _write_export(reader: fmt.Recording, raw: bool, output: str | None) -> None:
    from broker.domain.sanitize import safe_asciicast
    from broker.recordings.local import write_lines_atomically

    lines = fmt.to_asciicast(reader)
    # safe to play by default; --raw keeps every byte the target sent (for forensics)
    lines = lines if raw else safe_asciicast(lines)
    if not output or output == "-":
        for line in lines:
            sys.stdout.write(line + "\n")
        return
    write_lines_atomically(Path(output), lines)  # a failed export leaves no half file behind


async def _export(args: argparse.Namespace) -> int:
    reader, f = await _open_recording(args)
    with f:
        await asyncio.to_thread(_write_export, reader, args.raw, args.output)
    return 0


async def _play(args: argparse.Namespace) -> int:
    from broker.play import play

    if args.speed <= 0:
        raise UsageError("--speed must be positive")
    reader, f = await _open_recording(args)
    with f:
        await play(reader, speed=args.speed, idle_limit=args.idle_limit)
    return 0


# -- totp / users ------------------------------------------------------------------------------
async def _totp_enroll(args: argparse.Namespace) -> int:
    import qrcode

    from broker.app import connect_stores

    config = _config(args)
    stores = await connect_stores(config)
    key = _account(config, args.user)
    user = key
    secret = totp.new_secret()
    await stores.totp.set_secret(key, secret)
    stores.audit.emit("totp.enrolled", user=key, actor=_actor())
    uri = totp.provisioning_uri(secret, user, config.totp.issuer)
    _out(f"TOTP enrolled for {user}. Scan this with an authenticator app, or enter the URI:")
    _out(uri)
    qr = qrcode.QRCode(border=1)
    qr.add_data(uri)
    qr.make(fit=True)
    qr.print_ascii(out=sys.stdout, invert=True)
    return 0


def _account(config: BrokerConfig, user: str) -> str:
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


async def _totp_reset(args: argparse.Namespace) -> int:
    from broker.app import connect_stores

    config = _config(args)
    stores = await connect_stores(config)
    key = _account(config, args.user)
    if await stores.totp.get_secret(key) is None:
        raise NotFoundError(f"no TOTP enrolled for {key}")
    await _totp_enroll(args)
    stores.audit.emit("totp.reset", user=key, actor=_actor())
    return 0


async def _auth_status(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from broker.app import connect_stores

    stores = await connect_stores(_config(args))
    now = datetime.now(UTC).timestamp()
    rows = [
        {"account": st.account, "failures": st.failures, "locked": st.locked,
         "wait_s": max(0.0, round(st.next_allowed - now, 1))}
        for st in await stores.throttle.listing()
    ]
    if args.json:
        _out(json.dumps(rows, indent=2))
    else:
        _table(rows, ["account", "failures", "locked", "wait_s"])
    return 0


async def _auth_unlock(args: argparse.Namespace) -> int:
    from broker.app import connect_stores

    config = _config(args)
    stores = await connect_stores(config)
    key = _account(config, args.user)
    if not await stores.throttle.unlock(key):
        raise NotFoundError(f"{key} has no failed logins on record")
    stores.audit.emit("account.unlocked", user=key, actor=_actor())
    _out(f"{key} unlocked")
    return 0


async def _key_add(args: argparse.Namespace) -> int:
    from broker.app import connect_stores

    config = _config(args)
    stores = await connect_stores(config)
    account = _account(config, args.user)
    from broker.ssh.keys import parse_public_key

    line = sys.stdin.readline().strip() if args.public_key == "-" else args.public_key
    try:
        parse_public_key(line)
    except BrokerError as exc:
        raise UsageError(str(exc)) from None
    fp = await stores.keys.add(account, line, args.comment or "")
    stores.audit.emit("key.added", user=account, fingerprint=fp, actor=_actor())
    _out(f"{fp} registered for {account}")
    if not config.identity.public_keys:
        _out("note: [identity] public_keys = false in the config: keys are not accepted yet")
    return 0


async def _key_list(args: argparse.Namespace) -> int:
    from broker.app import connect_stores

    config = _config(args)
    stores = await connect_stores(config)
    account = _account(config, args.user) if args.user else None
    rows = [{"account": a, "fingerprint": f, "comment": c}
            for a, f, c in await stores.keys.listing(account)]
    if args.json:
        _out(json.dumps(rows, indent=2))
    else:
        _table(rows, ["account", "fingerprint", "comment"])
    return 0


async def _key_remove(args: argparse.Namespace) -> int:
    from broker.app import connect_stores

    config = _config(args)
    stores = await connect_stores(config)
    account = _account(config, args.user)
    if not await stores.keys.remove(account, args.fingerprint):
        raise NotFoundError(f"no key {args.fingerprint} registered for {account}")
    stores.audit.emit("key.removed", user=account, fingerprint=args.fingerprint, actor=_actor())
    _out(f"{args.fingerprint} removed from {account}")
    return 0


def _actor() -> str:
    from broker.cli_grants import unix_user

    return unix_user()


def cmd_totp_code(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    try:
        _out(totp.code_at_step(args.secret, totp.current_step(datetime.now(UTC))))
    except (ValueError, TypeError):
        raise UsageError("--secret is not a base32 TOTP secret") from None
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    from broker.identity.passwords import hash_password
    from broker.identity.static import load_users

    config = _config(args)
    path = config.identity.users_file
    existing = load_users(path) if path.exists() else None
    if existing and any(u.name.casefold() == args.user.casefold() for u in existing.users):
        raise UsageError(f"user {args.user} already exists in {path}")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"Password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            raise UsageError("passwords differ")
    if len(password) < 8:
        raise UsageError("password must have at least 8 characters")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f'\n[[users]]\nname = {json.dumps(args.user)}\n'
                f'password_hash = {json.dumps(hash_password(password))}\n')
    _out(f"user {args.user} added to {path}; restart the broker to load it")
    return 0


async def _ca_known_hosts(args: argparse.Namespace) -> int:
    """The known_hosts line that makes OpenSSH accept recorded ProxyJump (ssh -J) targets."""
    from broker.app import build_inventory
    from broker.ssh.jump import known_hosts_line

    cfg = _config(args)
    patterns = list(args.pattern or [])
    if not patterns:
        instances = await build_inventory(cfg).instances()
        patterns = sorted({n for i in instances if i.os == "linux" for n in (i.id, i.name)})
    _out(known_hosts_line(cfg, patterns))
    return 0


def _run(coro_fn: Any) -> Any:
    return lambda args: asyncio.run(coro_fn(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bastion-broker", description=__doc__.splitlines()[0])
    p.add_argument("--config",
                   help=f"config file (default: $BASTION_BROKER_CONFIG or {DEFAULT_CONFIG})")
    p.add_argument("--version", action="version", version=f"bastion-broker {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the broker")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("demo", help="run a demo broker with real sshd targets on loopback")
    s.add_argument("--state-dir", required=True, help="directory for all demo state")
    s.add_argument("--ssh-port", type=int, default=0, help="broker SSH port (default: a free one)")
    s.add_argument("--users", type=int, default=1,
                   help="demo users: alice plus user002..userN (for trying concurrency)")
    s.add_argument("--workers", type=int, default=1,
                   help="broker processes sharing the port (0: one per core)")
    s.add_argument("--public-keys", action="store_true",
                   help="also accept a demo SSH key (written to the state dir) instead of the "
                        "password; the code is still asked")
    s.set_defaults(func=cmd_demo)

    from broker.cli_grants import register as register_grants

    register_grants(sub)  # grant request|approve|...|list|show|add, login, logout
    from broker.cli_verify import register as register_verify

    register_verify(sub)  # verify SESSION_ID | --audit
    from broker.shipping.cli import register as register_shipping

    register_shipping(sub)  # shipping status: what waits for S3 / CloudWatch

    ss = sub.add_parser("sessions", help="recorded sessions").add_subparsers(dest="sub",
                                                                            required=True)
    s = ss.add_parser("list", help="list sessions, newest first")
    s.add_argument("--user")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_run(_sessions_list))
    from broker.sftp.cli import register as register_files

    register_files(ss)  # sessions files SESSION_ID: sftp/scp file operations

    s = sub.add_parser("play", help="replay a session in this terminal")
    s.add_argument("session_id")
    s.add_argument("--speed", type=float, default=1.0)
    s.add_argument("--idle-limit", type=float, default=2.0, help="cap pauses (seconds)")
    s.set_defaults(func=_run(_play))

    s = sub.add_parser("export", help="write a session as asciicast v2")
    s.add_argument("session_id")
    s.add_argument("-o", "--output", help="file (default: stdout)")
    s.add_argument("--raw", action="store_true", help="keep escape sequences that act on "
                   "the viewer's terminal (clipboard, title, queries); default: removed")
    s.set_defaults(func=_run(_export))

    t = sub.add_parser("totp", help="TOTP second factor").add_subparsers(dest="sub", required=True)
    s = t.add_parser("enroll", help="create a TOTP secret for USER; prints URI and QR code")
    s.add_argument("user")
    s.set_defaults(func=_run(_totp_enroll))
    s = t.add_parser("reset", help="replace USER's TOTP secret (lost device); prints the new one")
    s.add_argument("user")
    s.set_defaults(func=_run(_totp_reset))
    s = t.add_parser("code", help="print the current code for a secret (like oathtool)")
    s.add_argument("--secret", required=True)
    s.set_defaults(func=cmd_totp_code)

    a = sub.add_parser("auth", help="login throttling").add_subparsers(dest="sub", required=True)
    s = a.add_parser("status", help="accounts with recent failed logins, locked first")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_run(_auth_status))
    s = a.add_parser("unlock", help="clear the failures and the lock of an account")
    s.add_argument("user", help="alice, CORP\\alice or alice@corp.example.com")
    s.set_defaults(func=_run(_auth_unlock))

    k = sub.add_parser("key", help="SSH keys that may replace the password (never the code)"
                       ).add_subparsers(dest="sub", required=True)
    s = k.add_parser("add", help="register a public key for USER")
    s.add_argument("user")
    s.add_argument("public_key", help="an OpenSSH public key line, or - to read it from stdin")
    s.add_argument("--comment")
    s.set_defaults(func=_run(_key_add))
    s = k.add_parser("list", help="registered keys")
    s.add_argument("user", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_run(_key_list))
    s = k.add_parser("remove", help="unregister a key by its SHA256 fingerprint")
    s.add_argument("user")
    s.add_argument("fingerprint")
    s.set_defaults(func=_run(_key_remove))

    c = sub.add_parser("ca", help="the broker's certificate authorities"
                       ).add_subparsers(dest="sub", required=True)
    s = c.add_parser("known-hosts", help="the @cert-authority line for recorded ssh -J")
    s.add_argument("--pattern", action="append",
                   help="host pattern (repeatable; default: the inventory's Linux ids and names)")
    s.set_defaults(func=_run(_ca_known_hosts))

    u = sub.add_parser("user", help="static directory users").add_subparsers(dest="sub",
                                                                            required=True)
    s = u.add_parser("add", help="add a user with an argon2id password hash")
    s.add_argument("user")
    s.add_argument("--password-stdin", action="store_true")
    s.set_defaults(func=cmd_user_add)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokerError as exc:
        sys.stderr.write(f"bastion-broker: error: {exc.user_message}\n")
        return 2
    except KeyboardInterrupt:
        return 130
