"""Recordings on local disk: one framed file per session, appended with ``writev``.

Each chunk reaches the kernel before the broker forwards it (``write`` for one frame, at once;
``write_frames`` for a batch, see ``broker.services.recording_pipeline``), so a broker crash loses
nothing the client saw. Against power loss, ``sync`` (called at least every second by the
session service, in a thread, never per chunk) and ``close`` flush to the disk.

Once on disk, a recording's pages leave the page cache (``POSIX_FADV_DONTNEED``): a recording is
written once and read rarely, so caching it only pushes out pages that other work will read
again. It also makes the next second's writes reuse the pages just freed instead of growing the
cache; on a virtual machine that hands free memory back to its host, fresh pages are what make
appending expensive (docs/benchmarks.md, "Recording cost").

While a session is live its writer holds an exclusive ``flock`` on the file and a marker
``DIR/.open/SESSION_ID`` names it; the marker goes only once the session's end is recorded
everywhere. After a crash, markers whose file nobody locks are the recordings to repair
(``broker.recordings.repair``): the lock tells them apart from live sessions of another broker
process sharing the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from broker.domain import recording as fmt
from broker.domain.sanitize import safe_asciicast
from broker.errors import NotFoundError, RecordingError

_DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_SESSION_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz-")


_IOV_MAX = 1024  # iovecs per writev (Linux UIO_MAXIOV)

OPEN_DIR = ".open"  # markers of recordings whose session has not ended (see module docstring)


class LocalRecordingWriter:
    """Appends frames for one session from the event loop; ``sync``/``close`` may run in a thread."""

    def __init__(self, path: Path, meta: dict[str, Any], marker: Path | None = None) -> None:
        self._path = path
        self._marker = marker
        self._marker_made = False
        self._fd = -1
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if marker is not None:
                marker.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
                self._marker_made = True
                marker.write_text(str(path))
        except OSError as exc:
            self._abandon()
            raise RecordingError(f"cannot create recording {path}: {exc.strerror}") from exc
        self._t0 = time.monotonic_ns()
        self._last_us = 0  # the last frame's stamp
        self.bytes = 0
        self._synced = 0
        self._dirs_synced = False
        self._lock = threading.Lock()  # sync (thread) against close (thread)
        try:
            self._write([fmt.encode_header(meta)])
        except RecordingError:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """Undo a half-made start (no session ran): no file, no marker, nothing to repair."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._path.unlink(missing_ok=True)
        if self._marker is not None and self._marker_made:
            with contextlib.suppress(OSError):
                self._marker.unlink(missing_ok=True)

    @property
    def location(self) -> str:
        return str(self._path)

    def _write(self, parts: list[bytes]) -> None:
        want = sum(len(p) for p in parts)
        try:
            n = os.writev(self._fd, parts)
            if n != want:  # short write: retry the rest once, then give up (disk full)
                rest = b"".join(parts)[n:]
                if os.write(self._fd, rest) != len(rest):
                    raise OSError(28, "short write")
        except OSError as exc:
            raise RecordingError(f"cannot write recording {self._path}: {exc.strerror}") from exc
        self.bytes += want

    def write(self, kind: bytes, data: bytes) -> None:
        self._write(self.frame(kind, data))

    def frame(self, kind: bytes, data: bytes, t_us: int | None = None) -> list[bytes]:
        """One frame stamped now (the time it was relayed), or at ``t_us`` from ``now_us`` (input
        recorded once its echo was seen), for ``write_frames`` later. Stamps never go back: an
        earlier one is moved up to the last frame's, so the file stays in time order."""
        if t_us is None:
            t_us = (time.monotonic_ns() - self._t0) // 1000
        elif t_us < self._last_us:
            t_us = self._last_us
        self._last_us = t_us
        return [fmt.frame_header(t_us, kind, len(data)), data]

    def now_us(self) -> int:
        """Now, as ``frame`` stamps it (microseconds since the recording started)."""
        return (time.monotonic_ns() - self._t0) // 1000

    def write_frames(self, parts: list[bytes]) -> None:
        """Append frames from ``frame`` in one ``writev`` (a batch of
        ``broker.services.recording_pipeline``)."""
        # No lock: ``sync`` holds it through a long fdatasync, which must not stall the relay;
        # ``close`` only comes after the pipeline has drained.
        if self._fd < 0:
            raise RecordingError(f"recording {self._path} is closed")
        for i in range(0, len(parts), _IOV_MAX):
            self._write(parts[i:i + _IOV_MAX])

    @property
    def dirty(self) -> bool:
        """Bytes written since the last flush to disk."""
        return self.bytes != self._synced

    def sync(self) -> None:
        """Flush what was written so far to the disk (blocking: call it in a thread).

        The first call also syncs the directories, so that the file and its marker survive a
        power loss. Errors are raised as ``RecordingError``.
        """
        with self._lock:
            if self._fd < 0:
                return
            upto = self.bytes
            try:
                os.fdatasync(self._fd)
                if not self._dirs_synced:
                    dirs = {self._path.parent}
                    if self._marker is not None:
                        dirs.add(self._marker.parent)
                    for d in dirs:
                        _fsync_dir(d)
                    self._dirs_synced = True
            except OSError as exc:
                raise RecordingError(f"cannot sync recording {self._path}: {exc.strerror}") from exc
            if upto > self._synced:
                drop_cached(self._fd, upto)
            self._synced = upto

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    os.fsync(self._fd)
                    self._synced = self.bytes
                finally:
                    os.close(self._fd)  # also releases the flock
                    self._fd = -1

    def release(self) -> None:
        """Drop the live marker: the session's end is recorded in the index and the audit."""
        if self._marker is not None:
            self._marker.unlink(missing_ok=True)


