"""The notification delivery log over HTTP: ``GET /api/notify/deliveries`` (admins), the route
for the router and its OpenAPI components (``api``, ``openapi``).

The same rows as ``bastion-broker notify deliveries``: event, channel, status, attempts, the
receiver's last answer or error, never a body, URL or secret.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker.domain.notify import STATUSES, delivery_json
from broker.domain.workflow import Role
from broker.services.notify import Dispatcher
from broker.web import schema as S
from broker.web.routes import Caller, Route

MAX_LIMIT = 1000


class NotifyApi:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    async def deliveries(self, request: web.Request, caller: Caller | None
                         ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101 - wrap() guarantees it
        if not caller.actor.has(Role.ADMIN):
            raise S.ApiError(403, "forbidden", "the delivery log needs the admin role")
        for k in request.query:
            if k not in ("status", "limit"):
                raise S.invalid(k, "unknown query parameter")
        status = request.query.get("status")
        if status is not None and status not in STATUSES:
            raise S.invalid("status", "must be one of " + ", ".join(STATUSES))
        text = request.query.get("limit", "100")
        if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
            raise S.invalid("limit", f"must be 1 to {MAX_LIMIT}")
        rows = await self.dispatcher.deliveries(status, int(text))
        return web.json_response([delivery_json(d) for d in rows])


def notify_routes(api: NotifyApi) -> list[Route]:
    return [Route("GET", "/api/notify/deliveries", api.deliveries,
                  "The notification delivery log, newest first: event, channel, status, "
                  "attempts, the receiver's last answer; admins", "session",
                  query=(("status", "pending, sent or failed"),
                         ("limit", f"at most this many (1-{MAX_LIMIT}, default 100)")),
                  responses=(200, 400, 401, 403), ok_schema="DeliveryList")]


_TIME = {"type": "string", "format": "date-time"}
_NULL_TIME = {"oneOf": [_TIME, {"type": "null"}]}
SCHEMAS: dict[str, Any] = {
    "Delivery": {"type": "object", "properties": {
        "id": {"type": "string", "description": "sent as X-Bastion-Delivery"},
        "event_id": {"type": "string"}, "event": {"type": "string"},
        "channel": {"type": "string"}, "status": {"enum": list(STATUSES)},
        "attempts": {"type": "integer"}, "created_at": _TIME, "updated_at": _TIME,
        "next_attempt_at": _NULL_TIME, "sent_at": _NULL_TIME,
        "last_status": {"type": ["integer", "null"],
                        "description": "the receiver's last HTTP status"},
        "last_error": {"type": ["string", "null"]}, "summary": {"type": "string"}}},
    "DeliveryList": {"type": "array", "items": {"$ref": "#/components/schemas/Delivery"}},
}
