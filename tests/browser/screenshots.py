"""The console's screenshots for docs/console.md, taken from a real demo in Debian's Chromium:

    .venv/bin/python -m tests.browser.screenshots [docs/console]

Starts a demo, makes sessions through the real OpenSSH client and sftp (a shell that prints a
search word, an upload, a tampered recording), logs in as the demo auditor and saves one PNG per
page."""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from tests.browser.conftest import CHROMIUM, run_session, sessions_of, sftp_put, wait_sealed
from tests.conftest import start_demo, stop_demo

TERM = "pre.ap-term-text"


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
            browser.close()
        print(f"screenshots of session {s['id']} and others in {out}")  # noqa: T201
    finally:
        stop_demo(demo)


if __name__ == "__main__":
    main()
