"""Login: password (Directory) then one-time code (SecondFactor).

The SSH layer always asks for both before anything is checked, so the prompts never reveal which
factor failed, and unknown users cost the same as known ones (a dummy hash is verified). A code is
only consumed after a correct password, so a guesser cannot burn a user's codes.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.domain import totp
from broker.domain.models import Principal
from broker.ports import AuditSink, AuthOutcome, Clock, Directory, ThrottleStore, TotpStore


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


@dataclass(frozen=True, slots=True)
class AccountPolicy:
    free_failures: int = 3
    backoff_max_seconds: float = 60.0
    lock_after: int = 50


class Authenticator:
    def __init__(
        self,
        directory: Directory,
        second: TotpSecondFactor,
        audit: AuditSink,
        throttle: ThrottleStore,
        clock: Clock,
        policy: AccountPolicy = AccountPolicy(),
    ) -> None:
        self._directory = directory
        self._second = second
        self._audit = audit
        self._throttle = throttle
        self._clock = clock
        self._policy = policy

    def account_of(self, username: str, domain: str | None) -> str:
        """The throttling key: the name as typed (so unknown names are throttled alike)."""
        fqdn = self._directory.canonical_domain(domain) or domain or "?"
        return f"{username.casefold()}@{fqdn.casefold()}"

    async def login(
        self, username: str, domain: str | None, password: str, code: str, peer: str
    ) -> Principal | None:
        """Both factors; audits the precise reason, returns the principal or None."""
        account = self.account_of(username, domain)
        now = self._clock.now().timestamp()
        state = await self._throttle.state(account)
        if state.locked:
            self._fail(account, peer, f"account locked after {state.failures} failures")
            return None
        if now < state.next_allowed:
            # not counted: the credentials were not even checked
            self._fail(account, peer, f"throttled for {state.next_allowed - now:.1f} s more")
            return None
        first = await self._directory.authenticate(username, domain, password)
        if first.principal is None:
            await self._count_failure(account, peer, first.reason)
            return None
        second = await self._second.verify(first.principal, code)
        if second.principal is None:
            await self._count_failure(account, peer, second.reason)
            return None
        await self._throttle.succeeded(account)
        self._audit.emit("auth.success", user=str(first.principal), peer=peer,
                         method="password+totp")
        return first.principal

    def _fail(self, account: str, peer: str, reason: str) -> None:
        self._audit.emit("auth.failure", user=account, peer=peer, reason=reason)

    async def _count_failure(self, account: str, peer: str, reason: str) -> None:
        self._fail(account, peer, reason)
        p = self._policy
        st = await self._throttle.failed(account, self._clock.now().timestamp(),
                                         p.free_failures, p.backoff_max_seconds, p.lock_after)
        if st.locked and st.failures == p.lock_after:
            self._audit.emit("account.locked", user=account, failures=st.failures, peer=peer)
