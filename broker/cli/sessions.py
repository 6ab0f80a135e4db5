"""``sessions list``, ``play`` and ``export``: read recorded sessions (never writes the state
directory; ``sessions files`` is in ``files``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

from broker.cli import files
from broker.cli.common import config_of, leaf, run_async
from broker.cli.output import out, table
from broker.domain import recording as fmt
from broker.domain.outcome import outcome
from broker.errors import NotFoundError, UsageError


async def _sessions_list(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    stores = await connect_stores(config_of(args), "read")
    try:
        recs = await stores.sessions.list(user=args.user, limit=args.limit)
    finally:
        await stores.close()
    rows: list[dict[str, Any]] = []
    for r in recs:
        dur = (r.ended_at - r.started_at).total_seconds() if r.ended_at else None
        rows.append({
            "id": r.id, "user": r.user, "target": r.target, "login": r.login,
            "level": r.level, "kind": r.kind, "command": r.command, "peer": r.peer,
            "grant_id": r.grant_id, "started_at": r.started_at.isoformat(),
            "ended_at": r.ended_at.isoformat() if r.ended_at else None,
            "duration_s": round(dur, 3) if dur is not None else None,
            "exit_status": r.exit_status,
            "outcome": outcome(r.exit_status, r.kind, ended=r.ended_at is not None),
            "bytes_in": r.bytes_in, "bytes_out": r.bytes_out,
            "recording": r.recording,
        })
    if args.json:
        out(json.dumps(rows, indent=2))
    else:
        for row in rows:
            row["started_at"] = row["started_at"][:19].replace("T", " ")
            row["what"] = row["command"] or row["kind"]
            row["status"] = row["outcome"]
        table(rows, ["id", "started_at", "user", "target", "level", "what", "status",
                     "bytes_out"])
    return 0


async def _open_recording(args: argparse.Namespace) -> tuple[fmt.FrameReader, BinaryIO]:
    """The session's recording as a ``FrameReader`` over its open file (the caller closes the
    file): replay and export hold one frame at a time, not the whole session."""
    from broker.stores import connect_stores

    stores = await connect_stores(config_of(args), "read")
    try:
        rec = await stores.sessions.get(args.session_id)
    finally:
        await stores.close()
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


def write_export(reader: fmt.Recording, raw: bool, output: str | None) -> None:
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
        await asyncio.to_thread(write_export, reader, args.raw, args.output)
    return 0


async def _play(args: argparse.Namespace) -> int:
    from broker.play import play

    if args.speed <= 0:
        raise UsageError("--speed must be positive")
    reader, f = await _open_recording(args)
    with f:
        await play(reader, speed=args.speed, idle_limit=args.idle_limit)
    return 0


def register(sub: Any) -> None:
    ss = sub.add_parser("sessions", help="recorded sessions").add_subparsers(dest="sub",
                                                                            required=True)
    s = ss.add_parser("list", parents=leaf(), help="list sessions, newest first")
    s.add_argument("--user")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_sessions_list))
    files.register(ss)  # sessions files SESSION_ID: sftp/scp file operations

    s = sub.add_parser("play", parents=leaf(), help="replay a session in this terminal")
    s.add_argument("session_id")
    s.add_argument("--speed", type=float, default=1.0)
    s.add_argument("--idle-limit", type=float, default=2.0, help="cap pauses (seconds)")
    s.set_defaults(func=run_async(_play))

    s = sub.add_parser("export", parents=leaf(), help="write a session as asciicast v2")
    s.add_argument("session_id")
    s.add_argument("-o", "--output", help="file (default: stdout)")
    s.add_argument("--raw", action="store_true", help="keep escape sequences that act on "
                   "the viewer's terminal (clipboard, title, queries); default: removed")
    s.set_defaults(func=run_async(_export))
