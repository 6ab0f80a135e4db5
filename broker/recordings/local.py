"""Recordings on local disk: one framed file per session, appended with one ``writev`` per chunk.

Each chunk reaches the kernel before the broker forwards it to the client, so a broker crash loses
nothing the client saw (power loss: what the OS had not flushed; issue-level fsync comes later).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from broker.domain import recording as fmt
from broker.errors import NotFoundError, RecordingError

_SESSION_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz-")


class LocalRecordingWriter:
    """Appends frames for one session. Not thread-safe; used from the event loop only."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self._path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except OSError as exc:
            raise RecordingError(f"cannot create recording {path}: {exc.strerror}") from exc
        self._t0 = time.monotonic_ns()
        self.bytes = 0
        self._write([fmt.encode_header(meta)])

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
        t_us = (time.monotonic_ns() - self._t0) // 1000
        self._write([fmt.frame_header(t_us, kind, len(data)), data])

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1


class LocalRecordingSink:
    """Stores recordings as ``DIR/YYYY-MM-DD/SESSION_ID.rec`` (mode 0600)."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def open(self, session_id: str, meta: dict[str, Any]) -> LocalRecordingWriter:
        if not session_id or not set(session_id) <= _SESSION_ID_CHARS:
            raise RecordingError("invalid session id")
        day = time.strftime("%Y-%m-%d", time.gmtime())
        return LocalRecordingWriter(self._root / day / f"{session_id}.rec", meta)

    def path_of(self, location: str) -> Path:
        """Resolve a stored location, refusing anything outside the recordings directory."""
        p = Path(location).resolve()
        if not p.is_relative_to(self._root.resolve()):
            raise NotFoundError(f"recording {location} is outside the recordings directory")
        return p

    def read(self, location: str) -> bytes:
        try:
            return self.path_of(location).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"recording file {location} is missing") from None


def render_cast(rec_path: Path) -> Path:
    """Write ``SESSION_ID.cast`` (asciicast v2) beside a finished recording; returns its path."""
    parsed = fmt.parse(rec_path.read_bytes())
    out = rec_path.with_suffix(".cast")
    tmp = out.with_suffix(".cast.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in fmt.to_asciicast(parsed):
            f.write(line)
            f.write("\n")
    os.chmod(tmp, 0o600)
    tmp.replace(out)
    return out


def describe(rec_path: Path) -> dict[str, Any]:
    """Header metadata of a recording, for listings."""
    with open(rec_path, "rb") as f:
        head = f.read(len(fmt.MAGIC))
        if head != fmt.MAGIC:
            raise RecordingError(f"{rec_path} is not a recording")
        meta: dict[str, Any] = json.loads(f.readline())
        return meta
