"""Terminal replay of a recording, with speed and idle-time limits; and what ``play`` shows for
sessions that have no terminal to replay: the file operations of an sftp/scp session (its
recording holds raw SFTP packets, unreadable on a terminal), the metadata of a tunnel or of a
ProxyJump connection (a tunnel's payload is not recorded)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from broker.cli import when
from broker.domain import recording as fmt
from broker.domain.outcome import outcome
from broker.domain.sanitize import printable, safe_asciicast
from broker.ports import SessionRecord


async def play(rec: fmt.Recording, *, speed: float, idle_limit: float | None) -> None:
    """Replay output events in real time (scaled), one frame read at a time."""
    out = sys.stdout
    prev = 0.0
    # never raw: the viewer's terminal must not run what the target printed (OSC 52, queries)
    lines = safe_asciicast(fmt.to_asciicast(rec))
    next(lines, None)  # the header
    for line in lines:
        t, code, data = json.loads(line)
        if code != "o":
            continue
        delay = (t - prev) / speed
        if idle_limit is not None:
            delay = min(delay, idle_limit)
        prev = t
        if delay > 0:
            await asyncio.sleep(delay)
        out.write(data)
        out.flush()


def headline(r: SessionRecord) -> str:
    """One line saying which session this is and how it went."""
    what = f"{r.kind} {r.command}" if r.command and r.kind != "exec" else (r.command or r.kind)
    ended = r.ended_at is not None
    span = (f"{when.show(r.started_at)} - {when.show(r.ended_at)} "
            f"({when.duration((r.ended_at - r.started_at).total_seconds())})"
            if r.ended_at else f"{when.show(r.started_at)} - (live)")
    return printable(f"session {r.id}: {r.user} on {r.target_name or r.target} ({r.target}), "
                     f"{what}; {span}; {outcome(r.exit_status, r.kind, ended=ended)}")


def _ts(ev: dict[str, Any]) -> datetime | None:
    try:
        return when.utc(datetime.fromisoformat(str(ev.get("ts", ""))))
    except ValueError:
        return None


def file_operation(ev: dict[str, Any]) -> str:
    """One audited file operation in words: ``close /tmp/a upload 3.0M sha256 ab12...``."""
    op = str(ev.get("event", "")).removeprefix("sftp.")
    if op == "summary":
        return ("totals: " + ", ".join(f"{k} {ev.get(k, 0)}" for k in
                                       ("opens", "uploads", "downloads", "operations"))
                + f", read {when.size(int(ev.get('bytes_read', 0) or 0))}"
                + f", written {when.size(int(ev.get('bytes_written', 0) or 0))}")
    path = str(ev.get("path") or ev.get("link_path") or "")
    if ev.get("new_path"):
        path += f" -> {ev['new_path']}"
    if ev.get("link_target"):
        path += f" -> {ev['link_target']}"
    parts = [op, path]
    if ev.get("flags"):
        parts.append(f"({'|'.join(map(str, ev['flags']))})"
                     if isinstance(ev["flags"], list) else f"({ev['flags']})")
    if ev.get("transfer"):
        parts.append(f"{ev['transfer']} {when.size(int(ev.get('size') or 0))}")
    if ev.get("sha256"):
        parts.append(f"sha256 {ev['sha256']}")
    status = str(ev.get("status", ""))
    if status and status != "ok":
        parts.append(f"[{status}{': ' + str(ev['message']) if ev.get('message') else ''}]")
    return " ".join(p for p in parts if p)


def file_timeline(r: SessionRecord, events: Sequence[dict[str, Any]]) -> list[str]:
    """What ``play`` prints for an sftp/scp session: its file operations in time order."""
    lines = [headline(r)]
    if not events:
        lines.append("no file operations in the audit log")
        return lines
    start = when.utc(r.started_at)
    for ev in events:
        t = _ts(ev)
        at = f"{when.offset((t - start).total_seconds())} {when.show(t)}" if t else "?"
        lines.append(printable(f"{at}  {file_operation(ev)}"))
    return lines


def connection_summary(r: SessionRecord, children: Sequence[SessionRecord]) -> list[str]:
    """What ``play`` prints for a tunnel or a ProxyJump connection: who went where, for how
    long, bytes each way; for a jump, the sessions it carried (each one can be played)."""
    lines = [headline(r),
             printable(f"  {'destination':<12}{r.command or ''}"),
             printable(f"  {'grant':<12}{r.grant_id} ({r.level}), peer {r.peer}"),
             f"  {'bytes':<12}in {when.size(r.bytes_in)}, out {when.size(r.bytes_out)}",
             "  (the payload of a tunnel is not recorded)" if r.kind == "tunnel" else
             "  (a ProxyJump connection: what ran through it is recorded as its sessions)"]
    if r.kind == "jump":
        lines.append(f"sessions in this connection ({len(children)}):" if children
                     else "no sessions in this connection")
        for c in children:
            lines.append(printable(
                f"  {c.id[:8]}  {when.show(c.started_at)}  {c.command or c.kind}  "
                f"{outcome(c.exit_status, c.kind, ended=c.ended_at is not None)}"))
        if children:
            lines.append("replay one with: bastion-broker play ID")
    return lines
