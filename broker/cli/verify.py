"""``bastion-broker verify SESSION_ID | --audit``: integrity of recordings and the audit chain.

Reads files (config, recordings, audit log, the public signing key): it needs neither the
database nor the private key, so it can run on a copy, as a user who may only read. A session id
is resolved as every command resolves it (``resolve``: an ambiguous prefix is an error naming the
candidates) when the session index can be read; without it, or for a session the index does not
know, the recording files are searched for the id or a unique prefix.
Exit status: 0 all good (warnings allowed), 1 something is wrong, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path

from broker.cli import resolve
from broker.cli.common import config_of, leaf
from broker.cli.output import out, printable
from broker.config import BrokerConfig
from broker.errors import BrokerError, NotFoundError, UsageError

_ID = re.compile(r"[0-9a-f-]{1,64}")


async def _indexed_id(config: BrokerConfig, text: str) -> str:
    """The full id of the session ``text`` names in the index, or ``text`` as given if the
    index cannot be read or does not know it (the files decide then)."""
    from broker.stores import connect_stores

    if not _ID.fullmatch(text):
        return text  # the file lookup names what is wrong with it
    try:
        stores = await connect_stores(config, "read")
    except (BrokerError, OSError):
        return text
    try:
        rec = await resolve.known_session(stores.sessions, text)
    except resolve.AmbiguousSession:
        raise
    except (BrokerError, OSError):
        return text
    finally:
        await stores.close()
    return rec.id if rec is not None else text


def cmd_verify(args: argparse.Namespace) -> int:
    from broker.integrity.keys import default_key_path, load_verify_key, public_path
    from broker.integrity.verify import Report, read_lines, verify_audit, verify_session

    if not args.session_id and not args.audit:
        raise UsageError("give a SESSION_ID, or --audit (or both)")
    config = config_of(args)
    key_file = Path(args.public_key) if args.public_key else public_path(
        default_key_path(config.state_dir))
    key = load_verify_key(key_file)
    reports: list[Report] = []
    if args.session_id:
        try:
            audit_lines: list[bytes] | None = read_lines(config.audit_path)
        except NotFoundError:
            audit_lines = None
        sid = asyncio.run(_indexed_id(config, args.session_id))
        reports.append(verify_session(config.recordings_dir, sid, key, audit_lines))
    if args.audit:
        reports.append(verify_audit(config.audit_path, key))
    ok = all(r.ok for r in reports)
    if args.json:
        out(json.dumps({"ok": ok, "reports": [r.as_json() for r in reports]}, indent=2))
    else:
        for r in reports:
            errors = sum(f.severity == "error" for f in r.findings)
            warnings = len(r.findings) - errors
            status = "OK" if r.ok else f"FAILED ({errors} problem{'s' if errors != 1 else ''})"
            if warnings:
                status += f", {warnings} warning{'s' if warnings != 1 else ''}"
            out(printable(f"{r.subject}: {status}"))
            for f in r.findings:
                out(printable(f"  {f.severity}: {f.message} [{f.code}]"))
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("verify", parents=leaf(),
                        help="check a recording's signed manifest, or the audit chain")
    s.add_argument("session_id", nargs="?", help="session to check (id or a unique prefix)")
    s.add_argument("--audit", action="store_true",
                   help="check the audit log's hash chain and signed checkpoints, across "
                   "its rotated files")
    s.add_argument("--public-key", help="PEM public key to verify with (default: the one "
                   "beside the bastion's signing key in the state dir)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)
