"""Privileges end when the directory says so: sessions and tokens are bound to a live account.

The directory under the API (a real static directory) changes while cookies and tokens stay:
within ``[web] recheck_seconds`` (60 here) a disabled account is refused and a lost group loses
its role, whatever the signed cookie or the token record says."""

from __future__ import annotations

import pytest

from tests.web.conftest import DOMAIN, Env, Who

pytestmark = pytest.mark.timeout(60)
RECHECK = 60


async def _token(env: Env, who: str, scopes: list[str]) -> tuple[str, Who]:
    status, body = await env.call(who, "POST", "/api/tokens", {"name": "ci", "scopes": scopes})
    assert status == 201, body
    return body["id"], Who(f"{who}-token", {"Authorization": f"Bearer {body['token']}"})


async def _past_recheck(env: Env) -> None:
    env.clock.advance(RECHECK)


async def test_disabled_account_loses_cookie_and_token_after_recheck(env: Env) -> None:
    rita = await env.who("rita")
    _, tok = await _token(env, "rita", ["grants:read", "grants:write"])
    env.directory.disable("rita")
    env.clock.advance(RECHECK - 1)
    assert (await env.call(rita, "GET", "/api/me"))[0] == 200  # the answer is still fresh
    await _past_recheck(env)
    status, body = await env.call(rita, "GET", "/api/me")
    assert status == 401, body
    status, body = await env.call(tok, "GET", "/api/grants")
    assert status == 401, body
    audit = env.audit()
    ended = [e for e in audit if e["event"] == "web.session_ended"]
    assert ended and ended[0]["user"] == f"rita@{DOMAIN}"
    assert ended[0]["reason"] == "account no longer allowed: account disabled"
    assert any(e["event"] == "api_token.refused" and e["user"] == f"rita@{DOMAIN}"
               for e in audit)
    # the session was ended in the store: re-enabling the account does not bring it back
    env.directory.set(env.directory.users)
    await _past_recheck(env)
    assert (await env.call(rita, "GET", "/api/me"))[0] == 401
    assert (await env.call(tok, "GET", "/api/grants"))[0] == 200  # the token follows the owner
    assert await env.ctx.tokens.sessions(f"rita@{DOMAIN}", now=env.clock.now()) == []


async def test_deleted_account_is_refused(env: Env) -> None:
    rita = await env.who("rita")
    env.directory.set({k: v for k, v in env.directory.users.items() if k != "rita"})
    await _past_recheck(env)
    assert (await env.call(rita, "GET", "/api/grants"))[0] == 401


async def test_removed_approver_cannot_approve_but_still_requests(env: Env) -> None:
    alan = await env.who("alan")
    g = await env.request("rita")
    mine = await env.request("alan")  # read-only: an approver may approve his own
    status, me = await env.call(alan, "GET", "/api/me")
    assert me["roles"] == ["approver", "requester"]
    env.directory.move("alan", ["dev"])  # out of the approver group, still enabled
    await _past_recheck(env)
    status, body = await env.call(alan, "POST", f"/api/grants/{mine['id']}/approve", {})
    assert status == 403, body
    status, body = await env.call(alan, "POST", f"/api/grants/{g['id']}/approve", {})
    assert status == 404, body  # others' grants are hidden from a requester
    status, me = await env.call(alan, "GET", "/api/me")
    assert status == 200 and me["roles"] == ["requester"]
    status, own = await env.call(alan, "POST", "/api/grants", {
        "stacks": ["stack-web"], "vpc": "vpc-0demo", "level": "read-only", "ticket": "INC-2",
        "reason": "own work"})
    assert status == 201, own
    # rita's request is not visible to a requester any more either
    assert (await env.call(alan, "GET", f"/api/grants/{g['id']}"))[0] == 404


