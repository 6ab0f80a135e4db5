"""User names as sent: escaping for the audit, which names are refused, the refusal rate limit."""

from __future__ import annotations

from broker.ssh.usernames import RefusalLimiter, escape_name, refusal

FULLWIDTH = "".join(chr(ord(c) + 0xFEE0) for c in "alice")


def test_escape_name() -> None:
    assert escape_name(b"alice+web01") == "alice+web01"
    assert escape_name(FULLWIDTH.encode()) == "\\uff41\\uff4c\\uff49\\uff43\\uff45"
    assert escape_name("al\u00adice".encode()) == "al\\xadice"
    assert escape_name(b"al\x00i\x1bce\x7f") == "al\\x00i\\x1bce\\x7f"
    assert escape_name(b"a\\x00") == "a\\\\x00"  # a typed backslash is not an escape
    assert escape_name(b"\xff\xfeok") == "\\xff\\xfeok"  # not UTF-8
    assert escape_name("\U0001f600".encode()) == "\\U0001f600"
    assert len(escape_name(b"\x01" * 1000)) == 303


def test_refusal_with_the_raw_name() -> None:
    assert refusal(b"alice", "alice", normalize=False) is None
    assert refusal("jos\u00e9".encode(), "jos\u00e9", normalize=False) is None  # unchanged
    why = refusal(FULLWIDTH.encode(), "alice", normalize=False)
    assert why is not None and "normalize_names" in why
    assert refusal("al\u00adice".encode(), "alice", normalize=False) is not None
    assert refusal(FULLWIDTH.encode(), "alice", normalize=True) is None


def test_refusal_without_the_raw_name_refuses_anything_but_printable_ascii() -> None:
    assert refusal(None, "alice+web01", normalize=False) is None
    assert refusal(None, "jos\u00e9", normalize=False) is not None
    assert refusal(None, "jos\u00e9", normalize=True) is not None


def test_refusal_limiter_bounds_the_rate_and_counts_what_it_drops() -> None:
    now = [0.0]
    lim = RefusalLimiter(rate=2, burst=3, monotonic=lambda: now[0])
    assert [lim.take() for _ in range(5)] == [0, 0, 0, None, None]
    now[0] += 0.5  # one token back
    assert lim.take() == 2 and lim.take() is None
    now[0] += 100
    assert lim.take() == 1 and lim.take() == 0
