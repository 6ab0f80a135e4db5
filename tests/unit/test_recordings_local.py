"""LocalRecordingSink / LocalRecordingWriter / render_cast on a temporary directory."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from broker.domain import recording as fmt
from broker.errors import NotFoundError, RecordingError
from broker.recordings.local import LocalRecordingSink, describe, render_cast

META = {
    "session_id": "0a1b2c3d-4e5f",
    "user": "alice@corp.example.com",
    "target": "web01",
    "width": 100,
    "height": 30,
    "started_at_epoch": 1740830400,
}
ASCIINEMA = Path(sys.executable).with_name("asciinema")


@pytest.fixture
def sink(tmp_path: Path) -> LocalRecordingSink:
    return LocalRecordingSink(tmp_path / "recordings")


def test_writer_appends_frames_that_parse_back(sink: LocalRecordingSink, tmp_path: Path) -> None:
    w = sink.open("0a1b2c3d-4e5f", META)
    w.write(fmt.OUTPUT, b"hello\r\n")
    w.write(fmt.INPUT, b"\x03")
    w.write(fmt.OUTPUT, b"\x00\xff binary")
    w.write(fmt.EXIT, b"130")
    w.close()
    w.close()  # idempotent
    path = Path(w.location)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", path.parent.name)
    assert path.parent.parent == tmp_path / "recordings"
    assert path.name == "0a1b2c3d-4e5f.rec"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert w.bytes == len(data)
    rec = fmt.parse(data)
    assert rec.meta == META
    assert rec.truncated is False
    assert [(f.kind, f.data) for f in rec.frames] == [
        (fmt.OUTPUT, b"hello\r\n"),
        (fmt.INPUT, b"\x03"),
        (fmt.OUTPUT, b"\x00\xff binary"),
        (fmt.EXIT, b"130"),
    ]
    times = [f.t_us for f in rec.frames]
    assert times == sorted(times)
    assert times[-1] < 5_000_000  # microseconds since open, not an absolute clock
    assert describe(path) == META
    assert sink.read(w.location) == data


def test_frames_reach_the_file_before_close(sink: LocalRecordingSink) -> None:
    w = sink.open("live", META)
    w.write(fmt.OUTPUT, b"seen")
    rec = fmt.parse(Path(w.location).read_bytes())
    assert [f.data for f in rec.frames] == [b"seen"]
    w.close()


@pytest.mark.parametrize("sid", ["", "../etc", "ABC", "a/b", "a.b", "a b", "x\x00"])
def test_invalid_session_id_refused(sink: LocalRecordingSink, sid: str) -> None:
    with pytest.raises(RecordingError, match="invalid session id"):
        sink.open(sid, META)


def test_existing_recording_is_not_overwritten(sink: LocalRecordingSink) -> None:
    w = sink.open("dup", META)
    w.write(fmt.OUTPUT, b"first")
    w.close()
    with pytest.raises(RecordingError, match="cannot create recording"):
        sink.open("dup", META)
    assert fmt.parse(Path(w.location).read_bytes()).frames[0].data == b"first"


def test_unwritable_root_is_recording_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RecordingError, match="cannot create recording"):
        LocalRecordingSink(blocker).open("s1", META)


def test_read_refuses_paths_outside_root(sink: LocalRecordingSink, tmp_path: Path) -> None:
    outside = tmp_path / "secret.rec"
    outside.write_bytes(b"x")
    with pytest.raises(NotFoundError, match="outside the recordings directory"):
        sink.read(str(outside))
    with pytest.raises(NotFoundError, match="outside the recordings directory"):
        sink.read(str(tmp_path / "recordings" / ".." / "secret.rec"))


def test_read_missing_is_not_found(sink: LocalRecordingSink, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="is missing"):
        sink.read(str(tmp_path / "recordings" / "2025-01-01" / "gone.rec"))


def test_describe_refuses_non_recording(tmp_path: Path) -> None:
    p = tmp_path / "x.rec"
    p.write_bytes(b"hello")
    with pytest.raises(RecordingError, match="is not a recording"):
        describe(p)


def test_render_cast_and_asciinema_cat(sink: LocalRecordingSink) -> None:
    w = sink.open("cast-1", META)
    snow = "☃".encode()
    w.write(fmt.OUTPUT, b"snow: " + snow[:1])
    w.write(fmt.OUTPUT, snow[1:] + b"\r\n")
    w.write(fmt.RESIZE, b"132x43")
    w.write(fmt.ERROR, b"done\r\n")
    w.write(fmt.EXIT, b"0")
    w.close()
    cast = render_cast(Path(w.location))
    assert cast == Path(w.location).with_suffix(".cast")
    assert stat.S_IMODE(cast.stat().st_mode) == 0o600
    assert not cast.with_suffix(".cast.tmp").exists()
    lines = cast.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    assert (header["version"], header["width"], header["height"]) == (2, 100, 30)
    assert header["bastion"]["session_id"] == "0a1b2c3d-4e5f"
    events = [json.loads(x) for x in lines[1:]]
    assert [(e[1], e[2]) for e in events] == [
        ("o", "snow: "),
        ("o", "☃\r\n"),
        ("r", "132x43"),
        ("o", "done\r\n"),
        ("x", "0"),
    ]
    res = subprocess.run(
        [str(ASCIINEMA), "cat", str(cast)],
        capture_output=True,
        timeout=30,
        start_new_session=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode("utf-8") == "snow: ☃\r\ndone\r\n"


def test_render_cast_of_crashed_recording_keeps_complete_frames(sink: LocalRecordingSink) -> None:
    w = sink.open("crash", META)
    w.write(fmt.OUTPUT, b"kept")
    w.write(fmt.OUTPUT, b"lost in the crash")
    w.close()
    path = Path(w.location)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    lines = render_cast(path).read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)[1:] for x in lines[1:]] == [["o", "kept"]]


def _cached_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def test_synced_bytes_leave_the_page_cache_and_the_file_stays_whole(
        sink: LocalRecordingSink) -> None:
    """After ``sync`` a recording's synced pages are dropped from the cache (it is written once,
    read rarely); writes after that append correctly, and the whole file reads back intact."""
    w = sink.open("s-cache", {"session_id": "s-cache"})
    chunk = bytes(range(256)) * 1024  # 256 KiB, not page-sized frames
    for _ in range(64):
        w.write(fmt.OUTPUT, chunk)
    path = Path(w.location)
    before = _cached_bytes(path)
    w.sync()
    after = _cached_bytes(path)
    assert before >= 16 << 20  # the 16 MiB just written were cached ...
    assert after <= 2 << 20  # ... and are gone once on disk, but for a partly written last folio
    w.write_frames([*w.frame(fmt.OUTPUT, b"tail"), *w.frame(fmt.EXIT, b"0")])
    w.sync()
    w.write(fmt.OUTPUT, b"after the second sync")
    w.close()
    parsed = fmt.parse(path.read_bytes())
    assert not parsed.truncated
    assert fmt.output_bytes(parsed.frames) == chunk * 64 + b"tail" + b"after the second sync"
    assert fmt.exit_status(parsed.frames) == "0"


def test_render_cast_of_a_large_recording_holds_one_frame_at_a_time(
        sink: LocalRecordingSink) -> None:
    """A session that printed 48 MiB is rendered in a few MiB, not the size of the file."""
    import tracemalloc

    w = sink.open("s-large", {**META, "session_id": "s-large", "term": "xterm"})
    text = b"".join(b"%07d coloured \x1b[1;32mls -l\x1b[0m line\r\n" % i for i in range(1000))
    chunk = text[:32768]
    frames: list[bytes] = []
    for _ in range(48 << 20 >> 15):
        frames += w.frame(fmt.OUTPUT, chunk)
    w.write_frames(frames)
    w.write(fmt.EXIT, b"0")
    w.close()
    path = Path(w.location)
    assert path.stat().st_size > 48 << 20
    tracemalloc.start()
    try:
        cast = render_cast(path)
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"rendering held {peak >> 20} MiB"
    with cast.open(encoding="utf-8") as f:
        assert json.loads(f.readline())["width"] == META["width"]
        events = [json.loads(x) for x in f]
    assert "".join(e[2] for e in events if e[1] == "o") == (chunk * (48 << 20 >> 15)).decode()
    assert events[-1][1:] == ["x", "0"]


def test_render_cast_is_safe_to_play_and_the_rec_keeps_every_byte(
    sink: LocalRecordingSink,
) -> None:
    """What a target prints must not reach the clipboard, title or answers of whoever replays
    the .cast with asciinema; the .rec (and ``export --raw``) keep it for forensics."""
    w = sink.open("cast-osc", META)
    hostile = b"\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b]0;fake title\x07\x1b[6n"
    w.write(fmt.OUTPUT, b"ok " + hostile[:5])  # a sequence split across two frames
    w.write(fmt.ERROR, hostile[5:] + b"\x1b[31mred\x1b[0m\r\n")
    w.write(fmt.OUTPUT, b"\x1b]0;only a title\x07")  # an event left empty is dropped
    w.write(fmt.INPUT, b"\x1b[A")  # input events are not sent to the viewer's terminal
    w.write(fmt.EXIT, b"0")
    w.close()
    lines = render_cast(Path(w.location)).read_text(encoding="utf-8").splitlines()
    events = [json.loads(x)[1:] for x in lines[1:]]
    assert events == [["o", "ok "], ["o", "\x1b[31mred\x1b[0m\r\n"], ["i", "\x1b[A"], ["x", "0"]]
    raw = Path(w.location).read_bytes()
    assert b"ok " + hostile[:5] in raw and hostile[5:] in raw
