"""The one rule for a session id typed on the command line (``sessions show/files``, ``play``,
``export``, ``verify``): the full id or any unique prefix of it, as git takes commit ids.

A prefix that fits several sessions is an error naming them, never a guess: picking one would
show a reviewer the wrong session's recording.
"""

from __future__ import annotations

import re

from broker.cli import when
from broker.domain.sanitize import printable
from broker.errors import NotFoundError, UsageError
from broker.ports import SessionIndex, SessionRecord

CANDIDATES = 10  # shown for an ambiguous prefix
_ID = re.compile(r"[0-9a-fA-F-]{1,64}")


class AmbiguousSession(UsageError):
    """A prefix shared by several sessions; the message lists them, one per line."""


def ambiguous_message(prefix: str, rows: list[SessionRecord], more: bool) -> str:
    count = f"{len(rows)}{' or more' if more else ''}"
    lines = [f"session id {printable(prefix)} is ambiguous: it starts {count} sessions; "
             "give more of it:"]
    for r in rows:
        lines.append(printable(f"  {r.id}  {r.user}  {r.target_name or r.target}  "
                               f"{when.show(r.started_at)}"))
    return "\n".join(lines)


def check_id(text: str) -> str:
    """``text`` if it can be (the start of) a session id, else the not-found error."""
    if not text:
        raise UsageError("give a session id (or a unique prefix of it)")
    if not _ID.fullmatch(text):
        raise NotFoundError(f"no session {printable(text)}")
    return text.lower()


async def session(index: SessionIndex, text: str) -> SessionRecord:
    """The session ``text`` names: its id, or a prefix only it has."""
    found = await known_session(index, check_id(text))
    if found is None:
        raise NotFoundError(f"no session {printable(text)}")
    return found


async def known_session(index: SessionIndex, text: str) -> SessionRecord | None:
    """As ``session``, but None when no session in the index has that id or prefix (``verify``
    then looks among the recording files: it can check a copy whose index row is gone)."""
    prefix = text.lower()
    rows = await index.by_prefix(prefix, limit=CANDIDATES + 1)
    exact = [r for r in rows if r.id == prefix]
    if exact:
        return exact[0]
    if len(rows) > 1:
        raise AmbiguousSession(ambiguous_message(text, rows[:CANDIDATES],
                                                 len(rows) > CANDIDATES))
    return rows[0] if rows else None
