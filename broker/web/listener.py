"""Limits on the API's listener that aiohttp does not have: a time limit for each request's
header and body, and caps on connections at once, overall and per source address.

aiohttp waits for a request header without limit (300 connections that send half a header stay
open for ever) and keeps an idle keep-alive connection for an hour. ``GuardedListener`` wraps the
protocol factory of aiohttp's server (``web.AppRunner.server``): every connection gets a
``_Guarded`` protocol that counts it, watches the bytes on their way to aiohttp's own protocol
(only to find where a header and a body end, never changing them) and closes the connection when
the header has not ended ``header_timeout_seconds`` after its first byte (or after connecting),
or the body ``body_timeout_seconds`` after its header. Idle keep-alive connections are aiohttp's
``keepalive_timeout`` (``[web] keepalive_timeout_seconds``).

Over ``max_connections_per_source`` a new connection is answered ``503`` and closed (not from
one of ``[web] trusted_proxies``, which carry many clients' connections); at
``max_connections`` it takes the place of the stalest connection still waiting for a header (a
flood of half headers cannot keep a real request out), or, when every connection is inside a
request, is answered ``503``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable

import structlog

from broker.config import WebSettings
from broker.domain.proxyproto import is_trusted, networks

log = structlog.get_logger("broker.web")

BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 20\r\n"
        b"Connection: close\r\n\r\ntoo many connections")
_MAX_HEAD = 64 * 1024  # past this aiohttp has refused the header (max_line_size, max_field_size)
_LENGTH = re.compile(rb"\r?\ncontent-length[ \t]*:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r?\ntransfer-encoding[ \t]*:[^\r\n]*chunked", re.IGNORECASE)
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class GuardedListener:
    """The protocol factory for ``loop.create_server``: aiohttp's, with the limits above."""

    def __init__(self, settings: WebSettings,
                 factory: Callable[[], asyncio.Protocol]) -> None:
        self.settings = settings
        self._factory = factory
        self.open: dict[_Guarded, None] = {}  # oldest first
        self.per_source: dict[str, int] = {}
        self.refused = 0
        self.timed_out = 0

    def __call__(self) -> _Guarded:
        return _Guarded(self)

    def admit(self, conn: _Guarded) -> bool:
        s = self.settings
        # a trusted reverse proxy carries every client's connections: only max_connections
        # holds it (its clients' addresses are known per request, X-Forwarded-For, not here)
        if (self.per_source.get(conn.ip, 0) >= s.max_connections_per_source
                and not is_trusted(conn.ip, networks(tuple(s.trusted_proxies)))):
            log.info("web.connection_refused", peer=conn.ip, reason="max_connections_per_source")
            return False
        if len(self.open) >= s.max_connections:
            victim = next((c for c in self.open if c.state == "head"), None)
            if victim is None:
                log.info("web.connection_refused", peer=conn.ip, reason="max_connections")
                return False
            victim.drop("replaced by a newer connection at max_connections")
        self.open[conn] = None
        self.per_source[conn.ip] = self.per_source.get(conn.ip, 0) + 1
        return True

    def leave(self, conn: _Guarded) -> None:
        if self.open.pop(conn, "gone") is None:
            left = self.per_source.get(conn.ip, 0) - 1
            if left > 0:
                self.per_source[conn.ip] = left
            else:
                self.per_source.pop(conn.ip, None)

    def inner(self) -> asyncio.Protocol:
        return self._factory()


class _Guarded(asyncio.Protocol):
    """One connection: counted, timed, and passed through to aiohttp's protocol."""

    def __init__(self, listener: GuardedListener) -> None:
        self._listener = listener
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.ip = "?"
        # "head": waiting for (the rest of) a request header; "body": for its body;
        # "handled": the request is aiohttp's (then idle keep-alive) until the next byte
        self.state = "head"
        self._head = bytearray()
        self._left = 0  # body bytes still to come (Content-Length)
        self._chunked_tail = b""  # the last bytes of a chunked body, to find its end

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else "?"
        if not self._listener.admit(self):
            self._listener.refused += 1
            self.state = "refused"
            with contextlib.suppress(OSError, RuntimeError):
                transport.write(BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        self._arm(self._listener.settings.header_timeout_seconds, "header")
        self._inner = self._listener.inner()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return  # refused or dropped: nothing reaches aiohttp
        self._watch(data)
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._listener.leave(self)
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- limits ------------------------------------------------------------------------------
    def drop(self, reason: str) -> None:
        """Close at once (a timeout, or a newer connection takes this one's place)."""
        self._cancel()
        self._listener.leave(self)  # its place is free now, not when asyncio reports the close
        log.info("web.connection_dropped", peer=self.ip, reason=reason, state=self.state)
        if self._transport is not None:
            self._transport.abort()

    def _arm(self, seconds: float, what: str) -> None:
        self._cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(seconds, self._expired, what)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, what: str) -> None:
        self._timer = None
        self._listener.timed_out += 1
        self.drop(f"no complete request {what} in time")

    def _watch(self, data: bytes) -> None:
        """Follow request boundaries in ``data`` (pipelined requests too)."""
        view = memoryview(data)
        s = self._listener.settings
        while len(view):
            if self.state == "handled":
                self.state = "head"
                self._arm(s.header_timeout_seconds, "header")
            if self.state == "head":
                start = max(0, len(self._head) - 3)  # an end split across reads
                self._head += view
                m = _HEAD_END.search(self._head, start)
                if m is None:
                    if len(self._head) > _MAX_HEAD:
                        self._head.clear()  # aiohttp answers 400 and closes; keep the timer
                    return
                head = bytes(self._head[:m.end()])
                view = view[len(view) - (len(self._head) - m.end()):]
                self._head.clear()
                length = _LENGTH.search(head)
                if _CHUNKED.search(head):
                    self.state, self._chunked_tail = "chunked", b"\r\n"
                    self._arm(s.body_timeout_seconds, "body")
                elif length is not None and int(length.group(1)) > 0:
                    self.state, self._left = "body", int(length.group(1))
                    self._arm(s.body_timeout_seconds, "body")
                else:
                    self._done()
            elif self.state == "body":
                n = min(self._left, len(view))
                self._left -= n
                view = view[n:]
                if self._left == 0:
                    self._done()
            elif self.state == "chunked":  # ends with a last chunk of size 0 (no trailers)
                seen = self._chunked_tail + bytes(view)
                end = seen.find(b"\r\n0\r\n\r\n")
                if end < 0:
                    self._chunked_tail = seen[-6:]
                    return
                view = view[end + 7 - len(self._chunked_tail):]
                self._done()
            else:
                return

    def _done(self) -> None:
        self.state = "handled"
        self._cancel()

