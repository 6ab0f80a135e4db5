"""A webhook channel: the delivery rendered (``json``, ``slack`` or ``teams``), signed and POSTed.

Headers: ``X-Bastion-Event``, ``X-Bastion-Delivery`` (the same on every retry of one delivery,
so a receiver drops repeats), ``X-Bastion-Timestamp`` (Unix seconds) and, with a secret,
``X-Bastion-Signature: sha256=HEX`` over ``TIMESTAMP.BODY`` (``broker.domain.notify.sign``).
Redirects are not followed (a signed body goes only where it was configured to). The URL is not
logged and not put in an error: a Slack or Teams URL is a secret by itself.
"""

from __future__ import annotations

import time

import aiohttp

from broker import __version__
from broker.domain.notify import Attempt, Delivery, http_attempt, render_webhook, sign

MAX_ANSWER = 64 * 1024  # bytes of a receiver's answer read (and dropped)


class WebhookSender:
    def __init__(self, name: str, url: str, secret: bytes | None, fmt: str,
                 session: ClientSessions, timeout: float) -> None:
        self.name = name
        self._url = url
        self._secret = secret
        self._fmt = fmt
        self._sessions = session
        self._timeout = timeout

    def __repr__(self) -> str:  # never the URL or the secret
        return f"WebhookSender({self.name!r}, format={self._fmt!r})"

    async def send(self, delivery: Delivery) -> Attempt:
        body = render_webhook(self._fmt, delivery.event_json(), delivery.id)
        ts = int(time.time())
        headers = {"Content-Type": "application/json",
                   "User-Agent": f"bastion-broker/{__version__}",
                   "X-Bastion-Event": delivery.event, "X-Bastion-Delivery": delivery.id,
                   "X-Bastion-Timestamp": str(ts)}
        if self._secret is not None:
            headers["X-Bastion-Signature"] = sign(self._secret, ts, body)
        try:
            async with self._sessions.get().post(
                    self._url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self._timeout)) as r:
                await r.content.read(MAX_ANSWER)
                return http_attempt(r.status)
        except TimeoutError:
            return Attempt(ok=False, retry=True, error=f"no answer within {self._timeout:g} s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Attempt(ok=False, retry=True, error=_describe(exc, self._url))


def _describe(exc: BaseException, url: str) -> str:
    """The error's kind and text, without the URL (or its path, where a token may be)."""
    text = str(exc).replace(url, "<url>")
    if "/" in url.split("://", 1)[-1]:
        path = "/" + url.split("://", 1)[-1].split("/", 1)[1]
        if len(path) > 1:
            text = text.replace(path, "/<path>")
    return f"{type(exc).__name__}: {text}"[:300]


class ClientSessions:
    """One aiohttp client session per event loop for every webhook (its connection pool),
    made on first use and closed with the dispatcher."""

    def __init__(self, limit: int = 256, per_host: int = 0) -> None:
        self._limit = limit
        self._per_host = per_host
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, limit_per_host=self._per_host),
                cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
