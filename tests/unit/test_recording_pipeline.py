"""RecordingPipeline: bytes are relayed only after their frame is in the file, always in order.

A real LocalRecordingWriter on a temporary directory; the "relay" is a list of what the actions
passed on, checked against the file at the moment each action runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.domain import recording as fmt
from broker.errors import RecordingError
from broker.recordings.local import LocalRecordingSink, LocalRecordingWriter
from broker.services.recording_pipeline import INLINE_MAX, RecordingPipeline

BIG = INLINE_MAX + 1


class Relay:
    """Actions that check, when they run, that their frame is already in the recording."""

    def __init__(self, writer: LocalRecordingWriter) -> None:
        self.writer = writer
        self.sent: list[bytes] = []

    def recorded(self) -> bytes:
        return fmt.output_bytes(fmt.parse(Path(self.writer.location).read_bytes()).frames)

    def action(self, data: bytes) -> object:
        def send() -> None:
            so_far = b"".join(self.sent) + data
            assert self.recorded().startswith(so_far), "relayed before it was recorded"
            self.sent.append(data)
        return send


@pytest.fixture
def writer(tmp_path: Path) -> LocalRecordingWriter:
    w = LocalRecordingSink(tmp_path).open("0a1b2c3d", {"session_id": "0a1b2c3d"})
    assert isinstance(w, LocalRecordingWriter)
    return w


def pipeline(writer: LocalRecordingWriter, decisions: list[bool] | None = None,
             errors: list[RecordingError] | None = None) -> RecordingPipeline:
    def on_error(err: RecordingError) -> bool:
        if errors is not None:
            errors.append(err)
        return decisions.pop(0) if decisions else False
    return RecordingPipeline(writer, on_error=on_error)


async def test_small_frame_is_written_and_relayed_at_once(writer: LocalRecordingWriter) -> None:
    relay, pipe = Relay(writer), pipeline(writer)
    pipe.record(fmt.OUTPUT, b"$ ", relay.action(b"$ "))  # type: ignore[arg-type]
    assert relay.sent == [b"$ "]
    assert not pipe.busy


async def test_bulk_frames_are_written_together_then_relayed_in_order(
        writer: LocalRecordingWriter) -> None:
    relay, pipe = Relay(writer), pipeline(writer)
    chunks = [bytes([65 + i]) * BIG for i in range(5)]
    before = writer.bytes
    for c in chunks:
        pipe.record(fmt.OUTPUT, c, relay.action(c))  # type: ignore[arg-type]
    pipe.record(fmt.OUTPUT, b"tail", relay.action(b"tail"))  # type: ignore[arg-type]
    assert relay.sent == [] and writer.bytes == before  # held until the end of the iteration
    eof: list[str] = []
    pipe.then(lambda: eof.append("eof"))
    await asyncio.sleep(0)
    assert relay.sent == [*chunks, b"tail"]
    assert eof == ["eof"]
    assert relay.recorded() == b"".join(chunks) + b"tail"
    assert not pipe.busy
    pipe.then(lambda: eof.append("now"))  # nothing queued: runs at once
    assert eof == ["eof", "now"]


async def test_flush_writes_what_is_queued_now(writer: LocalRecordingWriter) -> None:
    relay, pipe = Relay(writer), pipeline(writer)
    pipe.record(fmt.OUTPUT, b"x" * BIG, relay.action(b"x" * BIG))  # type: ignore[arg-type]
    pipe.flush()
    assert relay.sent == [b"x" * BIG]
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert relay.sent == [b"x" * BIG]


async def test_an_action_that_records_again_queues_behind_the_rest(
        writer: LocalRecordingWriter) -> None:
    relay, pipe = Relay(writer), pipeline(writer)
    order: list[str] = []

    def first() -> None:
        order.append("first")
        pipe.record(fmt.OUTPUT, b"!", lambda: order.append("reentrant"))

    pipe.record(fmt.OUTPUT, b"a" * BIG, first)
    pipe.record(fmt.OUTPUT, b"b" * BIG, lambda: order.append("second"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["first", "second", "reentrant"]
    assert relay.recorded() == b"a" * BIG + b"b" * BIG + b"!"


async def test_strict_failure_relays_nothing_unrecorded(writer: LocalRecordingWriter) -> None:
    errors: list[RecordingError] = []
    relay, pipe = Relay(writer), pipeline(writer, [False], errors)
    pipe.record(fmt.OUTPUT, b"x" * BIG, relay.action(b"x" * BIG))  # type: ignore[arg-type]
    writer.close()  # the disk goes away before the batch is written
    await asyncio.sleep(0)
    assert relay.sent == [] and len(errors) == 1
    with pytest.raises(RecordingError):
        pipe.record(fmt.OUTPUT, b"y", relay.action(b"y"))  # type: ignore[arg-type]
    ran: list[int] = []
    pipe.then(lambda: ran.append(1))
    assert ran == []


async def test_best_effort_failure_relays_the_held_bytes(writer: LocalRecordingWriter) -> None:
    pipe = pipeline(writer, [True])
    sent: list[bytes] = []
    pipe.record(fmt.OUTPUT, b"x" * BIG, lambda: sent.append(b"x"))
    pipe.then(lambda: sent.append(b"eof"))
    writer.close()
    await asyncio.sleep(0)
    assert sent == [b"x", b"eof"]
    assert pipe.failed is None


async def test_small_frame_after_queued_bulk_keeps_the_order(writer: LocalRecordingWriter) -> None:
    relay, pipe = Relay(writer), pipeline(writer)
    pipe.record(fmt.OUTPUT, b"a" * BIG, relay.action(b"a" * BIG))  # type: ignore[arg-type]
    pipe.record(fmt.OUTPUT, b"b", relay.action(b"b"))  # type: ignore[arg-type]
    assert relay.sent == []
    await asyncio.sleep(0)
    assert relay.sent == [b"a" * BIG, b"b"]
