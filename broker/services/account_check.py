"""Privileges end when the directory says so: live accounts for API callers and SSH sessions.

A signed cookie, an API token or a live SSH session were all granted to an account as the
directory described it then. ``AccountChecker`` asks the directory again (``Directory.lookup``:
the account must exist, be enabled, not expired or locked out, and be in the required groups)
and keeps each answer for at most ``recheck_seconds`` (per process; the directory is the source
of truth, so every bastion converges within that time). ``AccountEnforcer`` ends the live SSH
sessions of an account the directory no longer admits, with one lookup per user per interval.

A directory that cannot answer is not an answer: nothing is cached, API calls are refused as
unavailable (fail closed) and live SSH sessions are kept until the directory answers again, as
the grant enforcer keeps them while the store is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from broker.ports import AuditSink, AuthOutcome, Clock, Directory
from broker.services.periodic import Periodic
from broker.services.sessions import LiveSession, SessionService

log = structlog.get_logger("broker.account_check")

_UNAVAILABLE = ("directory unavailable", "directory error")
_MAX_ENTRIES = 50_000  # past this, expired answers are dropped before a new one is kept


def directory_failed(outcome: AuthOutcome) -> bool:
    """Whether ``outcome`` says the directory could not answer (not that the account is dead)."""
    return outcome.principal is None and outcome.reason.startswith(_UNAVAILABLE)


@dataclass(frozen=True, slots=True)
class _Entry:
    outcome: AuthOutcome
    at: float  # clock seconds when the directory answered


class AccountChecker:
    """``Directory.lookup`` answers, each kept for at most ``recheck_seconds`` (0: every use).

    Concurrent checks of one account share one lookup."""

    def __init__(self, directory: Directory, clock: Clock, *, recheck_seconds: float) -> None:
        self._directory = directory
        self._clock = clock
        self._recheck = recheck_seconds
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[AuthOutcome]] = {}

    @property
    def recheck_seconds(self) -> float:
        return self._recheck

    def use_directory(self, directory: Directory) -> None:
        """A reloaded directory: every account is asked again at its next use."""
        self._directory = directory
        self._cache.clear()

    def configure(self, *, recheck_seconds: float) -> None:
        self._recheck = recheck_seconds

    def forget(self, username: str, domain: str | None) -> None:
        self._cache.pop(self._key(username, domain), None)

    @staticmethod
    def _key(username: str, domain: str | None) -> str:
        return f"{username}@{domain or ''}".casefold()

    def _now(self) -> float:
        return self._clock.now().timestamp()

    async def check(self, username: str, domain: str | None) -> AuthOutcome:
        """The account as the directory describes it now, or at most ``recheck_seconds`` ago."""
        key = self._key(username, domain)
        hit = self._cache.get(key)
        now = self._now()
        if hit is not None and 0 <= now - hit.at < self._recheck:
            return hit.outcome
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[AuthOutcome] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            outcome = await self._directory.lookup(username, domain)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._inflight[key]
        fut.set_result(outcome)
        if not directory_failed(outcome):
            if len(self._cache) >= _MAX_ENTRIES:
                self._prune(now)
            self._cache[key] = _Entry(outcome, self._now())
        return outcome

    def _prune(self, now: float) -> None:
        for k in [k for k, e in self._cache.items() if not 0 <= now - e.at < self._recheck]:
            del self._cache[k]


class AccountEnforcer:
    """Ends the live SSH sessions of accounts the directory no longer admits.

    Every ``interval`` seconds the distinct users of the live sessions are checked through the
    ``AccountChecker`` (so a user is looked up at most once per ``recheck_seconds``, however many
    sessions they hold): a deleted, disabled, expired or locked account, or one no longer in a
    required group, has every session ended, audited ``session.terminated`` with the
    directory's reason."""

    def __init__(self, sessions: SessionService, checker: AccountChecker, audit: AuditSink, *,
                 interval: float) -> None:
        self._sessions = sessions
        self._checker = checker
        self._audit = audit
        self._interval = interval
        self._loop = Periodic(self.check_once, lambda: self._interval,
                              failed_event="account_check.failed", errors=(Exception,))

    def configure(self, *, interval: float) -> None:
        self._interval = interval

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def check_once(self) -> int:
        """One pass; returns how many sessions it ended."""
        live = [s for s in self._sessions.live.values() if s.control is not None and not s.closed]
        by_user: dict[tuple[str, str], list[LiveSession]] = {}
        for s in live:
            p = s.request.principal
            by_user.setdefault((p.username.casefold(), p.domain.casefold()), []).append(s)
        users = list(by_user)
        # at once: cached answers cost nothing, and the directory bounds its own concurrency
        outcomes = await asyncio.gather(*(self._checker.check(u, d) for u, d in users))
        ended = 0
        for (username, domain), outcome in zip(users, outcomes, strict=True):
            sessions = by_user[(username, domain)]
            if outcome.principal is not None:
                continue
            if directory_failed(outcome):
                log.warning("account_check.directory_unavailable", user=f"{username}@{domain}",
                            reason=outcome.reason)
                continue
            ended += self._end(sessions, outcome.reason)
        return ended

    def _end(self, sessions: Iterable[LiveSession], reason: str) -> int:
        n = 0
        for s in sessions:
            control = s.control
            if control is None or s.closed:
                continue
            why = f"account no longer allowed: {reason}"
            self._audit.emit("session.terminated", session_id=s.id,
                             user=str(s.request.principal), target=s.request.instance.id,
                             grant_id=s.request.grant.id, reason=why)
            control.terminate(why)
            n += 1
        return n
