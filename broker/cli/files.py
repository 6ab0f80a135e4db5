"""``bastion-broker sessions files SESSION_ID``: the file operations of a session, from the audit log.

The audit log is the record of file operations (one event per operation, hash-chained), so this
reads it rather than keeping a second copy in the session index. For a recorded ProxyJump
connection (``scp -J``, ``sftp -J``) the operations are those of the sessions it carried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Collection, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from broker.cli import resolve, when
from broker.cli.common import config_of, leaf, run_async
from broker.cli.output import out, table
from broker.ports import SessionQuery


def file_events_of(lines: Iterable[bytes], session_ids: Collection[str]) -> list[dict[str, Any]]:
    """The ``sftp.*`` events of these sessions, in log order; damaged lines are passed over
    (``verify --audit`` is what reports them)."""
    needles = [json.dumps(sid).encode() for sid in session_ids]
    wanted = set(session_ids)
    events: list[dict[str, Any]] = []
    for line in lines:
        if b'"sftp.' not in line or not any(n in line for n in needles):
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if (isinstance(ev, dict) and ev.get("session_id") in wanted
                and str(ev.get("event", "")).startswith("sftp.")):
            events.append(ev)
    return events


def file_events(lines: Iterable[bytes], session_id: str) -> list[dict[str, Any]]:
    """The ``sftp.*`` events of one session, in log order."""
    return file_events_of(lines, (session_id,))


def read_events(path: Path, session_ids: Collection[str]) -> list[dict[str, Any]]:
    """``file_events_of`` over the audit log's files, rotated ones first (none if there is no
    log yet)."""
    from broker.audit.files import iter_lines
    from broker.errors import NotFoundError

    try:
        return file_events_of(iter_lines(path), session_ids)
    except OSError as exc:
        raise NotFoundError(f"cannot read the audit log: {exc.strerror}") from None


def rows(events: Iterable[dict[str, Any]], *, with_session: bool = False) -> list[dict[str, Any]]:
    """Table rows for file events (the per-session totals left out)."""
    out_rows = []
    for ev in events:
        if ev["event"] == "sftp.summary":
            continue
        path = str(ev.get("path") or ev.get("link_path") or "")
        if ev.get("new_path"):
            path += f" -> {ev['new_path']}"
        row = {"time": _time(ev), "operation": ev["event"].removeprefix("sftp."),
               "status": ev.get("status"), "path": path, "transfer": ev.get("transfer"),
               "size": ev.get("size"), "sha256": ev.get("sha256")}
        if with_session:
            row["session"] = str(ev.get("session_id", ""))[:8]
        out_rows.append(row)
    return out_rows


COLUMNS = ["time", "operation", "status", "path", "transfer", "size", "sha256"]


def _time(ev: dict[str, Any]) -> str:
    try:
        return when.show(datetime.fromisoformat(str(ev.get("ts", ""))))
    except ValueError:
        return str(ev.get("ts", ""))


async def _files(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    config = config_of(args)
    stores = await connect_stores(config, "read")
    try:
        rec = await resolve.session(stores.sessions, args.session_id)
        ids = [rec.id]
        if rec.kind == "jump":  # the file copies went through the sessions it carried
            inner = await stores.sessions.search(SessionQuery(parent_id=rec.id, limit=1000))
            ids += [m.record.id for m in inner]
    finally:
        await stores.close()
    events = await asyncio.to_thread(read_events, config.audit_path, ids)
    if args.json:
        out(json.dumps(events, indent=2))
        return 0
    jump = rec.kind == "jump"
    table(rows(events, with_session=jump), (["session"] if jump else []) + COLUMNS)
    return 0


def register(sessions: Any) -> None:
    """Add ``files`` to the ``sessions`` sub-commands."""
    s = sessions.add_parser("files", parents=leaf(),
                             help="file operations (sftp/scp) of a session, from the audit log")
    s.add_argument("session_id", help="session id or a unique prefix of it")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_files))
