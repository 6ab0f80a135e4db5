"""``GET /api/ssh/known_hosts``: the known_hosts lines an engineer needs before the first
``ssh -J``, without a login and without the bastion's state directory.

Public on purpose: the lines hold only public keys, and the point is to have them before a
TOTP code is spent on a connection that then fails host key verification. The answer is the
bastion's own host key (for the name the engineer reaches it by) and the ``@cert-authority``
line of its host CA for the inventory's Linux names, the same line ``ca known-hosts`` prints.
What it is built from is loaded at most once a ``ttl`` (the inventory may be AWS), never per
request; the listener's connection limits and the API's size limits apply as to every route.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from broker.web.routes import Caller, Route
from broker.web.schema import ApiError, invalid

log = structlog.get_logger("broker.web")

PATH = "/api/ssh/known_hosts"
TEXT_TYPE = "text/plain"
# a literal host (DNS name, IPv4, or [IPv6]) with an optional port: never a pattern, a list or
# anything with spaces, so the one line it names is exactly one known_hosts entry
# (plain groups, no Python-only syntax: the OpenAPI document states it as its pattern)
HOST_RE = re.compile(r"^(?:([A-Za-z0-9][A-Za-z0-9-]{0,62}(?:\.[A-Za-z0-9-]{1,63})*)"
                     r"|\[([0-9A-Fa-f:.]{2,45})\])(?::([0-9]{1,5}))?$")


@dataclass(frozen=True, slots=True)
class SshTrust:
    """What the SSH side publishes: OpenSSH public key lines of its host key and its host CA,
    the target names the CA vouches for (``ssh -J``), and the port SSH listens on."""

    host_key: str
    host_ca: str
    patterns: tuple[str, ...]
    ssh_port: int


TrustLoader = Callable[[], Awaitable[SshTrust]]


def host_entry(name: str, port: int) -> str:
    """How OpenSSH writes a host in known_hosts: bare on port 22, ``[name]:port`` otherwise."""
    return name if port == 22 else f"[{name}]:{port}"


def parse_host(value: str) -> tuple[str, int | None] | None:
    """``name``, ``name:port``, ``[v6]`` or ``[v6]:port`` -> (name, port or None); None if it
    is not one of those."""
    m = HOST_RE.fullmatch(value) if len(value) <= 260 else None  # fullmatch: no "\n" after $
    if m is None:
        return None
    name, v6, digits = m.groups()
    port = int(digits) if digits else None
    if port is not None and not 1 <= port <= 65535:
        return None
    return name or v6, port


class KnownHosts:
    """The route and its cache: one load per ``ttl`` seconds, shared by concurrent requests; a
    load that fails keeps serving the last good answer (the keys rarely change)."""

    def __init__(self, load: TrustLoader, public_url: str | None = None, ttl: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._load = load
        self._public_host = urlsplit(public_url).hostname if public_url else None
        self._ttl = ttl
        self._clock = clock
        self._value: SshTrust | None = None
        self._loaded_at = 0.0
        self._lock: asyncio.Lock | None = None

    def _fresh(self) -> SshTrust | None:
        if self._value is not None and self._clock() - self._loaded_at < self._ttl:
            return self._value
        return None

    async def trust(self) -> SshTrust:
        if (value := self._fresh()) is not None:
            return value
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if (value := self._fresh()) is not None:
                return value  # another request loaded it while this one waited
            try:
                value = await self._load()
            except Exception as exc:  # the inventory (AWS) or a key file: say so, never a 500
                log.error("web.known_hosts_unavailable", error=repr(exc)[:300])
                if self._value is None:
                    raise ApiError(503, "unavailable", "the bastion's keys cannot be read now; "
                                   "try again later") from None
                value = self._value
            # after a failure too (serving the last answer): no reload on every request
            self._value, self._loaded_at = value, self._clock()
            return value

    async def known_hosts(self, request: web.Request, _: Caller | None) -> web.StreamResponse:
        for k in request.query:
            if k != "host":
                raise invalid(k, "unknown query parameter")
        bastion = self._bastion(request)
        trust = await self.trust()
        lines = []
        if bastion is not None:
            name, port = bastion
            lines.append(f"{host_entry(name, port or trust.ssh_port)} {trust.host_key}")
        if trust.patterns:  # never "*": the CA would then vouch for every host there is
            lines.append(f"@cert-authority {','.join(trust.patterns)} {trust.host_ca}")
        return web.Response(text="".join(line + "\n" for line in lines), content_type=TEXT_TYPE,
                            charset="utf-8")

    def _bastion(self, request: web.Request) -> tuple[str, int | None] | None:
        """The bastion as the engineer names it (port None: the SSH port): ``?host=``, else the
        API's public name, else the host this request was sent to (not a plain host: no line)."""
        given = request.query.get("host")
        if given is not None:
            parsed = parse_host(given)
            if parsed is None:
                raise invalid("host", "must be a host name or address with an optional :port "
                                      "([address]:port for IPv6)")
            return parsed
        name = self._public_host
        if name is None:
            try:
                name = request.url.host or ""
            except ValueError:  # a Host header yarl cannot parse
                name = ""
        return parse_host(f"[{name}]" if ":" in name else name)

    def routes(self) -> list[Route]:
        return [Route(
            "GET", PATH, self.known_hosts,
            "known_hosts lines for ssh -J: the bastion's host key and the @cert-authority "
            "line of its host CA for the inventory's Linux names (text/plain)", "public",
            query=(("host", "the bastion as you reach it over SSH, NAME or NAME:PORT (default: "
                            "the API's host name and the SSH port)"),),
            responses=(200, 400, 503), ok_schema="KnownHosts")]
