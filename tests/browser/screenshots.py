"""The console's screenshots for docs/console.md, taken from a real demo in Debian's Chromium:

    .venv/bin/python -m tests.browser.screenshots [docs/console]

Starts a demo, makes sessions through the real OpenSSH client and sftp (a shell that prints a
search word, an upload, a tampered recording), logs in as the demo auditor and saves one PNG per
page; then the access pages (alice requests, the demo approver decides), ending a live session
and the locks page (the demo admin)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.browser.conftest import CHROMIUM, run_session, sessions_of, sftp_put, wait_sealed
from tests.conftest import Demo, start_demo, stop_demo

TERM = "pre.ap-term-text"


def _login(browser: Browser, demo: Demo, user: str, password: str) -> Page:
    ctx = browser.new_context(viewport={"width": 1366, "height": 860},
                              timezone_id="Europe/Berlin", locale="en-GB")
    page = ctx.new_page()
    page.goto(demo.info["web_url"] + "/")
    page.get_by_label("User").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_label("Verification code").fill(demo.next_code(user))
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/#/sessions")
    return page


def _request(page: Page, stack: str, level: str, trigger: str, ticket: str, reason: str,
             hours: str = "8") -> str:
    page.goto(page.url.split("#")[0] + "#/request")
    page.get_by_label(stack).check()
    page.get_by_label("VPC", exact=True).select_option("vpc-0demo")
    page.get_by_label(level).check()
    page.get_by_label("Trigger").select_option(trigger)
    page.get_by_label("Ticket").fill(ticket)
    page.get_by_label("Reason").fill(reason)
    page.get_by_label("Hours").fill(hours)
    page.get_by_role("button", name="Request access").click()
    done = page.locator("form.request .ok")
    expect(done).to_contain_text("Requested: g-")
    return done.locator("a").first.inner_text()


def access_shots(browser: Browser, demo: Demo, out: Path, auditor: Page, bob: str) -> None:
    """The access-request pages (alice requests, the approver decides), ending a live session
    (the auditor) and the locks page (the admin)."""
    base = demo.info["web_url"]
    pw = demo.info["password"]
    alice = _login(browser, demo, "alice", pw)
    alice.goto(f"{base}/#/request")
    alice.get_by_label("stack-db").check()
    alice.get_by_label("VPC", exact=True).select_option(label="another VPC…")
    alice.get_by_label("Other VPC ID").fill("vpc-0payments")
    alice.get_by_label("Trigger").select_option("incident")
    alice.get_by_label("Ticket").fill("INC-4711")
    alice.get_by_label("Reason").fill("db01 disk at 95%: rotate the logs, restart the app")
    alice.get_by_role("button", name="Request access").click()
    expect(alice.locator("div.vpc .field-error")).to_be_visible()
    alice.screenshot(path=out / "request.png", full_page=True)
    first = _request(alice, "stack-db", "Read-only", "incident", "INC-4711",
                     "db01 disk at 95%: rotate the logs, restart the app", "4")
    _request(alice, "stack-web", "Admin", "change-request", "CHG-1024",
             "deploy release 1.4.2 to web01 and web02 (needs sudo)", "2")
    approver = _login(browser, demo, demo.info["approver"]["user"], pw)
    approver.goto(f"{base}/#/approvals")
    expect(approver.locator("article.request-card")).to_have_count(2)
    approver.screenshot(path=out / "approvals.png", full_page=True)
    card = approver.locator(f"article.request-card[data-grant='{first}']")
    card.get_by_label("Comment").fill("ok for the incident")
    card.get_by_role("button", name="Approve").click()
    expect(card.locator(".ok")).to_contain_text("approved")
    approver.goto(f"{base}/#/grant/{first}")
    change = approver.get_by_role("form", name=f"Change the end of {first}")
    approver.get_by_role("button", name="Change end").click()
    end = datetime.now(UTC) + timedelta(hours=2)
    change.get_by_label("New end").fill(end.astimezone(ZoneInfo("Europe/Berlin"))
                                        .strftime("%Y-%m-%dT%H:%M"))
    change.get_by_label("Comment").fill("two hours are enough")
    change.get_by_role("button", name="Save end time").click()
    expect(approver.locator("section.history ol.timeline > li")).to_have_count(3,
                                                                           timeout=10_000)
    approver.screenshot(path=out / "grant.png", full_page=True)
    alice.goto(f"{base}/#/access")
    expect(alice.locator("table.grants tbody tr")).to_have_count(3)
    alice.screenshot(path=out / "access.png", full_page=True)
    # a live session, ended from its page
    p = subprocess.Popen([*demo.ssh_args(f"{bob}+web01"), "echo started; sleep 60"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=demo.env(bob))
    try:
        assert p.stdout is not None and p.stdout.readline() == b"started\n"
        live = next(x for x in sessions_of(demo, bob) if x["status"] == "live")
        auditor.goto(f"{base}/#/session/{live['id']}")
        panel = auditor.locator("section.end-session")
        panel.get_by_role("button", name="End session").click()
        panel.get_by_label("Reason").fill("copying the customer database (INC-4712)")
        panel.get_by_role("button", name="End session now").click()
        expect(panel.locator(".ok")).to_contain_text("Session ended", timeout=20_000)
        auditor.screenshot(path=out / "end-session.png")
    finally:
        p.kill()
    admin = _login(browser, demo, demo.info["admin"]["user"], pw)
    admin.goto(f"{base}/#/locks")
    form = admin.locator("form.lock-form")
    form.get_by_label("Lock a").select_option("target")
    form.get_by_label("Target").fill("web02")
    form.get_by_label("For").fill("4h")
    form.get_by_label("Reason").fill("kernel CVE: patching web02")
    form.get_by_role("button", name="Lock").click()
    expect(form.locator(".ok")).to_be_visible()
    form.get_by_label("Lock a").select_option("user")
    form.get_by_label("User").fill(bob)
    form.get_by_label("Reason").fill("laptop reported stolen")
    form.get_by_role("button", name="Lock").click()
    expect(admin.locator("table.locks tbody tr")).to_have_count(2)
    admin.screenshot(path=out / "locks.png", full_page=True)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/console").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bb-console-shots-"))
    demo = start_demo(tmp / "state", users=6)
    try:
        alice, bob = demo.take_user(), demo.take_user()
        word = "zqdeploy" + uuid.uuid4().hex[:6]
        s = run_session(demo, alice, f"echo 'checking disk space before {word}'; "
                                     "printf 'Filesystem  Size  Used Avail Use%% Mounted on\\n"
                                     "/dev/xvda1   50G   21G   29G  42%% /\\n'; "
                                     f"sleep 2; echo 'restarting service {word}'; "
                                     "echo 'app.service: active (running)'")
        run_session(demo, bob, "echo 'release check'; seq 3")  # nothing of the machine it runs on
        payload = tmp / "release-notes.txt"
        payload.write_text("release 1.4.2\n" * 200)
        before = {x["id"] for x in sessions_of(demo, alice)}
        sftp_put(demo, alice, payload, "release-notes.txt")
        (up,) = [x for x in sessions_of(demo, alice) if x["id"] not in before]
        wait_sealed(demo, up)
        bad = run_session(demo, bob, "echo 'quarterly numbers'")
        cast = Path(str(bad["recording"])).with_suffix(".cast")
        cast.write_text(cast.read_text().replace("quarterly", "QUARTERLY"))
        demo.ssh(alice, "web01", "true", password="wrong")  # a failed login for the dashboard
        time.sleep(2)  # the text index and the seals
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            ctx = browser.new_context(viewport={"width": 1366, "height": 860},
                                      timezone_id="Europe/Berlin", locale="en-GB")
            page = ctx.new_page()
            base = demo.info["web_url"]
            a = demo.info["auditor"]
            page.goto(base + "/")
            page.get_by_label("User").fill(a["user"])
            page.get_by_label("Password").fill(a["password"])
            page.screenshot(path=out / "login.png")
            page.get_by_label("Verification code").fill(demo.next_code(a["user"]))
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url("**/#/sessions")
            page.goto(f"{base}/#/sessions?q={word}")
            expect(page.locator("table.sessions tbody tr").first).to_be_visible(timeout=30_000)
            page.screenshot(path=out / "sessions.png", full_page=True)
            page.locator("ul.hits a").last.click()
            expect(page.locator(TERM)).to_contain_text("restarting", timeout=15_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=out / "session.png", full_page=True)
            page.goto(f"{base}/#/session/{up['id']}")
            expect(page.locator("li.op-close")).to_be_visible()
            page.locator("#files-h").scroll_into_view_if_needed()
            page.screenshot(path=out / "files.png", full_page=True)
            page.goto(f"{base}/#/session/{bad['id']}")
            expect(page.locator("section.integrity")).to_have_attribute("data-status", "failed")
            page.screenshot(path=out / "integrity-failed.png")
            page.goto(f"{base}/#/audit")
            expect(page.locator("table.audit tbody tr").first).to_be_visible()
            page.screenshot(path=out / "audit.png")
            page.goto(f"{base}/#/dashboard")
            expect(page.locator(".cards")).to_be_visible()
            page.screenshot(path=out / "dashboard.png", full_page=True)
            access_shots(browser, demo, out, page, bob)
            browser.close()
        print(f"screenshots of session {s['id']} and others in {out}")  # noqa: T201
    finally:
        stop_demo(demo)


if __name__ == "__main__":
    main()
