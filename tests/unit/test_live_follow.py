"""The live view's reading side on real files: a recording followed while the broker's own
writer appends to it (half-written frames, floods passed over by their headers, the end), and
what a watcher is shown (viewer-safe, withheld input as its marker)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from broker.domain import recording as fmt
from broker.ports import SessionRecord
from broker.recordings.follow import RecordingFollower
from broker.recordings.local import LocalRecordingWriter
from broker.services.clock import SystemClock
from broker.services.live import Renderer, Watch, skip_marker

META = {"session_id": "s-1", "user": "alice@corp", "target": "i-1", "width": 100, "height": 30,
        "started_at": "2026-12-07T10:00:00+00:00"}


def _writer(tmp_path: Path) -> LocalRecordingWriter:
    return LocalRecordingWriter(tmp_path / "s-1.rec", META)


def test_a_half_written_frame_is_read_whole_at_the_next_poll(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    f = RecordingFollower(tmp_path / "s-1.rec")
    assert f.header() == META and f.pending() == 0
    w.write(fmt.OUTPUT, b"hello ")
    with open(tmp_path / "s-1.rec", "ab") as raw:  # a frame caught mid-write
        raw.write(fmt.frame_header(5, fmt.OUTPUT, 6) + b"wor")
        raw.flush()
        assert [x.data for x in f.read(1 << 20)] == [b"hello "]
        assert f.read(1 << 20) == [] and f.pending() == 16
        raw.write(b"ld!")
    assert [x.data for x in f.read(1 << 20)] == [b"world!"]
    assert not f.writer_gone()
    w.close()
    assert f.writer_gone() and f.pending() == 0
    f.close()


def test_skip_passes_over_payloads_and_keeps_the_tail_the_size_and_the_exit(
        tmp_path: Path) -> None:
    w = _writer(tmp_path)
    chunk = b"x" * 32768
    for i in range(100):
        w.write(fmt.OUTPUT, chunk)
        if i == 50:
            w.write(fmt.RESIZE, b"132x43")
    w.write(fmt.OUTPUT, b"the last line\r\n")
    f = RecordingFollower(tmp_path / "s-1.rec")
    f.header()
    passed = f.skip(16 * 1024)
    assert passed.resize is not None and passed.resize.data == b"132x43"
    assert passed.exit is None
    tail = f.read(1 << 20)
    assert [x.data for x in tail] == [chunk, b"the last line\r\n"]
    assert passed.bytes == 99 * len(chunk)
    w.close()


def test_what_a_watcher_is_shown_is_viewer_safe_with_markers() -> None:
    r = Renderer()
    events, exit_status = r.events([
        fmt.Frame(1_000_000, fmt.OUTPUT, b"Pass\x1b]52;c;ZXZpbA==\x07word: \xe2\x82"),
        fmt.Frame(1_500_000, fmt.OUTPUT, b"\xac"),
        fmt.Frame(2_000_000, fmt.NOT_ECHOED, b"8"),
        fmt.Frame(2_100_000, fmt.OUTPUT, b"\r\n\x1b[?1049h"),
        fmt.Frame(3_000_000, fmt.NOT_ECHOED, b"1"),
        fmt.Frame(3_500_000, fmt.RESIZE, b"90x20"),
        fmt.Frame(4_000_000, fmt.EXIT, b"0"),
    ])
    assert exit_status == "0"
    assert events == [
        [2.0, "o", "Password: €[input not echoed: 8 bytes]"],
        [2.0, "i", "[input not echoed: 8 bytes]"],
        [3.0, "o", "\r\n\x1b[?1049h"],  # a full-screen program: the marker only as input
        [3.0, "i", "[input not echoed: 1 bytes]"],
        [3.5, "r", "90x20"],
    ]


def test_a_flood_is_skipped_with_a_marker_and_the_watch_ends_with_the_session(
        tmp_path: Path) -> None:
    rec = SessionRecord("s-1", "alice@corp", "i-1", "ubuntu", "g-1", "read-only", "shell", None,
                        "127.0.0.1", SystemClock().now(), None, None, 0, 0,
                        str(tmp_path / "s-1.rec"))

    async def go() -> list[Any]:
        w = _writer(tmp_path)
        w.write(fmt.OUTPUT, b"before\r\n")
        watch = Watch(rec, RecordingFollower(tmp_path / "s-1.rec"), SystemClock())
        seen: list[Any] = []

        async def write() -> None:
            await asyncio.sleep(0.3)
            for _ in range(256):  # 8 MiB at once: far more than a watcher reads
                w.write(fmt.OUTPUT, b"y" * 32768)
            await asyncio.sleep(0.3)
            w.write(fmt.OUTPUT, b"after the flood\r\n")
            await asyncio.sleep(0.3)
            w.write(fmt.EXIT, b"0")
            w.close()

        writer = asyncio.create_task(write())
        async with asyncio.timeout(20):
            async for msg in watch.messages():
                seen.append(msg)
        await writer
        watch.close()
        return seen

    seen = asyncio.run(go())
    header, *rest = seen
    assert (header["width"], header["height"]) == (100, 30) and header["version"] == 2
    text = "".join(m[2] for m in rest if isinstance(m, list) and m[1] == "o")
    assert text.startswith("before\r\n") and text.endswith("after the flood\r\n")
    skipped = [m for m in rest if isinstance(m, list) and "[live view skipped" in m[2]]
    assert skipped and sum(int(m[2].split("skipped ")[1].split(" ")[0]) for m in skipped) \
        > 7 * 1024 * 1024
    assert skip_marker(5) == "\r\n[live view skipped 5 bytes]\r\n"
    assert len(text) < 1024 * 1024  # what the watcher read is a small part of 8 MiB
    assert rest[-1] == {"end": {"reason": "exit", "exit_status": "0",
                                "message": "the session ended"}}
    assert os.path.exists(tmp_path / "s-1.rec")


def test_a_walk_that_would_wait_for_the_disk_stops_and_goes_on_when_asked(
        tmp_path: Path) -> None:
    """The writer drops what it has synced from the page cache: the event loop's walk stops at
    the first header not cached (the rest is walked in a thread), and nothing is lost."""
    w = _writer(tmp_path)
    chunk = b"z" * 32768
    for _ in range(400):
        w.write(fmt.OUTPUT, chunk)
    w.sync()
    f = RecordingFollower(tmp_path / "s-1.rec")
    f.header()
    first = f.skip(16 * 1024, nowait=True)
    assert not first.done
    rest = f.skip(16 * 1024)
    assert rest.done and first.bytes + rest.bytes == 399 * len(chunk)
    assert [x.data for x in f.read(1 << 20)] == [chunk]
    w.close()
    f.close()
