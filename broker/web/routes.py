"""The route table's types: who calls (``Caller``) and one endpoint (``Route``), shared by the
router (``api``) and the OpenAPI document (``openapi``), so neither imports the other."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from broker.domain.workflow import Actor


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: a browser/CLI session or an API token."""

    actor: Actor
    username: str
    domain: str
    groups: frozenset[str]
    via: str  # "session" or "token"
    scopes: frozenset[str]
    sid: str = ""
    csrf: str = ""
    exp: float = 0.0
    token_id: str = ""


Handler = Callable[[web.Request, Caller | None], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: router entry and OpenAPI operation at once."""

    method: str
    path: str
    handler: Handler
    summary: str
    auth: str  # "public", "session" (cookie only) or "any" (cookie or token)
    scopes: tuple[str, ...] = ()  # a token needs one of these
    body: str | None = None  # name of a schema in the OpenAPI components
    query: tuple[tuple[str, str], ...] = ()  # (name, description)
    responses: tuple[int, ...] = (200,)
    ok_schema: str | None = None
    self_token: bool = False  # "session" route a token may call on itself ({token_id})
