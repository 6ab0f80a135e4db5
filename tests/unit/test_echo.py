"""EchoTracker: which input a recording keeps as typed and which it withholds (pure, no I/O).

``play`` feeds a session's events in order and returns what would be recorded, in file order:
``("i", bytes)`` input kept, ``("n", bytes)`` input withheld (the test sees the bytes; the
recording gets only their count), ``("o", bytes)`` output.
"""

from __future__ import annotations

import random

import pytest

from broker.domain.echo import EchoTracker, Piece, visible

Event = tuple[str, bytes]


def _rec(out: list[tuple[str, bytes, int]], pieces: object) -> None:
    for p in pieces:  # type: ignore[attr-defined]
        assert isinstance(p, Piece)
        out.append(("i" if p.kept else "n", p.data, p.t))


def play(events: list[Event], *, limit: int = 64 * 1024, stamps: bool = False) -> list:
    tr = EchoTracker(limit=limit)
    out: list[tuple[str, bytes, int]] = []
    for t, (kind, data) in enumerate(events):
        if kind == "i":
            _rec(out, tr.input(t, data))
        elif kind == "o":
            _rec(out, tr.output(data))
            out.append(("o", data, t))
        elif kind == "expire":
            _rec(out, tr.expire(int(data)))
    _rec(out, tr.close())
    assert tr.pending == 0
    return out if stamps else [(k, d) for k, d, _t in out]


def typed(text: bytes) -> list[Event]:
    """One frame per key, no echo in between (a password)."""
    return [("i", bytes([b])) for b in text]


def echoed(text: bytes) -> list[Event]:
    """One frame per key, each echoed before the next (normal typing)."""
    ev: list[Event] = []
    for b in text:
        ev += [("i", bytes([b])), ("o", bytes([b]))]
    return ev


def inputs(rec: list) -> tuple[bytes, bytes]:
    """(kept input, withheld input) as concatenated bytes."""
    return (b"".join(d for k, d in rec if k == "i"), b"".join(d for k, d in rec if k == "n"))


# -- the visible stream ----------------------------------------------------------------------
def test_visible_drops_sequences_and_controls_keeps_newlines() -> None:
    assert visible(b"\x1b[01;32muser@h\x1b[00m:\x1b[01;34m~\x1b[00m$ ") == b"user@h:~$ "
    assert visible(b"\x1b]0;title\x07a\x1b]2;t\x1b\\b\x1bPdcs\x1b\\c") == b"abc"
    assert visible(b"x\r\n\x08 \x08\x07\x1b(B\x1b7y") == b"x\n y"
    assert visible("é\u00e9".encode()) == "éé".encode()


# -- typing that is echoed is recorded as typed ----------------------------------------------
def test_typed_and_echoed_command_is_kept() -> None:
    rec = play([("o", b"$ "), *echoed(b"ls -la"), ("i", b"\r"), ("o", b"\r\nfile\r\n$ ")])
    assert inputs(rec) == (b"ls -la\r", b"")
    assert ("n", b"") not in rec


def test_echo_with_colour_and_cursor_sequences_is_an_echo() -> None:
    # zsh-style highlighting, readline redrawing the rest of the line after an insert
    rec = play([("i", b"l"), ("o", b"\x1b[31ml\x1b[0m"), ("i", b"s"), ("o", b"s\x1b[K"),
                ("i", b"x"), ("o", b"x rest\x08\x08\x08\x08\x08")])
    assert inputs(rec) == (b"lsx", b"")


def test_paste_echoed_at_once_and_bracketed_paste() -> None:
    rec = play([("i", b"echo one two\r"), ("o", b"echo one two\r\none two\r\n$ "),
                ("i", b"\x1b[200~cat /etc/hostname\x1b[201~"),
                ("o", b"\x1b[7mcat /etc/hostname\x1b[27m"), ("i", b"\r"), ("o", b"\r\nweb01\r\n")])
    assert inputs(rec) == (b"echo one two\r\x1b[200~cat /etc/hostname\x1b[201~\r", b"")


