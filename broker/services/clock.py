"""The real clock; tests pass their own ``Clock`` instead."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    # the builtin itself, not a method wrapping it: ``clock.monotonic`` costs what
    # ``time.monotonic`` does (activity is stamped on every relayed chunk)
    monotonic = staticmethod(time.monotonic)
