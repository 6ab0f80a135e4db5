"""What the access-request form offers: the inventory's stacks with their VPCs, and the request
policy (default and longest duration per level, when undecided requests expire, whether admin
access needs two approvers).

The same map ``GrantService`` checks requests against, so the form offers exactly what the API
accepts. Readable by anyone who may request access (a session, or a token with a grants scope):
a requester has to name a stack and its VPC, and the IDs are no secret from them.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from broker.domain.models import Level
from broker.errors import BrokerError
from broker.services.grants import GrantService
from broker.web.routes import Caller, Route
from broker.web.schema import ApiError

log = structlog.get_logger("broker.web")


class InventoryApi:
    def __init__(self, grants: GrantService) -> None:
        self.grants = grants

    async def scopes(self, request: web.Request, caller: Caller | None) -> web.StreamResponse:
        try:
            known = await self.grants.known_scopes()
        except BrokerError as exc:  # an inventory that cannot answer now (AWS down...)
            log.warning("web.inventory_unavailable", error=str(exc)[:300])
            raise ApiError(503, "unavailable", "the inventory cannot answer now; try again "
                           "later") from None
        policy = self.grants.policy
        body: dict[str, Any] = {
            # False: no inventory configured, requests are not checked against one
            "checked": known is not None,
            "stacks": [{"id": s, "vpcs": sorted(v)} for s, v in sorted((known or {}).items())],
            "policy": {
                "default_hours": policy.default_duration.total_seconds() / 3600,
                "max_hours": {lv.value: td.total_seconds() / 3600
                              for lv, td in policy.max_duration.items()},
                "pending_expire_hours": policy.pending_expiry.total_seconds() / 3600,
                "two_approvers_for_admin": policy.two_approvers_for_admin,
            },
        }
        return web.json_response(body)


def inventory_routes(grants: GrantService) -> list[Route]:
    api = InventoryApi(grants)
    return [
        Route("GET", "/api/inventory/scopes", api.scopes,
              "Stacks with their VPCs (what a request may name) and the request policy",
              "any", ("grants:read", "grants:write"), responses=(200, 401, 403, 503),
              ok_schema="InventoryScopes"),
    ]


_HOURS = {"type": "number"}
SCHEMAS: dict[str, Any] = {
    "InventoryScopes": {"type": "object", "properties": {
        "checked": {"type": "boolean", "description": "false: no inventory, requests are not "
                    "checked against one (stacks is then empty)"},
        "stacks": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"},
            "vpcs": {"type": "array", "items": {"type": "string"}}}}},
        "policy": {"type": "object", "properties": {
            "default_hours": {"type": "number"},
            "max_hours": {"type": "object", "properties": {lv.value: _HOURS for lv in Level}},
            "pending_expire_hours": {"type": "number"},
            "two_approvers_for_admin": {"type": "boolean"}}}}},
}
