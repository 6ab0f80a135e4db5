"""The audit trail as hash-chained JSON lines in one append-only file.

Several processes (the broker, the CLI) may append: each append takes an exclusive ``flock``,
re-reads the chain head if another process wrote since, and appends one line, so the chain stays
linear. A failed write raises :class:`AuditError` and the caller refuses the action (fail closed).

With a signing key, the log also appends signed ``audit.checkpoint`` lines (see
``broker.audit.checkpoint``): after every ``checkpoint_lines`` events this process wrote, after
the first event once ``checkpoint_seconds`` have passed since the last checkpoint, when
``checkpoint_if_due`` finds events waiting that long (the broker calls it periodically), and at
``close``. Each is written under the same lock as the event before it.

Writers only append, so a log found shorter than this process left it was cut: the process
appends an ``audit.cut`` event (seq it expected next, seq it found, bytes lost) before anything
else, and ``verify --audit`` reports it.

Rotation (``rotate_bytes``, ``rotate_daily``) happens under the same lock, before an event is
appended: a checkpoint closes the file, the new file is written whole under a temporary name
with its first line, ``audit.rotated`` (next seq, ``prev`` = the hash of the old file's last
line, the old file's new name), the old file gets its rotated name as a hard link, and the new
one is renamed over the configured path. The path therefore always names a file whose last line
is the chain head. A writer that held the old file open finds another inode at the path once it
has the lock, and reopens the path before it writes (see ``broker.domain.audit_files``).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from broker.audit.checkpoint import CHECKPOINT, CUT, checkpoint_line
from broker.domain.audit import GENESIS, encode_event, line_hash
from broker.domain.audit_files import ROTATED, rotated_name, rotation_due
from broker.errors import AuditError
from broker.integrity.keys import SigningKey
from broker.ports import Clock

_TAIL = 1 << 16
# a rotation that failed (a full disk, a name taken by another file) is tried again after this
_ROTATE_RETRY = 60.0

log = structlog.get_logger("broker.audit")


def _first_line(fd: int) -> tuple[datetime, int] | None:
    """(ts, seq) of the file's first line, None if it is not a readable event."""
    head = os.pread(fd, _TAIL, 0).split(b"\n", 1)[0]
    try:
        obj = json.loads(head)
        ts = datetime.fromisoformat(str(obj["ts"]))
        seq = obj["seq"]
    except (ValueError, KeyError, TypeError):
        return None
    return (ts, seq) if isinstance(seq, int) and ts.tzinfo is not None else None


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


def _seq_after_damage(fd: int, size: int) -> int:
    """The seq for the next line when the last one is damaged: the last good seq, plus one for
    each damaged line after it, plus one; 0 if no good line is near the end."""
    start = max(0, size - 4 * _TAIL)
    lines = os.pread(fd, size - start, start).splitlines()
    if start > 0:
        lines = lines[1:]  # probably cut in the middle
    for back, raw in enumerate(reversed(lines)):
        try:
            return int(json.loads(raw)["seq"]) + back + 1
        except (ValueError, KeyError, TypeError):
            continue
    return 0


