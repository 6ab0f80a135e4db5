"""Session text for search: built from each finished recording, off the event loop, and stored
with ``SessionIndex.index_text``.

When a session's recording is closed (and its seal started), ``submit`` queues it; one worker
task takes the queue in order and reads each recording frame by frame in a thread
(``broker.domain.textindex``: bounded memory, at most 2 Mi characters of text per session), then
replaces the session's indexed text in the store. Crash-repaired recordings are queued the same
way when the broker starts. The queue is bounded (``MAX_PENDING``); indexing never touches the
recording and never delays or undoes a session's end: a failure (unreadable file, store error,
full queue) is logged and audited as ``session.index_failed``, and
``bastion-broker sessions reindex SESSION | --all`` builds the text again, offline.

At shutdown the worker gets ``DRAIN_SECONDS`` to finish the queue (a session's text takes
milliseconds; the largest about a second); what is still queued then is audited as
``session.index_failed`` (reason ``stopped``) for ``sessions reindex`` to rebuild.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import time
from dataclasses import dataclass
from typing import BinaryIO

import structlog

from broker.domain import recording as fmt
from broker.domain.textindex import TextIndexer
from broker.errors import BrokerError
from broker.ports import AuditSink, RecordingSink, SessionIndex, TextSegment

log = structlog.get_logger("broker.text_index")

MAX_PENDING = 10_000  # sessions waiting for their text; beyond, they are left for reindex
DRAIN_SECONDS = 10.0
STOP_GRACE = 30.0  # for the session being indexed when the drain time is up


@dataclass(frozen=True, slots=True)
class Built:
    """A recording's text, ready for ``index_text``."""

    segments: list[TextSegment]
    chars: int
    scanned: int  # payload bytes read
    truncated: bool  # a cap was reached: the rest of the session is not searchable


def read_text(f: BinaryIO) -> Built:
    """The text segments of the recording open in ``f`` (blocking: run it in a thread)."""
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    reader = fmt.FrameReader(f, size)
    ix = TextIndexer(reader.meta)
    segments = [TextSegment(s.t, s.source, s.text) for s in ix.segments(reader.frames)]
    return Built(segments, ix.chars, ix.scanned, ix.truncated)


def build(sink: RecordingSink, location: str) -> Built:
    """Open and read one recording by its stored location (blocking)."""
    with sink.open_read(location) as f:
        return read_text(f)


async def index_session(sink: RecordingSink, index: SessionIndex, session_id: str,
                        location: str) -> Built:
    """Build a session's text from its recording and replace what the index holds for it.
    Raises what reading or storing raised (``OSError``, ``RecordingFormatError``,
    ``BrokerError``)."""
    built = await asyncio.to_thread(build, sink, location)
    await index.index_text(session_id, built.segments)
    return built


class TextIndexService:
    """The queue of finished sessions whose text is to be indexed, and its one worker."""

    def __init__(self, sink: RecordingSink, index: SessionIndex, audit: AuditSink, *,
                 max_pending: int = MAX_PENDING) -> None:
        self._sink = sink
        self._index = index
        self._audit = audit
        self._max_pending = max_pending
        self._pending: collections.deque[tuple[str, str]] = collections.deque()
        self._current: tuple[str, str] | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._deadline: float | None = None  # set by ``stop``: drain until then, then end
        self.indexed = 0  # sessions indexed by this process
        self.failed = 0

    def submit(self, session_id: str, location: str) -> None:
        """Queue a closed recording (never raises, never blocks)."""
        if not location:
            return  # not recorded: nothing to read
        if len(self._pending) >= self._max_pending:
            self._failed(session_id, "queue_full",
                         f"{len(self._pending)} sessions already wait for indexing")
            return
        self._pending.append((session_id, location))
        if self._wake is not None:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending) + (self._current is not None)

    def start(self) -> None:
        """Start the worker (idempotent); what was submitted before is indexed first."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(self._wake))

    async def stop(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        """Let the worker finish the queue for up to ``drain_seconds`` (the session it is on
        when they run out is finished too), then stop it; sessions still queued are audited as
        not indexed (``sessions reindex`` rebuilds them)."""
        task = self._task
        if task is None or self._wake is None:
            return
        self._deadline = time.monotonic() + drain_seconds
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), drain_seconds + STOP_GRACE)
        except TimeoutError:  # a store that does not answer: give up on the current one
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None
        left = ([self._current] if self._current is not None else []) + list(self._pending)
        self._pending.clear()
        self._current = None
        for sid, _location in left:
            self._failed(sid, "stopped", "the broker stopped before the session's text was "
                         "indexed; run: bastion-broker sessions reindex " + sid)

    async def _run(self, wake: asyncio.Event) -> None:
        while True:
            if self._deadline is not None and (
                    not self._pending or time.monotonic() >= self._deadline):
                return
            if not self._pending:
                wake.clear()
                await wake.wait()
                continue
            self._current = self._pending.popleft()
            await self._index_one(*self._current)
            self._current = None

    async def _index_one(self, session_id: str, location: str) -> None:
        started = time.monotonic()
        try:
            built = await index_session(self._sink, self._index, session_id, location)
        except Exception as exc:  # the worker outlives one bad recording or store error
            self._failed(session_id, "error", str(exc) or type(exc).__name__)
            return
        self.indexed += 1
        log.info("text_index.indexed", session_id=session_id, segments=len(built.segments),
                 chars=built.chars, bytes_read=built.scanned,
                 seconds=round(time.monotonic() - started, 3))
        if built.truncated:
            log.warning("text_index.truncated", session_id=session_id, chars=built.chars,
                        bytes_read=built.scanned)

    def _failed(self, session_id: str, reason: str, error: str) -> None:
        self.failed += 1
        log.error("text_index.failed", session_id=session_id, reason=reason, error=error)
        try:
            self._audit.emit("session.index_failed", session_id=session_id, reason=reason,
                             error=error)
        except BrokerError as exc:
            log.error("audit.write_failed", session_id=session_id, error=str(exc))
