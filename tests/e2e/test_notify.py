"""Notifications from a real broker (in this process, sharing the demo's state) to real aiohttp
receivers on 127.0.0.1, driven as people do: a request and its approval through the HTTP API, an
admin session with the real OpenSSH client, a lock and a test event through the CLI.

Each receiver checks the signature with the channel's secret. Beside the channels that answer
at once, one never answers and one fails once: the API calls return at once anyway, the others
get every event, the failing one gets it on the retry, and the delivery log (CLI and API) says
so. A broker stopped with deliveries still due sends them when it starts again.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.app import Broker
from broker.config import load_config
from tests.conftest import Demo
from tests.conftest import broker_cli as cli
from tests.notify_receiver import Receiver, until

pytestmark = pytest.mark.e2e

SECRET = "whsec-e2e-" + secrets.token_hex(8)


def _config(demo: Demo, tmp: Path, hooks: str, notify: str = "") -> Path:
    (tmp / "hook.secret").write_text(SECRET + "\n")
    return demo.variant_config(tmp, limits="penalty_exempt = ['127.0.0.0/8']", extra=(
        '[web]\nlisten_host = "127.0.0.1"\nlisten_port = 0\nsecure_cookies = false\n'
        '[roles]\napprover_groups = ["bastion-approvers"]\nadmin_groups = ["bastion-admins"]\n'
        f"[notify]\n{notify}\n{hooks}"))


def _hook(name: str, url: str, fmt: str = "json", events: list[str] | None = None) -> str:
    line = f'[[notify.webhooks]]\nname = "{name}"\nurl = "{url}"\nsecret_file = "hook.secret"\n'
    line += f'format = "{fmt}"\n'
    if events is not None:
        line += f"events = {json.dumps(events)}\n"
    return line


class Api:
    """A logged-in API client (session cookie and CSRF token), as the console is."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def login(self, demo: Demo, user: str) -> Api:
        body = {"user": user, "password": demo.info["password"], "code": demo.next_code(user)}
        status, data = await self.call("POST", "/api/login", body)
        assert status == 200, data
        self.csrf = data["csrf"]
        return self

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, self.base + path, json=body,
                                     headers={"X-CSRF-Token": self.csrf}) as r:
            return r.status, await r.json()

    async def close(self) -> None:
        await self.http.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver(secret=SECRET.encode()).start()
    try:
        yield r
    finally:
        await r.stop()


