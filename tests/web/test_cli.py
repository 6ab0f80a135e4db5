"""The grant CLI against the real demo: operator mode (--config) and remote mode (--api), end to
end from a request to an SSH session through the bastion."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from broker.app import Broker
from broker.config import load_config
from tests.conftest import BIN, Demo

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _run(args: list[str], home: Path | None = None, stdin: str = "",
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("BASTION_BROKER_API", "BASTION_BROKER_TOKEN", "XDG_CONFIG_HOME")}
    if home is not None:
        e["HOME"] = str(home)
    e.update(env or {})
    return subprocess.run([str(BIN), *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env=e)


def _ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r.stdout


def test_demo_serves_the_api(demo: Demo) -> None:
    url = demo.info["web_url"]
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url + "/api/openapi.json", timeout=10) as r:  # noqa: S310
        doc = json.load(r)
    assert "/api/grants" in doc["paths"]


def test_operator_mode_request_approve_list_show(demo: Demo) -> None:
    user = demo.take_user()
    g = json.loads(demo.cli("grant", "request", "--user", user, "--domain",
                            demo.info["domain"], "--stack", "stack-db", "--vpc", "vpc-0demo",
                            "--level", "read-only", "--trigger", "incident", "--ticket",
                            "INC-9", "--reason", "operator test", "--json").stdout)
    assert g["state"] == "pending" and g["requested_by"].startswith("operator:")
    out = demo.cli("grant", "approve", g["id"], "--comment", "ok").stdout
    assert "approved" in out
    shown = json.loads(demo.cli("grant", "show", g["id"], "--json").stdout)
    assert [h["action"] for h in shown["history"]] == ["requested", "approved"]
    table = demo.cli("grant", "list", "--user", user, "--state", "active").stdout
    assert g["id"] in table and "STACKS" in table
    r = demo.cli("grant", "approve", g["id"], check=False)
    assert r.returncode == 2 and "is approved" in r.stderr
    r = demo.cli("grant", "extend", g["id"], "--hours", "1")
    assert "extended" in r.stdout
    demo.cli("grant", "revoke", g["id"])
    events = [e for e in demo.audit_lines() if e.get("grant_id") == g["id"]]
    assert [e["event"] for e in events] == ["grant.requested", "grant.approved",
                                            "grant.extended", "grant.revoked"]
    assert all(e["actor"].startswith("operator:") for e in events)
    bad = demo.cli("grant", "request", "--user", user, "--stack", "x y", "--vpc", "vpc-1",
                   "--level", "admin", "--ticket", "T", "--reason", "r", check=False)
    assert bad.returncode == 2 and "stacks" in bad.stderr and "Traceback" not in bad.stderr


async def test_remote_request_approve_then_ssh(demo: Demo, tmp_path: Path) -> None:
    """alice-like user requests through the demo's API; an approver on a second broker (same
    state, ops = approvers) approves through its API; the user then reaches db01 by SSH."""
    user, approver = demo.take_user(), demo.take_user()
    api = demo.info["web_url"]
    cfg = demo.variant_config(
        tmp_path, totp='\n[roles]\napprover_groups = ["ops"]\n'
        '[web]\nlisten_host = "127.0.0.1"\nlisten_port = 0\nsecure_cookies = false\n')
    broker = Broker(load_config(cfg))
    await broker.start()
    try:
        api2 = broker.web_url
        assert api2 is not None

        async def cli(*args: str, home: Path, stdin: str = "") -> str:
            r = await asyncio.to_thread(_run, list(args), home, stdin)
            return _ok(r)

        home_u, home_a = tmp_path / "u", tmp_path / "a"
        home_u.mkdir()
        home_a.mkdir()
        out = await cli("login", "--api", api, "--user", user, "--password-stdin", home=home_u,
                        stdin=f"{demo.info['password']}\n{demo.next_code(user)}\n")
        assert f"logged in to {api} as {user}@" in out and "requester" in out
        sess = home_u / ".config" / "bastion-broker" / "session.json"
        assert stat.S_IMODE(sess.stat().st_mode) == 0o600
        g: dict[str, Any] = json.loads(await cli(
            "grant", "request", "--api", api, "--stack", "stack-db", "--vpc", "vpc-0demo",
            "--level", "read-only", "--trigger", "incident", "--ticket", "INC-4711",
            "--reason", "disk alarm", "--json", home=home_u))
        assert g["state"] == "pending" and g["user"] == user
        r = await asyncio.to_thread(demo.ssh, user, "db01", "id -un")
        assert r.returncode == 255

        # the requester has no approver role on the demo broker
        r = await asyncio.to_thread(_run, ["grant", "approve", "--api", api, g["id"]], home_u)
        assert r.returncode == 2 and "403" in r.stderr

        await cli("login", "--api", api2, "--user", approver, "--password-stdin", home=home_a,
                  stdin=f"{demo.info['password']}\n{demo.next_code(approver)}\n")
        listed = json.loads(await cli("grant", "list", "--api", api2, "--state", "pending",
                                      "--json", home=home_a))
        assert g["id"] in {x["id"] for x in listed}
        out = await cli("grant", "approve", "--api", api2, g["id"], "--comment", "go",
                        home=home_a)
        assert "approved" in out

        shown = await cli("grant", "show", "--api", api, g["id"], home=home_u)
        assert "approved" in shown and "requested" in shown and approver in shown
        r = await asyncio.to_thread(demo.ssh, user, "db01", "id -un")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == demo.info["read_only_login"]

        active = json.loads(await cli("grant", "list", "--api", api, "--state", "active",
                                      "--json", home=home_u))
        assert g["id"] in {x["id"] for x in active}
        out = await cli("grant", "revoke", "--api", api, g["id"], home=home_u)
        assert "revoked" in out
        assert "logged out" in await cli("logout", "--api", api, home=home_u)
        r = await asyncio.to_thread(_run, ["grant", "list", "--api", api], home_u)
        assert r.returncode == 2 and "not logged in" in r.stderr
    finally:
        await broker.stop()
    events = [e["event"] for e in demo.audit_lines()
              if e.get("grant_id") == g["id"] and e["event"].startswith("grant.")]
    assert events == ["grant.requested", "grant.approved", "grant.revoked"]


def test_remote_with_an_api_token(demo: Demo, tmp_path: Path) -> None:
    """$BASTION_BROKER_TOKEN: a token made by a logged-in user works without the session."""
    user = demo.take_user()
    api = demo.info["web_url"]
    body = json.dumps({"user": user, "password": demo.info["password"],
                       "code": demo.next_code(user)}).encode()
    req = urllib.request.Request(api + "/api/login", data=body, method="POST",  # noqa: S310
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
        login = json.load(r)
        cookie = r.headers["Set-Cookie"].split(";")[0]
    req = urllib.request.Request(  # noqa: S310
        api + "/api/tokens", method="POST",
        data=json.dumps({"name": "ci", "scopes": ["grants:read"]}).encode(),
        headers={"Content-Type": "application/json", "Cookie": cookie,
                 "X-CSRF-Token": login["csrf"]})
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
        token = json.load(r)["token"]
    env = {"BASTION_BROKER_API": api, "BASTION_BROKER_TOKEN": token}
    rows = json.loads(_ok(_run(["grant", "list", "--json"], tmp_path, env=env)))
    assert f"g-demo-{user}" in {x["id"] for x in rows}
    assert all(x["user"] == user for x in rows)
    r = _run(["grant", "request", "--stack", "stack-db", "--vpc", "vpc-0demo", "--level",
              "read-only", "--ticket", "T", "--reason", "r"], tmp_path, env=env)
    assert r.returncode == 2 and "grants:write" in r.stderr
