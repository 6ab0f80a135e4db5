"""The console's live view in real Chromium: the auditor opens a live session (a real OpenSSH
shell in a pty through the demo) and sees what is typed there as it happens, with "live" and
the lag above it, then "session ended" and the replay offered; under the console's CSP (the
same-origin WebSocket is allowed by connect-src 'self', nothing else)."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import Console, sessions_of, word
from tests.conftest import Demo
from tests.e2e.test_terminal import Terminal

pytestmark = pytest.mark.browser

TERM = "pre.ap-term-text"


def _live_shell(demo: Demo, user: str) -> tuple[Terminal, str]:
    env = demo.env(user)
    env["TERM"] = "xterm"
    term = Terminal(demo.ssh_args(f"{user}+web01", "-tt"), env, rows=24, cols=100)
    term.send(b"PS1='RE''ADY> '; export PS1\r")
    term.expect(b"READY> ")
    deadline = time.monotonic() + 20
    while True:
        live = [s for s in sessions_of(demo, user) if s["status"] == "live"]
        if live:
            return term, live[0]["id"]
        assert time.monotonic() < deadline, "the session is not listed as live"
        time.sleep(0.2)


def test_the_live_view_shows_a_session_as_it_happens(auditor: Console, demo: Demo) -> None:
    user = demo.take_user()
    term, sid = _live_shell(demo, user)
    try:
        page = auditor.open(f"#/session/{sid}")
        expect(page.get_by_role("heading", name="Live")).to_be_visible(timeout=10_000)
        status = page.get_by_test_id("live-status")
        expect(status).to_have_attribute("data-state", "live", timeout=10_000)
        expect(status).to_contain_text("Live")
        screen = page.get_by_test_id("live-player").locator(TERM)
        expect(screen).to_contain_text("READY>", timeout=10_000)  # the screen so far
        for _ in range(2):
            w = word()
            term.send(f"echo {w[:4]}\"\"{w[4:]}\r".encode())
            term.expect(w.encode() + b"\r\n")
            seen = time.monotonic()
            expect(screen).to_contain_text(w, timeout=5_000)
            assert time.monotonic() - seen < 2.0  # the page polls the DOM; the broker < 1 s
        term.send(b"exit 0\r")
        assert term.close() == 0
        expect(status).to_have_attribute("data-state", "ended", timeout=10_000)
        expect(status).to_contain_text("Session ended (exit status 0)")
        expect(page.get_by_test_id("replay-ended")).to_be_visible()
        page.get_by_test_id("replay-ended").click()
        expect(page.get_by_role("heading", name="Replay")).to_be_visible(timeout=10_000)
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert auditor.problems == [], auditor.problems
