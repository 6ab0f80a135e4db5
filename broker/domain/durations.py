"""Durations as people type them: ``90s``, ``30m``, ``2h``, ``1d``, ``1w``.

One grammar for every flag and field that takes one (``--since 2h``, ``lock --ttl 1d``), so a
form accepted in one place is accepted in all of them.
"""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"(\d{1,6})\s*([smhdw])", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta | None:
    """``text`` (surrounding blanks and letter case ignored) as a duration; None if it is not
    a whole number of one unit."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        return None
    return timedelta(**{_UNITS[m.group(2).lower()]: int(m.group(1))})
