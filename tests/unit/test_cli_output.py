"""Listings never pass control characters from user-supplied text to the operator's terminal."""

from __future__ import annotations

import pytest

from broker.cli.output import printable, table


def test_table_escapes_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    table([{"command": "printf '\x1b]52;c;aGk=\x07'", "user": "alice\u009b"}],
          ["command", "user"])
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\x07" not in text and "\u009b" not in text
    assert "\\x1b]52;c;aGk=\\x07" in text and "alice\\x9b" in text


def test_printable_keeps_ordinary_text() -> None:
    assert printable("web01 é ✓ 42") == "web01 é ✓ 42"
    assert printable("a\tb\nc\x7f") == "a\\x09b\\x0ac\\x7f"
