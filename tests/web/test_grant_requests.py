"""The grant workflow as requesters and approvers meet it through the API: requests checked
against the inventory, undecided requests expiring, history that says what changed, shortening.

Real API server, real GrantService, real SQLite store and audit log; only the clock is fake.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from broker.services.grants import GrantService
from broker.store.sqlite import SqliteGrantStore
from tests.web.conftest import DOMAIN, Env

HOUR = 3600  # [grants] pending_expire_hours = 1 here: logins (10 h) outlive the wait


def _body(**fields: Any) -> dict[str, Any]:
    return {"stacks": ["stack-db"], "vpc": "vpc-0demo", "level": "read-only",
            "ticket": "INC-7", "reason": "disk alarm", **fields}


# -- requests checked against the inventory --------------------------------------------------------
async def test_unknown_stack_or_foreign_vpc_is_a_400_naming_the_field(env: Env) -> None:
    for fields, field, text in (
            ({"stacks": ["stack-nope"]}, "stacks",
             "stacks: unknown stack 'stack-nope': not in the inventory"),
            ({"stacks": ["Stack-DB"]}, "stacks", "did you mean stack-db?"),
            ({"stacks": ["stack-db", "stack-x"]}, "stacks", "unknown stack 'stack-x'"),
            ({"vpc": "vpc-0other"}, "vpc",
             "vpc: vpc-0other is not a VPC of stack stack-db (its VPC: vpc-0demo)")):
        status, err = await env.call("rita", "POST", "/api/grants", _body(**fields))
        assert (status, err["error"], err["detail"]["field"]) == (400, "invalid", field), err
        assert text in err["detail"]["message"]
    assert (await env.call("alan", "GET", "/api/grants?user=rita"))[1] == []  # nothing stored
    assert not [e for e in env.audit() if e["event"].startswith("grant.")]


async def test_edits_and_changes_are_checked_too(env: Env) -> None:
    p = await env.request("rita", stacks=["stack-db"])
    status, err = await env.call("rita", "PATCH", f"/api/grants/{p['id']}",
                                 {"stacks": ["stack-db", "stack-nope"]})
    assert (status, err["detail"]["field"]) == (400, "stacks")
    a = await env.approved("rita")
    status, err = await env.call("rita", "POST", f"/api/grants/{a['id']}/change",
                                 {"vpc": "vpc-0other"})
    assert (status, err["detail"]["field"]) == (400, "vpc")
    status, ok = await env.call("rita", "POST", f"/api/grants/{a['id']}/change",
                                {"stacks": ["stack-web", "stack-db"]})
    assert (status, ok["state"]) == (200, "pending")  # known stacks: widening, to approve again


# -- undecided requests expire -----------------------------------------------------------------------
async def test_a_request_left_pending_expires_and_cannot_be_approved(make_env: Any) -> None:
    async for env in make_env(pending_expire_hours=1):
        await _expires(env)


async def _expires(env: Env) -> None:
    await env.who("alan")  # logged in before the clock starts counting
    p = await env.request("rita")
    q = await env.request("rita", stacks=["stack-web"])
    env.clock.advance(HOUR - 60)
    status, ok = await env.call("alan", "POST", f"/api/grants/{q['id']}/approve", {})
    assert (status, ok["state"]) == (200, "approved")  # a minute before its time: still fine
    env.clock.advance(60)
    status, shown = await env.call("rita", "GET", f"/api/grants/{p['id']}")
    assert (status, shown["state"], shown["active"]) == (200, "expired", False)
    status, err = await env.call("alan", "POST", f"/api/grants/{p['id']}/approve", {})
    assert status == 409
    assert err["detail"]["message"].startswith(f"request {p['id']} expired at ")
    assert err["detail"]["message"].endswith("without a decision: a new request is needed")
    for action, body in (("reject", {"comment": "late"}), ("withdraw", {})):
        who = "alan" if action == "reject" else "rita"
        assert (await env.call(who, "POST", f"/api/grants/{p['id']}/{action}", body))[0] == 409
    ids = lambda rows: {g["id"] for g in rows}  # noqa: E731
    assert ids((await env.call("alan", "GET", "/api/grants?state=pending"))[1]) == set()
    assert p["id"] in ids((await env.call("alan", "GET", "/api/grants?state=expired"))[1])
    # stored and audited once, by whichever sweep comes first
    assert not [e for e in env.audit() if e["event"] == "grant.expired"]
    assert await env.ctx.grants.expire_pending() == 1
    assert await env.ctx.grants.expire_pending() == 0
    expired = [e for e in env.audit() if e["event"] == "grant.expired"]
    assert [(e["grant_id"], e["actor"], e["state"]) for e in expired] == [
        (p["id"], "system", "expired")]
    assert expired[0]["changes"] == {"state": {"before": "pending", "after": "expired"}}
    _, shown = await env.call("rita", "GET", f"/api/grants/{p['id']}")
    assert shown["state"] == "expired"
    assert [(h["action"], h["actor"], h["details"]) for h in shown["history"]][-1] == (
        "expired", "system", {"state": {"before": "pending", "after": "expired"}})


async def test_two_brokers_sweeping_audit_the_expiry_once(env: Env) -> None:
    other = GrantService(SqliteGrantStore(env.db), env.ctx.audit, env.clock,
                         env.ctx.grants.policy)
    ids = [(await env.request("rita"))["id"] for _ in range(3)]
    assert env.ctx.grants.policy.pending_expiry == timedelta(hours=24)  # the default
    env.clock.advance(24 * HOUR)
    counts = await asyncio.gather(env.ctx.grants.expire_pending(), other.expire_pending())
    assert sum(counts) == 3
    assert sorted(e["grant_id"] for e in env.audit() if e["event"] == "grant.expired") == \
        sorted(ids)


async def test_the_wait_restarts_when_a_change_needs_approval_again(make_env: Any) -> None:
    async for env in make_env(pending_expire_hours=1):
        a = await env.approved("rita", hours=4)
        env.clock.advance(45 * 60)
        status, w = await env.call("rita", "POST", f"/api/grants/{a['id']}/change",
                                   {"stacks": ["stack-db", "stack-web"]})
        assert (status, w["state"]) == (200, "pending")
        env.clock.advance(30 * 60)  # 75 min after the request, 30 after the change
        assert await env.ctx.grants.expire_pending() == 0
        status, ok = await env.call("alan", "POST", f"/api/grants/{a['id']}/approve", {})
        assert (status, ok["state"]) == (200, "approved")


async def test_pending_expire_hours_is_configurable_and_swept_by_the_loop(make_env: Any) -> None:
    async for env in make_env(pending_expire_hours=1):
        p = await env.request("rita")
        env.clock.advance(HOUR)
        env.ctx.grants.start()  # the broker's loop: a sweep at once, then every 30 s
        try:
            for _ in range(100):
                if any(e["event"] == "grant.expired" for e in env.audit()):
                    break
                await asyncio.sleep(0.05)
        finally:
            await env.ctx.grants.stop()
        assert [e["grant_id"] for e in env.audit() if e["event"] == "grant.expired"] == [p["id"]]


# -- history says what changed; extend, shorten -------------------------------------------------------
async def test_history_shows_before_and_after_of_every_change(env: Env) -> None:
    a = await env.approved("rita", hours=2)
    end = datetime.fromisoformat(a["expires_at"])
    status, _ = await env.call("alan", "POST", f"/api/grants/{a['id']}/extend", {"hours": 1})
    assert status == 200
    status, _ = await env.call("rita", "POST", f"/api/grants/{a['id']}/change",
                               {"ticket": "INC-8"})
    assert status == 200
    _, shown = await env.call("rita", "GET", f"/api/grants/{a['id']}")
    h = {e["action"]: e["details"] for e in shown["history"]}
    assert h["approved"]["state"] == {"before": "pending", "after": "approved"}
    assert h["approved"]["approved_by"] == {"before": [], "after": [f"alan@{DOMAIN}"]}
    assert h["extended"] == {"expires_at": {
        "before": end.isoformat(), "after": (end + timedelta(hours=1)).isoformat()}}
    assert h["changed"]["ticket"] == {"before": "INC-1", "after": "INC-8"}
    audited = {e["event"]: e for e in env.audit() if e.get("grant_id") == a["id"]}
    assert audited["grant.extended"]["changes"] == h["extended"]
    assert "changes" not in audited["grant.requested"]


async def test_extend_until_earlier_shortens_never_before_now(env: Env) -> None:
    a = await env.approved("rita", hours=8)
    now = env.clock.now()
    until = (now + timedelta(hours=1)).isoformat()
    status, short = await env.call("alan", "POST", f"/api/grants/{a['id']}/extend",
                                   {"until": until, "comment": "incident closed"})
    assert (status, short["state"], short["active"]) == (200, "approved", True)
    assert datetime.fromisoformat(short["expires_at"]) == now + timedelta(hours=1)
    _, shown = await env.call("rita", "GET", f"/api/grants/{a['id']}")
    last = shown["history"][-1]
    assert (last["action"], last["comment"]) == ("changed", "incident closed")
    assert last["details"] == {"expires_at": {"before": a["expires_at"],
                                              "after": short["expires_at"]}}
    assert [e["event"] for e in env.audit() if e.get("grant_id") == a["id"]][-1] == \
        "grant.changed"
    status, err = await env.call("alan", "POST", f"/api/grants/{a['id']}/extend",
                                 {"until": (now - timedelta(minutes=5)).isoformat()})
    assert (status, err["detail"]["field"]) == (400, "until")
    assert "to end access now, revoke the grant" in err["detail"]["message"]


async def test_an_expired_grant_is_not_extended_a_new_request_is_needed(env: Env) -> None:
    a = await env.approved("rita", hours=1)
    env.clock.advance(3601)
    for body in ({"hours": 1}, {"until": (env.clock.now() + timedelta(hours=1)).isoformat()}):
        status, err = await env.call("alan", "POST", f"/api/grants/{a['id']}/extend", body)
        assert status == 409
        assert "cannot be extended: a new request is needed" in err["detail"]["message"]


async def test_active_filter_and_the_active_flag_agree(env: Env) -> None:
    live = await env.approved("rita", hours=1)
    later = await env.approved("rita", starts_at=(env.clock.now() + timedelta(hours=2))
                               .isoformat())
    _, rows = await env.call("alan", "GET", "/api/grants?user=rita&state=active")
    assert [(g["id"], g["state"], g["active"]) for g in rows] == [
        (live["id"], "approved", True)]
    _, rows = await env.call("alan", "GET", "/api/grants?user=rita&state=approved")
    assert {(g["id"], g["active"]) for g in rows} == {(live["id"], True), (later["id"], False)}