def test_echo_split_over_many_output_chunks() -> None:
    text = b"a fairly long pasted command line"
    ev: list[Event] = [("i", text)]
    ev += [("o", text[i:i + 3]) for i in range(0, len(text), 3)]
    rec = play(ev)
    assert inputs(rec) == (text, b"")


def test_typing_ahead_of_the_echo_keeps_the_matched_part() -> None:
    rec = play([("i", b"l"), ("i", b"s"), ("o", b"l"), ("i", b" "), ("o", b"s "),
                ("i", b"\r"), ("o", b"\r\n")])
    assert inputs(rec) == (b"ls \r", b"")


def test_escape_sequence_cut_between_output_chunks() -> None:
    rec = play([("i", b"q"), ("o", b"\x1b[3"), ("o", b"1mq\x1b"), ("o", b"[0m")])
    assert inputs(rec) == (b"q", b"")
    rec = play([("i", b"q"), ("o", b"\x1b]0;very long ti"), ("o", b"tle\x07q")])
    assert inputs(rec) == (b"q", b"")


def test_multibyte_characters() -> None:
    word = "grüße".encode()
    rec = play([("i", word), ("o", word[:3]), ("o", word[3:])])
    assert inputs(rec) == (word, b"")


def test_cooked_mode_lines_pasted_at_once() -> None:
    rec = play([("i", b"one\rtwo\r"), ("o", b"one\r\ntwo\r\n")])
    assert inputs(rec) == (b"one\rtwo\r", b"")


# -- input the target does not echo is withheld ----------------------------------------------
def test_password_at_sudo_prompt_is_withheld_enter_is_kept() -> None:
    rec = play([("o", b"[sudo] password for alice: "), *typed(b"hunter2"), ("i", b"\r"),
                ("o", b"\n"), ("o", b"root\r\n")])
    assert inputs(rec) == (b"\r", b"hunter2")
    assert [k for k, _ in rec] == ["o", "n", "i", "o", "o"]  # one marker, in its place


def test_password_with_crlf_echo_and_separate_enter() -> None:
    rec = play([*typed(b"s3cr3t"), ("i", b"\r"), ("o", b"\r\n")])
    assert inputs(rec) == (b"\r", b"s3cr3t")


def test_password_followed_by_output_with_the_same_letters() -> None:
    # read -s prints nothing at Enter; the next output starts with the secret's letters
    rec = play([*typed(b"user"), ("i", b"\r"), ("o", b"user@web01:~$ ")])
    assert inputs(rec) == (b"\r", b"user")
    rec = play([*typed(b"visible"), ("i", b"\r"), ("o", b"visible-word\r\n$ ")])
    assert inputs(rec) == (b"\r", b"visible")
    # then an echoed command whose output starts like the password: the command is kept
    rec = play([*typed(b"ls"), ("i", b"\r"), ("o", b"\r\n$ "), *echoed(b"ls"), ("i", b"\r"),
                ("o", b"\r\nls\r\n$ ")])
    assert inputs(rec) == (b"\r" + b"ls\r", b"ls")


def test_password_pasted_with_enter_in_one_frame() -> None:
    rec = play([("o", b"Password: "), ("i", b"p4ss\r"), ("o", b"\r\n")])
    assert inputs(rec) == (b"\r", b"p4ss")
    rec = play([("o", b"Password: "), ("i", b"p4ss\r"), ("o", b"p4ssw0rd accepted\r\n")])
    assert inputs(rec) == (b"\r", b"p4ss")


def test_command_and_password_pasted_together() -> None:
    rec = play([("i", b"sudo id\rpassword\r"),
                ("o", b"sudo id\r\n[sudo] password for alice: "), ("o", b"\r\nuid=0\r\n")])
    kept, withheld = inputs(rec)
    assert withheld == b"password"
    assert kept == b"sudo id\r\r"


def test_echo_off_program_that_answers_differently() -> None:
    rec = play([("i", b"x"), ("o", b"\x1b[H\x1b[2Jmenu")])  # e.g. a key in less or vim
    assert inputs(rec) == (b"", b"x")


