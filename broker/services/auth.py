"""Login: password (Directory) then one-time code (SecondFactor).

The SSH layer always asks for both before anything is checked, so the prompts never reveal which
factor failed, and unknown users cost the same as known ones (a dummy hash is verified). A code is
only consumed after a correct password, so a guesser cannot burn a user's codes.
"""

from __future__ import annotations

from broker.domain import totp
from broker.domain.models import Principal
from broker.ports import AuditSink, AuthOutcome, Clock, Directory, TotpStore


class TotpSecondFactor:
    """``SecondFactor`` over a ``TotpStore``: RFC 6238, one step of drift, single use per user."""

    def __init__(self, store: TotpStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def verify(self, principal: Principal, code: str) -> AuthOutcome:
        secret = await self._store.get_secret(principal.key)
        if secret is None:
            return AuthOutcome(None, "no TOTP enrolled")
        last = await self._store.last_step(principal.key)
        step = totp.match_step(secret, code, self._clock.now(), last)
        if step is None:
            # Distinguish a replay for the audit log: the code matches a step already used.
            replay = totp.match_step(secret, code, self._clock.now(), None) is not None
            return AuthOutcome(None, "TOTP code reused" if replay else "bad TOTP code")
        if not await self._store.advance_step(principal.key, step):
            return AuthOutcome(None, "TOTP code reused")  # another login won the race
        return AuthOutcome(principal, "totp ok")


class Authenticator:
    def __init__(
        self, directory: Directory, second: TotpSecondFactor, audit: AuditSink
    ) -> None:
        self._directory = directory
        self._second = second
        self._audit = audit

    async def login(
        self, username: str, domain: str | None, password: str, code: str, peer: str
    ) -> Principal | None:
        """Both factors; audits the precise reason, returns the principal or None."""
        first = await self._directory.authenticate(username, domain, password)
        if first.principal is None:
            self._audit.emit(
                "auth.failure", user=username, domain=domain, peer=peer, reason=first.reason
            )
            return None
        second = await self._second.verify(first.principal, code)
        if second.principal is None:
            self._audit.emit(
                "auth.failure", user=str(first.principal), peer=peer, reason=second.reason
            )
            return None
        self._audit.emit("auth.success", user=str(first.principal), peer=peer, method="password+totp")
        return first.principal
