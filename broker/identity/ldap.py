"""Active Directory behind the ``Directory`` port, over LDAPS or StartTLS with validated certificates.

One login runs in a worker thread (the event loop never waits on a socket), under a semaphore and
one deadline:

1. a service-account connection finds the user by sAMAccountName or UPN (filter values escaped),
   with the user's direct groups (``memberOf``) and, for a ``lookup``, the account state;
2. a second connection binds as the user's DN with the password. An unknown user binds a dummy DN
   instead, so it costs the same round trips as a wrong password, and is padded to look the same;
3. the service connection follows ``memberOf`` upwards, one search per nesting level, for the
   nested groups (the same set as the LDAP_MATCHING_RULE_IN_CHAIN filter, at a fraction of the
   DC's work), skipping groups the short-lived group cache knows (``group_cache_seconds``);
   the user must be in at least one required group.

Connections are pooled per DC (``pool_size``), already TLS-protected: service-account ones (the
only ones that search) and password-bind ones (bound as whichever user bound last, used for
nothing but binds) in separate pools, so a login usually costs no TLS handshake and no service
bind. A connection goes back to its pool only if everything on it succeeded; a pooled one the DC
closed while idle is replaced once by a fresh one; a DC failure empties that DC's pools.

DCs of a domain are tried in order (or round robin); a DC that fails (refused, silent, bad
certificate) is tried last for ``dc_retry_seconds``, so a dead DC costs one timeout, not one per
login, and comes back by itself. ldap3's ServerPool is not used: its liveness check is a bare TCP
connect (a hung DC passes it), ``active=True`` retries forever with 10 s sleeps, and its state
lives per connection, so it would not remember a dead DC between logins.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import random
import re
import secrets
import ssl
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
from ldap3 import (  # type: ignore[import-untyped]
    BASE,
    NONE,
    SIMPLE,
    SUBTREE,
    Connection,
    Server,
    Tls,
)
from ldap3.core.exceptions import LDAPException  # type: ignore[import-untyped]
from ldap3.utils.conv import escape_filter_chars  # type: ignore[import-untyped]

from broker.domain.models import Principal
from broker.errors import BrokerError, ConfigError
from broker.identity.ad_rules import (
    AD_BIND_CODES,
    ROLE_PREFIX,
    STATE_ATTRS,
    account_state_problem,
    all_values,
    first_value,
    group_matches,
    normalize_dn,
    parse_ad_bind_error,
    password_problem,
    split_login,
    username_problem,
)
from broker.identity.ad_settings import ADDomain, ADSettings, DCAddress, parse_server_uri
from broker.identity.group_cache import GroupCache, GroupFacts
from broker.ports import AuthOutcome

log = structlog.get_logger("broker.identity.ad")

_MAX_NESTING = 64  # group nesting levels followed (cycles stop earlier: groups are seen once)
_DN_CHUNK = 100  # group DNs per search filter
_NO_GROUP = GroupFacts("", ())
# Result codes that say "this DC cannot serve now", so the next DC is worth trying.
_DC_TROUBLE = {1: "operationsError", 3: "timeLimitExceeded", 51: "busy", 52: "unavailable",
               53: "unwillingToPerform", 80: "other"}

# ---------------------------------------------------------------------------------------------
# LDAP plumbing (runs in worker threads)


class _VerifiedTls(Tls):  # type: ignore[misc]
    """ldap3's Tls turns the stdlib hostname check off and redoes it with a Python 2 backport;
    this wraps with a context that has CERT_REQUIRED and check_hostname on (IP SANs included)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        self._context = context

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(
            connection.socket, server_side=False, do_handshake_on_connect=True,
            server_hostname=connection.server.host,
        )


class _DCFailure(Exception):
    """This DC could not serve the login (transport, TLS, timeout, busy): try the next one."""


def _tls_context(ca_file: Path) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    except FileNotFoundError:
        raise ConfigError(f"{ca_file}: CA file not found") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{ca_file}: cannot load CA certificates: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    return ctx


