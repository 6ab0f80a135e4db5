"""``GET /api/bastions``: the bastions sharing the store, as their heartbeats say (auditors and
admins; the same rows as ``bastion-broker bastions --json``), for the console's dashboard."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from broker.domain.workflow import Role
from broker.services.fleet import FleetWatch, bastion_json
from broker.web import schema as S
from broker.web.routes import Caller, Route


class FleetApi:
    def __init__(self, watch: FleetWatch, now: Callable[[], datetime]) -> None:
        self.watch = watch
        self._now = now

    async def bastions(self, request: web.Request, caller: Caller | None) -> web.StreamResponse:
        assert caller is not None  # noqa: S101 - wrap() guarantees it
        if not (caller.actor.has(Role.AUDITOR) or caller.actor.has(Role.ADMIN)):
            raise S.ApiError(403, "forbidden", "the fleet's state needs the auditor or admin "
                             "role")
        for k in request.query:
            raise S.invalid(k, "unknown query parameter")
        found = await self.watch.listing()
        now = self._now()
        return web.json_response([bastion_json(b, state, now, self.watch.name)
                                  for b, state in found])


def fleet_routes(api: FleetApi) -> list[Route]:
    return [Route("GET", "/api/bastions", api.bastions,
                  "The bastions sharing this store: last heartbeat, alive/late/lost, open "
                  "sessions; auditors and admins", "session", responses=(200, 400, 401, 403),
                  ok_schema="BastionList")]


_TIME = {"type": "string", "format": "date-time"}
SCHEMAS: dict[str, Any] = {
    "Bastion": {"type": "object", "properties": {
        "name": {"type": "string", "description": "its node_name"},
        "state": {"enum": ["alive", "late", "lost"],
                  "description": "late: two heartbeats missed; lost: silent past "
                                 "[fleet] lost_after_seconds (its open sessions are closed)"},
        "seen_at": _TIME, "silent_s": {"type": "number"}, "started_at": _TIME,
        "live_sessions": {"type": "integer", "description": "session rows open on it"},
        "this": {"type": "boolean", "description": "the bastion answering"}}},
    "BastionList": {"type": "array", "items": {"$ref": "#/components/schemas/Bastion"}},
}
