"""Active Directory behind the ``Directory`` port, over LDAPS or StartTLS with validated certificates.

One login runs in a worker thread (the event loop never waits on a socket), under a semaphore and
one deadline:

1. a service-account connection finds the user by sAMAccountName or UPN (filter values escaped);
2. a second connection binds as the user's DN with the password. An unknown user binds a dummy DN
   instead, so it costs the same round trips as a wrong password and looks the same outside;
3. the service connection lists the user's groups, nested ones included (IN_CHAIN matching rule);
   the user must be in at least one required group.

DCs of a domain are tried in order (or round robin); a DC that fails (refused, silent, bad
certificate) is tried last for ``dc_retry_seconds``, so a dead DC costs one timeout, not one per
login, and comes back by itself. ldap3's ServerPool is not used: its liveness check is a bare TCP
connect (a hung DC passes it), ``active=True`` retries forever with 10 s sleeps, and its state
lives per connection, so it would not remember a dead DC between logins.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import re
import secrets
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import structlog
from ldap3 import (  # type: ignore[import-untyped]
    NONE,
    SIMPLE,
    SUBTREE,
    Connection,
    Server,
    Tls,
)
from ldap3.core.exceptions import LDAPException  # type: ignore[import-untyped]
from ldap3.utils.conv import escape_filter_chars  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from broker.domain.models import Principal
from broker.errors import ConfigError
from broker.ports import AuthOutcome

log = structlog.get_logger("broker.identity.ad")

IN_CHAIN = "1.2.840.113556.1.4.1941"  # LDAP_MATCHING_RULE_IN_CHAIN: nested group membership
ROLE_PREFIX = "role:"
MAX_USERNAME = 256

# AD's "data" code in a result-49 bind message -> reason for the audit log.
AD_BIND_CODES: dict[str, str] = {
    "52e": "bad password",
    "525": "no such user",
    "530": "logon time restriction",
    "531": "workstation restriction",
    "532": "password expired",
    "533": "account disabled",
    "701": "account expired",
    "773": "must change password",
    "775": "account locked out",
}
_DATA_RE = re.compile(r"\bdata\s+([0-9a-fA-F]{3,8})\b")
# Characters AD forbids in sAMAccountName, plus the backslash that separates DOMAIN\user.
_BAD_NAME_CHARS = frozenset('"/\\[]:;|=,+*?<>\x00')
# Result codes that say "this DC cannot serve now", so the next DC is worth trying.
_DC_TROUBLE = {1: "operationsError", 3: "timeLimitExceeded", 51: "busy", 52: "unavailable",
               53: "unwillingToPerform", 80: "other"}


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit-tested without a DC)


def parse_ad_bind_error(message: str | None) -> str:
    """The reason behind AD's result-49 message (``... AcceptSecurityContext error, data 52e, ...``).

    All AD bind failures share result 49; only the "data" code tells a locked account from a typo.
    """
    m = _DATA_RE.search(message or "")
    if not m:
        return "invalid credentials"
    code = m.group(1).lower().lstrip("0") or "0"
    return AD_BIND_CODES.get(code, f"invalid credentials (AD code {code})")


def username_problem(username: str) -> str | None:
    """Why ``username`` cannot be a sAMAccountName (or UPN prefix); None if it can be looked up."""
    if not username or not username.strip():
        return "empty user name"
    if len(username) > MAX_USERNAME:
        return "user name too long"
    if any(c in _BAD_NAME_CHARS or ord(c) < 32 or c == "\x7f" for c in username):
        return "invalid character in user name"
    if username != username.strip():
        return "invalid user name (surrounding spaces)"
    return None


def password_problem(password: str) -> str | None:
    """Why ``password`` must never reach a bind: an empty one is an anonymous bind (RFC 4513)."""
    if not password or not password.strip():
        return "empty password"
    if "\x00" in password:
        return "invalid password (NUL)"
    return None


def split_login(name: str) -> tuple[str, str | None]:
    """``CORP\\alice`` -> (alice, CORP); ``alice@corp.example.test`` -> (alice, corp.example.test).

    For callers that did not split the SSH user name already (``domain`` None).
    """
    if "\\" in name:
        dom, _, user = name.partition("\\")
        return user, dom
    if "@" in name:
        user, _, dom = name.rpartition("@")
        return user, dom
    return name, None


def normalize_dn(dn: str) -> str:
    """Casefolded DN without spaces around separators, for comparing configured and AD group DNs."""
    parts = [p.strip() for p in re.split(r"(?<!\\),", dn)]
    out = []
    for p in parts:
        k, _, v = p.partition("=")
        out.append(f"{k.strip()}={v.strip()}")
    return ",".join(out).casefold()


def group_matches(configured: list[str], group_dns: set[str], group_cns: set[str]) -> bool:
    """Whether any configured group (a DN, or a bare CN) is among the user's groups."""
    for g in configured:
        if "=" in g:
            if normalize_dn(g) in group_dns:
                return True
        elif g.casefold() in group_cns:
            return True
    return False


