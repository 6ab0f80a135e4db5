"""A real Chromium (Debian's, driven by Playwright) against the real demo broker's console.

One browser per test module; a page per role, logged in once through the login form with the
demo account's password and a fresh TOTP code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, sync_playwright

from tests.conftest import Demo

CHROMIUM = "/usr/bin/chromium"
SEARCH_WAIT = 30.0  # a session's text is indexed when its recording is sealed, after its end


def chromium_path() -> str:
    path = shutil.which("chromium") or CHROMIUM
    if not os.access(path, os.X_OK):
        pytest.skip("Debian's chromium is not installed (scripts/bootstrap installs it)")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@dataclass
class Console:
    """A logged-in page and what the browser said while the tests used it."""

    page: Page
    context: BrowserContext
    base: str
    user: str
    problems: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def open(self, hash_: str) -> Page:
        self.page.goto(f"{self.base}/{hash_}")
        return self.page


def _watch(page: Page, problems: list[str], dialogs: list[str]) -> None:
    def console(msg: ConsoleMessage) -> None:
        # a CSP refusal, a script error: the console must not cause either
        if msg.type == "error" and "401" not in msg.text:
            problems.append(msg.text)

    page.on("console", console)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def dialog(d: Any) -> None:
        dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", dialog)


def login(browser: Browser, demo: Demo, user: str, password: str, *,
          timezone: str = "Europe/Berlin", base: str | None = None,
          code: str | None = None) -> Console:
    """Log in through the form (``code``: the TOTP code to use; default the demo's next)."""
    context = browser.new_context(viewport={"width": 1366, "height": 900}, timezone_id=timezone,
                                  locale="en-GB")
    page = context.new_page()
    c = Console(page, context, base or demo.info["web_url"], user)
    _watch(page, c.problems, c.dialogs)
    page.goto(c.base + "/")
    # by their labels: the form is usable without seeing it
    page.get_by_label("User").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_label("Verification code").fill(code or demo.next_code(user))
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/#/sessions")
    return c


@pytest.fixture(scope="module")
def auditor(browser: Browser, demo: Demo) -> Iterator[Console]:
    a = demo.info["auditor"]
    c = login(browser, demo, a["user"], a["password"])
    try:
        yield c
    finally:
        c.context.close()


def word(prefix: str = "zq") -> str:
    """Letters and digits only: one token for the text index."""
    return prefix + uuid.uuid4().hex[:12]


def sessions_of(demo: Demo, user: str) -> list[dict[str, Any]]:
    return [s for s in demo.sessions() if str(s["user"]).startswith(user + "@")]


def run_session(demo: Demo, user: str, command: str, *, tty: bool = True) -> dict[str, Any]:
    """One exec session through the real OpenSSH client; its index row once it is sealed."""
    before = {s["id"] for s in sessions_of(demo, user)}
    r = demo.ssh(user, "web01", command, extra=("-tt",) if tty else ())
    assert r.returncode == 0, r.stderr
    (s,) = [s for s in sessions_of(demo, user) if s["id"] not in before]
    wait_sealed(demo, s)
    return s


def wait_sealed(demo: Demo, s: dict[str, Any], timeout: float = 30.0) -> None:
    manifest = Path(str(s["recording"])).with_suffix(".manifest.json")
    deadline = time.monotonic() + timeout
    while not manifest.exists():
        assert time.monotonic() < deadline, f"session {s['id']} was not sealed"
        time.sleep(0.05)


def sftp_put(demo: Demo, user: str, local: Path, remote: str) -> None:
    args = ["sftp", "-F", "/dev/null", "-o", f"UserKnownHostsFile={demo.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "PreferredAuthentications=keyboard-interactive",
            "-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=1", "-b", "-",
            "-P", str(demo.port), f"{user}+web01@127.0.0.1"]
    r = subprocess.run(args, input=f"put {local} {remote}\n".encode(), capture_output=True,
                       timeout=60, env=demo.env(user))
    assert r.returncode == 0, r.stderr
