"""Flood and guessing limits, as pure state machines that take ``now`` (seconds, monotonic).

``SourceGuard`` does per process what OpenSSH's MaxStartups and PerSourcePenalties do: a cap on
unauthenticated connections in progress (overall and per source address), and a growing penalty
for an address that keeps failing to authenticate. ``account_backoff`` is the back-off rule that the
store applies atomically to an account and to each (account, source address) pair, shared by every
broker process; ``login_refusal`` decides from both (and whether the device is known) whether a
login may even be checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field


def account_backoff(failures: int, free: int, max_seconds: float) -> float:
    """Seconds an account must wait after ``failures`` consecutive failures.

    The first ``free`` failures cost nothing (typos); then 1 s, 2 s, 4 s ... up to ``max_seconds``.
    """
    if failures < free:
        return 0.0
    return float(min(max_seconds, 2.0 ** min(failures - free, 30)))


@dataclass(frozen=True, slots=True)
class Tally:
    """Consecutive failures of one account, or of one account from one source address."""

    failures: int = 0
    next_allowed: float = 0.0  # epoch seconds
    locked: bool = False


def known_device(last_success: float | None, now: float, days: float) -> bool:
    """Whether an address or key with a successful login of the account at ``last_success``
    (epoch seconds, None: never) is still a known device at ``now`` (like OWASP's device cookie)."""
    return last_success is not None and days > 0 and now - last_success < days * 86400.0


def login_refusal(pair: Tally, account: Tally, known: bool, now: float) -> str | None:
    """Why a login of an account from a source is refused before its credentials are checked,
    or None. The (account, source) pair is limited always; the account as a whole only for
    unknown devices, so failures elsewhere neither delay nor lock a known device."""
    if pair.locked:
        return f"locked (source) after {pair.failures} failures"
    if now < pair.next_allowed:
        return f"throttled (source) for {pair.next_allowed - now:.1f} s more"
    if known:
        return None
    if account.locked:
        return f"locked (account, unknown source) after {account.failures} failures"
    if now < account.next_allowed:
        return f"throttled (account, unknown source) for {account.next_allowed - now:.1f} s more"
    return None


@dataclass(slots=True)
class _Source:
    unauthenticated: int = 0
    failures: list[float] = field(default_factory=list)
    penalty_until: float = 0.0
    penalty_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    reason: str
    penalty_started: bool = False


class SourceGuard:
    def __init__(
        self,
        *,
        max_startups: int,
        max_startups_per_source: int,
        penalty_after: int,
        penalty_window: float,
        penalty_seconds: float,
        penalty_max_seconds: float,
        exempt: Iterable[str] = (),
    ) -> None:
        self._sources: dict[str, _Source] = {}
        self.unauthenticated = 0
        self.configure(max_startups=max_startups, max_startups_per_source=max_startups_per_source,
                       penalty_after=penalty_after, penalty_window=penalty_window,
                       penalty_seconds=penalty_seconds, penalty_max_seconds=penalty_max_seconds,
                       exempt=exempt)

    def configure(self, *, max_startups: int, max_startups_per_source: int, penalty_after: int,
                  penalty_window: float, penalty_seconds: float, penalty_max_seconds: float,
                  exempt: Iterable[str] = ()) -> None:
        """New limits (a configuration reload); what is counted so far, and running penalties,
        are kept: a reload neither frees a flood's slots nor lifts a penalty."""
        self._max = max_startups
        self._max_per_source = max_startups_per_source
        self._penalty_after = penalty_after
        self._window = penalty_window
        self._penalty = penalty_seconds
        self._penalty_max = penalty_max_seconds
        self._exempt = [ipaddress.ip_network(n, strict=False) for n in exempt]

    def _exempt_ip(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self._exempt)

    def admit(self, ip: str, now: float) -> Admission:
        """A new TCP connection from ``ip``: count it as unauthenticated, or refuse it."""
        if len(self._sources) > 50_000:
            self._prune(now)
        src = self._sources.get(ip)
        if src is not None and now < src.penalty_until and not self._exempt_ip(ip):
            return Admission(False, "source address penalised after repeated failures")
        if self.unauthenticated >= self._max:
            return Admission(False, "too many unauthenticated connections (max_startups)")
        if src is None:
            src = self._sources[ip] = _Source()
        if src.unauthenticated >= self._max_per_source and not self._exempt_ip(ip):
            return Admission(False, "too many unauthenticated connections from this address")
        src.unauthenticated += 1
        self.unauthenticated += 1
        return Admission(True, "ok")

    def left_unauthenticated(self, ip: str) -> None:
        """An admitted connection authenticated or closed: it no longer counts."""
        src = self._sources.get(ip)
        if src is not None and src.unauthenticated > 0:
            src.unauthenticated -= 1
            self.unauthenticated -= 1
            self._forget_if_idle(ip, src)

    def failed(self, ip: str, now: float) -> Admission:
        """An authentication failure from ``ip``; may start or lengthen a penalty."""
        if self._exempt_ip(ip):
            return Admission(True, "exempt")
        src = self._sources.setdefault(ip, _Source())
        src.failures = [t for t in src.failures if now - t < self._window]
        src.failures.append(now)
        if len(src.failures) >= self._penalty_after:
            src.penalty_seconds = min(self._penalty_max,
                                      src.penalty_seconds * 2 if src.penalty_seconds else
                                      self._penalty)
            src.penalty_until = now + src.penalty_seconds
            src.failures.clear()
            return Admission(False, f"penalised for {src.penalty_seconds:.0f} s", True)
        return Admission(True, "counted")

    def _forget_if_idle(self, ip: str, src: _Source) -> None:
        if src.unauthenticated == 0 and not src.failures and src.penalty_seconds == 0:
            del self._sources[ip]

    def _prune(self, now: float) -> None:
        """Forget addresses whose penalty has long expired (bounds memory under a wide flood)."""
        for ip, src in list(self._sources.items()):
            if src.unauthenticated == 0 and now > src.penalty_until + self._penalty_max:
                del self._sources[ip]

    def tracked_sources(self) -> int:
        return len(self._sources)
