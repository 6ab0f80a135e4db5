"""Access requests, approvals, grants, ending a session and locks in the console, in a real
Chromium against the real demo broker, with the real OpenSSH client on the other side: what the
console sends is what the API decides, and what the API decides is what ssh then does."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from broker.runtime import free_port
from tests.browser.conftest import Console, login, word
from tests.conftest import Demo, serve_broker

pytestmark = pytest.mark.browser

BERLIN = ZoneInfo("Europe/Berlin")  # the browser contexts' time zone (conftest.login)
REFUSED = "Failed to load resource: the server responded with a status of 4"


def _problems(*consoles: Console) -> list[str]:
    """Script errors and CSP refusals; not the API's refusals these tests provoke (the browser
    logs every 4xx response)."""
    return [p for c in consoles for p in c.problems if not p.startswith(REFUSED)]


def _staff(browser: Browser, demo: Demo, name: str) -> Iterator[Console]:
    a = demo.info[name]
    c = login(browser, demo, a["user"], a["password"])
    try:
        yield c
    finally:
        c.context.close()


@pytest.fixture(scope="module")
def approver(browser: Browser, demo: Demo) -> Iterator[Console]:
    yield from _staff(browser, demo, "approver")


@pytest.fixture(scope="module")
def admin(browser: Browser, demo: Demo) -> Iterator[Console]:
    yield from _staff(browser, demo, "admin")


@pytest.fixture
def requester(browser: Browser, demo: Demo) -> Iterator[Console]:
    """A demo user no other test used, logged in (one TOTP code; one more is left for ssh)."""
    user = demo.take_user()
    c = login(browser, demo, user, demo.info["password"])
    try:
        yield c
    finally:
        c.context.close()
        assert not _problems(c), c.problems


def _fill_request(page: Page, *, stack: str, ticket: str, reason: str,
                  trigger: str = "incident", level: str = "Read-only") -> None:
    page.get_by_label(stack).check()
    page.get_by_label("VPC", exact=True).select_option("vpc-0demo")
    page.get_by_label(level).check()
    page.get_by_label("Trigger").select_option(trigger)
    page.get_by_label("Ticket").fill(ticket)
    page.get_by_label("Reason").fill(reason)


def _submit_request(page: Page) -> str:
    """Submit the request form; the new grant's id from the confirmation."""
    page.get_by_role("button", name="Request access").click()
    done = page.locator("form.request .ok")
    expect(done).to_contain_text("Requested: g-")
    return done.locator("a").first.inner_text()


