"""Requests aiohttp cannot parse (a header line too long, a NUL in a header value, a URL past the
limit, not HTTP at all) answered with the API's JSON error, in one log line.

aiohttp answers those itself, before any middleware runs: a text/plain 400 and a logged
traceback per request, which lets anyone who can reach the listener fill the log. Every other
error already goes through ``api.error_middleware``.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from broker.domain.sanitize import printable

log = structlog.get_logger("broker.web")


class JsonErrorHandler(RequestHandler):
    """aiohttp's request handler but for ``handle_error`` (same slots: an instance aiohttp's
    server made is given this class, so its constructor and options stay aiohttp's own)."""

    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        return _handle_error(request, status, exc, message)


def _handle_error(request: BaseRequest, status: int, exc: BaseException | None,
                  message: str | None) -> web.StreamResponse:
    if request.writer.output_size > 0:  # part of a response went out: only closing is left
        raise ConnectionError("response already started")
    lines = (message or str(exc or "")).strip().splitlines()
    text = printable(lines[0] if lines else "")
    try:
        reason = HTTPStatus(status).phrase.lower()
    except ValueError:
        reason = "error"
    if status >= 500:
        log.error("web.internal_error", status=status, error=repr(exc)[:300],
                  peer=request.remote)
        detail = None
    else:
        log.info("web.bad_request", status=status, error=text[:200], peer=request.remote)
        detail = {"message": text[:200]}
    resp = web.json_response({"error": reason, "detail": detail}, status=status)
    resp.force_close()
    return resp


def json_errors(factory: Callable[[], RequestHandler]) -> Callable[[], RequestHandler]:
    """``factory`` (aiohttp's server) with each request handler answering protocol errors as
    JSON (``RequestHandler.handle_error`` is the hook aiohttp calls for them)."""

    def make() -> RequestHandler:
        handler = factory()
        if type(handler) is RequestHandler:
            handler.__class__ = JsonErrorHandler
        return handler

    return make
