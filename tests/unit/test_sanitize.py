"""Replays are safe to watch: sequences acting on the viewer go, colours and movement stay."""

from __future__ import annotations

import json
import random

import pytest

from broker.domain.sanitize import ViewerSafeFilter, neutralise, neutralise_all, safe_asciicast

ESC = "\x1b"
ST = ESC + "\\"

KEPT = [
    ESC + "[1;31mred" + ESC + "[0m",  # SGR
    ESC + "[38;5;208m" + ESC + "[48;2;10;20;30m" + ESC + "[38:2::1:2:3m",  # 256/true colour
    ESC + "[H" + ESC + "[2J" + ESC + "[3J" + ESC + "[K" + ESC + "[1K",  # home, erase
    ESC + "[10;20H" + ESC + "[5A" + ESC + "[B" + ESC + "[3C" + ESC + "[D" + ESC + "[7G",
    ESC + "[2;24r" + ESC + "[L" + ESC + "[2M" + ESC + "[P" + ESC + "[@" + ESC + "[4X",
    ESC + "[?1049h" + ESC + "[?25l" + ESC + "[?25h" + ESC + "[?2004h" + ESC + "[?1049l",
    ESC + "[?7l" + ESC + "[4h" + ESC + "[4l",  # autowrap off, insert mode
    ESC + "7" + ESC + "8" + ESC + "M" + ESC + "=" + ESC + ">" + ESC + "c",
    ESC + "(B" + ESC + ")0" + "\x0e\x0f",  # charsets
    ESC + "[2 q" + ESC + "[s" + ESC + "[u" + ESC + "[3g" + ESC + "[2S" + ESC + "[T",
    "plain text, tabs\tand\r\nnewlines, bell \x07, backspace \b, unicode é 漢字",
]

DROPPED = {
    "osc52_clipboard_bel": ESC + "]52;c;ZWNobyBwd25lZA==\x07",
    "osc52_clipboard_st": ESC + "]52;c;ZWNobyBwd25lZA==" + ST,
    "osc52_query": ESC + "]52;c;?\x07",
    "osc_title": ESC + "]0;you are root\x07",
    "osc_title_2": ESC + "]2;title" + ST,
    "osc_colour_query": ESC + "]11;?\x07",
    "osc_hyperlink": ESC + "]8;;http://evil.example/\x07",
    "dcs_decrqss": ESC + "P$qm" + ST,
    "dcs_tmux_passthrough": ESC + "Ptmux;" + ESC + ESC + "]52;c;eA==\x07" + ST,
    "apc": ESC + "_Gf=100;AAAA" + ST,
    "pm": ESC + "^private" + ST,
    "sos": ESC + "Xstring" + ST,
    "dsr_cursor_position": ESC + "[6n",
    "dsr_status": ESC + "[5n",
    "dsr_private": ESC + "[?6n",
    "device_attributes": ESC + "[c",
    "device_attributes_0": ESC + "[0c",
    "secondary_da": ESC + "[>c",
    "tertiary_da": ESC + "[=c",
    "window_report_title": ESC + "[21t",
    "window_resize": ESC + "[8;100;300t",
    "window_iconify": ESC + "[2t",
    "decrqm": ESC + "[?2004$p",
    "decreqtparm": ESC + "[x",
    "decid": ESC + "Z",
    "enq_answerback": "\x05",
    "mouse_tracking": ESC + "[?1000h",
    "mouse_sgr": ESC + "[?1006;1000h",
    "focus_reports": ESC + "[?1004h",
    "keyboard_lock": ESC + "[2h",
    "media_copy": ESC + "[5i",
    "soft_reset": ESC + "[!p",
    "xterm_modify_keys": ESC + "[>4;2m",
    "mouse_highlight": ESC + "[1;2;3;4;5T",
    "c1_csi_dsr": "\x9b6n",
    "c1_osc_title": "\x9d0;title\x07",
    "c1_dcs": "\x90$qm\x9c",
    "dec_alignment_test": ESC + "#8",
}


@pytest.mark.parametrize("text", KEPT)
def test_safe_sequences_are_kept_byte_for_byte(text: str) -> None:
    assert neutralise(text) == text


@pytest.mark.parametrize("seq", DROPPED.values(), ids=DROPPED.keys())
def test_unsafe_sequences_are_removed_whole(seq: str) -> None:
    assert neutralise(f"before{seq}after") == "beforeafter"


def test_c1_csi_that_is_safe_comes_out_as_7bit() -> None:
    assert neutralise("\x9b1mB") == ESC + "[1mB"


@pytest.mark.parametrize("seq", [ESC + "]52;c;ZXZpbA==\x07", ESC + "[6n", ESC + "P$qm" + ST,
                                 ESC + "[1;31m"])
def test_a_sequence_split_across_chunks_is_still_recognised(seq: str) -> None:
    text = f"a{seq}b"
    for cut in range(1, len(text)):
        f = ViewerSafeFilter()
        assert f.feed(text[:cut]) + f.feed(text[cut:]) + f.flush() == neutralise(text)


