"""``GET /api/inventory/scopes`` (what the console's request form offers) against a real aiohttp
server and the real ``GrantService``: the stacks and VPCs it checks requests against, the request
policy, who may read it, and that it is in the OpenAPI document."""

from __future__ import annotations

from typing import Any

from tests.web.conftest import Env, Who
from tests.web.test_sessions_api import token


async def test_the_form_gets_the_stacks_the_api_checks_and_the_policy(env2: Env) -> None:
    status, body = await env2.call("rita", "GET", "/api/inventory/scopes")
    assert status == 200, body
    assert body["checked"] is True
    by_id = {s["id"]: s["vpcs"] for s in body["stacks"]}
    assert by_id and all(v and v == sorted(v) for v in by_id.values())
    assert [s["id"] for s in body["stacks"]] == sorted(by_id)
    assert body["policy"] == {"default_hours": 8.0,
                              "max_hours": {"admin": 12.0, "read-only": 24.0},
                              "pending_expire_hours": 24.0, "two_approvers_for_admin": True}
    # what it offers is what a request may name: each stack with its VPC is accepted ...
    stack, vpcs = next(iter(by_id.items()))
    g = await env2.request("rita", stacks=[stack], vpc=vpcs[0])
    assert g["state"] == "pending"
    # ... and a VPC it does not list for the stack is refused, naming the field
    status, err = await env2.call("rita", "POST", "/api/grants", {
        "stacks": [stack], "vpc": "vpc-0notlisted", "level": "read-only", "ticket": "T-1",
        "reason": "r"})
    assert (status, err["detail"]["field"]) == (400, "vpc"), err


async def test_who_may_read_the_scopes(env: Env) -> None:
    status, _ = await env.call(Who("nobody", {}), "GET", "/api/inventory/scopes")
    assert status == 401
    reader = await token(env, "rita", ["grants:read"])
    status, body = await env.call(reader, "GET", "/api/inventory/scopes")
    assert status == 200 and body["stacks"], body
    sessions_only = await token(env, "rita", ["sessions:read"])
    status, body = await env.call(sessions_only, "GET", "/api/inventory/scopes")
    assert status == 403, body


async def test_the_route_is_in_the_openapi_document(env: Env) -> None:
    status, doc = await env.call(Who("nobody", {}), "GET", "/api/openapi.json")
    assert status == 200
    op: dict[str, Any] = doc["paths"]["/api/inventory/scopes"]["get"]
    assert op["x-scopes"] == ["grants:read", "grants:write"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InventoryScopes"}
    assert "InventoryScopes" in doc["components"]["schemas"]
