"""The framed recording format and its asciicast v2 rendering (checked with asciinema 2.4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.domain import recording as fmt

META: dict[str, Any] = {
    "session_id": "0123abcd-0000-4000-8000-000000000001",
    "user": "alice@corp.example.com",
    "target": "web01",
    "grant_id": "g-42",
    "level": "admin",
    "login": "admin",
    "command": None,
    "width": 120,
    "height": 40,
    "term": "xterm-256color",
    "started_at_epoch": 1740830400,
}
ASCIINEMA = Path(sys.executable).with_name("asciinema")


def frame(t_us: int, kind: bytes, data: bytes) -> bytes:
    return fmt.frame_header(t_us, kind, len(data)) + data


def blob(*frames: tuple[int, bytes, bytes], meta: dict[str, Any] = META) -> bytes:
    return fmt.encode_header(meta) + b"".join(frame(*f) for f in frames)


FRAMES = [
    (0, fmt.OUTPUT, b"$ "),
    (1_500_000, fmt.INPUT, b"ls\r"),
    (1_600_000, fmt.OUTPUT, b"ls\r\nfile\x00\xff\r\n"),
    (2_000_000, fmt.ERROR, b"warn\n"),
    (2_500_000, fmt.RESIZE, b"100x30"),
    (3_000_000, fmt.EXIT, b"0"),
]


def test_frame_header_is_13_bytes_little_endian() -> None:
    h = fmt.frame_header(1, fmt.OUTPUT, 2)
    assert len(h) == 13
    assert h == b"\x01\x00\x00\x00\x00\x00\x00\x00o\x02\x00\x00\x00"


def test_encode_header_layout() -> None:
    h = fmt.encode_header({"b": 1, "a": "x"})
    assert h == b'BBREC1\n{"a":"x","b":1}\n'


def test_round_trip() -> None:
    data = blob(*FRAMES)
    rec = fmt.parse(data)
    assert rec.meta == META
    assert rec.frames == [fmt.Frame(*f) for f in FRAMES]
    assert rec.truncated is False
    assert rec.valid_length == len(data)


def test_empty_recording() -> None:
    data = fmt.encode_header(META)
    rec = fmt.parse(data)
    assert rec.frames == []
    assert rec.truncated is False
    assert rec.valid_length == len(data)


def test_empty_payload_frame() -> None:
    rec = fmt.parse(blob((5, fmt.OUTPUT, b"")))
    assert rec.frames == [fmt.Frame(5, fmt.OUTPUT, b"")]
    assert rec.truncated is False


@pytest.mark.parametrize("cut", [1, 5, 12, 13, 14, 20])
def test_truncated_last_frame(cut: int) -> None:
    good = blob(*FRAMES[:3])
    last = frame(9_000_000, fmt.OUTPUT, b"this frame was cut short")
    data = good + last[: len(last) - cut]
    rec = fmt.parse(data)
    assert rec.truncated is True
    assert rec.valid_length == len(good)
    assert rec.frames == [fmt.Frame(*f) for f in FRAMES[:3]]


def test_unknown_kind_stops_parsing_and_marks_truncated() -> None:
    good = blob(*FRAMES[:2])
    rec = fmt.parse(good + frame(1, b"z", b"junk") + frame(2, fmt.OUTPUT, b"after"))
    assert rec.truncated is True
    assert rec.valid_length == len(good)
    assert len(rec.frames) == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "bad magic"),
        (b"BBREC2\n{}\n", "bad magic"),
        (b"\x1f\x8b\x08\x00", "bad magic"),
        (b'{"version": 2}\n', "bad magic"),
        (b"BBREC1\n{}", "header is incomplete"),
        (b"BBREC1\nnot json\n", "header is not JSON"),
    ],
)
def test_not_a_recording(data: bytes, message: str) -> None:
    with pytest.raises(fmt.RecordingFormatError, match=message):
        fmt.parse(data)


def test_output_bytes_and_exit_status() -> None:
    frames = [fmt.Frame(*f) for f in FRAMES]
    assert fmt.output_bytes(frames) == b"$ ls\r\nfile\x00\xff\r\n"
    assert fmt.output_bytes(frames, frozenset({fmt.OUTPUT, fmt.ERROR})) == (
        b"$ ls\r\nfile\x00\xff\r\nwarn\n"
    )
    assert fmt.output_bytes(frames, frozenset({fmt.INPUT})) == b"ls\r"
    assert fmt.exit_status(frames) == "0"
    assert fmt.exit_status(frames[:-1]) is None
    assert fmt.exit_status([fmt.Frame(1, fmt.EXIT, b"signal:TERM")]) == "signal:TERM"


def cast_lines(data: bytes) -> tuple[dict[str, object], list[list[object]]]:
    lines = list(fmt.to_asciicast(fmt.parse(data)))
    header = json.loads(lines[0])
    events = [json.loads(x) for x in lines[1:]]
    return header, events


def test_asciicast_header() -> None:
    header, _ = cast_lines(blob())
    assert header == {
        "version": 2,
        "width": 120,
        "height": 40,
        "timestamp": 1740830400,
        "title": "alice@corp.example.com -> web01",
        "env": {"TERM": "xterm-256color", "SHELL": ""},
        "bastion": {
            "session_id": "0123abcd-0000-4000-8000-000000000001",
            "user": "alice@corp.example.com",
            "target": "web01",
            "grant_id": "g-42",
            "level": "admin",
            "login": "admin",
            "command": None,
        },
    }


def test_asciicast_header_defaults_for_exec_session() -> None:
    header, _ = cast_lines(blob(meta={"session_id": "s1", "width": 0, "term": None}))
    assert header["width"] == 80
    assert header["height"] == 24
    assert header["timestamp"] == 0
    assert header["title"] == "? -> ?"
    assert header["env"] == {"TERM": "", "SHELL": ""}


def test_asciicast_events() -> None:
    _, events = cast_lines(blob(*FRAMES))
    assert events == [
        [0.0, "o", "$ "],
        [1.5, "i", "ls\r"],
        [1.6, "o", "ls\r\nfile\x00\ufffd\r\n"],
        [2.0, "o", "warn\n"],
        [2.5, "r", "100x30"],
        [3.0, "x", "0"],
    ]


def test_asciicast_microsecond_times() -> None:
    _, events = cast_lines(blob((1, fmt.OUTPUT, b"a"), (1_234_567, fmt.OUTPUT, b"b")))
    assert events == [[0.000001, "o", "a"], [1.234567, "o", "b"]]


def test_utf8_split_across_frames_renders_one_character() -> None:
    euro = "€".encode()  # e2 82 ac
    _, events = cast_lines(
        blob(
            (100, fmt.OUTPUT, b"price " + euro[:1]),
            (200, fmt.OUTPUT, euro[1:2]),
            (300, fmt.OUTPUT, euro[2:] + b"5"),
        )
    )
    assert events == [[0.0001, "o", "price "], [0.0003, "o", "€5"]]
    assert "\ufffd" not in "".join(str(e[2]) for e in events)


def test_utf8_split_with_other_stream_in_between() -> None:
    smile = "😀".encode()  # 4 bytes
    _, events = cast_lines(
        blob(
            (1, fmt.OUTPUT, smile[:2]),
            (2, fmt.INPUT, "é".encode()[:1]),
            (3, fmt.ERROR, b"E"),
            (4, fmt.OUTPUT, smile[2:]),
            (5, fmt.INPUT, "é".encode()[1:]),
        )
    )
    assert events == [
        [0.000003, "o", "E"],
        [0.000004, "o", "😀"],
        [0.000005, "i", "é"],
    ]


def test_dangling_partial_utf8_flushed_at_end_as_replacement() -> None:
    _, events = cast_lines(blob((1, fmt.OUTPUT, b"ok"), (2_000_000, fmt.OUTPUT, b"\xe2\x82")))
    assert events == [[0.000001, "o", "ok"], [2.0, "o", "\ufffd"]]


def test_asciinema_cat_plays_the_cast(tmp_path: Path) -> None:
    euro = "€".encode()
    data = blob(
        (0, fmt.OUTPUT, b"hello "),
        (10_000, fmt.OUTPUT, euro[:2]),
        (20_000, fmt.OUTPUT, euro[2:] + " wörld\r\n".encode()),
        (30_000, fmt.INPUT, b"exit\r"),
        (40_000, fmt.RESIZE, b"90x20"),
        (50_000, fmt.ERROR, b"bye\r\n"),
        (60_000, fmt.EXIT, b"0"),
    )
    cast = tmp_path / "s.cast"
    cast.write_text("\n".join(fmt.to_asciicast(fmt.parse(data))) + "\n", encoding="utf-8")
    res = subprocess.run(
        [str(ASCIINEMA), "cat", str(cast)],
        capture_output=True,
        timeout=30,
        start_new_session=True,  # no controlling tty: cat must not put a terminal in raw mode
        check=False,
    )
    assert res.returncode == 0, res.stderr.decode()
    out = res.stdout.decode("utf-8")
    assert out == "hello € wörld\r\nbye\r\n"  # "o" events only; input, resize and exit skipped


def _read(data: bytes) -> tuple[fmt.FrameReader, list[fmt.Frame]]:
    import io

    reader = fmt.FrameReader(io.BytesIO(data), len(data))
    return reader, list(reader.frames)


def test_frame_reader_agrees_with_parse_at_every_cut() -> None:
    """Read frame by frame or all at once: the same frames, valid length and truncation, for
    the whole file and for every prefix a crash could leave (header excepted)."""
    data = blob(*FRAMES)
    header = len(fmt.encode_header(META))
    for cut in range(header, len(data) + 1):
        parsed = fmt.parse(data[:cut])
        reader, frames = _read(data[:cut])
        assert frames == parsed.frames, cut
        assert (reader.valid_length, reader.truncated) == (parsed.valid_length, parsed.truncated)
        assert reader.meta == parsed.meta


def test_frame_reader_stops_at_a_corrupt_length_without_allocating_it() -> None:
    data = blob(*FRAMES) + fmt.FRAME.pack(9, fmt.OUTPUT, 0xFFFFFFF0) + b"short"
    reader, frames = _read(data)
    assert len(frames) == len(FRAMES)
    assert reader.truncated and reader.valid_length == len(blob(*FRAMES))


@pytest.mark.parametrize("bad", [b"NOTREC\n{}\n", fmt.MAGIC + b'{"no": "newline"}',
                                 fmt.MAGIC + b"not json\n"])
def test_frame_reader_refuses_what_is_not_a_recording(bad: bytes) -> None:
    import io

    with pytest.raises(fmt.RecordingFormatError):
        fmt.FrameReader(io.BytesIO(bad), len(bad))
