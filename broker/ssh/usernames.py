"""User names as the client sent them: what the audit shows, and which names are refused.

asyncssh prepares every user name with SASLprep (RFC 4013) before the broker sees it: NFKC
folds fullwidth ``alice`` (U+FF41...) to ``alice`` and a soft hyphen inside ``alice`` is removed, so
those would log in as ``alice`` and the audit would never show what was typed. With the asyncssh
patches the broker gets the raw bytes of the USERAUTH_REQUEST name (``patches.raw_username``):
a name that SASLprep changes is refused unless ``[identity] normalize_names = true``, and either
way the raw name is audited (escaped) next to the resolved one. Without the patches (stock
asyncssh) the raw name is unknown, so any name that is not printable ASCII after SASLprep is
refused outright (a fullwidth name folded to ASCII cannot be told apart there).

A name asyncssh cannot prepare at all (a NUL or control byte, invalid UTF-8, too long) drops
the connection inside asyncssh; the broker audits each such refused connection
(``connection.refused``), at most ``RefusalLimiter``'s rate so a flood cannot fill the disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_ESCAPED = 300  # characters of an escaped name kept in the audit


def escape_name(raw: bytes) -> str:
    """The bytes of a user name as printable ASCII: printable ASCII as is, a backslash doubled,
    other characters ``\\xNN``/``\\uNNNN``/``\\UNNNNNNNN``, bytes that are not UTF-8 ``\\xNN``."""
    out: list[str] = []
    for ch in raw.decode("utf-8", "surrogateescape"):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    text = "".join(out)
    return text if len(text) <= MAX_ESCAPED else text[:MAX_ESCAPED] + "..."


def printable_ascii(name: str) -> bool:
    return name.isascii() and name.isprintable()


def refusal(raw: bytes | None, prepared: str, normalize: bool) -> str | None:
    """Why the name is refused, or None. ``raw``: the bytes the client sent (None: unknown,
    stock asyncssh); ``prepared``: the name after asyncssh's SASLprep."""
    if raw is None:
        if printable_ascii(prepared):
            return None
        return "not printable ASCII (the name as sent is unknown without the asyncssh patches)"
    if raw == prepared.encode("utf-8") or normalize:
        return None
    return "SASLprep changes the name (set [identity] normalize_names = true to accept it)"


class RefusalLimiter:
    """A token bucket for audit events about refused connections: ``rate`` per second, bursts
    of ``burst``; events beyond it are counted and the count goes with the next one let through
    (``suppressed``)."""

    def __init__(self, rate: float = 5.0, burst: int = 50,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._rate, self._burst, self._now = rate, float(burst), monotonic
        self._tokens = float(burst)
        self._at = monotonic()
        self.suppressed = 0

    def take(self) -> int | None:
        """None if this event is to be dropped; else how many were dropped before it."""
        now = self._now()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            self.suppressed += 1
            return None
        self._tokens -= 1
        dropped, self.suppressed = self.suppressed, 0
        return dropped
