"""Names and order of a rotated audit log's files, and when the writer rotates.

The current file keeps its configured name (``audit.jsonl``); a closed one is renamed
``audit-YYYYMMDDTHHMMSSZ-SEQ.jsonl`` after its first event (its time and its ``seq``, twelve
digits). The chain's ``seq`` counts on across files, so it orders them even when several
rotate within one second or the clock steps back; the time is for people and for readers that
skip files by date.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

ROTATED = "audit.rotated"  # the first event of every file after the first
_SEQ_DIGITS = 12


@dataclass(frozen=True, slots=True, order=True)
class RotatedName:
    first_seq: int
    started: datetime
    name: str


def _split(base: str) -> tuple[str, str]:
    stem, dot, suffix = base.rpartition(".")
    return (stem, dot + suffix) if stem else (base, "")


def rotated_name(base: str, started: datetime, first_seq: int) -> str:
    """The name a closed file gets: ``base``'s stem, its first event's UTC time and seq."""
    stem, suffix = _split(base)
    stamp = started.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stem}-{stamp}-{first_seq:0{_SEQ_DIGITS}d}{suffix}"


def parse_rotated(base: str, name: str) -> RotatedName | None:
    """``name`` read as a rotated file of ``base``; None for any other name."""
    stem, suffix = _split(base)
    m = re.fullmatch(re.escape(stem) + r"-(\d{8}T\d{6}Z)-(\d{1,20})" + re.escape(suffix), name)
    if m is None:
        return None
    try:
        started = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return RotatedName(int(m.group(2)), started, name)


def ordered(base: str, names: list[str]) -> list[RotatedName]:
    """The rotated files of ``base`` among ``names``, oldest first (by first seq)."""
    return sorted(r for n in names if (r := parse_rotated(base, n)) is not None)


def rotation_due(size: int, first_event: datetime | None, now: datetime, *,
                 rotate_bytes: int, rotate_daily: bool) -> bool:
    """Whether the writer rotates before appending: the file has reached ``rotate_bytes`` (0:
    never by size), or, with ``rotate_daily``, its first event is from an earlier UTC day."""
    if size <= 0:
        return False
    if rotate_bytes > 0 and size >= rotate_bytes:
        return True
    return rotate_daily and first_event is not None and \
        first_event.astimezone(UTC).date() < now.astimezone(UTC).date()