def _read_secret(path: Path) -> str:
    try:
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        raise ConfigError(f"{path}: bind password file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read bind password file: {exc}") from None
    if not value:
        raise ConfigError(f"{path}: bind password file is empty")
    return value


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        m = re.search(r"certificate verify failed: ([^(]*)", text)
        text = "TLS certificate not valid: " + (m.group(1).strip() if m else text)
    elif "timed out" in text:
        text = "timed out"
    return text[:200]


@dataclass(frozen=True, slots=True)
class _Domain:
    fqdn: str
    netbios: str
    dcs: tuple[DCAddress, ...]
    round_robin: bool
    base_dn: str
    bind_user: str
    bind_password: bytes
    tls: _VerifiedTls
    required: list[str]
    approvers: list[str]
    auditors: list[str]
    dummy_dn: str
    domain_dn: str  # where group searches look: the domain, or base_dn if it is not under it
    base_key: str  # normalize_dn(base_dn)


class _DCHealth:
    """Remembers DCs that failed recently, across logins and threads, so they are tried last."""

    def __init__(self, retry_after: float) -> None:
        self._retry_after = retry_after
        self._down: dict[str, float] = {}
        self._lock = threading.Lock()
        self._rr = itertools.count()

    def order(self, dcs: tuple[DCAddress, ...], round_robin: bool) -> list[DCAddress]:
        now = time.monotonic()
        with self._lock:
            down = {d.uri: t for d in dcs if (t := self._down.get(d.uri)) is not None
                    and now - t < self._retry_after}
        up = [d for d in dcs if d.uri not in down]
        if round_robin and up:
            k = next(self._rr) % len(up)
            up = up[k:] + up[:k]
        return up + sorted((d for d in dcs if d.uri in down), key=lambda d: down[d.uri])

    def mark(self, uri: str, ok: bool) -> None:
        with self._lock:
            if ok:
                self._down.pop(uri, None)
            else:
                self._down[uri] = time.monotonic()


class _FailureCost:
    """Recent durations of the bind step of a wrong password, so an unknown user's dummy bind
    can take as long.

    A DC answers a bind for a missing DN much faster than a wrong password for a real account
    (which writes badPwdCount): ~1 ms against ~15 ms on Samba, a clean user-enumeration oracle.
    The dummy bind alone does not close it, so it is padded by (a duration drawn from recent
    wrong passwords) - (the median recent dummy bind): the same distribution, measured under the
    same load. Padding each answer up to one target (``target - took``) would not do: under load
    it yields max(took, target), slower than a wrong password by tens of ms at the median.
    """

    def __init__(self, keep: int = 64) -> None:
        self._wrong: collections.deque[float] = collections.deque(maxlen=keep)
        self._dummy: collections.deque[float] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._rng = random.SystemRandom()

    def record(self, seconds: float) -> None:
        """A wrong password's bind took ``seconds``."""
        with self._lock:
            self._wrong.append(seconds)

    def pad(self, seconds: float) -> float:
        """How long an unknown user's dummy bind that took ``seconds`` must still wait."""
        with self._lock:
            if not self._wrong:
                self._dummy.append(seconds)
                return 0.0
            target = self._rng.choice(self._wrong)
            base = statistics.median(self._dummy) if self._dummy else seconds
            self._dummy.append(seconds)
        return max(0.0, target - base)


class _Pool:
    """Idle connections to one DC, all of one kind, already connected, TLS-protected and bound.

    ``svc`` pools hold connections bound as the service account: the only ones that search.
    ``bind`` pools hold connections used for nothing but users' password binds; after one they
    are bound as that user (or anonymous after a refused bind), so they never join a ``svc``
    pool. A connection goes back only after everything on it succeeded; any error discards it.
    """

    def __init__(self, size: int, max_idle: float) -> None:
        self._size = size
        self._max_idle = max_idle
        self._idle: collections.deque[tuple[Any, float]] = collections.deque()
        self._lock = threading.Lock()

    def get(self) -> Any | None:
        now = time.monotonic()
        stale: list[Any] = []
        conn = None
        with self._lock:
            while self._idle:
                c, since = self._idle.pop()  # most recently used first: least likely closed
                if now - since <= self._max_idle:
                    conn = c
                    break
                stale.append(c)
            # everything left is older still
            while self._idle and now - self._idle[0][1] > self._max_idle:
                stale.append(self._idle.popleft()[0])
        for c in stale:
            _quiet_unbind(c)
        return conn

    def put(self, conn: Any) -> None:
        with self._lock:
            if len(self._idle) < self._size:
                self._idle.append((conn, time.monotonic()))
                return
        _quiet_unbind(conn)

    def close(self) -> None:
        """Close the idle connections and keep none from now on."""
        self._size = 0
        self.clear()

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = list(self._idle), collections.deque()
        for c, _ in idle:
            _quiet_unbind(c)

    def __len__(self) -> int:
        with self._lock:
            return len(self._idle)


