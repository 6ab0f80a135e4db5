"""Repair of recordings left open by a crash (SIGKILL, power loss), run when a broker starts.

A live recording has a marker in ``DIR/.open`` and an exclusive ``flock`` held by its writer. A
marker whose file nobody locks belongs to a broker process that died: its recording is cut to the
last complete frame (a crash mid-``writev`` leaves a partial one), ends with an exit frame
``interrupted``, is flushed, rendered to asciicast for terminal sessions; the session index row
is closed with exit status ``interrupted`` and a ``session.end`` audit event with
``reason = "interrupted"`` is synthesized. The lock is held throughout, so two broker processes
starting together repair each recording once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from broker.domain import recording as fmt
from broker.domain.outcome import LOST
from broker.errors import BrokerError
from broker.ports import AuditSink, Clock, SessionIndex
from broker.recordings.local import OPEN_DIR, render_cast

log = structlog.get_logger("broker.repair")

INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True)
class Repaired:
    session_id: str
    path: Path | None  # None: the recording file was missing
    cut_bytes: int  # bytes of an incomplete last frame removed
    frames: int


@dataclass(frozen=True, slots=True)
class _FileResult:
    cut_bytes: int
    frames: int
    bytes_in: int
    bytes_out: int
    last_t_us: int
    meta: dict[str, object]


def _cut(fd: int, mark: bool) -> _FileResult:
    """Truncate an open recording to its last complete frame; ``mark`` appends the exit frame
    ``interrupted`` (not for a session whose end the index already has). Reads frame by frame:
    a crashed multi-GiB recording must not take the starting broker's memory with it."""
    size = os.fstat(fd).st_size
    with os.fdopen(os.dup(fd), "rb") as f:  # shares fd's offset: start at 0
        f.seek(0)
        try:
            reader = fmt.FrameReader(f, size)
        except fmt.RecordingFormatError:
            return _FileResult(0, 0, 0, 0, 0, {})  # died before the header: keep it as it is
        frames = bytes_in = bytes_out = last_t = 0
        last_kind = b""
        for frame in reader.frames:
            frames += 1
            if frame.kind == fmt.INPUT:
                bytes_in += len(frame.data)
            elif frame.kind == fmt.NOT_ECHOED and frame.data.isdigit():
                bytes_in += int(frame.data)  # withheld input counts as typed
            elif frame.kind in (fmt.OUTPUT, fmt.ERROR):
                bytes_out += len(frame.data)
            last_t = max(last_t, frame.t_us)
            last_kind = frame.kind
    valid = reader.valid_length
    cut = size - valid
    if cut:
        os.ftruncate(fd, valid)
    if mark and last_kind != fmt.EXIT:
        payload = INTERRUPTED.encode()
        os.pwrite(fd, fmt.frame_header(last_t, fmt.EXIT, len(payload)) + payload, valid)
        frames += 1
    os.fsync(fd)
    return _FileResult(cut, frames, bytes_in, bytes_out, last_t, reader.meta)


def pending(root: Path) -> list[tuple[str, Path]]:
    """(session id, marker) of every recording not finished cleanly, live ones included."""
    d = root / OPEN_DIR
    try:
        return sorted((m.name, m) for m in d.iterdir() if m.is_file())
    except FileNotFoundError:
        return []
    except OSError as exc:  # sessions will fail closed on the same directory, with the details
        log.error("recording.repair_scan_failed", dir=str(d), error=exc.strerror)
        return []


async def repair_interrupted(root: Path, index: SessionIndex, audit: AuditSink,
                             clock: Clock) -> list[Repaired]:
    """Repair every crashed recording under ``root`` (skipping live ones); returns what it did."""
    done: list[Repaired] = []
    for sid, marker in pending(root):
        try:
            result = await _repair_one(root, sid, marker, index, audit, clock)
        except (OSError, ValueError, BrokerError) as exc:
            # one bad file must not keep the broker (and every other session) down
            log.error("recording.repair_failed", session_id=sid, error=str(exc))
            continue
        if result is not None:
            done.append(result)
    return done


def _claim(root: Path, marker: Path) -> tuple[Path, int] | None:
    """Open and lock the recording a marker names; None if it is live or already repaired.

    The descriptor is -1 when the file is missing (the crash came before it reached the disk).
    """
    try:
        rec_path = Path(marker.read_text().strip())
    except FileNotFoundError:
        return None  # finished meanwhile
    if not rec_path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"marker {marker} names a file outside the recordings directory")
    try:
        fd = os.open(rec_path, os.O_RDWR)
    except FileNotFoundError:
        return rec_path, -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None  # a live session of another broker process
    if not marker.exists():
        os.close(fd)
        return None  # another process repaired it while we waited for the lock
    return rec_path, fd


def _cleanup(rec_path: Path, marker: Path, res: _FileResult | None) -> None:
    if res is not None and res.meta.get("term"):
        with contextlib.suppress(OSError, ValueError):
            render_cast(rec_path)
    marker.unlink(missing_ok=True)


async def _repair_one(root: Path, sid: str, marker: Path, index: SessionIndex,
                      audit: AuditSink, clock: Clock) -> Repaired | None:
    claimed = _claim(root, marker)
    if claimed is None:
        return None
    rec_path, fd = claimed
    try:
        rec = await index.get(sid)
        open_row = rec is not None and rec.ended_at is None
        # a row another bastion closed as lost (this one was silent too long) has no end in
        # its recording yet: the file gets its exit frame; the row and audit stay as they are
        mark = open_row or (rec is not None and rec.exit_status == LOST)
        res = await asyncio.to_thread(_cut, fd, mark) if fd >= 0 else None
        if rec is not None and rec.ended_at is None:
            bytes_in, bytes_out = (res.bytes_in, res.bytes_out) if res else (0, 0)
            if res is not None and res.frames:
                ended = rec.started_at + timedelta(microseconds=res.last_t_us)
            else:
                ended = clock.now()
            ended = min(ended, clock.now())
            audit.emit(
                "session.end", session_id=sid, user=rec.user, target=rec.target,
                exit_status=INTERRUPTED, reason=INTERRUPTED, bytes_in=bytes_in,
                bytes_out=bytes_out, duration_s=round(_seconds(rec.started_at, ended), 3),
                synthesized=True, recording_missing=res is None,
                cut_bytes=res.cut_bytes if res else 0,
            )
            await index.ended(sid, ended, INTERRUPTED, bytes_in, bytes_out)
        await asyncio.to_thread(_cleanup, rec_path, marker, res)
        log.warning("recording.repaired", session_id=sid, cut_bytes=res.cut_bytes if res else 0,
                    recording_missing=res is None)
        return Repaired(sid, rec_path if res else None, res.cut_bytes if res else 0,
                        res.frames if res else 0)
    finally:
        if fd >= 0:
            os.close(fd)


def _seconds(a: datetime, b: datetime) -> float:
    return max(0.0, (b - a).total_seconds())