def test_no_output_at_all_withholds_at_close() -> None:
    rec = play(typed(b"abc"))
    assert rec == [("n", b"abc")]


def test_controls_are_kept_even_when_nothing_echoes() -> None:
    rec = play([("i", b"\x03"), ("i", b"\x1b[A"), ("i", b"\t"), ("i", b"\x04")])
    assert inputs(rec) == (b"\x03\x1b[A\t\x04", b"")


def test_typed_after_output_already_there_is_not_its_echo() -> None:
    # the output came before the key was typed: it cannot be the key's echo
    rec = play([("i", b"a"), ("o", b"ab"), ("i", b"b")])
    assert inputs(rec) == (b"a", b"b")


def test_output_before_the_echo_withholds() -> None:
    # typed while a command still prints: unsure, so withheld
    rec = play([("o", b"line 1\r\n"), ("i", b"q"), ("o", b"line 2\r\nq")])
    assert inputs(rec) == (b"", b"q")


def test_limit_withholds_everything_pending() -> None:
    rec = play([("i", b"a" * 40), ("i", b"\x03"), ("i", b"b" * 40), ("o", b"a" * 40)], limit=64)
    assert inputs(rec) == (b"\x03", b"a" * 40 + b"b" * 40)


def test_expire_withholds_old_input_and_keeps_the_rest_waiting() -> None:
    rec = play([("i", b"abc"), ("i", b"\r"), ("i", b"d"), ("expire", b"2"), ("o", b"d")])
    assert inputs(rec) == (b"\rd", b"abc")


def test_stamps_are_the_inputs_and_markers_take_the_first() -> None:
    rec = play([("o", b"Password: "), *typed(b"abc"), ("i", b"\r"), ("o", b"\r\n")], stamps=True)
    assert rec == [("o", b"Password: ", 0), ("n", b"abc", 1), ("i", b"\r", 4),
                   ("o", b"\r\n", 5)]


def test_kept_pieces_of_one_frame_stay_one_frame() -> None:
    rec = play([("i", b"ls\r"), ("o", b"ls\r\n")])
    assert rec == [("i", b"ls\r"), ("o", b"ls\r\n")]


def test_backspace_correction_typed_key_by_key() -> None:
    rec = play([*echoed(b"lx"), ("i", b"\x7f"), ("o", b"\x08\x1b[K"), *echoed(b"s")])
    assert inputs(rec) == (b"lx\x7fs", b"")


def test_enter_echo_arriving_in_two_chunks() -> None:
    rec = play([("i", b"ab\r"), ("o", b"ab"), ("o", b"\r"), ("o", b"\n"), *echoed(b"c")])
    assert inputs(rec) == (b"ab\rc", b"")


@pytest.mark.parametrize("seed", range(20))
def test_random_sessions_never_record_a_withheld_secret(seed: int) -> None:
    """Echoed words are kept and a secret typed without echo never is, whatever the output
    after it starts with (it may even repeat the secret's letters, without a newline)."""
    rnd = random.Random(seed)  # noqa: S311 - reproducible test data, not a secret
    ev: list[Event] = []
    secrets: list[bytes] = []
    typed_in: list[bytes] = []  # what the recording keeps: echoed words and every Enter
    for _ in range(10):
        word = bytes(rnd.choice(b"abcdefgh") for _ in range(rnd.randint(1, 8)))
        if rnd.random() < 0.4:
            secrets.append(word)
            typed_in.append(b"\r")
            ev += [("o", b"Password: "), *(typed(word) if rnd.random() < 0.5 else [("i", word)])]
            ev += [("i", b"\r"), ("o", rnd.choice([b"\r\n", b"\n", word + b"x", b"$ "]))]
        else:
            typed_in.append(word + b"\r")
            ev += [*echoed(word), ("i", b"\r"), ("o", b"\r\n" + word + b"\r\n$ ")]
    assert inputs(play(ev)) == (b"".join(typed_in), b"".join(secrets))
