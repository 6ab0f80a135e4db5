"""A broker whose ``[web] player_dir`` holds no player: the console still works and says plainly
that replay is unavailable (and downloads stay), instead of an empty box or a script error."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from tests.browser.conftest import login, run_session
from tests.conftest import BIN, Demo

pytestmark = pytest.mark.browser


@pytest.fixture
def bare_broker(demo: Demo, tmp_path: Path) -> Iterator[str]:
    """A second broker on this demo's state whose player_dir is an empty directory."""
    empty = tmp_path / "no-player"
    empty.mkdir()
    cfg = demo.variant_config(tmp_path, extra=(
        '[web]\nlisten_host = "127.0.0.1"\nlisten_port = 0\nsecure_cookies = false\n'
        f'player_dir = "{empty}"\n'))
    proc = subprocess.Popen([str(BIN), "--config", str(cfg), "serve"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    url = None
    deadline = time.monotonic() + 60
    try:
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if b'"web.listening"' in line:
                url = str(json.loads(line)["url"])
        assert url, "the second broker's web listener did not start"
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_console_says_when_the_player_is_missing(browser: Browser, demo: Demo,
                                                     bare_broker: str) -> None:
    user = demo.take_user()
    s = run_session(demo, user, "echo no player here")
    c = login(browser, demo, user, demo.info["password"], base=bare_broker)
    try:
        page = c.open(f"#/session/{s['id']}")
        expect(page.locator(".replay [role=alert]")).to_contain_text(
            "asciinema player is not installed")
        expect(page.get_by_role("link", name="Download recording (.cast)")).to_be_visible()
        expect(page.locator("section.integrity")).to_have_attribute("data-status", "verified")
    finally:
        c.context.close()
