"""RFC 6238 verification with one step of drift and single use of every accepted step.

The caller stores the last accepted step per user and must only accept a step strictly greater
(compare-and-set in the store), so a code can never be replayed, even across processes.
"""

from __future__ import annotations

import hmac
from datetime import datetime

import pyotp

STEP_SECONDS = 30
DIGITS = 6
DRIFT_STEPS = 1


def current_step(now: datetime) -> int:
    """The RFC 6238 time step containing ``now``."""
    return int(now.timestamp()) // STEP_SECONDS


def code_at_step(secret: str, step: int) -> str:
    """The code valid for ``step`` (what an authenticator app shows)."""
    return str(pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).generate_otp(step))


def match_step(secret: str, code: str, now: datetime, last_step: int | None) -> int | None:
    """Return the step that ``code`` proves, or None.

    Only steps within one step of ``now`` and strictly after ``last_step`` count; every candidate is
    compared in constant time and all are compared, so timing does not reveal which one matched.
    """
    code = code.strip()
    if len(code) != DIGITS or not code.isascii() or not code.isdigit():
        return None
    now_step = current_step(now)
    found: int | None = None
    for step in range(now_step - DRIFT_STEPS, now_step + DRIFT_STEPS + 1):
        ok = hmac.compare_digest(code_at_step(secret, step), code)
        if ok and (last_step is None or step > last_step) and found is None:
            found = step
    return found


def provisioning_uri(secret: str, account: str, issuer: str) -> str:
    """The ``otpauth://`` URI an authenticator app scans."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=account, issuer_name=issuer
    )


def new_secret() -> str:
    """A fresh 160-bit base32 secret (RFC 4226 recommends at least 160 bits)."""
    return pyotp.random_base32(length=32)
