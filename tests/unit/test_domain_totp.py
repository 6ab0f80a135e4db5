"""RFC 6238 verification: drift window, single use, strict code syntax."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pyotp
import pytest

from broker.domain import totp

# RFC 6238 appendix B: SHA-1 seed "12345678901234567890"
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()
# a random-looking secret for the window tests
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
NOW = datetime(2025, 3, 1, 12, 0, 10, tzinfo=UTC)  # 10 s into a step
STEP = totp.current_step(NOW)


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


@pytest.mark.parametrize(
    ("t", "code"),
    [
        # the RFC's 8-digit values, truncated to the last 6 digits (same HOTP value mod 10**6)
        (59, "287082"),
        (1111111109, "081804"),
        (1111111111, "050471"),
        (1234567890, "005924"),
        (2000000000, "279037"),
        (20000000000, "353130"),
    ],
)
def test_rfc6238_vectors(t: int, code: str) -> None:
    assert totp.code_at_step(RFC_SECRET, totp.current_step(at(t))) == code
    assert totp.match_step(RFC_SECRET, code, at(t), None) == t // 30


def test_current_step() -> None:
    assert totp.current_step(at(0)) == 0
    assert totp.current_step(at(29)) == 0
    assert totp.current_step(at(30)) == 1
    assert totp.current_step(at(1111111109)) == 37037036


def test_code_matches_pyotp() -> None:
    expected = pyotp.TOTP(SECRET).at(NOW)
    assert totp.code_at_step(SECRET, STEP) == expected
    assert len(expected) == 6


def code(offset: int) -> str:
    return pyotp.TOTP(SECRET).at(NOW + timedelta(seconds=30 * offset))


def test_current_previous_and_next_step_accepted() -> None:
    assert totp.match_step(SECRET, code(0), NOW, None) == STEP
    assert totp.match_step(SECRET, code(-1), NOW, None) == STEP - 1
    assert totp.match_step(SECRET, code(1), NOW, None) == STEP + 1


@pytest.mark.parametrize("offset", [-2, 2, -3, 3, 100])
def test_two_or_more_steps_away_refused(offset: int) -> None:
    c = code(offset)
    # guard against an accidental collision with a code inside the window
    assert c not in {code(-1), code(0), code(1)}
    assert totp.match_step(SECRET, c, NOW, None) is None


def test_replay_of_same_step_refused() -> None:
    assert totp.match_step(SECRET, code(0), NOW, last_step=STEP) is None


def test_lower_step_after_higher_used_refused() -> None:
    assert totp.match_step(SECRET, code(-1), NOW, last_step=STEP) is None
    assert totp.match_step(SECRET, code(0), NOW, last_step=STEP + 1) is None


def test_higher_step_after_lower_used_accepted() -> None:
    assert totp.match_step(SECRET, code(0), NOW, last_step=STEP - 1) == STEP
    assert totp.match_step(SECRET, code(1), NOW, last_step=STEP) == STEP + 1


def test_surrounding_whitespace_is_stripped() -> None:
    assert totp.match_step(SECRET, f" {code(0)}\n", NOW, None) == STEP


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "12345",
        "1234567",
        "12 456",
        "abcdef",
        "12345a",
        "-12345",
        "+12345",
        "\u0661\u0662\u0663\u0664\u0665\u0666",  # Arabic-Indic digits: isdigit() but not ASCII
        "\uff11\uff12\uff13\uff14\uff15\uff16",  # fullwidth digits
        "123456\x00",
    ],
)
def test_malformed_codes_refused(bad: str) -> None:
    assert totp.match_step(SECRET, bad, NOW, None) is None


def test_seven_digits_containing_valid_code_refused() -> None:
    assert totp.match_step(SECRET, code(0) + "0", NOW, None) is None
    assert totp.match_step(SECRET, "0" + code(0), NOW, None) is None


def test_wrong_secret_refused() -> None:
    other = "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU"
    other_codes = {pyotp.TOTP(other).at(NOW + timedelta(seconds=30 * k)) for k in (-1, 0, 1)}
    assert code(0) not in other_codes  # precondition: no accidental collision
    assert totp.match_step(other, code(0), NOW, None) is None


def test_new_secret_is_160_bits_base32() -> None:
    s = totp.new_secret()
    assert len(s) == 32
    assert len(base64.b32decode(s)) == 20
    assert s != totp.new_secret()


def test_provisioning_uri() -> None:
    uri = totp.provisioning_uri(SECRET, "alice@corp.example.com", "bastion-broker")
    assert uri.startswith("otpauth://totp/bastion-broker:alice%40corp.example.com?")
    assert f"secret={SECRET}" in uri
    assert "issuer=bastion-broker" in uri
