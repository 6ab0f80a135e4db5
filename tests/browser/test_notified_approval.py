"""The approver's whole path, in a real Chromium: a request made in the console reaches the
approvers as a signed webhook (a real aiohttp receiver) and an e-mail (a real SMTP server with
STARTTLS and AUTH), the approver approves it in the console, both channels hear of the
approval, and the requester's real ``ssh`` then reaches the stack.

The broker is a second one on the demo's state with ``[notify]`` configured; the receivers run
on an event loop in a thread of their own, as the browser API here is synchronous.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from playwright.sync_api import Browser, expect

from broker.runtime import free_port
from tests import smtpserver
from tests.browser.conftest import Console, login, word
from tests.browser.test_console_grants import (
    _card,
    _fill_request,
    _problems,
    _submit_request,
    _web_up,
)
from tests.conftest import Demo, serve_broker
from tests.notify_receiver import Receiver

pytestmark = pytest.mark.browser

T = TypeVar("T")
APPROVERS = "approvers@example.com"


class LoopThread:
    """An asyncio loop in a daemon thread: the async receivers beside the sync browser."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()


@pytest.fixture
def smtp(tmp_path: Path) -> Iterator[smtpserver.SmtpServer]:
    with smtpserver.running(smtpserver.make_certs(tmp_path)) as server:
        yield server


def test_a_request_reaches_approvers_by_webhook_and_email_and_approval_lets_ssh_in(
        browser: Browser, demo: Demo, tmp_path: Path, loop: LoopThread,
        smtp: smtpserver.SmtpServer) -> None:
    secret = "whsec-" + secrets.token_hex(16)
    receiver = loop.run(Receiver(secret=secret.encode()).start())
    (tmp_path / "hook.secret").write_text(secret + "\n")
    (tmp_path / "smtp.password").write_text(smtp.password + "\n")
    web_port = free_port()
    staff = demo.info["approver"]["group"], demo.info["admin"]["group"]
    events = '["grant.requested", "grant.approved"]'
    cfg = demo.variant_config(tmp_path, extra=(
        f'[roles]\napprover_groups = ["{staff[0]}"]\nadmin_groups = ["{staff[1]}"]\n'
        f'[web]\nlisten_host = "127.0.0.1"\nlisten_port = {web_port}\nsecure_cookies = false\n'
        "[notify]\n"
        f'[[notify.webhooks]]\nname = "approvers-hook"\nurl = "{receiver.url}/ok/approvers"\n'
        f'secret_file = "{tmp_path / "hook.secret"}"\nevents = {events}\n'
        f'[[notify.email]]\nname = "approvers-mail"\nto = ["{APPROVERS}"]\nevents = {events}\n'
        f'smtp_host = "{smtp.host}"\nsmtp_port = {smtp.port}\nsecurity = "starttls"\n'
        f'username = "{smtp.username}"\npassword_file = "{tmp_path / "smtp.password"}"\n'
        f'from_addr = "bastion@example.com"\nca_file = "{smtp.ca_file}"\n'))
    proc, _ = serve_broker(cfg)
    consoles: list[Console] = []
    try:
        base = f"http://127.0.0.1:{web_port}"
        _web_up(base)
        user = demo.take_user()
        requester = login(browser, demo, user, demo.info["password"], base=base)
        consoles.append(requester)
        page = requester.open("#/request")
        ticket, reason = "INC-" + word("")[:6], f"db01 disk full {word()}"
        _fill_request(page, stack="stack-db", ticket=ticket, reason=reason)
        grant_id = _submit_request(page)

        # the approvers hear of it: a signed webhook and an e-mail over STARTTLS
        [hook] = loop.run(receiver.wait_for("approvers", 1))
        assert hook.signed_ok is True
        body = hook.json
        assert body["event"] == "grant.requested"
        assert body["data"]["grant_id"] == grant_id, body
        assert ticket in hook.body.decode() and reason in hook.body.decode()
        [mail] = loop.run(smtp.wait(1, within=30))
        assert mail.tls and mail.login == smtp.username and mail.rcpt_tos == [APPROVERS]
        msg = mail.message
        assert "Access requested" in msg["Subject"]
        text = msg.get_content()
        assert grant_id in text and ticket in text and reason in text

        # the approver approves in the console
        approver = login(browser, demo, demo.info["approver"]["user"], demo.info["password"],
                         base=base)
        consoles.append(approver)
        card = _card(approver.open("#/approvals"), grant_id)
        expect(card).to_contain_text(reason)
        card.get_by_label("Comment").fill("approved after the webhook")
        card.get_by_role("button", name="Approve").click()
        expect(card.locator(".ok")).to_contain_text(f"{grant_id} approved")

        hooks = loop.run(receiver.wait_for("approvers", 2))
        assert hooks[1].json["event"] == "grant.approved" and hooks[1].signed_ok is True
        mails = loop.run(smtp.wait(2, within=30))
        assert "Access approved" in mails[1].message["Subject"]

        # and the requester's real ssh reaches the stack (through the demo's own listener)
        r = demo.ssh(user, demo.info["denied_target"], "echo granted")
        assert r.returncode == 0 and r.stdout == b"granted\n", r.stderr
        assert not _problems(*consoles), [c.problems for c in consoles]
    finally:
        for c in consoles:
            c.context.close()
        proc.terminate()
        proc.wait(20)
        loop.run(receiver.stop())