def _live_session(demo: Demo, user: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        live = [s for s in demo.sessions() if str(s["user"]).startswith(user + "@")
                and s["status"] == "live"]
        if live:
            return live[0]
        assert time.monotonic() < deadline, "the session did not show up as live"
        time.sleep(0.2)


def _started(demo: Demo, user: str) -> subprocess.Popen[bytes]:
    """A real ssh session to web01 that prints a line and then waits."""
    p = subprocess.Popen([*demo.ssh_args(f"{user}+web01"), "echo started; sleep 60; echo never"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=demo.env(user))
    assert p.stdout is not None
    assert p.stdout.readline() == b"started\n"
    return p


def _card(page: Page, grant_id: str) -> Locator:
    return page.locator(f"article.request-card[data-grant='{grant_id}']")


def test_a_request_is_checked_approved_in_the_queue_and_then_ssh_works(
        requester: Console, approver: Console, demo: Demo) -> None:
    user = requester.user
    denied = demo.info["denied_target"]  # db01, in stack-db: the demo grants only stack-web
    page = requester.open("#/request")
    expect(page.get_by_role("heading", name="Request access")).to_be_focused()
    expect(page.get_by_label("AD user")).to_have_value(user)
    expect(page.get_by_label("AD domain (FQDN)")).to_have_value(demo.info["domain"])
    expect(page.get_by_label("Hours")).to_have_value("8")
    ticket, reason = "INC-" + word("")[:6], f"disk full on db01 {word()}"
    _fill_request(page, stack="stack-db", ticket=ticket, reason=reason)
    # a stack the inventory does not list: refused by the API, said next to the stacks
    page.get_by_label("Other stack IDs").fill("stack-nope")
    page.get_by_role("button", name="Request access").click()
    stacks_error = page.locator("fieldset.stacks .field-error")
    expect(stacks_error).to_contain_text("unknown stack 'stack-nope'")
    expect(page.locator("form.request [role=alert]")).to_contain_text("(field: stacks)")
    expect(page.locator("fieldset.stacks [aria-invalid=true]")).to_have_count(1)
    # a VPC that is not the stack's
    page.get_by_label("Other stack IDs").fill("")
    page.get_by_label("VPC", exact=True).select_option(label="another VPC…")
    page.get_by_label("Other VPC ID").fill("vpc-0elsewhere")
    page.get_by_role("button", name="Request access").click()
    vpc_error = page.locator("div.vpc .field-error")
    expect(vpc_error).to_contain_text("vpc-0elsewhere is not a VPC of stack stack-db")
    expect(stacks_error).to_be_hidden()
    page.get_by_label("VPC", exact=True).select_option("vpc-0demo")
    grant_id = _submit_request(page)
    expect(vpc_error).to_be_hidden()
    # the requester has no queue; their list shows the request as pending
    expect(page.get_by_role("link", name="Approvals")).to_be_hidden()
    page = requester.open("#/access")
    row = page.locator(f"tr[data-grant='{grant_id}']")
    expect(row).to_contain_text("pending")
    expect(row).to_contain_text("stack-db")
    # the approver's queue: who, what, why, which ticket, until when it waits
    q = approver.open("#/approvals")
    card = _card(q, grant_id)
    for text in (f"{user}@{demo.info['domain']}", "stack-db", "vpc-0demo", "read-only",
                 "incident", ticket, reason, "Pending until"):
        expect(card).to_contain_text(text)
    card.get_by_label("Comment").fill("ok, go ahead")
    card.get_by_role("button", name="Approve").click()
    expect(card.locator(".ok")).to_contain_text(f"{grant_id} approved, valid until")
    expect(card.locator("h2 .badge").first).to_have_text("active")
    # the requester's real ssh to the stack now works
    r = demo.ssh(user, denied, "echo granted")
    assert r.returncode == 0 and r.stdout == b"granted\n", r.stderr
    # and the grant's history says who approved it, with the comment
    page = requester.open(f"#/grant/{grant_id}")
    history = page.locator("section.history ol.timeline > li")
    expect(history.nth(0)).to_contain_text("requested")
    expect(history.nth(1)).to_contain_text("approved")
    expect(history.nth(1)).to_contain_text(f"approver@{demo.info['domain']}")
    expect(history.nth(1)).to_contain_text("ok, go ahead")
    assert not _problems(approver), approver.problems


def test_nobody_approves_their_own_admin_request_and_a_pending_one_can_be_withdrawn(
        approver: Console, admin: Console, demo: Demo) -> None:
    page = approver.open("#/request")
    _fill_request(page, stack="stack-db", ticket="CHG-7", reason=f"own admin {word()}",
                  trigger="change-request", level="Admin")
    grant_id = _submit_request(page)
    q = approver.open("#/approvals")
    card = _card(q, grant_id)
    expect(card).to_contain_text("your own request")
    card.get_by_role("button", name="Approve").click()
    expect(card.get_by_role("alert")).to_contain_text("nobody approves their own admin request")
    # rejecting needs a comment: the API says so, next to the comment
    admin_card = _card(admin.open("#/approvals"), grant_id)
    admin_card.get_by_role("button", name="Reject").click()
    expect(admin_card.locator(".field-error")).to_contain_text("comment")
    expect(admin_card.get_by_label("Comment")).to_have_attribute("aria-invalid", "true")
    # the requester cancels it from their list instead
    page = approver.open("#/access")
    row = page.locator(f"tr[data-grant='{grant_id}']")
    row.get_by_role("button", name="Withdraw").click()
    row.get_by_role("form", name=f"Withdraw {grant_id}").get_by_label("Comment").fill(
        "not needed after all")
    row.get_by_role("button", name="Withdraw request").click()
    expect(row.locator(".ok")).to_contain_text(f"{grant_id} withdrawn")
    expect(page.locator(f"tr[data-grant='{grant_id}'] .badge")).to_have_text("withdrawn")
    expect(_card(approver.open("#/approvals"), grant_id)).to_have_count(0)
    assert not _problems(approver, admin), (approver.problems, admin.problems)


def _local(t: datetime) -> str:
    return t.astimezone(BERLIN).strftime("%Y-%m-%dT%H:%M")


def test_change_the_end_then_revoke_and_the_history_shows_before_and_after(
        requester: Console, approver: Console, demo: Demo) -> None:
    user = requester.user
    grant_id = f"g-demo-{user}"  # the demo's grant on the web stack
    page = approver.open(f"#/grant/{grant_id}")
    expect(page.locator("section.summary")).to_contain_text("active")
    # shorten to two hours from now
    shorter = (datetime.now(UTC) + timedelta(hours=2)).replace(second=0, microsecond=0)
    change = page.get_by_role("form", name=f"Change the end of {grant_id}")
    page.get_by_role("button", name="Change end").click()
    change.get_by_label("New end").fill(_local(shorter))
    change.get_by_label("Comment").fill("shift ends early")
    change.get_by_role("button", name="Save end time").click()
    expect(page.locator(".grant-actions .ok")).to_contain_text("now ends")
    changed = page.locator("section.history ol.timeline > li").filter(has_text="changed")
    expect(changed).to_have_count(1, timeout=10_000)
    expect(changed).to_contain_text("expires_at:")
    expect(changed).to_contain_text("→")
    expect(changed).to_contain_text(shorter.astimezone(BERLIN).strftime("%H:%M:00"))
    expect(changed).to_contain_text("shift ends early")
    # extend to ten hours from now
    longer = (datetime.now(UTC) + timedelta(hours=10)).replace(second=0, microsecond=0)
    page.get_by_role("button", name="Change end").click()
    change.get_by_label("New end").fill(_local(longer))
    change.get_by_role("button", name="Save end time").click()
    extended = page.locator("section.history ol.timeline > li").filter(has_text="extended")
    expect(extended).to_have_count(1, timeout=10_000)
    expect(extended.locator("ul.changes li")).to_contain_text(
        f"{shorter.astimezone(BERLIN):%H:%M:00}")
    expect(extended.locator("ul.changes li")).to_contain_text(
        f"{longer.astimezone(BERLIN):%H:%M:00}")
    # the grantee gives the access up from their list
    mine = requester.open("#/access")
    row = mine.locator(f"tr[data-grant='{grant_id}']")
    expect(row.get_by_role("button", name="Change end")).to_have_count(0)  # approvers only
    row.get_by_role("button", name="Revoke").click()
    row.get_by_role("button", name="Revoke now").click()
    expect(row.locator(".ok")).to_contain_text("revoked")
    page = requester.open(f"#/grant/{grant_id}")
    revoked = page.locator("section.history ol.timeline > li").filter(has_text="revoked")
    expect(revoked).to_contain_text(f"by {user}@")
    expect(revoked.locator("ul.changes")).to_contain_text("state: approved → revoked")
    r = demo.ssh(user, "web01", "echo in")
    assert r.returncode != 0 and b"in\n" not in r.stdout


def test_end_session_button_ends_a_live_ssh_session_with_the_reason(
        auditor: Console, demo: Demo) -> None:
    user = demo.take_user()
    p = _started(demo, user)
    try:
        s = _live_session(demo, user)
        page = auditor.open(f"#/session/{s['id']}")
        panel = page.locator("section.end-session")
        panel.get_by_role("button", name="End session").click()
        panel.get_by_role("button", name="End session now").click()
        expect(panel.locator(".field-error")).to_contain_text("reason")
        reason = f"exfiltration suspected {word()}"
        panel.get_by_label("Reason").fill(reason)
        panel.get_by_role("button", name="End session now").click()
        expect(panel.locator(".ok")).to_contain_text("Session ended", timeout=20_000)
        expect(panel.locator(".ok")).to_contain_text(reason)
        # the summary above follows: it ended, and the status is no longer "live"
        summary = page.locator("section.summary")
        expect(summary).not_to_contain_text("live")
        expect(summary).to_contain_text("Ended")
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 255
    assert f"ended by the security team: {reason}".encode() in err, err
    assert not _problems(auditor), auditor.problems


def test_admin_locks_a_user_ending_their_session_and_refusing_logins_then_removes_it(
        admin: Console, demo: Demo) -> None:
    user = demo.take_user()
    p = _started(demo, user)
    page = admin.open("#/locks")
    try:
        form = page.locator("form.lock-form")
        form.get_by_label("Lock a").select_option("user")
        form.get_by_label("User").fill(user)
        form.get_by_role("button", name="Lock").click()
        expect(form.locator(".field-error:not([hidden])")).to_contain_text("reason")
        reason = f"stolen laptop {word()}"
        form.get_by_label("For").fill("1h")
        form.get_by_label("Reason").fill(reason)
        form.get_by_role("button", name="Lock").click()
        expect(form.locator(".ok")).to_contain_text(f"Locked user {user}@")
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 255
    assert f"locked by the security team: {reason}".encode() in err, err
    row = page.locator("table.locks tbody tr").filter(has_text=reason)
    expect(row).to_contain_text(f"admin@{demo.info['domain']}")
    expect(row).to_contain_text(f"{user}@")
    r = demo.ssh(user, "web01", "echo in", timeout=30)
    assert r.returncode == 255 and b"in\n" not in r.stdout
    row.get_by_role("button", name="Remove").click()
    expect(row.locator(".ok")).to_contain_text("removed")
    expect(page.locator("table.locks tbody tr").filter(has_text=reason)).to_have_count(0)
    assert reason not in demo.cli("lock", "list").stdout
    assert not _problems(admin), admin.problems


def test_a_requester_sees_no_queue_and_no_locks(requester: Console) -> None:
    page = requester.page
    expect(page.get_by_role("link", name="Access")).to_be_visible()
    for name in ("Approvals", "Locks", "Audit log"):
        expect(page.get_by_role("link", name=name)).to_be_hidden()
    requester.open("#/approvals")
    expect(page.locator("main [role=alert]")).to_contain_text("for approvers and admins")
    requester.open("#/locks")
    expect(page.locator("main [role=alert]")).to_contain_text("for admins")


def _web_up(base: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(base + "/api/openapi.json", timeout=5):  # noqa: S310
                return
        except OSError:
            assert time.monotonic() < deadline, "the second broker's web listener did not start"
            time.sleep(0.2)


def test_admin_access_needs_two_approvers_where_the_policy_says_so(
        browser: Browser, demo: Demo, tmp_path: Path) -> None:
    """A second broker on the demo's state whose policy wants two approvers for admin access:
    the queue counts the approvals ("1 of 2") and the second one grants it."""
    web_port = free_port()
    staff = demo.info["approver"]["group"], demo.info["admin"]["group"]
    cfg = demo.variant_config(tmp_path, extra=(
        "[grants]\ntwo_approvers_for_admin = true\n"
        f'[roles]\napprover_groups = ["{staff[0]}"]\nadmin_groups = ["{staff[1]}"]\n'
        f'[web]\nlisten_host = "127.0.0.1"\nlisten_port = {web_port}\nsecure_cookies = false\n'))
    proc, _ = serve_broker(cfg)
    consoles: list[Console] = []
    try:
        base = f"http://127.0.0.1:{web_port}"
        _web_up(base)
        user = demo.take_user()
        g = json.loads(demo.cli("grant", "request", "--user", user, "--stack", "stack-db",
                                "--vpc", "vpc-0demo", "--level", "admin", "--ticket", "CHG-9",
                                "--reason", "schema migration", "--json").stdout)
        first = login(browser, demo, demo.info["approver"]["user"], demo.info["password"],
                      base=base)
        consoles.append(first)
        card = _card(first.open("#/approvals"), g["id"])
        expect(card.locator(".approvals")).to_have_text("0 of 2 approvals")
        card.get_by_role("button", name="Approve").click()
        expect(card.locator(".ok")).to_contain_text("1 of 2 approvals")
        expect(card.locator(".approvals")).to_contain_text("1 of 2 approvals (approver@")
        # the same approver cannot be the second
        card.get_by_role("button", name="Approve").click()
        expect(card.get_by_role("alert")).to_contain_text("you already approved this request")
        second = login(browser, demo, demo.info["admin"]["user"], demo.info["password"],
                       base=base)
        consoles.append(second)
        card = _card(second.open("#/approvals"), g["id"])
        expect(card.locator(".approvals")).to_contain_text("1 of 2 approvals")
        card.get_by_label("Comment").fill("second pair of eyes")
        card.get_by_role("button", name="Approve").click()
        expect(card.locator(".ok")).to_contain_text(f"{g['id']} approved, valid until")
        page = second.open(f"#/grant/{g['id']}")
        recorded = page.locator("section.history ol.timeline > li").filter(
            has_text="approval-recorded")
        expect(recorded.locator("ul.changes")).to_contain_text("approvals: 1")
        expect(recorded.locator("ul.changes")).to_contain_text("needed: 2")
        assert not _problems(*consoles), [c.problems for c in consoles]
    finally:
        for c in consoles:
            c.context.close()
        proc.terminate()
        proc.wait(20)
