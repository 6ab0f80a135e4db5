"""Follow a live recording as it grows: the source of the live view (console and
``sessions watch``).

The file is the one place every broker process writes a session to (``[ssh] workers`` share the
recordings directory), and the writer appends each frame before it is relayed (at most one event
loop iteration behind: ``broker.services.recording_pipeline``), so reading it needs no link to
the process that relays the session. A reader may see a frame half written: it stops before it
and reads it whole at the next poll.

A bulk session appends MiB/s that no viewer can read, and reading, decoding and filtering all of
it would cost the relay. ``skip`` walks frame headers only (one ``pread`` of 13 bytes each,
payloads passed over) up to the last ``keep`` bytes, noting what the viewer still needs: the
terminal size and the exit.

The session has ended when its writer released the file: it holds an exclusive ``flock`` from
creation until ``close`` (``broker.recordings.local``), which comes after the last frame and
the ``EXIT`` frame. A crashed broker's lock goes with its process, so that ends a watch too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.domain import recording as fmt
from broker.errors import NotFoundError
from broker.recordings.local import LocalRecordingSink

HEAD = fmt.FRAME.size
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
MAX_FRAME = 16 << 20  # a payload larger than this is passed over, never read into memory


@dataclass(frozen=True, slots=True)
class Passed:
    """What ``skip`` passed over: payload bytes (output, input, markers), and the frames among
    them that a viewer still needs (the last resize, an exit)."""

    bytes: int
    resize: fmt.Frame | None
    exit: fmt.Frame | None
    done: bool = True  # False: stopped at a header that was not in the page cache


class NotCached(Exception):
    """What was asked is not in the page cache (a read would wait for the disk)."""


class RecordingFollower:
    """One reader of one live recording file, owned by one watch. Its calls may run in a thread
    (a header walk); ``close`` waits for one under way, so the descriptor is never closed (and
    its number reused) under it."""

    def __init__(self, path: Path) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"recording file {path.name} is not on this bastion") from None
        # headers are read one by one, far apart: reading ahead would bring the payloads back
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.meta: dict[str, Any] | None = None
        self.offset = 0  # just after the last frame read or passed over
        self._lock = threading.Lock()
        self._head_buf = bytearray(HEAD)  # one header at a time, read into the same buffer

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def pending(self) -> int:
        """Bytes written and not yet read (a half-written frame included)."""
        return max(0, self.size() - self.offset) if self.meta is not None else 0

    def header(self) -> dict[str, Any] | None:
        """The session's metadata; None while the writer has not finished writing it."""
        with self._lock:
            return self._header() if self._fd >= 0 else None

    def _header(self) -> dict[str, Any] | None:
        if self.meta is not None:
            return self.meta
        head = os.pread(self._fd, 8192, 0)  # a header is a few hundred bytes
        if b"\n" not in head[len(fmt.MAGIC):] and len(head) == 8192:
            head = os.pread(self._fd, len(fmt.MAGIC) + fmt.MAX_HEADER, 0)
        if len(head) < len(fmt.MAGIC) + 1:
            return None
        if not head.startswith(fmt.MAGIC):
            raise fmt.RecordingFormatError("not a bastion-broker recording (bad magic)")
        nl = head.find(b"\n", len(fmt.MAGIC))
        if nl < 0:
            if len(head) >= len(fmt.MAGIC) + fmt.MAX_HEADER:
                raise fmt.RecordingFormatError("recording header is too long")
            return None
        try:
            meta = json.loads(head[len(fmt.MAGIC):nl])
        except ValueError as exc:
            raise fmt.RecordingFormatError(f"recording header is not JSON: {exc}") from None
        self.meta = meta if isinstance(meta, dict) else {}
        self.offset = nl + 1
        return self.meta

    def _pread(self, n: int, at: int, nowait: bool) -> bytes:
        """``n`` bytes at ``at``; with ``nowait``, ``NotCached`` unless all are in the page
        cache (``RWF_NOWAIT``: the event loop never waits for the disk)."""
        if not nowait or _NOWAIT == 0:
            return os.pread(self._fd, n, at)
        buf = self._head_buf if n == HEAD else bytearray(n)
        try:
            got = os.preadv(self._fd, [buf], at, _NOWAIT)
        except BlockingIOError:
            raise NotCached from None
        except OSError as exc:  # a kernel or file system without it: wait like pread
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            return os.pread(self._fd, n, at)
        if got < n and at + got < self.size():
            raise NotCached  # only a part was cached
        return bytes(buf[:got])

    def _frame_head(self, at: int, size: int, nowait: bool) -> tuple[int, bytes, int] | None:
        """(time, kind, length) of the frame at ``at`` if it is written whole."""
        if at + HEAD > size:
            return None
        head = self._pread(HEAD, at, nowait)
        if len(head) < HEAD:
            return None
        t_us, kind, length = fmt.FRAME.unpack(head)
        if kind not in fmt.KINDS:
            raise fmt.RecordingFormatError(f"corrupt frame at offset {at}")
        if at + HEAD + length > size:
            return None
        return t_us, kind, length

    def read(self, limit: int) -> list[fmt.Frame]:
        """Whole frames from the offset on, about ``limit`` payload bytes at most (always at
        least one frame, whatever its size, when one is there); a half-written frame stays."""
        with self._lock:
            return self._read(limit) if self._fd >= 0 else []

    def _read(self, limit: int) -> list[fmt.Frame]:
        if self.meta is None:
            return []
        size = self.size()
        avail = size - self.offset
        if avail < HEAD:
            return []
        blob = os.pread(self._fd, min(avail, limit + HEAD), self.offset)
        frames: list[fmt.Frame] = []
        pos = got = 0
        while pos + HEAD <= len(blob) and got < limit:
            t_us, kind, length = fmt.FRAME.unpack_from(blob, pos)
            if kind not in fmt.KINDS:
                raise fmt.RecordingFormatError(f"corrupt frame at offset {self.offset + pos}")
            end = pos + HEAD + length
            if self.offset + end > size:
                break  # written in part: read whole at the next poll
            if end > len(blob):  # whole on disk, longer than this read
                if frames:
                    break
                data = (os.pread(self._fd, length, self.offset + pos + HEAD)
                        if length <= MAX_FRAME else b"")  # never hold a corrupt length
                frames.append(fmt.Frame(t_us, kind, data))
                pos = end
                break
            frames.append(fmt.Frame(t_us, kind, blob[pos + HEAD:end]))
            pos, got = end, got + length
        self.offset += pos
        return frames

    def skip(self, keep: int, nowait: bool = False) -> Passed:
        """Pass over frames (headers read, payloads not) until at most ``keep`` bytes plus one
        frame are left to read; the last resize and any exit among them are returned. With
        ``nowait`` it stops at the first header not in the page cache (``Passed.done`` False:
        go on without it, in a thread): the writer drops what it has synced from the cache."""
        with self._lock:
            if self._fd < 0:
                return Passed(0, None, None)
            return self._skip(keep, nowait)

    def _skip(self, keep: int, nowait: bool) -> Passed:
        size = self.size()
        passed, resize, exit_ = 0, None, None
        at = self.offset
        done = True
        while size - at > keep:
            try:
                head = self._frame_head(at, size, nowait)
            except NotCached:
                # have the kernel read it back meanwhile (no thread: on a busy event loop the
                # GIL hand-offs of a walk in a thread cost the relay more than the walk)
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self._fd, at, min(size - at, 1 << 20),
                                     os.POSIX_FADV_WILLNEED)
                done = False
                break
            if head is None:
                break
            t_us, kind, length = head
            end = at + HEAD + length
            if size - end < keep and kind in (fmt.OUTPUT, fmt.ERROR):
                break  # this frame holds the tail the viewer gets
            if kind in (fmt.RESIZE, fmt.EXIT) and length <= 64:
                frame = fmt.Frame(t_us, kind, os.pread(self._fd, length, at + HEAD))  # cached
                if kind == fmt.RESIZE:
                    resize = frame
                else:
                    exit_ = frame
            elif kind in (fmt.OUTPUT, fmt.ERROR):
                passed += length
            at = end
        self.offset = at
        return Passed(passed, resize, exit_, done)

    def writer_gone(self) -> bool:
        """Whether the writer has released the file (closed it, or its process is gone)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return True


class LocalFollow:
    """Opens followers on this bastion's recordings (``LiveService``'s ``follow``)."""

    def __init__(self, sink: LocalRecordingSink) -> None:
        self._sink = sink

    def __call__(self, location: str) -> RecordingFollower:
        return RecordingFollower(self._sink.path_of(location))