class JsonlAuditLog:
    def __init__(self, path: Path, clock: Clock, *, signer: SigningKey | None = None,
                 checkpoint_lines: int = 256, checkpoint_seconds: float = 30.0,
                 rotate_bytes: int = 0, rotate_daily: bool = False,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._rotate_bytes = max(0, rotate_bytes)
        self._rotate_daily = rotate_daily
        self._rotate_after = 0.0  # monotonic time before which a failed rotation is not retried
        self._first: tuple[int, datetime | None] = (-1, None)  # (inode, its first event's ts)
        self._clock = clock
        self._signer = signer
        self._cp_lines = max(1, checkpoint_lines)
        self._cp_seconds = checkpoint_seconds
        self._monotonic = monotonic
        self._since = 0  # events this process appended since its last checkpoint
        self._last_cp = monotonic()
        self._head_event: str | None = None
        if signer is not None:
            # a CLI command that wrote and exits without close() still signs what it wrote
            atexit.register(self.close)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            self._ino = os.fstat(self._fd).st_ino
        except OSError as exc:
            raise AuditError(f"cannot open audit log {path}: {exc.strerror}") from exc
        self._reopened = False
        self._known_size = -1
        self._prev = GENESIS
        self._seq = 0

    @property
    def path(self) -> Path:
        return self._path

    def _refresh_head(self, size: int) -> None:
        last = _last_line(self._fd, size)
        if last is None:
            self._prev, self._seq, self._head_event = GENESIS, 0, None
            return
        self._prev = line_hash(last)
        try:
            obj = json.loads(last)
            self._seq = int(obj["seq"]) + 1
            self._head_event = obj.get("event")
        except (ValueError, KeyError, TypeError):
            # damaged tail (a torn write): keep appending, counting on from the last good line
            # as if the damaged lines had their numbers; `verify --audit` reports the damage
            self._seq = _seq_after_damage(self._fd, size)
            self._head_event = None

    def _lock_current(self) -> None:
        """Lock the file the path names now. Another process may have rotated the file this one
        holds open (or it was removed): then the path names another inode once the lock is
        held, and this process moves to that file, so nothing lands in a closed one."""
        while True:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                current = os.stat(self._path).st_ino
            except FileNotFoundError:
                current = -1
            if current == self._ino:
                return
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            os.close(self._fd)
            self._fd, self._ino = fd, os.fstat(fd).st_ino
            self._known_size, self._reopened = -1, True

    def _sync_head(self) -> int:
        """With the lock held: the file size, the chain head re-read if another process wrote."""
        size = os.fstat(self._fd).st_size
        reopened, self._reopened = self._reopened, False
        if size != self._known_size:
            # after a reopen the file is another one: it is not shorter than this one was
            cut = not reopened and 0 <= size < self._known_size
            expected = self._seq
            if size and os.pread(self._fd, 1, size - 1) != b"\n":
                # a torn last line (crash mid-write): end it, so the damage stays on
                # its own line and the chain continues from it
                os.write(self._fd, b"\n")
                size += 1
            lost = self._known_size - size
            self._refresh_head(size)
            self._known_size = size
            fields: dict[str, Any] | None = None
            if cut:
                # writers only append: a shorter file was cut (lines after the last checkpoint
                # removed). Say so in the chain, signed with the next checkpoint
                fields = {"expected_seq": expected, "found_seq": self._seq, "lost_bytes": lost}
            elif reopened and self._seq < expected:
                # a rotated file continues the chain (its head is at least the seq expected):
                # a lower one means the file at the path was replaced or removed
                fields = {"expected_seq": expected, "found_seq": self._seq, "replaced": True}
            if fields is not None:
                line = encode_event(self._seq, self._prev, CUT, self._clock.now(), fields)
                size = self._append(size, line, CUT)
                self._since += 1
        return size

    def _append(self, size: int, line: bytes, event: str) -> int:
        if os.write(self._fd, line) != len(line):
            raise OSError(28, "short write")
        return self._append_done(size, line, event)

    def _append_done(self, size: int, line: bytes, event: str) -> int:
        self._known_size = size + len(line)
        self._prev = line_hash(line)
        self._seq += 1
        self._head_event = event
        return self._known_size

    def _append_checkpoint(self, size: int, signer: SigningKey) -> int:
        line = checkpoint_line(self._seq, self._prev, self._clock.now(), signer.key_id,
                               signer.sign)
        size = self._append(size, line, CHECKPOINT)
        self._since = 0
        self._last_cp = self._monotonic()
        return size

    def _due(self) -> bool:
        return self._signer is not None and self._since > 0 and (
            self._since >= self._cp_lines
            or self._monotonic() - self._last_cp >= self._cp_seconds)

    def _rotation_due(self, size: int, now: datetime) -> bool:
        if not (self._rotate_bytes or self._rotate_daily) or self._monotonic() < self._rotate_after:
            return False
        first = None
        if self._rotate_daily:
            if self._first[0] != self._ino and size > 0:
                head = _first_line(self._fd)  # read once per file (a damaged one: each time)
                if head is not None:
                    self._first = (self._ino, head[0])
            first = self._first[1] if self._first[0] == self._ino else None
        return rotation_due(size, first, now, rotate_bytes=self._rotate_bytes,
                            rotate_daily=self._rotate_daily)

    def _rotate(self, size: int, now: datetime) -> int:
        """With the lock held: close this file (signed), start the next; the new size. A failure
        leaves the current file in place (it is tried again later): events are never refused
        because a file could not be rotated."""
        if self._signer is not None and self._head_event != CHECKPOINT:
            size = self._append_checkpoint(size, self._signer)
        first = _first_line(self._fd)
        # a damaged first line: the last seq still orders the file between its neighbours
        started, first_seq = first if first is not None else (now, self._seq - 1)
        name = rotated_name(self._path.name, started, first_seq)
        target = self._path.with_name(name)
        tmp = self._path.with_name(f".{self._path.name}.rotating")
        line = encode_event(self._seq, self._prev, ROTATED, now, {"previous": name})
        fd = -1
        try:
            os.fsync(self._fd)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.write(fd, line) != len(line):
                raise OSError(28, "short write")
            os.fsync(fd)
            try:
                os.link(self._path, target)
            except FileExistsError:  # a rotation cut short by a crash after the link
                if os.stat(target).st_ino != self._ino:
                    raise
            os.rename(tmp, self._path)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            self._rotate_after = self._monotonic() + _ROTATE_RETRY
            log.error("audit.rotate_failed", path=str(self._path), error=exc.strerror or str(exc))
            return size
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd, self._ino = fd, os.fstat(fd).st_ino
        self._first = (self._ino, now)
        self._known_size = 0
        size = self._append_done(0, line, ROTATED)
        self._since += 1
        try:
            dfd = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            log.warning("audit.rotate_dir_sync_failed", error=exc.strerror)
        return size

    def _locked(self, action: Callable[[int], None]) -> None:
        try:
            self._lock_current()
            try:
                action(self._sync_head())
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as exc:
            raise AuditError(f"cannot write audit log {self._path}: {exc.strerror}") from exc

    def emit(self, event: str, **fields: Any) -> None:
        def append(size: int) -> None:
            now = self._clock.now()
            if self._rotation_due(size, now):
                size = self._rotate(size, now)
            line = encode_event(self._seq, self._prev, event, now, fields)
            size = self._append(size, line, event)
            self._since += 1
            if self._signer is not None and self._due():
                self._append_checkpoint(size, self._signer)

        self._locked(append)

    def checkpoint(self) -> None:
        """Sign the chain head now, unless it already is a checkpoint (or the log is empty)."""
        signer = self._signer
        if signer is None:
            return

        def append(size: int) -> None:
            if self._seq > 0 and self._head_event != CHECKPOINT:
                self._append_checkpoint(size, signer)
            self._since = 0

        self._locked(append)

    def checkpoint_if_due(self) -> None:
        """Called periodically: sign events that have waited ``checkpoint_seconds``, including
        events other processes (CLI, other workers) appended without signing them."""
        if self._signer is None or self._fd < 0:
            return
        try:
            size = os.fstat(self._fd).st_size
            moved = os.stat(self._path).st_ino != self._ino
        except FileNotFoundError:
            moved = True
        except OSError as exc:
            raise AuditError(f"cannot read audit log {self._path}: {exc.strerror}") from exc
        others_wrote = moved or size != self._known_size  # rotated: others wrote the new file
        if not moved and 0 <= size < self._known_size:
            self._locked(lambda size: None)  # the file shrank: record the cut now
        if others_wrote and self._monotonic() - self._last_cp >= self._cp_seconds:
            self._since = max(self._since, 1)
        if self._due():
            self.checkpoint()
            self._last_cp = self._monotonic()

    def close(self) -> None:
        if self._signer is not None:
            atexit.unregister(self.close)
        if self._fd >= 0:
            if self._since:
                # a failure leaves an unsigned tail, which is what `verify --audit` reports
                with contextlib.suppress(AuditError):
                    self.checkpoint()
            os.close(self._fd)
            self._fd = -1
