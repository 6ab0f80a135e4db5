"""The text a session showed and typed, as indexed for search (``broker.domain.textindex``)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from broker.domain import textindex as ti
from broker.domain.recording import ERROR, EXIT, INPUT, OUTPUT, RESIZE, Frame
from broker.domain.textindex import Segment, TextIndexer, text_segments

SHELL = {"kind": "shell", "term": "xterm-256color", "command": None}


def out(*chunks: bytes, t: float = 0.0, meta: dict[str, object] = SHELL) -> list[Segment]:
    """Segments of output chunks that all arrive at ``t`` (one segment unless it is large)."""
    return text_segments(meta, [Frame(int(t * 1e6), OUTPUT, c) for c in chunks])


def texts(segments: list[Segment], source: str = "output") -> str:
    return "\n".join(s.text for s in segments if s.source == source)


@pytest.mark.parametrize(("raw", "shown"), [
    (b"\x1b[01;31mred\x1b[0m plain\r\n", "red plain"),
    (b"\x1b]0;user@host: ~\x07prompt\r\n", "prompt"),  # window title (OSC ... BEL)
    (b"\x1b]52;c;c2VjcmV0\x1b\\after\r\n", "after"),  # clipboard (OSC ... ST)
    (b"\x1bP+q544e\x1b\\x\r\n", "x"),  # DCS
    (b"\x1b(Bline\x1b)0\r\n", "line"),  # charset designations
    (b"\x1b[?1049h\x1b[?25lfull\x1b[?25h\r\n", "full"),  # private modes
    ("\x9b31mc1\x9d0;title\x9c\r\n".encode(), "c1"),  # C1 CSI, OSC, ST (as UTF-8)
    (b"bell\x07 \x00nul\x0e\x0f\r\n", "bell nul"),
    (b"tab\tstop\r\n", "tab stop"),
    (b"a  \t b   c\r\n", "a b c"),
])
def test_escape_sequences_and_controls_are_not_text(raw: bytes, shown: str) -> None:
    assert texts(out(raw)) == shown


def test_cursor_moves_edit_the_line_as_a_terminal_would() -> None:
    assert texts(out(b"10%\r20%\r100% done\r\n")) == "100% done"
    assert texts(out(b"abcdef\rxy\r\n")) == "xycdef"  # CR overwrites, what is left stays
    assert texts(out(b"ab\b \bc\r\n")) == "ac"  # a shell echoing a backspace
    assert texts(out(b"abcdef\b\b\b\x1b[K!\r\n")) == "abc!"  # erase to the end of the line
    assert texts(out(b"ab\x1b[5Ccd\r\n")) == "ab cd"  # cursor forward keeps words apart
    assert texts(out(b"abcdef\x1b[3D\x1b[2P\r\n")) == "abcf"  # delete characters
    assert texts(out(b"one\x1b[5;1Htwo\x1b[2Jthree\r\n")) == "one\ntwo\nthree"


def test_a_sequence_or_a_character_split_across_frames() -> None:
    word = "zébra-ünïcode-€-𝄞".encode()
    raw = b"\x1b[01;32m" + word + b"\x1b[0m \x1b]0;t\x07end\r\n"
    whole = texts(out(raw))
    assert whole == word.decode() + " end"
    for cut in range(1, len(raw)):
        assert texts(out(raw[:cut], raw[cut:])) == whole, cut


def test_any_chunking_gives_the_same_text() -> None:
    rng = random.Random(7)  # noqa: S311 - reproducible cut points, not secrets
    raw = (b"$ ls\r\n\x1b[0m\x1b[01;34mbin\x1b[0m  caf\xc3\xa9\r\nprog 1%\r\x1b[Kprog 9%\r\n"
           b"\x1b]0;x\x1b\\\x1b[?2004hdone\x1b[5Gx\r\n") * 5
    whole = texts(out(raw))
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 30)))
        parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        assert texts(out(*parts)) == whole


def test_bytes_that_are_not_utf8_separate_words_and_binary_is_not_text() -> None:
    assert texts(out(b"caf\xe9-latin1 ab\xff\xfecd in a line of text\r\n")) == \
        "caf -latin1 ab cd in a line of text"
    noise = random.Random(3).randbytes(4096)  # noqa: S311
    elf = b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + b"\x03\x00>\x00\x01\x00\x00\x00" * 20
    assert texts(out(noise, elf, b"\r\nreadable\r\n")) == "readable"


def test_segments_carry_the_time_of_their_first_byte_and_pauses_split_them() -> None:
    frames = [
        Frame(1_000_000, OUTPUT, b"first "),  # the line starts here
        Frame(1_500_000, OUTPUT, b"line\r\nsecond\r\n"),
        Frame(1_900_000, RESIZE, b"100x30"),
        Frame(4_000_000, OUTPUT, b"after a pause\r\n"),  # 2.5 s of silence: a new segment
        Frame(4_500_000, OUTPUT, b"$ "),
        Frame(9_000_000, OUTPUT, b"typed late\r\n"),  # the prompt's line ends at the pause
        Frame(9_100_000, EXIT, b"0"),
    ]
    segs = text_segments(SHELL, frames)
    assert [(s.t, s.text) for s in segs] == [
        (1.0, "first line\nsecond"), (4.0, "after a pause\n$"), (9.0, "typed late")]


def test_a_long_run_is_grouped_by_lines_and_size() -> None:
    segs = out(b"".join(b"line %d\r\n" % i for i in range(50)))
    assert [s.text.count("\n") + 1 for s in segs] == [20, 20, 10]
    long_words = b" ".join(b"w%04d" % i for i in range(2000))  # one 12 KB line
    segs = out(long_words + b"\r\n")
    lines = [line for s in segs for line in s.text.split("\n")]
    assert all(len(line) <= ti.MAX_LINE for line in lines)
    assert all(len(s.text) <= ti.SEGMENT_CHARS for s in segs)
    assert " ".join(lines) == long_words.decode()  # wrapped at spaces: no word is cut


def test_the_cap_ends_indexing_with_a_marker_and_stops_reading() -> None:
    read = 0

    def frames() -> Iterator[Frame]:
        nonlocal read
        for i in range(10_000):
            read += 1
            yield Frame(i * 1000, OUTPUT, b"word%d and some more text\r\n" % i)

    ix = TextIndexer(SHELL, max_text=5000)
    segs = list(ix.segments(frames()))
    assert ix.truncated
    assert segs[-1].text == ti.TRUNCATED
    assert sum(len(s.text) for s in segs[:-1]) <= 5000 + 20 * len(segs)  # + line breaks
    assert "word0 and" in segs[0].text
    assert read < 300  # the rest of the recording was never read


def test_output_that_is_not_text_stops_at_the_scan_cap() -> None:
    ix = TextIndexer(SHELL, max_scan=1 << 16)
    segs = list(ix.segments(Frame(i, OUTPUT, b"\x1b[H" * 1024) for i in range(1000)))
    assert ix.truncated and segs == [Segment(segs[0].t, "output", ti.TRUNCATED)]
    assert ix.scanned <= (1 << 16) + 4096


def test_typed_lines_are_input_segments() -> None:
    frames = [
        Frame(0, OUTPUT, b"$ "),
        Frame(3_000_000, INPUT, b"ech"),
        Frame(3_200_000, INPUT, b"o zebrx\x7fa\r"),  # a typo fixed with backspace
        Frame(6_000_000, INPUT, b"rm -rf /tmp/x\x15ls\x1b[A\x1bOB -l\r"),  # ^U, arrow keys
        Frame(9_000_000, INPUT, b"cat one two\x17three\r"),  # ^W
        Frame(12_000_000, INPUT, b"abandoned\x03"),  # ^C
        Frame(12_500_000, INPUT, b"\x1b[200~pasted\x1b[201~\r"),
        Frame(13_000_000, b"n", b"secret\r"),  # input the terminal did not echo: skipped
    ]
    segs = text_segments(SHELL, frames)
    assert [(s.t, s.text) for s in segs if s.source == "input"] == [
        (3.0, "echo zebra"), (6.0, "ls -l"), (9.0, "cat one three"), (12.5, "pasted")]
    assert "secret" not in " ".join(s.text for s in segs)


def test_exec_has_its_command_and_output_but_stdin_is_data() -> None:
    meta = {"kind": "exec", "term": None, "command": "grep  -r\tneedle /srv"}
    segs = text_segments(meta, [
        Frame(0, INPUT, b"stdin data\n"), Frame(10, OUTPUT, b"/srv/a:needle\n"),
        Frame(20, ERROR, b"grep: /srv/b: Permission denied\n"), Frame(30, EXIT, b"0")])
    assert segs == [
        Segment(0.0, "command", "grep -r needle /srv"),
        Segment(0.00001, "output", "/srv/a:needle\ngrep: /srv/b: Permission denied")]


@pytest.mark.parametrize("kind", ["subsystem", "tunnel", "jump"])
def test_sftp_and_tunnels_have_their_command_only(kind: str) -> None:
    def never() -> Iterator[Frame]:
        raise AssertionError("the protocol stream was read")
        yield  # pragma: no cover

    segs = text_segments({"kind": kind, "command": "sftp"}, never())
    assert segs == [Segment(0.0, "command", "sftp")]


def test_an_unterminated_string_is_dropped_without_being_kept() -> None:
    ix = TextIndexer(SHELL)
    frames = [Frame(0, OUTPUT, b"before\x1b]0;")]
    frames += [Frame(1, OUTPUT, b"x" * 65536) for _ in range(100)]
    frames.append(Frame(2, OUTPUT, b"\x07after\r\n"))
    segs = list(ix.segments(frames))
    assert texts(segs) == "beforeafter"
