"""``bastion-broker sessions files SESSION_ID``: the file operations of a session, from the audit log.

The audit log is the record of file operations (one event per operation, hash-chained), so this
reads it rather than keeping a second copy in the session index.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from broker.cli.common import config_of, leaf, run_async
from broker.cli.output import out, table


def file_events(lines: Iterable[bytes], session_id: str) -> list[dict[str, Any]]:
    """The ``sftp.*`` events of one session, in log order; damaged lines are passed over
    (``verify --audit`` is what reports them)."""
    needle = json.dumps(session_id).encode()
    events: list[dict[str, Any]] = []
    for line in lines:
        if needle not in line or b'"sftp.' not in line:
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if (isinstance(ev, dict) and ev.get("session_id") == session_id
                and str(ev.get("event", "")).startswith("sftp.")):
            events.append(ev)
    return events


def _read(path: Path, session_id: str) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return file_events(f, session_id)


async def _files(args: argparse.Namespace) -> int:
    from broker.errors import NotFoundError
    from broker.stores import connect_stores

    config = config_of(args)
    stores = await connect_stores(config, "read")
    try:
        rec = await stores.sessions.get(args.session_id)  # a unique prefix of the id counts
    finally:
        await stores.close()
    if rec is None:
        raise NotFoundError(f"no session {args.session_id}")
    try:
        events = await asyncio.to_thread(_read, config.audit_path, rec.id)
    except FileNotFoundError:
        events = []
    except OSError as exc:
        raise NotFoundError(f"cannot read the audit log: {exc.strerror}") from None
    if args.json:
        out(json.dumps(events, indent=2))
        return 0
    rows = []
    for ev in events:
        if ev["event"] == "sftp.summary":
            continue
        path = str(ev.get("path") or ev.get("link_path") or "")
        if ev.get("new_path"):
            path += f" -> {ev['new_path']}"
        rows.append({"time": str(ev.get("ts", ""))[:19].replace("T", " "),
                     "operation": ev["event"].removeprefix("sftp."), "status": ev.get("status"),
                     "path": path, "transfer": ev.get("transfer"), "size": ev.get("size"),
                     "sha256": ev.get("sha256")})
    table(rows, ["time", "operation", "status", "path", "transfer", "size", "sha256"])
    return 0


def register(sessions: Any) -> None:
    """Add ``files`` to the ``sessions`` sub-commands."""
    s = sessions.add_parser("files", parents=leaf(),
                             help="file operations (sftp/scp) of a session, from the audit log")
    s.add_argument("session_id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_files))