@dataclass(frozen=True, slots=True)
class _UserEntry:
    dn: str
    sam: str
    member_of: tuple[str, ...]
    attrs: dict[str, Any]


class _Session:
    """The connections one login uses on one DC: checked out of the pools, given back at the end
    only if nothing failed on them. A pooled connection that fails before answering anything (the
    DC closed it while idle) is replaced by a fresh one once; a fresh one failing is the DC's
    failure."""

    def __init__(self, owner: ADDirectory, dom: _Domain, dc: DCAddress, deadline: float) -> None:
        self._o = owner
        self._dom = dom
        self._dc = dc
        self._deadline = deadline
        self._conns: dict[str, tuple[Any, bool]] = {}  # kind -> (connection, reused)
        self.failed = False

    def conn(self, kind: Literal["svc", "bind"]) -> tuple[Any, bool]:
        if kind not in self._conns:
            pooled = self._o._pool(self._dom, self._dc, kind).get()
            if pooled is not None:
                self._conns[kind] = (pooled, True)
            else:
                self._conns[kind] = (self._fresh(kind), False)
        return self._conns[kind]

    def _fresh(self, kind: str) -> Any:
        if kind == "svc":
            return self._o._connect(self._dom, self._dc, self._dom.bind_user,
                                    self._dom.bind_password, self._deadline)
        return self._o._connect(self._dom, self._dc, None, None, self._deadline)

    def run(self, kind: Literal["svc", "bind"], op: Callable[[Any], Any]) -> Any:
        """``op(conn)``; on a transport error of a reused connection, once more on a fresh one."""
        conn, reused = self.conn(kind)
        try:
            return op(conn)
        except (LDAPException, OSError, _DCFailure) as exc:
            del self._conns[kind]
            _quiet_unbind(conn)
            if not reused or not _stale(exc):
                raise
            log.info("ad_pooled_connection_stale", dc=self._dc.uri, kind=kind, error=_short(exc))
        conn = self._fresh(kind)
        self._conns[kind] = (conn, False)
        return op(conn)

    def close(self) -> None:
        for kind, (conn, _) in self._conns.items():
            if self.failed:
                _quiet_unbind(conn)
            else:
                self._o._pool(self._dom, self._dc, kind).put(conn)
        self._conns.clear()


def _stale(exc: BaseException) -> bool:
    """Whether a failure on a reused connection looks like the DC closed it while idle (worth one
    retry on a fresh connection) rather than the DC being slow or refusing (not worth it)."""
    text = str(exc)
    if "timed out" in text or isinstance(exc, TimeoutError):
        return False
    return not isinstance(exc, _DCFailure) or text.startswith("closed:")


def _domain_dn(fqdn: str, base_dn: str) -> str:
    dn = ",".join(f"DC={label}" for label in fqdn.split("."))
    key, base = normalize_dn(dn), normalize_dn(base_dn)
    return dn if base == key or base.endswith("," + key) else base_dn


