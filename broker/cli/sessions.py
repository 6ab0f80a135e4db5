"""``sessions list|show|files``, ``play`` and ``export``: read recorded sessions (never writes the
state directory; ``sessions files`` is in ``files``).

Every command that takes a session id takes a unique prefix of it too (``resolve``). Times are
UTC: ISO 8601 with ``+00:00`` in JSON, ``2026-12-07 14:30:05Z`` in tables (``when``).

A recorded ProxyJump is one connection (a ``jump`` session) carrying the sessions run through
it; ``sessions list`` shows each such connection with its sessions indented below it, unless
``--all`` asks for every session flat, newest first. A filter that picks sessions by what they
are (``--kind``, ``--status``, ``--search``) lists them flat too, naming the connection that
carried one in the VIA column: a match inside a jump would be hidden under a parent that does
not match itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from broker.cli import files, kill, reindex, resolve, unseal, watch, when
from broker.cli.common import account, config_of, leaf, run_async
from broker.cli.output import out, printable
from broker.config import BrokerConfig
from broker.domain import recording as fmt
from broker.domain.outcome import outcome, status_of
from broker.errors import BrokerError, NotFoundError, UsageError
from broker.ports import (
    SESSION_STATUSES,
    RecordingSink,
    SessionIndex,
    SessionMatch,
    SessionQuery,
    SessionRecord,
    TextHit,
)

KINDS = ("shell", "exec", "subsystem", "tunnel", "jump")
MAX_LIMIT = 10_000
CHILDREN = 1_000  # sessions listed under one jump connection
HITS_SHOWN = 3  # per session in the table (JSON has every hit the search returned)
WHAT_WIDTH = 48


# -- the query --------------------------------------------------------------------------------
def build_query(args: argparse.Namespace, config: BrokerConfig, now: datetime) -> SessionQuery:
    """The ``sessions list`` options as a ``SessionQuery`` (bad input: a one-line error)."""
    since = when.parse_when("--since", args.since, now) if args.since is not None else None
    until = when.parse_when("--until", args.until, now) if args.until is not None else None
    if since is not None and until is not None and until <= since:
        raise UsageError(f"--until ({when.show(until)}) must be after --since "
                         f"({when.show(since)})")
    if not 1 <= args.limit <= MAX_LIMIT:
        raise UsageError(f"--limit must be between 1 and {MAX_LIMIT}")
    text = None
    if args.search is not None:
        text = " ".join(args.search.split())
        if not text:
            raise UsageError("--search: give the text to look for")
    user = args.user
    if user is not None:
        user = account(config, user) if "\\" in user else user.strip().casefold()
        if not user:
            raise UsageError("--user: empty user name")
    return SessionQuery(
        user=user, target=_opt(args.target), stack=_opt(args.stack), grant_id=_opt(args.grant),
        ticket=_opt(args.ticket), trigger=_opt(args.trigger), kind=args.kind,
        status=args.status, since=since, until=until, text=text, limit=args.limit)


def _opt(value: str | None) -> str | None:
    return value.strip() or None if value is not None else None


def flat_listing(q: SessionQuery, all_sessions: bool) -> bool:
    """Whether the list is flat: asked for, or filtered on what sessions themselves are."""
    return all_sessions or bool(q.kind or q.status or q.text)


Entry = tuple[SessionMatch, int]  # a match and its depth (1: inside the jump above it)


async def listing(index: SessionIndex, q: SessionQuery, *, flat: bool) -> list[Entry]:
    """The matches to show, in order: newest first; in the tree, each jump connection followed
    by the sessions it carried, in the order they started."""
    if flat:
        return [(m, 0) for m in await index.search(q)]
    entries: list[Entry] = []
    for m in await index.search(replace(q, top_level=True)):
        entries.append((m, 0))
        if m.record.kind == "jump":
            inner = await index.search(SessionQuery(parent_id=m.record.id, limit=CHILDREN))
            entries += [(c, 1) for c in reversed(inner)]
    return entries


# -- rows -------------------------------------------------------------------------------------
def _seconds(r: SessionRecord) -> float | None:
    return (r.ended_at - r.started_at).total_seconds() if r.ended_at else None


def hit_json(r: SessionRecord, h: TextHit) -> dict[str, Any]:
    at = when.utc(r.started_at).timestamp() + h.t
    return {"t": round(h.t, 3), "at": when.iso(datetime.fromtimestamp(at, UTC)),
            "source": h.source, "snippet": h.snippet}


def session_json(r: SessionRecord, hits: Sequence[TextHit] | None = None) -> dict[str, Any]:
    """One session for ``--json`` (times ISO 8601 UTC, sizes in bytes)."""
    dur = _seconds(r)
    ended = r.ended_at is not None
    row: dict[str, Any] = {
        "id": r.id, "user": r.user, "target": r.target, "target_name": r.target_name,
        "stack": r.stack, "login": r.login, "level": r.level, "kind": r.kind,
        "command": r.command, "peer": r.peer, "grant_id": r.grant_id,
        "parent_id": r.parent_id, "bastion": r.bastion,
        "started_at": when.iso(r.started_at), "ended_at": when.iso(r.ended_at),
        "duration_s": round(dur, 3) if dur is not None else None,
        "exit_status": r.exit_status,
        "outcome": outcome(r.exit_status, r.kind, ended=ended),
        "status": status_of(r.exit_status, ended=ended),
        "bytes_in": r.bytes_in, "bytes_out": r.bytes_out, "recording": r.recording,
    }
    if hits is not None:
        row["hits"] = [hit_json(r, h) for h in hits]
    return row


def _what(r: SessionRecord) -> str:
    text = " ".join((r.command or r.kind).split())
    return text if len(text) <= WHAT_WIDTH else text[:WHAT_WIDTH - 1] + "…"


def table_row(r: SessionRecord, depth: int, now: datetime) -> dict[str, str]:
    ended = r.ended_at is not None
    dur = _seconds(r)
    if dur is None:
        dur_text = when.duration((now - when.utc(r.started_at)).total_seconds()) + "+"
    else:
        dur_text = when.duration(dur)
    return {
        "id": ("└ " if depth else "") + r.id[:8], "started": when.show(r.started_at),
        "user": r.user, "target": r.target_name or r.target, "what": _what(r),
        "status": outcome(r.exit_status, r.kind, ended=ended), "duration": dur_text,
        "in": when.size(r.bytes_in), "out": when.size(r.bytes_out),
        "via": r.parent_id[:8] if r.parent_id else "",
    }


def hit_line(r: SessionRecord, h: TextHit) -> str:
    at = datetime.fromtimestamp(when.utc(r.started_at).timestamp() + h.t, UTC)
    snippet = " ".join(h.snippet.split())
    if len(snippet) > 100:
        snippet = snippet[:99] + "…"
    return printable(f"{when.offset(h.t)}  {when.show(at)}  {h.source}: {snippet}")


def render(entries: list[Entry], columns: Sequence[str], now: datetime) -> list[str]:
    """The table, with a session's text hits on the lines below it."""
    if not entries:
        return ["(none)"]
    cells = [{c: printable(v) for c, v in table_row(m.record, d, now).items()}
             for m, d in entries]
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for (m, _), row in zip(entries, cells, strict=True):
        lines.append("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())
        for h in m.hits[:HITS_SHOWN]:
            lines.append("    " + hit_line(m.record, h))
        if len(m.hits) > HITS_SHOWN:
            lines.append(f"    ... more: bastion-broker sessions show {m.record.id[:8]} "
                         "--search TEXT")
    return lines


# -- sessions list ----------------------------------------------------------------------------
async def _sessions_list(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    config = config_of(args)
    now = datetime.now(UTC)
    q = build_query(args, config, now)
    flat = flat_listing(q, args.all)
    stores = await connect_stores(config, "read")
    try:
        entries = await listing(stores.sessions, q, flat=flat)
    finally:
        await stores.close()
    if args.json:
        out(json.dumps([session_json(m.record, m.hits if q.text else None)
                        for m, _ in entries], indent=2))
        return 0
    columns = ["id", "started", "user", "target", "what", "status", "duration", "in", "out"]
    if flat:
        columns.append("via")
    for line in render(entries, columns, now):
        out(line)
    shown = sum(1 for _, d in entries if d == 0)
    if shown == q.limit:
        out(f"(the newest {shown}{' connections' if not flat else ''}; --limit or --until "
            "for more)")
    return 0


# -- sessions show ----------------------------------------------------------------------------
def integrity(config: BrokerConfig, r: SessionRecord,
              audit_lines: list[bytes] | None) -> dict[str, Any]:
    """The ``verify`` result of the session's recording, or why it was not checked."""
    from broker.integrity.keys import default_key_path, load_verify_key, public_path
    from broker.integrity.verify import verify_session

    if r.ended_at is None:
        return {"status": "not checked", "reason": "live: the recording is sealed when it ends"}
    if not r.recording:
        return {"status": "not checked", "reason": "not recorded"}
    try:
        key = load_verify_key(public_path(default_key_path(config.state_dir)))
        report = verify_session(config.recordings_dir, r.id, key, audit_lines)
    except BrokerError as exc:
        return {"status": "not checked", "reason": exc.user_message}
    return {"status": "ok" if report.ok else "failed", "report": report.as_json()}


def _read_audit(path: Path) -> list[bytes] | None:
    from broker.audit.files import read_all

    try:
        data = read_all(path)  # every file of a rotated log, in order
    except OSError:
        return None
    return data.splitlines() if data is not None else None


def _grant_json(g: Any, now: datetime) -> dict[str, Any]:
    return {"id": g.id, "user": f"{g.username}@{g.domain}", "state": str(g.effective_state(now)),
            "level": str(g.level), "stacks": list(g.stack_ids), "vpc": g.vpc_id,
            "trigger": str(g.trigger), "ticket": g.ticket, "reason": g.reason,
            "requested_by": g.requested_by, "approved_by": g.approved_by,
            "starts_at": when.iso(g.starts_at), "expires_at": when.iso(g.expires_at)}


async def _show(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    config = config_of(args)
    now = datetime.now(UTC)
    text = " ".join(args.search.split()) if args.search is not None else None
    if text == "":
        raise UsageError("--search: give the text to look for")
    stores = await connect_stores(config, "read")
    try:
        rec = await resolve.session(stores.sessions, args.session_id)
        grant = await stores.grants.get(rec.grant_id) if rec.grant_id else None
        parent = await stores.sessions.get(rec.parent_id) if rec.parent_id else None
        inner = ([m.record for m in await stores.sessions.search(
            SessionQuery(parent_id=rec.id, limit=CHILDREN))] if rec.kind == "jump" else [])
        hits = await stores.sessions.text_hits(rec.id, text) if text else None
    finally:
        await stores.close()
    inner.reverse()  # in the order they started
    audit_lines = await asyncio.to_thread(_read_audit, config.audit_path)
    events = files.file_events_of(audit_lines or [], [rec.id, *(c.id for c in inner)])
    check = await asyncio.to_thread(integrity, config, rec, audit_lines)
    doc: dict[str, Any] = {
        "session": session_json(rec), "grant": _grant_json(grant, now) if grant else None,
        "parent": session_json(parent) if parent else None,
        "sessions": [session_json(c) for c in inner], "files": events, "integrity": check}
    if hits is not None:
        doc["hits"] = [hit_json(rec, h) for h in hits]
    if args.json:
        out(json.dumps(doc, indent=2))
    else:
        for line in show_lines(rec, doc, hits, now):
            out(line)
    return 0


def show_lines(r: SessionRecord, doc: dict[str, Any], hits: list[TextHit] | None,
               now: datetime) -> list[str]:
    """``sessions show`` as text: the record, its grant, integrity, files, inner sessions, hits."""
    s = doc["session"]
    ended = r.ended_at is not None
    dur = _seconds(r)
    fields = [
        ("user", r.user),
        ("target", f"{r.target_name or r.target} ({r.target})"
                   + (f", stack {r.stack}" if r.stack else "")),
        ("login", f"{r.login or '-'}, level {r.level}"),
        ("kind", r.kind), ("command", r.command or ""), ("peer", r.peer),
        ("bastion", r.bastion), ("started", when.show(r.started_at)),
        ("ended", f"{when.show(r.ended_at)} ({when.duration(dur)})" if ended else
         f"live for {when.duration((now - when.utc(r.started_at)).total_seconds())}"),
        ("status", f"{s['outcome']} ({s['status']})"),
        ("bytes", f"in {when.size(r.bytes_in)} ({r.bytes_in}), "
                  f"out {when.size(r.bytes_out)} ({r.bytes_out})"),
        ("recording", r.recording or "(not recorded)"),
    ]
    p = doc["parent"]
    if p is not None:
        fields.append(("via", f"jump {p['id']} ({p['command'] or ''})"))
    elif r.parent_id:
        fields.append(("via", f"jump {r.parent_id}"))
    lines = [f"session {r.id}"]
    lines += [printable(f"  {k:<10} {v}") for k, v in fields if v]
    g = doc["grant"]
    if g is None:
        lines.append(printable(f"grant {r.grant_id or '-'}: not found"))
    else:
        lines.append(printable(f"grant {g['id']}: {g['state']}, {g['level']}, stacks "
                               f"{','.join(g['stacks'])}, vpc {g['vpc']}"))
        lines.append(printable(f"  ticket {g['ticket'] or '-'}, trigger {g['trigger']}, "
                               f"reason {g['reason'] or '-'}"))
        who = f"requested by {g['requested_by'] or '-'}"
        if g["approved_by"]:
            who += f", approved by {g['approved_by']}"
        lines.append(printable(f"  {who}; {when.show(datetime.fromisoformat(g['starts_at']))}"
                               f" - {when.show(datetime.fromisoformat(g['expires_at']))}"))
    lines += _integrity_lines(doc["integrity"])
    if r.kind == "jump":
        inner: list[dict[str, Any]] = doc["sessions"]
        lines.append(f"sessions in this connection ({len(inner)}):" if inner
                     else "sessions in this connection: none")
        for c in inner:
            lines.append(printable(
                f"  {c['id'][:8]}  {when.show(datetime.fromisoformat(c['started_at']))}  "
                f"{c['command'] or c['kind']}  {c['outcome']}"))
    events = [e for e in doc["files"] if e.get("event") != "sftp.summary"]
    if events or r.kind in ("subsystem", "jump"):
        lines.append(f"file operations ({len(events)}):" if events else "file operations: none")
        for e in events:
            t = files.rows([e], with_session=r.kind == "jump")[0]
            where = f"{t['session']}  " if "session" in t else ""
            lines.append(printable(
                f"  {t['time']}  {where}{t['operation']} {t['status'] or ''} {t['path']}"
                + (f" {t['transfer']} {t['size']} sha256 {t['sha256']}" if t["transfer"]
                   else "")))
    if hits is not None:
        lines.append(f"hits ({len(hits)}):" if hits else "hits: none")
        lines += ["  " + hit_line(r, h) for h in hits]
    return lines


def _integrity_lines(check: dict[str, Any]) -> list[str]:
    if check["status"] == "not checked":
        return [printable(f"integrity: not checked ({check['reason']})")]
    report = check["report"]
    findings = report["findings"]
    if check["status"] == "ok":
        n = len(report["checked"].get("files") or [])
        head = (f"integrity: OK (signed manifest, {n} file{'s' if n != 1 else ''})"
                if "manifest" in report["checked"] else "integrity: OK")
    else:
        errors = sum(f["severity"] == "error" for f in findings)
        head = f"integrity: FAILED ({errors} problem{'s' if errors != 1 else ''})"
    return [head] + [printable(f"  {f['severity']}: {f['message']} [{f['code']}]")
                     for f in findings]


# -- play and export --------------------------------------------------------------------------
Lookup = tuple[BrokerConfig, RecordingSink, SessionRecord, list[SessionRecord]]


async def _lookup(args: argparse.Namespace) -> Lookup:
    """The session the id names, and for a jump connection the sessions it carried."""
    from broker.stores import connect_stores

    config = config_of(args)
    stores = await connect_stores(config, "read")
    try:
        rec = await resolve.session(stores.sessions, args.session_id)
        inner = ([m.record for m in await stores.sessions.search(
            SessionQuery(parent_id=rec.id, limit=CHILDREN))] if rec.kind == "jump" else [])
    finally:
        await stores.close()
    inner.reverse()
    return config, stores.recordings, rec, inner


def _open_recording(sink: RecordingSink, rec: SessionRecord) -> tuple[fmt.FrameReader, BinaryIO]:
    """The session's recording as a ``FrameReader`` over its open file (the caller closes the
    file): replay and export hold one frame at a time, not the whole session."""
    if not rec.recording:
        raise NotFoundError(f"session {rec.id} was not recorded")
    f = sink.open_read(rec.recording)
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
    _, sink, rec, _ = await _lookup(args)
    reader, f = _open_recording(sink, rec)
    with f:
        await asyncio.to_thread(write_export, reader, args.raw, args.output)
    return 0


async def _play(args: argparse.Namespace) -> int:
    from broker.play import connection_summary, file_timeline, play

    if args.speed <= 0:
        raise UsageError("--speed must be positive")
    config, sink, rec, inner = await _lookup(args)
    if rec.kind == "subsystem":  # raw SFTP packets: the file operations say what happened
        events = await asyncio.to_thread(files.read_events, config.audit_path, [rec.id])
        for line in file_timeline(rec, events):
            out(line)
        return 0
    if rec.kind in ("tunnel", "jump"):  # no terminal: who went where, and what it carried
        for line in connection_summary(rec, inner):
            out(line)
        return 0
    reader, f = _open_recording(sink, rec)
    with f:
        await play(reader, speed=args.speed, idle_limit=args.idle_limit)
    return 0


def register(sub: Any) -> None:
    ss = sub.add_parser("sessions", help="recorded sessions").add_subparsers(dest="sub",
                                                                            required=True)
    s = ss.add_parser("list", parents=leaf(), help="list and search sessions, newest first")
    s.add_argument("--user", help="alice (any domain), alice@corp.example.com or CORP\\alice")
    s.add_argument("--target", help="instance id or name")
    s.add_argument("--stack")
    s.add_argument("--grant", help="grant id")
    s.add_argument("--ticket", help="the grant's ticket")
    s.add_argument("--trigger", help="the grant's trigger (incident, change-request, ...)")
    s.add_argument("--kind", choices=KINDS)
    s.add_argument("--status", choices=SESSION_STATUSES,
                   help="live, ok (exit 0 or closed by the client) or failed")
    s.add_argument("--since", help="live or ended after: ISO date/time (UTC unless it has a "
                   "zone) or an age like 90m, 2h, 1d, 1w")
    s.add_argument("--until", help="started before: the same forms as --since")
    s.add_argument("--search", metavar="TEXT",
                   help="words in what sessions showed, typed or ran (all must match)")
    s.add_argument("--limit", type=int, default=50,
                   help="at most this many sessions (connections in the tree view)")
    s.add_argument("--all", action="store_true",
                   help="every session flat, newest first, instead of ProxyJump connections "
                        "with their sessions below them")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_sessions_list))

    s = ss.add_parser("show", parents=leaf(), help="everything about one session: record, "
                      "grant, integrity, file operations, sessions of a jump connection")
    s.add_argument("session_id", help="session id or a unique prefix of it")
    s.add_argument("--search", metavar="TEXT", help="where this text appears in the session")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_show))
    files.register(ss)  # sessions files SESSION_ID: sftp/scp file operations
    reindex.register(ss)  # sessions reindex SESSION | --all: the text for search
    unseal.register(ss)  # sessions unseal SESSION --key FILE --reason TEXT: break glass
    kill.register(ss)  # sessions kill SESSION --reason TEXT: end it on its bastion
    watch.register(ss)  # sessions watch SESSION: the live view in this terminal

    s = sub.add_parser("play", parents=leaf(), help="replay a session in this terminal "
                       "(file operations of an sftp/scp session, a tunnel's metadata)")
    s.add_argument("session_id", help="session id or a unique prefix of it")
    s.add_argument("--speed", type=float, default=1.0)
    s.add_argument("--idle-limit", type=float, default=2.0, help="cap pauses (seconds)")
    s.set_defaults(func=run_async(_play))

    s = sub.add_parser("export", parents=leaf(), help="write a session as asciicast v2")
    s.add_argument("session_id", help="session id or a unique prefix of it")
    s.add_argument("-o", "--output", help="file (default: stdout)")
    s.add_argument("--raw", action="store_true", help="keep escape sequences that act on "
                   "the viewer's terminal (clipboard, title, queries); default: removed")
    s.set_defaults(func=run_async(_export))

