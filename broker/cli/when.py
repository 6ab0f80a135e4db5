"""Times, durations and sizes as the session commands read and show them.

Read: ``--since``/``--until`` take an ISO date or time, or an age before now (``90m``, ``2h``,
``1d``, ``1w``). Shown: JSON carries ISO 8601 in UTC (``+00:00``); tables show UTC with a ``Z``
(``2026-12-07 14:30:05Z``), the zone the audit log and the recordings use, so a time read in a
table can be typed back as it is (a time typed without a zone is UTC, like the tables).
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from broker.domain.durations import parse_duration
from broker.errors import UsageError

_FORMS = ("an ISO date or time (2026-12-07, 2026-12-07T14:30, 2026-12-07 14:30:05Z, "
          "2026-12-07T14:30+01:00) or an age like 90m, 2h, 1d, 1w")


def parse_when(option: str, text: str, now: datetime) -> datetime:
    """``text`` as an aware UTC time; ``option`` names the flag in the error."""
    s = text.strip()
    if not s:
        raise UsageError(f"{option}: empty; give {_FORMS}")
    age = parse_duration(s)
    if age is not None:
        try:
            return now - age
        except OverflowError:
            raise UsageError(f"{option}: {s} reaches back before year 1") from None
    if s.lower() == "now":
        return now
    iso = s[:-1] + "+00:00" if s[-1:] in ("Z", "z") else s
    try:
        if len(iso) == 10:
            d = date.fromisoformat(iso)
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        t = datetime.fromisoformat(iso)
    except ValueError:
        raise UsageError(f"{option}: cannot read {text.strip()!r}; give {_FORMS}") from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)


def utc(t: datetime) -> datetime:
    """``t`` in UTC (a naive time from an older row is taken as UTC)."""
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)


def iso(t: datetime | None) -> str | None:
    """For JSON: ISO 8601 in UTC, ``+00:00``."""
    return utc(t).isoformat() if t is not None else None


def show(t: datetime | None) -> str:
    """For tables: ``2026-12-07 14:30:05Z``."""
    return utc(t).strftime("%Y-%m-%d %H:%M:%SZ") if t is not None else ""


def duration(seconds: float | None) -> str:
    """``0.4s``, ``12s``, ``3m05s``, ``2h03m``, ``4d02h``."""
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{max(seconds, 0):.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def offset(seconds: float) -> str:
    """A moment in a recording, from its start: ``+0:07``, ``+12:30``, ``+1:02:03``."""
    s = max(int(seconds), 0)
    h, rest = divmod(s, 3600)
    return f"+{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"+{rest // 60}:{rest % 60:02d}"


def size(n: int) -> str:
    """Bytes in binary units: ``512``, ``1.5K``, ``3.0M``, ``1.2G``."""
    if n < 1024:
        return str(n)
    value = float(n)
    for unit in "KMGT":
        value /= 1024
        if value < 1024 or unit == "T":
            return f"{value:.1f}{unit}"
    return str(n)  # not reached
