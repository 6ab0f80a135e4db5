"""Free space on the recordings file system, against two thresholds.

A full disk must never mean unrecorded sessions: below ``min_free`` no new session starts, below
``critical`` the live ones are ended (or, by explicit policy, go on unrecorded and say so in the
audit). One ``statvfs`` per check: cheap enough for every session start and a periodic check.
"""

from __future__ import annotations

import os
from pathlib import Path

from broker.errors import RecordingDiskFull
from broker.ports import DiskLevel, DiskStatus

__all__ = ["DiskGuard", "DiskLevel", "DiskStatus", "RecordingDiskFull", "classify"]


def _threshold(total: int, percent: float, absolute: int) -> int:
    return max(int(total * percent / 100.0), absolute)


def classify(free: int, total: int, *, min_free_percent: float, min_free_bytes: int,
             critical_free_percent: float, critical_free_bytes: int) -> DiskLevel:
    """Pure decision, separate from ``statvfs`` so that it is unit-tested directly."""
    if free < _threshold(total, critical_free_percent, critical_free_bytes):
        return DiskLevel.CRITICAL
    if free < _threshold(total, min_free_percent, min_free_bytes):
        return DiskLevel.LOW
    return DiskLevel.OK


class DiskGuard:
    """Checks the file system holding ``path`` (the nearest existing ancestor if not created)."""

    def __init__(self, path: Path, *, min_free_percent: float = 2.0, min_free_bytes: int = 0,
                 critical_free_percent: float = 1.0, critical_free_bytes: int = 0) -> None:
        self._path = path
        self._min = (min_free_percent, min_free_bytes)
        self._crit = (critical_free_percent, critical_free_bytes)

    def status(self) -> DiskStatus:
        p = self._path
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            st = os.statvfs(p)
        except OSError:
            # unreadable: treat as full (fail closed); opening the recording reports the details
            return DiskStatus(DiskLevel.CRITICAL, 0, 0)
        free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        level = classify(free, total, min_free_percent=self._min[0], min_free_bytes=self._min[1],
                         critical_free_percent=self._crit[0], critical_free_bytes=self._crit[1])
        return DiskStatus(level, free, total)
