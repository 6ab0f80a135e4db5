"""The audit trail as hash-chained JSON lines in one append-only file.

Several processes (the broker, the CLI) may append: each append takes an exclusive ``flock``,
re-reads the chain head if another process wrote since, and appends one line, so the chain stays
linear. A failed write raises :class:`AuditError` and the caller refuses the action (fail closed).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from broker.domain.audit import GENESIS, encode_event, line_hash
from broker.errors import AuditError
from broker.ports import Clock

_TAIL = 1 << 16


def _last_line(fd: int, size: int) -> bytes | None:
    """The last complete line, reading backwards in blocks until its start is found."""
    if size == 0:
        return None
    end = size
    data = b""
    while True:
        start = max(0, end - _TAIL)
        data = os.pread(fd, end - start, start) + data
        body = data.rstrip(b"\n") if data.endswith(b"\n") else data
        nl = body.rfind(b"\n")
        if nl >= 0 or start == 0:
            return body[nl + 1 :] + b"\n"
        end = start


class JsonlAuditLog:
    def __init__(self, path: Path, clock: Clock) -> None:
        self._path = path
        self._clock = clock
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {path}: {exc.strerror}") from exc
        self._known_size = -1
        self._prev = GENESIS
        self._seq = 0

    @property
    def path(self) -> Path:
        return self._path

    def _refresh_head(self, size: int) -> None:
        last = _last_line(self._fd, size)
        if last is None:
            self._prev, self._seq = GENESIS, 0
            return
        self._prev = line_hash(last)
        try:
            self._seq = int(json.loads(last)["seq"]) + 1
        except (ValueError, KeyError, TypeError):
            self._seq = 0  # damaged tail: keep appending; `verify --audit` reports the damage

    def emit(self, event: str, **fields: Any) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(self._fd).st_size
                if size != self._known_size:
                    if size and os.pread(self._fd, 1, size - 1) != b"\n":
                        # a torn last line (crash mid-write): end it, so the damage stays on
                        # its own line and the chain continues from it
                        os.write(self._fd, b"\n")
                        size += 1
                    self._refresh_head(size)
                line = encode_event(self._seq, self._prev, event, self._clock.now(), fields)
                if os.write(self._fd, line) != len(line):
                    raise OSError(28, "short write")
                self._known_size = size + len(line)
                self._prev = line_hash(line)
                self._seq += 1
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as exc:
            raise AuditError(f"cannot write audit log {self._path}: {exc.strerror}") from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