async def test_stale_cookie_cannot_mint_an_approving_token(env: Env) -> None:
    alan = await env.who("alan")
    env.directory.move("alan", ["dev"])
    await _past_recheck(env)
    status, body = await env.call(alan, "POST", "/api/tokens",
                                  {"name": "x", "scopes": ["grants:approve"]})
    assert status == 403, body
    assert body["detail"]["message"] == "grants:approve needs the approver role"


async def test_token_scopes_are_cut_to_the_owners_live_roles(env: Env) -> None:
    _, tok = await _token(env, "alan", ["grants:read", "grants:approve"])
    g1, g2 = await env.request("rita"), await env.request("ron")
    status, me = await env.call(tok, "GET", "/api/me")
    assert me["scopes"] == ["grants:approve", "grants:read"]
    assert (await env.call(tok, "POST", f"/api/grants/{g1['id']}/approve", {}))[0] == 200
    env.directory.move("alan", ["dev"])
    await _past_recheck(env)
    status, me = await env.call(tok, "GET", "/api/me")
    assert status == 200
    assert me["scopes"] == ["grants:read"] and me["roles"] == ["requester"]
    status, body = await env.call(tok, "POST", f"/api/grants/{g2['id']}/approve", {})
    assert status == 403, body
    # back in the group: the token may approve again (never more than it was made with)
    env.directory.move("alan", ["approvers"])
    await _past_recheck(env)
    assert (await env.call(tok, "POST", f"/api/grants/{g2['id']}/approve", {}))[0] == 200


async def test_a_token_never_gains_a_role_its_owner_gained_later(env: Env) -> None:
    _, tok = await _token(env, "rita", ["grants:read"])
    env.directory.move("rita", ["dev", "auditors"])
    await _past_recheck(env)
    status, me = await env.call(tok, "GET", "/api/me")
    assert status == 200 and me["roles"] == ["requester"]
    # the cookie follows the directory: a fresh answer, a new role
    _, me = await env.call("rita", "GET", "/api/me")
    assert me["roles"] == ["auditor", "requester"]


async def test_audit_names_the_live_roles_of_whoever_acted(env: Env) -> None:
    g = await env.request("rita")
    await env.call("alan", "POST", f"/api/grants/{g['id']}/approve", {})
    approved = [e for e in env.audit() if e["event"] == "grant.approved"]
    assert approved[-1]["actor"] == f"alan@{DOMAIN}"
    assert approved[-1]["actor_roles"] == ["approver", "requester"]
    requested = [e for e in env.audit() if e["event"] == "grant.requested"]
    assert requested[-1]["actor_roles"] == ["requester"]


async def test_one_lookup_per_recheck_and_an_unreachable_directory_fails_closed(env: Env
                                                                                ) -> None:
    rita = await env.who("rita")
    before = env.directory.lookups
    for _ in range(5):
        assert (await env.call(rita, "GET", "/api/grants"))[0] == 200
    assert env.directory.lookups - before <= 1
    env.directory.down = True
    await _past_recheck(env)
    status, body = await env.call(rita, "GET", "/api/grants")
    assert status == 503, body
    env.directory.down = False  # nothing was ended while it could not answer
    assert (await env.call(rita, "GET", "/api/grants"))[0] == 200


async def test_a_token_revokes_itself_and_no_other(env: Env) -> None:
    id1, tok1 = await _token(env, "rita", ["grants:read"])
    id2, _ = await _token(env, "rita", ["grants:read"])
    status, body = await env.call(tok1, "DELETE", f"/api/tokens/{id2}")
    assert status == 403, body
    status, body = await env.call(tok1, "DELETE", f"/api/tokens/{id1}")
    assert status == 200 and body == {"id": id1, "revoked": True}
    assert (await env.call(tok1, "GET", "/api/grants"))[0] == 401
    status, listing = await env.call("rita", "GET", "/api/tokens")
    assert {t["id"]: t["revoked"] for t in listing} == {id1: True, id2: False}
    revoked = [e for e in env.audit() if e["event"] == "api_token.revoked"]
    assert [(e["token_id"], e["via"], e["roles"]) for e in revoked] == [
        (id1, "token", ["requester"])]