@dataclass(frozen=True, slots=True)
class DCAddress:
    """One domain controller: ``ldaps://host:636`` (TLS from the start) or ``ldap://`` + StartTLS."""

    uri: str
    host: str
    port: int
    ldaps: bool


def parse_server_uri(uri: str) -> DCAddress:
    """Parse and check a DC URI; only ldaps:// and ldap:// (which then always uses StartTLS)."""
    try:
        parts = urlsplit(uri.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid server URI '{uri}': {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ldaps", "ldap"):
        raise ValueError(f"server URI '{uri}' must start with ldaps:// or ldap:// (StartTLS)")
    if not parts.hostname:
        raise ValueError(f"server URI '{uri}' has no host")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"server URI '{uri}' must be scheme://host[:port] only")
    ldaps = scheme == "ldaps"
    return DCAddress(uri.strip(), parts.hostname, port or (636 if ldaps else 389), ldaps)


# ---------------------------------------------------------------------------------------------
# Settings


class ADDomain(BaseModel):
    """One trusted AD domain and how to reach it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fqdn: str = Field(min_length=1, max_length=255)
    netbios: str = Field(min_length=1, max_length=15)
    servers: list[str] = Field(min_length=1)
    strategy: Literal["first", "round_robin"] = "first"
    base_dn: str = Field(min_length=1)
    bind_user: str = Field(min_length=1)
    bind_password: SecretStr | None = None
    bind_password_file: Path | None = None
    ca_file: Path
    required_groups: list[str] = Field(min_length=1)
    approver_groups: list[str] = Field(default_factory=list)
    auditor_groups: list[str] = Field(default_factory=list)

    @field_validator("fqdn")
    @classmethod
    def _fqdn(cls, v: str) -> str:
        v = v.strip().rstrip(".")
        if not re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+", v):
            raise ValueError("must be a DNS domain name like corp.example.com")
        return v

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: list[str]) -> list[str]:
        for uri in v:
            parse_server_uri(uri)
        return v

    @model_validator(mode="after")
    def _one_password(self) -> ADDomain:
        if (self.bind_password is None) == (self.bind_password_file is None):
            raise ValueError("set exactly one of bind_password or bind_password_file")
        return self


class ADSettings(BaseModel):
    """``[identity.ad]``: the trusted domains plus limits shared by all of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domains: list[ADDomain] = Field(min_length=1)
    default_domain: str | None = None  # FQDN or NetBIOS name; None: the first domain
    # Per DC: TCP connect, TLS handshake and each LDAP answer. A DC silent this long is skipped.
    connect_timeout_seconds: float = Field(5.0, gt=0, le=120)
    # The whole login (queueing, every DC tried); past it the login fails closed.
    operation_timeout_seconds: float = Field(10.0, gt=0, le=600)
    max_concurrency: int = Field(16, ge=1, le=512)
    # How long a failed DC is tried only after the others.
    dc_retry_seconds: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> ADSettings:
        names: set[str] = set()
        for d in self.domains:
            for n in (d.fqdn.casefold(), d.netbios.casefold()):
                if n in names:
                    raise ValueError(f"domain name '{n}' is configured twice")
                names.add(n)
        if self.default_domain is not None and self.default_domain.casefold() not in names:
            raise ValueError(f"default_domain '{self.default_domain}' is not a configured domain")
        return self


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
    """Running mean of how long a wrong password takes, so "unknown user" can take as long.

    A DC answers a bind for a missing DN faster than a wrong password for a real account (which
    writes badPwdCount): ~45 ms against ~140 ms on Samba, a clean user-enumeration oracle. The
    dummy bind alone does not close it, so unknown users are padded to this mean.
    """

    def __init__(self) -> None:
        self._mean: float | None = None
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        with self._lock:
            self._mean = seconds if self._mean is None else 0.8 * self._mean + 0.2 * seconds

    def pad(self, seconds: float) -> float:
        """How long to wait so an answer that took ``seconds`` matches a wrong password."""
        with self._lock:
            mean = self._mean
        return 0.0 if mean is None else max(0.0, mean - seconds)


class ADDirectory:
    """``Directory`` over one or more Active Directory domains (see the module docstring)."""

    def __init__(self, settings: ADSettings) -> None:
        self._s = settings
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
            )
            self._domains[d.fqdn.casefold()] = dom
            self._names[d.fqdn.casefold()] = d.fqdn.casefold()
            self._names[d.netbios.casefold()] = d.fqdn.casefold()
        default = settings.default_domain or settings.domains[0].fqdn
        self._default = self._domains[self._names[default.casefold()]]
        self._health = _DCHealth(settings.dc_retry_seconds)
        self._fail_cost = {fqdn: _FailureCost() for fqdn in self._domains}
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="bb-ad")
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None
        # Unknown users bind the dummy DN with a random password, never with what they typed.
        self._dummy_password = secrets.token_urlsafe(24).encode()

    def close(self) -> None:
        """Stop the worker threads; logins still running finish on their own timeouts."""
        self._executor.shutdown(wait=False, cancel_futures=True)

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

    async def _authenticate(self, username: str, domain: str | None, password: str) -> AuthOutcome:
        if domain is None:
            username, domain = split_login(username)
        problem = username_problem(username) or password_problem(password)
        if problem:
            return AuthOutcome(None, problem)
        fqdn = self.canonical_domain(domain)
        if fqdn is None:
            return AuthOutcome(None, "untrusted domain")
        dom = self._domains[fqdn.casefold()]
        budget = self._s.operation_timeout_seconds
        deadline = time.monotonic() + budget
        started = time.monotonic()
        outcome = await self._run(dom, username, password, deadline, budget)
        took = time.monotonic() - started
        cost = self._fail_cost[fqdn.casefold()]
        if outcome.reason == AD_BIND_CODES["52e"]:
            cost.record(took)
        elif outcome.reason in ("unknown user", "ambiguous user name"):
            await asyncio.sleep(min(cost.pad(took), max(0.0, deadline - time.monotonic())))
        return outcome

    async def _run(self, dom: _Domain, username: str, password: str, deadline: float,
                   budget: float) -> AuthOutcome:
        loop = asyncio.get_running_loop()
        sem = self._semaphore(loop)
        try:
            async with asyncio.timeout(budget):
                await sem.acquire()
                try:
                    fut = self._executor.submit(self._login, dom, username, password, deadline)
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

    def _login(self, dom: _Domain, username: str, password: str, deadline: float) -> AuthOutcome:
        failures: list[str] = []
        for dc in self._health.order(dom.dcs, dom.round_robin):
            if time.monotonic() >= deadline:
                break
            try:
                outcome = self._attempt(dom, dc, username, password, deadline)
            except _DCFailure as exc:
                self._health.mark(dc.uri, ok=False)
                log.warning("ad_dc_failed", dc=dc.uri, error=str(exc))
                failures.append(f"{dc.uri}: {exc}")
                continue
            self._health.mark(dc.uri, ok=True)
            return outcome
        detail = "; ".join(failures) or "login deadline passed"
        return AuthOutcome(None, f"directory unavailable: {detail}")

    def _attempt(
        self, dom: _Domain, dc: DCAddress, username: str, password: str, deadline: float,
    ) -> AuthOutcome:
        try:
            svc = self._connect(dom, dc, dom.bind_user, dom.bind_password, deadline)
        except _BindRefused as exc:
            return AuthOutcome(None, f"directory unavailable: service account bind refused ({exc})")
        try:
            entry, ambiguous = self._find_user(svc, dom, username, deadline)
            dn = entry[0] if entry else dom.dummy_dn
            pw = password.encode() if entry else self._dummy_password
            try:
                self._connect(dom, dc, dn, pw, deadline).unbind()
                bound, reason = True, ""
            except _BindRefused as exc:
                bound, reason = False, str(exc)
            if ambiguous:
                return AuthOutcome(None, "ambiguous user name")
            if entry is None:
                return AuthOutcome(None, "unknown user")
            if not bound:
                return AuthOutcome(None, reason)
            return self._authorise(svc, dom, entry, deadline)
        except (LDAPException, OSError) as exc:
            raise _DCFailure(f"search: {_short(exc)}") from None
        finally:
            _quiet_unbind(svc)

    def _connect(self, dom: _Domain, dc: DCAddress, user: str, password: bytes,
                 deadline: float) -> Any:
        """An open, TLS-protected connection bound as ``user``; _BindRefused on a bind "no"."""
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
            self._arm(conn, deadline)
            stage = "bind"
            if conn.bind(read_server_info=False):
                return conn
            result = conn.result or {}
            code = int(result.get("result", -1))
            if code in _DC_TROUBLE:
                raise _DCFailure(f"bind answered {_DC_TROUBLE[code]}")
            if code == 49:
                raise _BindRefused(parse_ad_bind_error(result.get("message")))
            raise _BindRefused(f"bind refused: {result.get('description')}")
        except (LDAPException, OSError) as exc:
            _quiet_unbind(conn)
            raise _DCFailure(f"{stage}: {_short(exc)}") from None
        except BaseException:
            _quiet_unbind(conn)
            raise

    def _timeout(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _DCFailure("login deadline passed")
        return min(self._s.connect_timeout_seconds, left)

    def _arm(self, conn: Any, deadline: float) -> None:
        """Bound the next answer by the per-DC timeout and by what is left of the login's budget."""
        conn.socket.settimeout(self._timeout(deadline))

    def _find_user(self, conn: Any, dom: _Domain, username: str,
                   deadline: float) -> tuple[tuple[str, str] | None, bool]:
        """(DN, sAMAccountName) of the user, or None; and whether the name was ambiguous."""
        name = escape_filter_chars(username)
        upn = escape_filter_chars(f"{username}@{dom.fqdn}")
        flt = (f"(&(objectCategory=person)(objectClass=user)"
               f"(|(sAMAccountName={name})(userPrincipalName={upn})))")
        self._arm(conn, deadline)
        conn.search(dom.base_dn, flt, SUBTREE, attributes=["sAMAccountName"], size_limit=3)
        self._check(conn, "user search")
        found = [(str(r["dn"]), _first(r["attributes"].get("sAMAccountName")))
                 for r in conn.response or [] if r.get("type") == "searchResEntry"]
        exact = [f for f in found if f[1].casefold() == username.casefold()]
        if len(exact) == 1:
            return exact[0], False
        if len(found) == 1:
            return found[0], False
        return None, len(found) > 1

    def _authorise(self, conn: Any, dom: _Domain, entry: tuple[str, str],
                   deadline: float) -> AuthOutcome:
        dn, sam = entry
        flt = f"(&(objectClass=group)(member:{IN_CHAIN}:={escape_filter_chars(dn)}))"
        dns: set[str] = set()
        cns: dict[str, str] = {}
        cookie: Any = None
        while True:
            self._arm(conn, deadline)
            conn.search(dom.base_dn, flt, SUBTREE, attributes=["cn"], paged_size=500,
                        paged_cookie=cookie)
            self._check(conn, "group search")
            for r in conn.response or []:
                if r.get("type") != "searchResEntry":
                    continue
                dns.add(normalize_dn(str(r["dn"])))
                cn = _first(r["attributes"].get("cn"))
                if cn:
                    cns[cn.casefold()] = cn
            ctrl = (conn.result.get("controls") or {}).get("1.2.840.113556.1.4.319") or {}
            cookie = (ctrl.get("value") or {}).get("cookie")
            if not cookie:
                break
        if not group_matches(dom.required, dns, set(cns)):
            return AuthOutcome(None, "not in a required group")
        # A group whose CN looks like a role marker must not grant the role.
        groups = {cn for cn in cns.values() if not cn.casefold().startswith(ROLE_PREFIX)}
        if group_matches(dom.approvers, dns, set(cns)):
            groups.add(f"{ROLE_PREFIX}approver")
        if group_matches(dom.auditors, dns, set(cns)):
            groups.add(f"{ROLE_PREFIX}auditor")
        return AuthOutcome(Principal(dom.fqdn, sam, frozenset(groups)), "password ok")

    @staticmethod
    def _check(conn: Any, what: str) -> None:
        result = conn.result or {}
        code = int(result.get("result", -1))
        if code not in (0, 4):  # 4: sizeLimitExceeded still returns the entries
            raise _DCFailure(f"{what} failed: {result.get('description')} {result.get('message', '')}"
                             .strip()[:200])


def _first(value: Any) -> str:
    """ldap3 without schema info returns every attribute as a list."""
    if isinstance(value, list | tuple):
        value = value[0] if value else ""
    return str(value or "")


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
