"""Login: password (Directory) or a registered key, then a one-time code (SecondFactor).

The SSH layer always asks for both before anything is checked, so the prompts never reveal which
factor failed, and unknown users cost the same as known ones (a dummy hash is verified). A code is
only consumed after a correct first factor, so a guesser cannot burn a user's codes. A registered
SSH key may replace the password, never the code. Opt-in: self-enrolment of TOTP after a correct
password, and a short re-authentication window (same account, address and key) that skips the code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from broker.domain import ratelimit, totp
from broker.domain.models import Principal
from broker.ports import (
    AuditSink,
    AuthOutcome,
    Clock,
    Directory,
    Metrics,
    NullMetrics,
    ReauthStore,
    ThrottleStore,
    TotpStore,
)
from broker.services.locks import LockGate


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
    """Back-off and lock of an (account, source address) pair, and of an account for unknown
    devices: an address or registered key it logged in with within ``known_source_days``."""

    free_failures: int = 3
    backoff_max_seconds: float = 60.0
    lock_after: int = 50
    known_source_days: float = 30.0


@dataclass(frozen=True, slots=True)
class LoginResult:
    """A principal, or None; ``enrol_secret`` when self-enrolment of TOTP should be offered."""

    principal: Principal | None
    enrol_secret: str | None = None
    enrol_uri: str | None = None


@dataclass(frozen=True, slots=True)
class TotpPolicy:
    self_enroll: bool = False
    reauth_window_seconds: int = 0
    issuer: str = "bastion-broker"


class Authenticator:
    def __init__(
        self,
        directory: Directory,
        second: TotpSecondFactor,
        audit: AuditSink,
        throttle: ThrottleStore,
        clock: Clock,
        policy: AccountPolicy | None = None,
        *,
        totp_store: TotpStore | None = None,
        totp_policy: TotpPolicy | None = None,
        reauth: ReauthStore | None = None,
        metrics: Metrics | None = None,
        locks: LockGate | None = None,
    ) -> None:
        self._directory = directory
        self._locks = locks  # a locked user is refused after the first factor, as a failure
        self._metrics = metrics or NullMetrics()
        self._second = second
        self._audit = audit
        self._throttle = throttle
        self._clock = clock
        self._policy = policy or AccountPolicy()
        self._totp_store = totp_store
        self._totp_policy = totp_policy or TotpPolicy()
        self._reauth = reauth

    def use_directory(self, directory: Directory) -> None:
        """A reloaded directory (a new static users file) for the logins that start from now."""
        self._directory = directory

    def configure(self, policy: AccountPolicy, totp_policy: TotpPolicy) -> None:
        """Reloaded limits and TOTP options, for the logins that start from now."""
        self._policy = policy
        self._totp_policy = totp_policy

    def account_of(self, username: str, domain: str | None) -> str:
        """The throttling key: the name as typed (so unknown names are throttled alike)."""
        fqdn = self._directory.canonical_domain(domain) or domain or "?"
        return f"{username.casefold()}@{fqdn.casefold()}"

    async def _throttled(self, account: str, password: str | None, peer: str,
                         key_fp: str | None) -> bool:
        """Whether the limits refuse this login before its credentials are checked: the
        (account, source) pair always, the account as a whole for an unknown device only.
        A refusal is not counted, and takes the path of a wrong password: the directory's cost
        of an unknown user (never the account's own credentials: no directory lockout), the
        same audit event, the same answer."""
        now = self._clock.now().timestamp()
        view = await self._throttle.view(account, _ip(peer), key_fp)
        days = self._policy.known_source_days
        known = (ratelimit.known_device(view.source.last_success, now, days)
                 or ratelimit.known_device(view.key_last_success, now, days))
        src, acc = view.source, view.account
        reason = ratelimit.login_refusal(
            ratelimit.Tally(src.failures, src.next_allowed, src.locked),
            ratelimit.Tally(acc.failures, acc.next_allowed, acc.locked), known, now)
        if reason is None:
            return False
        await self._first_factor(_NOBODY, None, password, key_fp)
        self._fail(account, peer, reason)
        return True

    async def _first_factor(self, username: str, domain: str | None, password: str | None,
                            key_fp: str | None) -> AuthOutcome:
        started = time.perf_counter()  # durations for the metrics only, never for decisions
        if key_fp is not None:
            # the key was proven by the SSH layer; the directory still decides if the account
            # exists, is enabled and belongs to the required groups
            outcome = await self._directory.lookup(username, domain)
            self._metrics.directory_call("lookup", time.perf_counter() - started)
            return outcome
        outcome = await self._directory.authenticate(username, domain, password or "")
        self._metrics.directory_call("authenticate", time.perf_counter() - started)
        return outcome

    async def login(
        self, username: str, domain: str | None, password: str | None, code: str, peer: str,
        *, key_fp: str | None = None,
    ) -> LoginResult:
        """Password (or a proven registered key) and a TOTP code; audits the precise reason."""
        started = time.perf_counter()
        result = await self._login(username, domain, password, code, peer, key_fp)
        outcome = ("failure" if result.principal is None
                   else "enrolment" if result.enrol_secret is not None else "success")
        self._metrics.login_seconds(outcome, time.perf_counter() - started)
        return result

    async def _login(self, username: str, domain: str | None, password: str | None, code: str,
                     peer: str, key_fp: str | None) -> LoginResult:
        account = self.account_of(username, domain)
        if await self._throttled(account, password, peer, key_fp):
            return LoginResult(None)
        first = await self._first_factor(username, domain, password, key_fp)
        if first.principal is None:
            await self._count_failure(account, peer, first.reason)
            return LoginResult(None)
        principal = first.principal
        if await self._locked(account, principal, peer):
            return LoginResult(None)
        second = await self._second.verify(principal, code)
        if second.principal is None:
            if second.reason == "no TOTP enrolled" and self._totp_policy.self_enroll:
                secret = totp.new_secret()
                uri = totp.provisioning_uri(secret, str(principal), self._totp_policy.issuer)
                self._audit.emit("totp.self_enrolment_offered", user=str(principal), peer=peer)
                return LoginResult(principal, enrol_secret=secret, enrol_uri=uri)
            await self._count_failure(account, peer, second.reason)
            return LoginResult(None)
        await self._succeeded(account, principal, peer, key_fp,
                              "publickey+totp" if key_fp else "password+totp")
        return LoginResult(principal)

    async def complete_enrolment(self, principal: Principal, secret: str, code: str,
                                 peer: str) -> Principal | None:
        """Self-enrolment: the first code from the new authenticator proves it was set up."""
        account = principal.key
        step = totp.match_step(secret, code, self._clock.now(), None)
        if step is None or self._totp_store is None:
            await self._count_failure(account, peer, "self-enrolment: bad TOTP code")
            return None
        if await self._totp_store.get_secret(account) is not None:
            await self._count_failure(account, peer, "self-enrolment: already enrolled")
            return None
        await self._totp_store.set_secret(account, secret)
        await self._totp_store.advance_step(account, step)
        self._audit.emit("totp.self_enrolled", user=str(principal), peer=peer)
        await self._succeeded(account, principal, peer, None, "password+totp-enrolment")
        return principal

    async def reauth_allowed(self, username: str, domain: str | None, ip: str,
                             key_fp: str | None) -> bool:
        """Whether a recent full login of this account, from this address (and key, if any)
        lets this one skip the code. Off unless ``reauth_window_seconds`` is set."""
        if self._reauth is None or self._totp_policy.reauth_window_seconds <= 0:
            return False
        account = self.account_of(username, domain)
        return await self._reauth.valid(account, ip, key_fp or "", self._clock.now().timestamp())

    async def login_within_window(self, username: str, domain: str | None,
                                  password: str | None, peer: str,
                                  key_fp: str | None) -> Principal | None:
        """The first factor only, inside a re-authentication window (audited as such)."""
        started = time.perf_counter()
        principal = await self._login_within_window(username, domain, password, peer, key_fp)
        self._metrics.login_seconds("failure" if principal is None else "success",
                                    time.perf_counter() - started)
        return principal

    async def _login_within_window(self, username: str, domain: str | None,
                                   password: str | None, peer: str,
                                   key_fp: str | None) -> Principal | None:
        account = self.account_of(username, domain)
        if await self._throttled(account, password, peer, key_fp):
            return None
        first = await self._first_factor(username, domain, password, key_fp)
        if first.principal is None:
            await self._count_failure(account, peer, first.reason)
            return None
        if await self._locked(account, first.principal, peer):
            return None
        await self._known(account, peer, key_fp)
        method = ("publickey" if key_fp else "password") + "+reauth-window"
        self._audit.emit("auth.success", user=str(first.principal), peer=peer, method=method,
                         **({"key": key_fp} if key_fp else {}))
        self._metrics.login(True, method)
        return first.principal

    async def _succeeded(self, account: str, principal: Principal, peer: str,
                         key_fp: str | None, method: str) -> None:
        await self._known(account, peer, key_fp)
        self._audit.emit("auth.success", user=str(principal), peer=peer, method=method,
                         **({"key": key_fp} if key_fp else {}))
        self._metrics.login(True, method)
        window = self._totp_policy.reauth_window_seconds
        if self._reauth is not None and window > 0:
            await self._reauth.remember(account, _ip(peer), key_fp or "",
                                        self._clock.now().timestamp() + window)

    async def _known(self, account: str, peer: str, key_fp: str | None) -> None:
        """A successful login: reset the pair's and the account's counters, and remember the
        address (and key) as known devices of the account."""
        now = self._clock.now().timestamp()
        await self._throttle.login_succeeded(
            account, _ip(peer), key_fp, now, now - self._policy.known_source_days * 86400.0)

    async def _locked(self, account: str, principal: Principal, peer: str) -> bool:
        """A lock on the user (``lock --user``): refused like any failed login (the client
        learns nothing more), audited with the lock's id; not counted against the account."""
        lock = await self._locks.lock_for(principal) if self._locks is not None else None
        if lock is None:
            return False
        self._fail(account, peer, f"locked: lock {lock.id}")
        return True

    def _fail(self, account: str, peer: str, reason: str) -> None:
        self._audit.emit("auth.failure", user=account, peer=peer, reason=reason)
        self._metrics.login(False, reason)

    async def _count_failure(self, account: str, peer: str, reason: str) -> None:
        self._fail(account, peer, reason)
        p = self._policy
        now = self._clock.now().timestamp()
        pair = await self._throttle.source_failed(account, _ip(peer), now, p.free_failures,
                                                  p.backoff_max_seconds, p.lock_after)
        if pair.locked and pair.failures == p.lock_after:
            self._audit.emit("account.source_locked", user=account, source=pair.source,
                             failures=pair.failures, peer=peer)
        st = await self._throttle.failed(account, now, p.free_failures, p.backoff_max_seconds,
                                         p.lock_after)
        if st.locked and st.failures == p.lock_after:  # for unknown devices only
            self._audit.emit("account.locked", user=account, failures=st.failures, peer=peer)
            self._metrics.account_locked()


# a name no directory has: a refused login costs what an unknown user's does
_NOBODY = "\x00throttled"


def _ip(peer: str) -> str:
    """The address of an ``address:port`` peer (IPv6 too)."""
    return peer.rsplit(":", 1)[0] if ":" in peer else peer