async def test_requests_decisions_sessions_and_locks_reach_their_channels(
        demo: Demo, tmp_path: Path, receiver: Receiver) -> None:
    tag = secrets.token_hex(3)
    ok, soon, chat, stuck, flaky = (f"{k}-{tag}" for k in ("ok", "soon", "chat", "stuck",
                                                             "flaky"))
    # grant.expiring has a channel of its own: the demo's store holds other tests' grants, and
    # any of them may end within the window too
    cfg = _config(demo, tmp_path, "".join([
        _hook(ok, f"{receiver.url}/ok/{ok}", events=[
            "grant.requested", "grant.approved", "session.admin_started", "lock.created"]),
        _hook(soon, f"{receiver.url}/ok/{soon}", events=["grant.expiring"]),
        _hook(chat, f"{receiver.url}/ok/{chat}", "slack", ["grant.requested"]),
        _hook(stuck, f"{receiver.url}/hang/{stuck}"),
        _hook(flaky, f"{receiver.url}/flaky/{flaky}", "teams", ["grant.requested"])]),
        notify="timeout_seconds = 30\nexpiring_soon_minutes = 90\n")
    broker = Broker(load_config(cfg))
    port = await broker.start()
    assert broker.web_url is not None
    user = demo.take_user()
    requester, approver, admin = (Api(broker.web_url) for _ in range(3))
    try:
        await requester.login(demo, user)
        await approver.login(demo, "approver")
        await admin.login(demo, "admin")
        t0 = time.monotonic()
        status, g = await requester.call("POST", "/api/grants", {
            "stacks": ["stack-web"], "vpc": "vpc-0demo", "level": "admin", "hours": 1,
            "ticket": f"INC-{tag}", "reason": "disk <!here> full", "trigger": "incident"})
        assert status == 201, g
        status, g = await approver.call("POST", f"/api/grants/{g['id']}/approve",
                                        {"comment": "go ahead"})
        assert status == 200, g
        # a receiver that never answers does not slow the calls down
        assert time.monotonic() - t0 < 2
        # the grant ends within expiring_soon_minutes: the next sweep announces it, once
        await broker.expiring.sweep()
        await broker.expiring.sweep()
        await receiver.wait_for(ok, 2)

        def announced() -> list[Any]:
            return [r for r in receiver.got[soon] if r.json["data"]["grant_id"] == g["id"]]

        async def expiring_seen() -> bool:
            return bool(announced())
        await until(expiring_seen, 15, "grant.expiring of this grant")
        [slack] = await receiver.wait_for(chat, 1)
        await receiver.wait_for(stuck, 2)
        # the real OpenSSH client starts an admin session through this broker
        known = demo.known_hosts_for(tmp_path, port)
        proc = await asyncio.create_subprocess_exec(
            *demo.ssh_args(f"{user}+web01", port=port, known_hosts=known), "id -un",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=demo.env(user))
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        assert out.decode().strip() == demo.info["admin_login"]
        await receiver.wait_for(ok, 3)
        # an operator's lock (the CLI queues it; this broker sends it)
        lock = json.loads(cli(cfg, "lock", "--target", "web02", "--ttl", "30m", "--reason",
                              f"suspicious {tag}", "--json"))
        cli(cfg, "lock", "remove", lock["id"])
        await receiver.wait_for(ok, 4)
        # the flaky receiver: 500, then 200 on the retry (2.5 to 5 s later)
        first, second = await receiver.wait_for(flaky, 2, within=20)
        status, log = await admin.call("GET", "/api/notify/deliveries?limit=1000")
        assert status == 200, log
        status, refused = await requester.call("GET", "/api/notify/deliveries")
        assert status == 403 and refused["error"] == "forbidden"
        status, _ = await admin.call("GET", "/api/notify/deliveries?status=lost")
        assert status == 400
    finally:
        for api in (requester, approver, admin):
            await api.close()
        await broker.stop()

    seen = {r.headers["X-Bastion-Event"]: r for r in receiver.got[ok]}
    req, appr, started, locked = (seen[e] for e in (
        "grant.requested", "grant.approved", "session.admin_started", "lock.created"))
    assert len(receiver.got[ok]) == 4
    [expiring] = announced()  # once, for two sweeps
    every = [*receiver.got[ok], *receiver.got[soon], *receiver.got[chat], *receiver.got[stuck],
             first, second]
    assert all(r.signed_ok for r in every)
    assert (expiring.json["data"]["grant_id"], expiring.json["data"]["expires_at"]) == (
        g["id"], appr.json["data"]["expires_at"])
    assert (req.json["data"]["grant_id"], req.json["data"]["reason"]) == (
        g["id"], "disk <!here> full")
    assert (appr.json["data"]["actor"], appr.json["data"]["comment"]) == (
        f"approver@{demo.info['domain']}".casefold(), "go ahead")
    assert (started.json["data"]["target_name"], started.json["data"]["grant_id"]) == (
        "web01", g["id"])
    assert (locked.json["data"]["lock_id"], locked.json["data"]["value"]) == (lock["id"],
                                                                            "web02")
    assert "&lt;!here&gt;" in slack.json["text"] and "<!here>" not in slack.body.decode()
    assert second.json["attachments"][0]["content"]["type"] == "AdaptiveCard"
    assert first.headers["X-Bastion-Delivery"] == second.headers["X-Bastion-Delivery"]
    mine = {d["channel"]: d for d in log if d["channel"] == flaky}
    assert (mine[flaky]["status"], mine[flaky]["attempts"], mine[flaky]["last_status"]) == (
        "sent", 2, 200)
    # the CLI shows the same log; the hanging channel's rows wait for their retry
    rows = json.loads(cli(cfg, "notify", "deliveries", "--json", "--limit", "1000"))
    by_channel: dict[str, list[dict[str, Any]]] = {}
    for d in rows:
        by_channel.setdefault(d["channel"], []).append(d)
    assert [d["status"] for d in by_channel[ok]] == ["sent"] * 4
    assert {d["status"] for d in by_channel[stuck]} == {"pending"}
    tried = [d for d in by_channel[stuck] if d["attempts"]]
    assert tried and all(d["last_error"] for d in tried)  # cut by the stop, handed back
    assert [d["event"] for d in by_channel[chat]] == ["grant.requested"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_deliveries_still_due_are_sent_after_a_restart(demo: Demo, tmp_path: Path) -> None:
    tag = secrets.token_hex(3)
    name = f"later-{tag}"
    port = _free_port()  # nothing listens there yet: every attempt is refused
    # lock.created only (and the test event, sent to the channel named whatever it takes): not
    # grant.expiring, which other tests' grants in the demo's store may bring at any time
    cfg = _config(demo, tmp_path, _hook(name, f"http://127.0.0.1:{port}/ok/{name}",
                                        events=["lock.created"]))
    broker = Broker(load_config(cfg))
    await broker.start()
    try:
        cli(cfg, "notify", "test", "--channel", name)

        async def tried() -> bool:
            return any(d.channel == name and d.last_error
                       for d in await broker.dispatcher.deliveries("pending", 1000))
        await until(tried, 15, "the first attempt")
    finally:
        await broker.stop()
    # while no broker runs, an operator's lock is queued too
    lock = json.loads(cli(cfg, "lock", "--stack", "stack-nowhere", "--ttl", "30m", "--reason",
                          f"restart {tag}", "--json"))
    cli(cfg, "lock", "remove", lock["id"])
    receiver = Receiver(secret=SECRET.encode())
    await receiver.start(port=port)
    broker = Broker(load_config(cfg))
    await broker.start()
    try:
        got = await receiver.wait_for(name, 2, within=20)

        async def stored() -> bool:
            return sum(d.channel == name
                       for d in await broker.dispatcher.deliveries("sent", 1000)) == 2
        await until(stored, 10, "the outcomes")
    finally:
        await broker.stop()
        await receiver.stop()
    assert sorted(r.headers["X-Bastion-Event"] for r in got) == ["lock.created", "notify.test"]
    assert all(r.signed_ok for r in got)
    rows = [d for d in json.loads(cli(cfg, "notify", "deliveries", "--json"))
            if d["channel"] == name]
    assert sorted((d["event"], d["status"]) for d in rows) == [
        ("lock.created", "sent"), ("notify.test", "sent")]
    assert next(d for d in rows if d["event"] == "notify.test")["attempts"] >= 2
    audit = [e for e in demo.audit_lines() if e["event"] == "notify.test"
             and e.get("channel") == name]
    assert len(audit) == 1 and audit[0]["user"].startswith("operator:")
