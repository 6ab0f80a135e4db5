"""parse_selector: ``user[@domain|DOMAIN\\user][+target]`` and every way it must refuse."""

from __future__ import annotations

import re

import pytest

from broker.domain.selector import Selector, SelectorError, parse_selector


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice", Selector("alice", None, None)),
        ("alice+web01", Selector("alice", None, "web01")),
        ("alice@corp.example.com+web01", Selector("alice", "corp.example.com", "web01")),
        ("alice@corp.example.com", Selector("alice", "corp.example.com", None)),
        ("CORP\\alice+web01", Selector("alice", "CORP", "web01")),
        ("CORP\\alice", Selector("alice", "CORP", None)),
        ("alice+i-0abc123", Selector("alice", None, "i-0abc123")),
        ("alice+web-01.prod.example.com", Selector("alice", None, "web-01.prod.example.com")),
        ("alice+10.0.1.12", Selector("alice", None, "10.0.1.12")),
        ("Alice.Smith+web01", Selector("Alice.Smith", None, "web01")),
        ("svc_backup$+db01", Selector("svc_backup$", None, "db01")),
        ("a-b+x", Selector("a-b", None, "x")),
        ("alice+web01:2222", Selector("alice", None, "web01:2222")),
    ],
)
def test_valid_selectors(raw: str, expected: Selector) -> None:
    assert parse_selector(raw) == expected


def test_only_first_plus_separates_target() -> None:
    # '+' is forbidden in a target, so a second '+' makes the target malformed
    with pytest.raises(SelectorError, match="malformed target"):
        parse_selector("alice+web01+db01")


def test_user_of_64_chars_ok_and_65_refused() -> None:
    assert parse_selector("a" * 64).username == "a" * 64
    with pytest.raises(SelectorError, match="malformed user"):
        parse_selector("a" * 65)


def test_target_of_253_chars_ok_and_254_refused() -> None:
    assert parse_selector("alice+" + "w" * 253).target == "w" * 253
    with pytest.raises(SelectorError, match="malformed target"):
        parse_selector("alice+" + "w" * 254)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "empty, too long or control characters"),
        ("a" * 513, "empty, too long or control characters"),
        ("alice+" + "w" * 507, "empty, too long or control characters"),  # 513 chars total
        ("alice\x00+web01", "empty, too long or control characters"),
        ("alice+web01\x00", "empty, too long or control characters"),
        ("alice\n", "empty, too long or control characters"),
        ("alice+web01\n", "empty, too long or control characters"),
        ("ali\tce", "empty, too long or control characters"),
        ("alice\x1b[31m", "empty, too long or control characters"),
        ("alice\x7f", "empty, too long or control characters"),
        ("alice+", "empty target after '+'"),
        ("+", "empty target after '+'"),
        ("+web01", "malformed user"),
        ("alice+-web01", "malformed target"),
        ("alice+.web01", "malformed target"),
        ("alice+web 01", "malformed target"),
        ("alice+web01/../x", "malformed target"),
        ("alice+web01;id", "malformed target"),
        ("alice+wéb01", "malformed target"),
        ("alice@+web01", "malformed domain"),
        ("alice@-corp.example.com", "malformed domain"),
        ("alice@corp..example.com", "malformed domain"),
        ("alice@corp.example.com.", "malformed domain"),
        ("alice@corp_example.com", "malformed domain"),
        ("alice@corp example.com", "malformed domain"),
        ("\\alice+web01", "empty domain before '\\'"),
        ("CO RP\\alice", "malformed domain"),
        ("CORP\\+web01", "malformed user"),
        ("@corp.example.com+web01", "malformed user"),
        ("a@b@corp.example.com", "malformed user"),
        (" alice+web01", "malformed user"),
        ("alice +web01", "malformed user"),
        ("  ", "malformed user"),
        ("al/ice", "malformed user"),
        ("al:ice+web01", "malformed user"),
        ("al*ice", "malformed user"),
        ("élise", "malformed user"),
    ],
)
def test_invalid_selectors(raw: str, message: str) -> None:
    with pytest.raises(SelectorError, match=re.escape(message)):
        parse_selector(raw)


def test_selector_error_is_value_error() -> None:
    assert issubclass(SelectorError, ValueError)