class LocalRecordingSink:
    """Stores recordings as ``DIR/YYYY-MM-DD/SESSION_ID.rec`` (mode 0600)."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def open(self, session_id: str, meta: dict[str, Any]) -> LocalRecordingWriter:
        if not session_id or not set(session_id) <= _SESSION_ID_CHARS:
            raise RecordingError("invalid session id")
        day = time.strftime("%Y-%m-%d", time.gmtime())
        return LocalRecordingWriter(self._root / day / f"{session_id}.rec", meta,
                                    self._root / OPEN_DIR / session_id)

    @property
    def root(self) -> Path:
        return self._root

    def path_of(self, location: str) -> Path:
        """Resolve a stored location, refusing anything outside the recordings directory.

        A location recorded under another root (a state directory restored from a backup to a
        new place) is found by its ``DAY/SESSION.rec`` tail in this one."""
        p = Path(location).resolve()
        root = self._root.resolve()
        if p.is_relative_to(root):
            return p
        day, name = p.parent.name, p.name
        if _DAY_RE.fullmatch(day) and name.endswith(".rec") \
                and set(name.removesuffix(".rec")) <= _SESSION_ID_CHARS:
            return root / day / name
        raise NotFoundError(f"recording {location} is outside the recordings directory")

    def read(self, location: str) -> bytes:
        with self.open_read(location) as f:
            return f.read()

    def open_read(self, location: str) -> BinaryIO:
        """The recording opened for reading (the caller closes it): ``FrameReader`` reads it
        frame by frame, so replaying or exporting a large session needs little memory."""
        try:
            return self.path_of(location).open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"recording file {location} is missing") from None


def drop_cached(fd: int, upto: int) -> None:
    """Advise the kernel to drop [0, upto) of a file (0: all of it) from the page cache. Only
    clean pages go, so nothing unsynced is lost; advice that fails changes nothing. Always from
    0: the kernel drops only folios wholly inside the range, and a large folio may straddle the
    previous end; the part dropped before costs a walk over an empty range."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, upto, os.POSIX_FADV_DONTNEED)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def render_cast(rec_path: Path) -> Path:
    """Write ``SESSION_ID.cast`` (asciicast v2) beside a finished recording; returns its path.

    Viewer-safe, like ``export``: whoever runs ``asciinema play`` on it must not have their
    clipboard, title or terminal answers driven by what the target printed (see
    ``broker.domain.sanitize``). The ``.rec`` stays byte-exact, and ``export --raw`` renders
    every byte. Frame by frame: a session that printed gigabytes is rendered in bounded memory."""
    out = rec_path.with_suffix(".cast")
    with open(rec_path, "rb") as src:
        reader = fmt.FrameReader(src, os.fstat(src.fileno()).st_size)
        write_lines_atomically(out, safe_asciicast(fmt.to_asciicast(reader)), mode=0o600)
    return out


def write_lines_atomically(out: Path, lines: Iterable[str], mode: int | None = None) -> None:
    """Each line plus a newline into ``OUT.tmp``, renamed to ``out`` at the end: a failure
    midway leaves neither file. ``mode`` is set before anything is written."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            for line in lines:
                f.write(line)
                f.write("\n")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def describe(rec_path: Path) -> dict[str, Any]:
    """Header metadata of a recording, for listings."""
    with open(rec_path, "rb") as f:
        head = f.read(len(fmt.MAGIC))
        if head != fmt.MAGIC:
            raise RecordingError(f"{rec_path} is not a recording")
        meta: dict[str, Any] = json.loads(f.readline())
        return meta