def test_unterminated_string_swallows_until_eof_and_flush_drops_partials() -> None:
    f = ViewerSafeFilter()
    assert f.feed("ok" + ESC + "]52;c;AAAA") == "ok"
    assert f.feed("still inside the OSC") == ""
    assert f.flush() == ""
    assert f.feed("x" + ESC + "[1;3") == "x"
    assert f.flush() == ""
    assert f.feed("y") == "y"


def test_esc_inside_a_string_ends_it_and_starts_a_new_sequence() -> None:
    assert neutralise(ESC + "]0;t" + ESC + "[1mX") == ESC + "[1mX"


def test_oversized_and_malformed_csi_are_dropped() -> None:
    out = neutralise(ESC + "[" + "1;" * 200 + "mZ")
    assert ESC not in out and out.endswith("mZ")  # never executed; the excess shows as text
    assert neutralise(ESC + "[1\x01m") == "m"  # a control inside CSI aborts it


def test_neutralise_all_keeps_chunk_boundaries() -> None:
    assert neutralise_all(["a" + ESC + "]0;", "t\x07b", "c"]) == ["a", "b", "c"]


def test_safe_asciicast_filters_output_events_only() -> None:
    lines = [
        json.dumps({"version": 2, "width": 80, "height": 24}),
        json.dumps([0.1, "o", "hi" + ESC + "]52;c;"]),
        json.dumps([0.2, "o", "ZXZpbA==\x07"]),  # the rest of the OSC: event dropped
        json.dumps([0.3, "i", "ls\r"]),
        json.dumps([0.4, "o", ESC + "[32mgreen" + ESC + "[6n"]),
        json.dumps([0.5, "r", "100x30"]),
        json.dumps([0.6, "x", "0"]),
    ]
    out = list(safe_asciicast(lines))
    assert out[0] == lines[0]
    assert [json.loads(x) for x in out[1:]] == [
        [0.1, "o", "hi"], [0.3, "i", "ls\r"], [0.4, "o", ESC + "[32mgreen"],
        [0.5, "r", "100x30"], [0.6, "x", "0"]]
    assert list(safe_asciicast([])) == []


def _one_char_at_a_time(chunks: list[str]) -> list[str]:
    """The filter's definition: ``_step`` for every character, no fast paths."""
    f = ViewerSafeFilter()
    res = []
    for chunk in chunks:
        out: list[str] = []
        for ch in chunk:
            f._step(ch, out)
        res.append("".join(out))
    return res


# characters that steer the state machine, and some that do not
_ALPHABET = [ESC, "[", "]", "P", "_", "^", "X", "(", "#", " ", "?", ">", "0", "1", "2", "5", "6",
             "9", ";", ":", "m", "h", "l", "n", "c", "t", "q", "T", "Z", "\\", "\x07", "\x05",
             "\x9b", "\x9c", "\x9d", "\x90", "\x85", "\x01", "a", "é", "\r", "\n"]


def _piece(rng: random.Random) -> str:
    """Plain text, a CSI sequence of random shape, a string sequence, or a few loose characters."""
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(["plain text ", "été ", "x" * rng.randint(1, 40), "\r\n"])
    if kind == 1:
        params = "".join(rng.choice("0123456789;:") for _ in range(
            rng.choice([0, 1, 2, 5, rng.randint(124, 129)])))
        return (ESC + "[" + rng.choice(["", "", "", "?", ">", "=", "<"]) + params
                + rng.choice(["", "", "", " ", "!"]) + rng.choice("mmmmhlnctqTJKrABHfdZ@`su"))
    if kind == 2:
        return (rng.choice([ESC + "]", ESC + "P", "\x9d", ESC + "_"]) + "0;title"
                + rng.choice(["\x07", ESC + "\\", "\x9c", ""]))
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 6)))


def test_fast_paths_give_what_one_character_at_a_time_gives() -> None:
    for k in range(120, 131):  # around the CSI length limit, whole and cut anywhere
        for seq in (ESC + "[" + "1" * k + "m", ESC + "[?" + "1" * k + "m", ESC + "[" + "2;" * k + "h",
                    ESC + "[" + "3;" * (k // 2) + "H", ESC + "[1;" + "2" * k + "T"):
            text = "a" + seq + "b"
            for cut in range(len(text) + 1):
                chunks = [text[:cut], text[cut:]]
                f = ViewerSafeFilter()
                assert [f.feed(c) for c in chunks] == _one_char_at_a_time(chunks), (k, seq, cut)
    rng = random.Random(20261128)  # noqa: S311 - test data, not secrets
    for _ in range(4000):
        text = "".join(_piece(rng) for _ in range(rng.randint(0, 8)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 3))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        f = ViewerSafeFilter()
        assert [f.feed(c) for c in chunks] == _one_char_at_a_time(chunks), repr(chunks)
