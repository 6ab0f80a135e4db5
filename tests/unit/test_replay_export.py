"""``play`` and ``export`` read a recording frame by frame: a large session needs little memory,
and a failed export leaves no half-written file."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.cli.sessions import write_export as _write_export
from broker.domain import recording as fmt
from broker.play import play
from broker.recordings.local import LocalRecordingSink

META = {"session_id": "s-big", "user": "alice@corp.example.com", "target": "web01",
        "width": 100, "height": 30, "term": "xterm", "started_at_epoch": 1_700_000_000}
# plain text: the viewer-safe filter (export's default, and play) passes it unchanged
CHUNK = b"".join(b"%07d -rwxr-xr-x 1 root root 1234 ls -l line\r\n" % i for i in range(800))[:32768]
FRAMES = 16 << 20 >> 15  # 16 MiB of output: holding it whole would break the 4 MiB bound


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalRecordingSink, str]:
    sink = LocalRecordingSink(tmp_path_factory.mktemp("recordings"))
    w = sink.open("s-big", META)
    for _ in range(FRAMES // 64):
        parts: list[bytes] = []
        for _ in range(64):
            parts += w.frame(fmt.OUTPUT, CHUNK)
        w.write_frames(parts)
    w.write(fmt.EXIT, b"0")
    w.close()
    return sink, w.location


def _reader(sink: LocalRecordingSink, location: str) -> tuple[fmt.FrameReader, Any]:
    f = sink.open_read(location)
    return fmt.FrameReader(f, os.fstat(f.fileno()).st_size), f


def _peak(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_export_of_a_large_recording_holds_one_frame_at_a_time(
        big: tuple[LocalRecordingSink, str], tmp_path: Path) -> None:
    reader, f = _reader(*big)
    out = tmp_path / "s-big.cast"
    with f:
        peak = _peak(lambda: _write_export(reader, False, str(out)))
    assert peak < 4 << 20, f"export held {peak >> 20} MiB"
    assert [p.name for p in tmp_path.iterdir()] == ["s-big.cast"]  # no .part left
    with out.open(encoding="utf-8") as lines:
        header = json.loads(lines.readline())
        assert (header["width"], header["bastion"]["session_id"]) == (100, "s-big")
        events = [json.loads(line) for line in lines]
    assert "".join(e[2] for e in events if e[1] == "o") == (CHUNK * FRAMES).decode()
    assert events[-1][1:] == ["x", "0"]


def test_play_of_a_large_recording_holds_one_frame_at_a_time(
        big: tuple[LocalRecordingSink, str], monkeypatch: pytest.MonkeyPatch) -> None:
    reader, f = _reader(*big)
    written = [0]

    class _Counting(io.TextIOBase):
        def write(self, s: str) -> int:
            written[0] += len(s)
            return len(s)

    monkeypatch.setattr(sys, "stdout", _Counting())
    with f:
        peak = _peak(lambda: asyncio.run(play(reader, speed=1e9, idle_limit=0.0)))
    assert peak < 4 << 20, f"play held {peak >> 20} MiB"
    assert written[0] == len(CHUNK) * FRAMES


class _Broken:
    """A recording whose file fails after the first frame (a disk error while exporting)."""

    meta = META

    @property
    def frames(self) -> Iterator[fmt.Frame]:
        yield fmt.Frame(0, fmt.OUTPUT, b"first")
        raise OSError(5, "Input/output error")


def test_a_failed_export_leaves_no_file_behind(tmp_path: Path) -> None:
    out = tmp_path / "s.cast"
    with pytest.raises(OSError, match="Input/output"):
        _write_export(_Broken(), True, str(out))
    assert list(tmp_path.iterdir()) == []
