"""``bastion-broker sessions reindex SESSION | --all``: build sessions' searchable text again.

The broker indexes a session's text when its recording is sealed; this rebuilds it from the
recordings, for sessions whose indexing failed (``session.index_failed`` in the audit), was cut
short by a stop, or predates text search. It works on the state directory with or without a
broker running (the text of a session is replaced whole, so running it twice changes nothing).
Live sessions are skipped: the broker indexes them when they end.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from broker.cli import resolve
from broker.cli.common import config_of, leaf, run_async, unix_user
from broker.cli.output import out, printable
from broker.domain.recording import RecordingFormatError
from broker.errors import BrokerError, UsageError
from broker.ports import SessionIndex, SessionQuery, SessionRecord
from broker.services.text_index import index_session

PAGE = 500


async def _all_sessions(index: SessionIndex) -> AsyncIterator[SessionRecord]:
    """Every session in the index, newest first, a page at a time (keyset: no page is
    skipped or read twice while sessions start meanwhile)."""
    after: tuple[datetime, str] | None = None
    while True:
        page = await index.search(SessionQuery(limit=PAGE, after=after))
        for m in page:
            yield m.record
        if len(page) < PAGE:
            return
        last = page[-1].record
        after = (last.started_at, last.id)


async def _reindex(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    if bool(args.session_id) == bool(args.all):
        raise UsageError("give a SESSION id (or a unique prefix of it), or --all")
    stores = await connect_stores(config_of(args), "command")
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    skipped = 0
    try:
        if args.session_id:
            rec = await resolve.session(stores.sessions, args.session_id)
            if rec.ended_at is None:
                raise UsageError(f"session {rec.id} has not ended: its text is indexed when "
                                 "it ends (a broker that stopped repairs it when it starts)")
            if not rec.recording:
                raise UsageError(f"session {rec.id} was not recorded: it has no text")
            records: AsyncIterator[SessionRecord] = _one(rec)
        else:
            records = _all_sessions(stores.sessions)
        async for rec in records:
            if rec.ended_at is None or not rec.recording:
                skipped += 1
                continue
            try:
                built = await index_session(stores.recordings, stores.sessions, rec.id,
                                            rec.recording)
            except (OSError, RecordingFormatError, BrokerError) as exc:
                error = str(exc) or type(exc).__name__
                failed.append({"session_id": rec.id, "error": error})
                stores.audit.emit("session.index_failed", session_id=rec.id, reason="error",
                                  error=error)
                continue
            done.append({"session_id": rec.id, "segments": len(built.segments),
                         "chars": built.chars, "truncated": built.truncated})
        stores.audit.emit("sessions.reindexed", actor=unix_user(),
                          scope=args.session_id or "all", indexed=len(done),
                          failed=len(failed), skipped=skipped)
    finally:
        await stores.close()
    _report(args, done, failed, skipped)
    return 1 if failed else 0


async def _one(rec: SessionRecord) -> AsyncIterator[SessionRecord]:
    yield rec


def _report(args: argparse.Namespace, done: list[dict[str, Any]],
            failed: list[dict[str, Any]], skipped: int) -> None:
    if args.json:
        out(json.dumps({"indexed": done, "failed": failed, "skipped": skipped}, indent=2))
        return
    for d in done if args.session_id else ():
        note = " (truncated: the rest of the session is not searchable)" if d["truncated"] else ""
        out(f"{d['session_id']}: {d['segments']} segments, {d['chars']} characters{note}")
    if args.all:
        truncated = sum(1 for d in done if d["truncated"])
        out(f"{len(done)} sessions indexed ({truncated} truncated), {len(failed)} failed, "
            f"{skipped} skipped (live or not recorded)")
    for f in failed:
        out(printable(f"{f['session_id']}: failed: {f['error']}"))


def register(ss: Any) -> None:
    s = ss.add_parser("reindex", parents=leaf(),
                      help="build sessions' searchable text again from their recordings")
    s.add_argument("session_id", nargs="?", help="session id or a unique prefix of it")
    s.add_argument("--all", action="store_true", help="every ended, recorded session")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_reindex))