async def test_a_cookie_without_a_server_side_session_is_refused(env: Env) -> None:
    rita = await env.who("rita")
    sessions = await env.ctx.tokens.sessions(f"rita@{DOMAIN}", now=env.clock.now())
    assert len(sessions) == 1
    assert await env.ctx.tokens.revoke_session(sessions[0].sid, env.clock.now())
    status, _ = await env.call(rita, "GET", "/api/me")
    assert status == 401


# -- operators: anyone's tokens and web sessions, from the CLI on the bastion -----------------
def _cli(env: Env, *args: str) -> list[str]:
    from broker.cli.entry import main

    config = env.state / "broker.toml"
    if not config.exists():
        config.write_text(f'state_dir = "{env.state}"\n[identity]\n'
                          f'domain_aliases = {{ CORP = "{DOMAIN}" }}\n')
        from broker.app import prepare_state
        from broker.config import load_config

        prepare_state(load_config(config))  # the keys the broker's first start makes
    return [str(main(["--config", str(config), *args]))]


async def test_operator_lists_and_revokes_tokens_and_web_sessions(
        env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import json

    monkeypatch.setenv("SUDO_USER", "opal")
    rita, alan = await env.who("rita"), await env.who("alan")
    rid, rtok = await _token(env, "rita", ["grants:read"])
    aid, _ = await _token(env, "alan", ["grants:read", "grants:approve"])
    capsys.readouterr()

    async def cli(*args: str) -> tuple[str, str]:
        rc = await asyncio.to_thread(_cli, env, *args)
        o = capsys.readouterr()
        assert rc == ["0"], o.err
        return o.out, o.err

    out, _ = await cli("tokens", "list", "--json")
    rows = json.loads(out)
    assert {(r["id"], r["owner"], r["state"]) for r in rows} == {
        (rid, f"rita@{DOMAIN}", "active"), (aid, f"alan@{DOMAIN}", "active")}
    out, _ = await cli("tokens", "list", "--user", "CORP\\rita")
    assert rid in out and aid not in out
    out, _ = await cli("tokens", "revoke", rid)
    assert f"token {rid} revoked" in out
    assert (await env.call(rtok, "GET", "/api/grants"))[0] == 401
    out, _ = await cli("tokens", "list", "--user", "rita", "--json")
    assert json.loads(out)[0]["state"] == "revoked"

    out, _ = await cli("web-sessions", "list", "--json")
    sessions = {r["owner"]: r["id"] for r in json.loads(out)}
    assert set(sessions) == {f"rita@{DOMAIN}", f"alan@{DOMAIN}"}
    out, _ = await cli("web-sessions", "list", "--user", "alan")
    assert sessions[f"alan@{DOMAIN}"] in out and sessions[f"rita@{DOMAIN}"] not in out
    out, _ = await cli("web-sessions", "revoke", sessions[f"alan@{DOMAIN}"])
    assert "ended" in out
    assert (await env.call(alan, "GET", "/api/me"))[0] == 401
    assert (await env.call(rita, "GET", "/api/me"))[0] == 200
    out, _ = await cli("web-sessions", "list", "--json")
    assert [r["owner"] for r in json.loads(out)] == [f"rita@{DOMAIN}"]

    # a second revoke finds nothing: exit status 2 and one line on stderr
    rc = await asyncio.to_thread(_cli, env, "tokens", "revoke", rid)
    assert rc == ["2"] and f"no active token {rid}" in capsys.readouterr().err
    audit = [json.loads(line) for line in
             (env.state / "audit" / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["user"]) for e in audit if e["event"] in (
        "api_token.revoked", "web.session_ended")] == [
        ("api_token.revoked", "operator:opal"), ("web.session_ended", "operator:opal")]
