"""The grant CLI as requesters and approvers use it, against the real demo broker: requests
checked against the inventory, ``--wait`` for the decision, the state column, history changes,
shortening and extending an expired grant. Operator mode (--config) and remote mode (--api)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, Demo
from tests.web.test_cli import _run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _request_args(user: str, demo: Demo, *extra: str, vpc: str = "vpc-0demo",
                  stack: str = "stack-db") -> list[str]:
    return ["grant", "request", "--user", user, "--domain", demo.info["domain"], "--stack",
            stack, "--vpc", vpc, "--level", "read-only", "--ticket", "INC-5", "--reason",
            "cli test", *extra]


def _token(demo: Demo, user: str, scopes: list[str]) -> str:
    """An API token of ``user`` (logged in once through the API)."""
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
        data=json.dumps({"name": "cli", "scopes": scopes}).encode(),
        headers={"Content-Type": "application/json", "Cookie": cookie,
                 "X-CSRF-Token": login["csrf"]})
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
        return str(json.load(r)["token"])


def test_unknown_stack_and_foreign_vpc_refused_in_both_modes(demo: Demo, tmp_path: Path) -> None:
    user = demo.take_user()
    for args, text in ((_request_args(user, demo, stack="stack-nope"),
                        "stacks: unknown stack 'stack-nope': not in the inventory"),
                       (_request_args(user, demo, vpc="vpc-0other"),
                        "vpc: vpc-0other is not a VPC of stack stack-db (its VPC: vpc-0demo)")):
        r = demo.cli(*args, check=False)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr == f"bastion-broker: error: {text}\n"
    r = demo.cli("grant", "add", "--user", user, "--domain", demo.info["domain"], "--stack",
                 "stack-nope", "--vpc", "vpc-0demo", "--level", "read-only", "--ticket", "T",
                 "--reason", "r", check=False)
    assert r.returncode == 2 and "unknown stack 'stack-nope'" in r.stderr
    env = {"BASTION_BROKER_API": demo.info["web_url"],
           "BASTION_BROKER_TOKEN": _token(demo, user, ["grants:read", "grants:write"])}
    r = _run(_request_args(user, demo, vpc="vpc-0other"), tmp_path, env=env)
    assert r.returncode == 2
    assert r.stderr == ("bastion-broker: error: 400 invalid: vpc: vpc-0other is not a VPC of "
                        "stack stack-db (its VPC: vpc-0demo)\n")
    assert not [e for e in demo.audit_lines()
                if e["event"].startswith("grant.") and e.get("user", "").startswith(user + "@")
                and e.get("ticket") == "INC-5"]


def _popen(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("BASTION_BROKER_API", "BASTION_BROKER_TOKEN")}
    e.update(env or {})
    return subprocess.Popen([str(BIN), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=e)


def _pending_id(demo: Demo, user: str) -> str:
    """The id of the user's pending request, once the waiting CLI has made it."""
    for _ in range(100):
        rows = json.loads(demo.cli("grant", "list", "--user", user, "--state", "pending",
                                   "--json").stdout)
        if rows:
            return str(rows[0]["id"])
        time.sleep(0.1)
    raise AssertionError("no pending request appeared")


def test_request_wait_approved_remote(demo: Demo) -> None:
    user = demo.take_user()
    env = {"BASTION_BROKER_API": demo.info["web_url"],
           "BASTION_BROKER_TOKEN": _token(demo, user, ["grants:read", "grants:write"])}
    proc = _popen(_request_args(user, demo, "--wait"), env)
    try:
        gid = _pending_id(demo, user)
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting
        demo.cli("grant", "approve", gid, "--comment", "go ahead")
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert f"waiting for a decision on grant {gid}" in err
    assert out.splitlines()[-1].startswith(f"grant {gid} approved by operator:")
    assert out.splitlines()[-1].endswith(": go ahead")


def test_request_wait_rejected_and_timeout_operator(demo: Demo) -> None:
    user = demo.take_user()
    proc = _popen(["--config", demo.config, *_request_args(user, demo, "--wait", "--json")])
    try:
        gid = _pending_id(demo, user)
        demo.cli("grant", "reject", gid, "--comment", "no ticket")
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    doc = json.loads(out)
    assert (doc["id"], doc["state"], doc["history"][-1]["comment"]) == (gid, "rejected",
                                                                       "no ticket")
    t0 = time.monotonic()
    r = demo.cli(*_request_args(user, demo, "--wait", "--timeout", "1s"), check=False)
    assert r.returncode == 3 and "still pending: gave up waiting after 1 s" in r.stdout
    assert time.monotonic() - t0 < 15
    r = demo.cli(*_request_args(user, demo, "--timeout", "1"), check=False)
    assert (r.returncode, r.stderr) == (2, "bastion-broker: error: --timeout needs --wait\n")
    r = demo.cli(*_request_args(user, demo, "--wait", "--timeout", "soon"), check=False)
    assert r.returncode == 2 and "--timeout must be" in r.stderr


def _grant(demo: Demo, user: str, hours: float, *extra: str) -> dict[str, Any]:
    return dict(json.loads(demo.cli(
        "grant", "add", "--user", user, "--domain", demo.info["domain"], "--stack", "stack-db",
        "--vpc", "vpc-0demo", "--level", "read-only", "--ticket", "T-1", "--reason", "r",
        "--hours", str(hours), "--json", *extra).stdout))


def test_state_column_history_changes_and_shortening(demo: Demo) -> None:
    user = demo.take_user()
    g = _grant(demo, user, 4)
    table = demo.cli("grant", "list", "--user", user, "--state", "active").stdout.splitlines()
    header = table[0].split()
    rows = [dict(zip(header, line.split(), strict=False)) for line in table[1:]]
    assert g["id"] in {r["ID"] for r in rows}
    assert {r["STATE"] for r in rows} == {"active"}
    until = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    out = demo.cli("grant", "extend", g["id"], "--until", until.isoformat(), "--comment",
                   "done early").stdout
    assert out.startswith(f"grant {g['id']} shortened: active read-only")
    shown = demo.cli("grant", "show", g["id"]).stdout
    assert "state:        active" in shown
    old = datetime.fromisoformat(g["expires_at"]).astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    assert f"expires_at: {old} -> {until:%Y-%m-%d %H:%M}" in shown
    doc = json.loads(demo.cli("grant", "show", g["id"], "--json").stdout)
    assert doc["history"][-1]["action"] == "changed"
    assert doc["history"][-1]["details"]["expires_at"]["before"] == g["expires_at"]
    r = demo.cli("grant", "extend", g["id"], "--until",
                 (datetime.now(UTC) - timedelta(minutes=5)).isoformat(), check=False)
    assert r.returncode == 2 and "to end access now, revoke the grant" in r.stderr


def test_extending_an_expired_grant_says_a_new_request_is_needed(demo: Demo) -> None:
    user = demo.take_user()
    g = _grant(demo, user, 2 / 3600)  # two seconds
    time.sleep(2.5)
    r = demo.cli("grant", "extend", g["id"], "--hours", "1", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "cannot be extended: a new request is needed" in r.stderr
    listed = demo.cli("grant", "list", "--user", user, "--state", "expired").stdout
    assert g["id"] in listed and " expired " in listed