class ADDirectory:
    """``Directory`` over one or more Active Directory domains (see the module docstring)."""

    def __init__(self, settings: ADSettings, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._s = settings
        self._sleep = sleep  # the unknown-user padding's wait (in a worker thread); tests record it
        self._domains: dict[str, _Domain] = {}
        self._names: dict[str, str] = {}
        for d in settings.domains:
            if d.bind_password is not None:
                password = d.bind_password.get_secret_value()
            else:
                assert d.bind_password_file is not None  # noqa: S101 - the model validator ensures it
                password = _read_secret(d.bind_password_file)
            dom = _Domain(
                fqdn=d.fqdn, netbios=d.netbios,
                dcs=tuple(parse_server_uri(u) for u in d.servers),
                round_robin=d.strategy == "round_robin",
                base_dn=d.base_dn, bind_user=d.bind_user, bind_password=password.encode(),
                tls=_VerifiedTls(_tls_context(d.ca_file)),
                required=list(d.required_groups), approvers=list(d.approver_groups),
                auditors=list(d.auditor_groups),
                dummy_dn=f"CN=bastion-broker-no-such-user-{secrets.token_hex(8)},{d.base_dn}",
                domain_dn=_domain_dn(d.fqdn, d.base_dn), base_key=normalize_dn(d.base_dn),
            )
            self._domains[d.fqdn.casefold()] = dom
            self._names[d.fqdn.casefold()] = d.fqdn.casefold()
            self._names[d.netbios.casefold()] = d.fqdn.casefold()
        default = settings.default_domain or settings.domains[0].fqdn
        self._default = self._domains[self._names[default.casefold()]]
        self._health = _DCHealth(settings.dc_retry_seconds)
        self._fail_cost = {fqdn: _FailureCost() for fqdn in self._domains}
        self._pools: dict[tuple[str, str, str], _Pool] = {}
        self._pools_lock = threading.Lock()
        self._group_cache = GroupCache(settings.group_cache_seconds)
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="bb-ad")
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None
        # Unknown users bind the dummy DN with a random password, never with what they typed.
        self._dummy_password = secrets.token_urlsafe(24).encode()

    def close(self) -> None:
        """Stop the worker threads and close idle connections; logins still running finish on
        their own timeouts (their connections are closed, not pooled)."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._pools_lock:
            pools = list(self._pools.values())
        for p in pools:
            p.close()

    def _pool(self, dom: _Domain, dc: DCAddress, kind: str) -> _Pool:
        key = (dom.fqdn, dc.uri, kind)
        with self._pools_lock:
            pool = self._pools.get(key)
            if pool is None:
                size = 0 if self._closed else self._s.pool_size
                pool = self._pools[key] = _Pool(size, self._s.pool_max_idle_seconds)
            return pool

    def _drop_pools(self, dom: _Domain, dc: DCAddress) -> None:
        """A DC failed: its idle connections are likely dead too."""
        for kind in ("svc", "bind"):
            self._pool(dom, dc, kind).clear()

    def canonical_domain(self, domain: str | None) -> str | None:
        if domain is None:
            return self._default.fqdn
        key = self._names.get(domain.strip().rstrip(".").casefold())
        return self._domains[key].fqdn if key else None

    async def authenticate(self, username: str, domain: str | None, password: str) -> AuthOutcome:
        try:
            return await self._authenticate(username, domain, password)
        except Exception as exc:  # fail closed: the SSH layer must never see a directory exception
            log.error("ad_login_error", error=repr(exc)[:300])
            return AuthOutcome(None, f"directory error: {type(exc).__name__}")

    async def lookup(self, username: str, domain: str | None) -> AuthOutcome:
        """The account behind ``username`` without a password (a registered SSH key was proven):
        it must exist, be enabled, not expired, not locked out, and be in a required group."""
        try:
            return await self._lookup(username, domain)
        except Exception as exc:  # fail closed, as authenticate
            log.error("ad_lookup_error", error=repr(exc)[:300])
            return AuthOutcome(None, f"directory error: {type(exc).__name__}")

    async def ping(self) -> None:
        """Readiness: in every domain, one DC answers a base search of ``base_dn`` on a pooled
        service-account connection (no TLS handshake or bind when one is idle). In a thread of
        its own, not the login threads, so a login storm does not make it fail. Raises
        BrokerError naming each domain none of whose DCs answered."""
        problems = await asyncio.to_thread(self._ping_all)
        if problems:
            raise BrokerError("directory unavailable: " + "; ".join(problems))

    def _ping_all(self) -> list[str]:
        problems = []
        for dom in self._domains.values():
            problem = self._ping(dom, time.monotonic() + self._s.operation_timeout_seconds)
            if problem is not None:
                problems.append(f"{dom.fqdn}: {problem}")
        return problems

    def _ping(self, dom: _Domain, deadline: float) -> str | None:
        """None if a DC of ``dom`` answered, else what each one tried said. A DC that fails is
        remembered as down, as after a failed login."""
        failures: list[str] = []
        for dc in self._health.order(dom.dcs, dom.round_robin):
            if time.monotonic() >= deadline:
                break
            session = _Session(self, dom, dc, deadline)
            try:
                session.run("svc", lambda c: self._base_search(c, dom, deadline))
            except _BindRefused as exc:
                session.failed = True
                failures.append(f"{dc.uri}: service account bind refused ({exc})")
                continue
            except (_DCFailure, LDAPException, OSError) as exc:
                session.failed = True
                self._health.mark(dc.uri, ok=False)
                self._drop_pools(dom, dc)
                failures.append(f"{dc.uri}: {_short(exc)}")
                continue
            finally:
                session.close()
            self._health.mark(dc.uri, ok=True)
            return None
        return "; ".join(failures) or "no DC answered before the deadline"

    def _base_search(self, conn: Any, dom: _Domain, deadline: float) -> None:
        self._arm(conn, deadline)
        ok = conn.search(dom.base_dn, "(objectClass=*)", BASE, attributes=["1.1"])
        if not ok and (conn.closed or (conn.result or {}).get("type") is None):
            raise _DCFailure(f"closed: ping got no answer ({conn.last_error or 'connection lost'})")
        self._check(conn, "ping")

    def _resolve(self, username: str, domain: str | None) -> tuple[str, _Domain | AuthOutcome]:
        if domain is None:
            username, domain = split_login(username)
        problem = username_problem(username)
        if problem:
            return username, AuthOutcome(None, problem)
        fqdn = self.canonical_domain(domain)
        if fqdn is None:
            return username, AuthOutcome(None, "untrusted domain")
        return username, self._domains[fqdn.casefold()]

    async def _authenticate(self, username: str, domain: str | None, password: str) -> AuthOutcome:
        username, dom = self._resolve(username, domain)
        if isinstance(dom, AuthOutcome):
            return dom
        problem = password_problem(password)
        if problem:
            return AuthOutcome(None, problem)
        return await self._run(self._login, dom, username, password)

    async def _lookup(self, username: str, domain: str | None) -> AuthOutcome:
        username, dom = self._resolve(username, domain)
        if isinstance(dom, AuthOutcome):
            return dom
        return await self._run(self._login, dom, username, None)

    async def _run(self, fn: Callable[..., AuthOutcome], dom: _Domain, username: str,
                   password: str | None) -> AuthOutcome:
        budget = self._s.operation_timeout_seconds
        deadline = time.monotonic() + budget
        loop = asyncio.get_running_loop()
        sem = self._semaphore(loop)
        try:
            async with asyncio.timeout(budget):
                await sem.acquire()
                try:
                    fut = self._executor.submit(fn, dom, username, password, deadline)
                except BaseException:
                    sem.release()
                    raise
                # Released when the thread ends, not when we stop waiting: the bound holds.
                fut.add_done_callback(lambda _f: _release(loop, sem))
                return await asyncio.wrap_future(fut)
        except TimeoutError:
            return AuthOutcome(None, f"directory unavailable: no answer within {budget:g} s")

    def _semaphore(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        if self._sem is None or self._sem_loop is not loop:
            self._sem = asyncio.Semaphore(self._s.max_concurrency)
            self._sem_loop = loop
        return self._sem

    # -- worker thread ------------------------------------------------------------------------

    def _login(self, dom: _Domain, username: str, password: str | None,
               deadline: float) -> AuthOutcome:
        """One login (``password``) or lookup (None), DC after DC until one answers."""
        failures: list[str] = []
        for dc in self._health.order(dom.dcs, dom.round_robin):
            if time.monotonic() >= deadline:
                break
            session = _Session(self, dom, dc, deadline)
            try:
                outcome = self._attempt(session, dom, username, password, deadline)
            except _DCFailure as exc:
                session.failed = True
                self._health.mark(dc.uri, ok=False)
                self._drop_pools(dom, dc)
                log.warning("ad_dc_failed", dc=dc.uri, error=str(exc))
                failures.append(f"{dc.uri}: {exc}")
                continue
            except BaseException:
                session.failed = True
                raise
            finally:
                session.close()
            self._health.mark(dc.uri, ok=True)
            return outcome
        detail = "; ".join(failures) or "login deadline passed"
        return AuthOutcome(None, f"directory unavailable: {detail}")

    def _attempt(self, session: _Session, dom: _Domain, username: str, password: str | None,
                 deadline: float) -> AuthOutcome:
        try:
            return self._steps(session, dom, username, password, deadline)
        except _BindRefused as exc:  # only the service account's binds raise it
            session.failed = True
            return AuthOutcome(None, f"directory unavailable: service account bind refused ({exc})")
        except (LDAPException, OSError) as exc:
            raise _DCFailure(f"search: {_short(exc)}") from None

    def _steps(self, session: _Session, dom: _Domain, username: str, password: str | None,
               deadline: float) -> AuthOutcome:
        entry, ambiguous = session.run(
            "svc", lambda c: self._find_user(c, dom, username, deadline,
                                             state=password is None))
        if password is None:
            if ambiguous:
                return AuthOutcome(None, "ambiguous user name")
            if entry is None:
                return AuthOutcome(None, "unknown user")
            refusal = account_state_problem(entry.attrs, time.time())
            if refusal:
                return AuthOutcome(None, refusal)
            return self._authorise(session, dom, entry, deadline, "account ok")
        dn = entry.dn if entry else dom.dummy_dn
        pw = password.encode() if entry else self._dummy_password
        # Time the bind alone: a fresh connection's TLS handshake (same for both paths) must not
        # enter the wrong-password samples, or an unknown user would sometimes pay for it twice.
        timed: list[float] = []

        def bind(c: Any) -> str | None:
            started = time.monotonic()
            try:
                return self._user_bind(c, dn, pw, deadline)
            finally:
                timed.append(time.monotonic() - started)

        reason = session.run("bind", bind)
        took = timed[-1]
        cost = self._fail_cost[dom.fqdn.casefold()]
        if entry is None or ambiguous:
            self._sleep(min(cost.pad(took), max(0.0, deadline - time.monotonic())))
            return AuthOutcome(None, "ambiguous user name" if ambiguous else "unknown user")
        if reason == AD_BIND_CODES["52e"]:
            cost.record(took)
        if reason is not None:
            return AuthOutcome(None, reason)
        return self._authorise(session, dom, entry, deadline, "password ok")

    def _connect(self, dom: _Domain, dc: DCAddress, user: str | None, password: bytes | None,
                 deadline: float) -> Any:
        """An open, TLS-protected connection, bound as ``user`` (None: not bound, for the bind
        pool); _BindRefused on a bind "no"."""
        timeout = self._timeout(deadline)
        server = Server(dc.host, port=dc.port, use_ssl=dc.ldaps, tls=dom.tls, get_info=NONE,
                        connect_timeout=timeout)
        conn = Connection(server, user=user, password=password, authentication=SIMPLE,
                          auto_bind=False, raise_exceptions=False, auto_referrals=False,
                          read_only=True, receive_timeout=None)
        stage = "connect"
        try:
            conn.open(read_server_info=False)
            self._arm(conn, deadline)
            stage = "StartTLS"
            if not dc.ldaps and not conn.start_tls(read_server_info=False):
                raise _DCFailure(f"StartTLS refused: {conn.result.get('description')}")
            if not (conn.server.ssl or conn.tls_started):  # never a simple bind in clear text
                raise _DCFailure("no TLS on the connection; refusing to bind")
            if user is None:
                return conn
            self._arm(conn, deadline)
            stage = "bind"
            reason = self._bind(conn, user, password or b"")
            if reason is not None:
                raise _BindRefused(reason)
            return conn
        except (LDAPException, OSError) as exc:
            _quiet_unbind(conn)
            raise _DCFailure(f"{stage}: {_short(exc)}") from None
        except BaseException:
            _quiet_unbind(conn)
            raise

    def _bind(self, conn: Any, user: str, password: bytes) -> str | None:
        """Simple bind on an open TLS connection: None if accepted, else the AD reason.
        _DCFailure if the DC cannot serve it, or closed the connection."""
        if not (conn.server.ssl or conn.tls_started):  # never a simple bind in clear text
            raise _DCFailure("no TLS on the connection; refusing to bind")
        conn.user, conn.password, conn.authentication = user, password, SIMPLE
        try:
            ok = conn.bind(read_server_info=False)
        finally:
            conn.password = None  # do not keep a user's password on a pooled connection
        if ok:
            return None
        result = conn.result or {}
        code = int(result.get("result", -1))
        if code == 49:
            return parse_ad_bind_error(result.get("message"))
        if conn.closed or code == -1 or result.get("type") is None:
            raise _DCFailure(f"closed: bind got no answer ({conn.last_error or 'connection lost'})")
        if code in _DC_TROUBLE:
            raise _DCFailure(f"bind answered {_DC_TROUBLE[code]}")
        return f"bind refused: {result.get('description')}"

    def _user_bind(self, conn: Any, dn: str, password: bytes, deadline: float) -> str | None:
        self._arm(conn, deadline)
        return self._bind(conn, dn, password)

    def _timeout(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _DCFailure("login deadline passed")
        return min(self._s.connect_timeout_seconds, left)

    def _arm(self, conn: Any, deadline: float) -> None:
        """Bound the next answer by the per-DC timeout and by what is left of the login's budget."""
        if conn.socket is None or conn.closed:
            raise _DCFailure("closed: connection is not open")
        conn.socket.settimeout(self._timeout(deadline))

    def _find_user(self, conn: Any, dom: _Domain, username: str, deadline: float,
                   state: bool) -> tuple[_UserEntry | None, bool]:
        """The user's entry (with direct groups, and account state for a lookup), or None; and
        whether the name was ambiguous."""
        name = escape_filter_chars(username)
        upn = escape_filter_chars(f"{username}@{dom.fqdn}")
        flt = (f"(&(objectCategory=person)(objectClass=user)"
               f"(|(sAMAccountName={name})(userPrincipalName={upn})))")
        attrs = ["sAMAccountName", "memberOf", *(STATE_ATTRS if state else ())]
        self._search(conn, deadline, "user search", dom.base_dn, flt, attributes=attrs,
                     size_limit=3)
        found = [
            _UserEntry(str(r["dn"]), first_value(r["attributes"].get("sAMAccountName")),
                       tuple(str(g) for g in all_values(r["attributes"].get("memberOf"))),
                       dict(r["attributes"]))
            for r in conn.response or [] if r.get("type") == "searchResEntry"]
        exact = [f for f in found if f.sam.casefold() == username.casefold()]
        if len(exact) == 1:
            return exact[0], False
        if len(found) == 1:
            return found[0], False
        return None, len(found) > 1

    def _search(self, conn: Any, deadline: float, what: str, base: str, flt: str,
                **kwargs: Any) -> None:
        self._arm(conn, deadline)
        ok = conn.search(base, flt, SUBTREE, **kwargs)
        result = conn.result or {}
        if not ok and (conn.closed or result.get("type") is None):
            raise _DCFailure(f"closed: {what} got no answer ({conn.last_error or 'connection lost'})")
        self._check(conn, what)

    def _groups(self, session: _Session, dom: _Domain, entry: _UserEntry,
                deadline: float) -> dict[str, str]:
        """The user's groups, nested ones included: normalised DN -> CN.

        Walks memberOf upwards, one search per nesting level for all groups of that level
        (the user's direct groups came with the user search) that the group cache does not
        already know. Same answer as the LDAP_MATCHING_RULE_IN_CHAIN filter
        ``(member:1.2.840.113556.1.4.1941:=DN)``, which Samba answers by expanding every group
        of the domain (~20-40 ms a login against ~2 ms a level here). Groups outside
        ``base_dn`` are followed but not reported, as the IN_CHAIN search under ``base_dn``
        would not return them.
        """
        found: dict[str, str] = {}
        seen: set[str] = set()
        frontier = {normalize_dn(g): g for g in entry.member_of}
        levels = 0
        while frontier:
            levels += 1
            if levels > _MAX_NESTING:
                raise _DCFailure(f"group nesting deeper than {_MAX_NESTING} levels")
            seen.update(frontier)
            facts = self._group_facts(session, dom, frontier, deadline)
            parents: dict[str, str] = {}
            for key, fact in facts.items():
                if fact.cn and (key == dom.base_key or key.endswith("," + dom.base_key)):
                    found[key] = fact.cn
                for p in fact.parents:
                    pk = normalize_dn(p)
                    if pk not in seen:
                        parents[pk] = p
            frontier = parents
        return found

    def _group_facts(self, session: _Session, dom: _Domain, groups: dict[str, str],
                     deadline: float) -> dict[str, GroupFacts]:
        """CN and parents of each group (normalised DN -> DN), from the cache or one search per
        ``_DN_CHUNK`` groups; a DN the search does not return is remembered as no group."""
        facts: dict[str, GroupFacts] = {}
        todo: list[tuple[str, str]] = []  # (normalised DN, DN) not in the cache
        for key, dn in groups.items():
            cached = self._group_cache.get(dom.fqdn, key)
            if cached is None:
                todo.append((key, dn))
            else:
                facts[key] = cached
        for i in range(0, len(todo), _DN_CHUNK):
            chunk = todo[i:i + _DN_CHUNK]
            flt = "(&(objectClass=group)(|" + "".join(
                f"(distinguishedName={escape_filter_chars(dn)})" for _, dn in chunk) + "))"

            def search(c: Any, flt: str = flt) -> list[dict[str, Any]]:
                self._search(c, deadline, "group search", dom.domain_dn, flt,
                             attributes=["cn", "memberOf"])
                return [r for r in c.response or [] if r.get("type") == "searchResEntry"]

            answered: dict[str, GroupFacts] = {}
            for r in session.run("svc", search):
                answered[normalize_dn(str(r["dn"]))] = GroupFacts(
                    first_value(r["attributes"].get("cn")),
                    tuple(str(p) for p in all_values(r["attributes"].get("memberOf"))))
            for key, _ in chunk:
                fact = answered.get(key, _NO_GROUP)
                self._group_cache.put(dom.fqdn, key, fact)
                facts[key] = fact
        return facts

    def _authorise(self, session: _Session, dom: _Domain, entry: _UserEntry, deadline: float,
                   ok_reason: str) -> AuthOutcome:
        groups_by_dn = self._groups(session, dom, entry, deadline)
        dns = set(groups_by_dn)
        cns = {cn.casefold(): cn for cn in groups_by_dn.values()}
        if not group_matches(dom.required, dns, set(cns)):
            return AuthOutcome(None, "not in a required group")
        # A group whose CN looks like a role marker must not grant the role.
        groups = {cn for cn in cns.values() if not cn.casefold().startswith(ROLE_PREFIX)}
        if group_matches(dom.approvers, dns, set(cns)):
            groups.add(f"{ROLE_PREFIX}approver")
        if group_matches(dom.auditors, dns, set(cns)):
            groups.add(f"{ROLE_PREFIX}auditor")
        return AuthOutcome(Principal(dom.fqdn, entry.sam, frozenset(groups)), ok_reason)

    @staticmethod
    def _check(conn: Any, what: str) -> None:
        result = conn.result or {}
        code = int(result.get("result", -1))
        if code not in (0, 4):  # 4: sizeLimitExceeded still returns the entries
            raise _DCFailure(f"{what} failed: {result.get('description')} {result.get('message', '')}"
                             .strip()[:200])


class _BindRefused(Exception):
    """The DC answered the bind with a definite no; the message is the audit reason."""


def _quiet_unbind(conn: Any) -> None:
    # closing a dead socket has nothing useful to report
    with contextlib.suppress(Exception):
        conn.unbind()


def _release(loop: asyncio.AbstractEventLoop, sem: asyncio.Semaphore) -> None:
    with contextlib.suppress(RuntimeError):  # loop closed: nobody waits on it any more
        loop.call_soon_threadsafe(sem.release)


__all__ = [
    "AD_BIND_CODES", "ADDirectory", "ADDomain", "ADSettings", "DCAddress", "group_matches",
    "normalize_dn", "parse_ad_bind_error", "parse_server_uri", "password_problem", "split_login",
    "username_problem",
]
