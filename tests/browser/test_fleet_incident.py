"""An incident on a fleet of two bastions sharing PostgreSQL, in a real Chromium: the auditor
watches a user's live shell on bastion A in A's console as it happens, then an admin locks the
user in A's console, and both of the user's sessions end, the one on A (the live view says so)
and the one on B, each ssh client printing the lock's reason."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest
from playwright.sync_api import Browser, expect

from broker.runtime import free_port
from tests.browser.conftest import Console, login, word
from tests.browser.test_console_grants import _problems, _web_up
from tests.conftest import Demo, broker_cli, serve_broker
from tests.contract import pgserver
from tests.contract.pgserver import PgServer
from tests.e2e.test_terminal import Terminal

pytestmark = [pytest.mark.browser, pytest.mark.postgres]

TERM = "pre.ap-term-text"


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with pgserver.running() as server:
        yield server


class Codes:
    """TOTP codes of accounts enrolled on the fleet's store: each step used once per user."""

    def __init__(self) -> None:
        self._totp: dict[str, pyotp.TOTP] = {}
        self._last: dict[str, int] = {}

    def enroll(self, cfg: Path, user: str) -> None:
        found = re.search(r"secret=([A-Z2-7]+)", broker_cli(cfg, "totp", "enroll", user))
        assert found is not None
        self._totp[user] = pyotp.TOTP(found.group(1))

    def next(self, user: str) -> str:
        step = max(int(time.time()) // 30, self._last.get(user, -1) + 1)
        while step > int(time.time()) // 30 + 1:
            time.sleep(0.5)
        self._last[user] = step
        return str(self._totp[user].generate_otp(step))


def test_watch_on_one_bastion_then_a_lock_in_the_console_ends_sessions_on_both(
        browser: Browser, demo: Demo, pg: PgServer, tmp_path: Path) -> None:
    web_port = free_port()
    staff = demo.info["auditor"]["group"], demo.info["admin"]["group"]
    cfgs = []
    for name, web in (("a", True), ("b", False)):
        web_cfg = (f'[web]\nlisten_host = "127.0.0.1"\nlisten_port = {web_port}\n'
                   "secure_cookies = false\n" if web else "[web]\nenabled = false\n")
        cfgs.append(demo.fleet_config(tmp_path, name, pg.dsn(), enforce_interval=1, extra=(
            f'[roles]\nauditor_groups = ["{staff[0]}"]\nadmin_groups = ["{staff[1]}"]\n'
            f'{web_cfg}[recordings]\ndir = "{tmp_path / name / "recordings"}"\n')))
    a_cfg, b_cfg = cfgs
    procs: list[subprocess.Popen[bytes]] = []
    consoles: list[Console] = []
    term: Terminal | None = None
    on_b: subprocess.Popen[bytes] | None = None
    try:
        (pa, port_a), (pb, port_b) = serve_broker(a_cfg), serve_broker(b_cfg)
        procs = [pa, pb]
        base = f"http://127.0.0.1:{web_port}"
        _web_up(base)
        user = demo.take_user()
        auditor, admin = demo.info["auditor"], demo.info["admin"]
        codes = Codes()
        for who in (user, auditor["user"], admin["user"]):
            codes.enroll(a_cfg, who)
        broker_cli(a_cfg, "grant", "add", "--user", user, "--domain", demo.info["domain"], "--stack",
             "stack-web", "--vpc", "vpc-0demo", "--level", "read-only", "--ticket", "INC-19",
             "--reason", "fleet incident drill", "--json")

        # the user: a shell on A (in a pty) and a command on B
        env = demo.env(user, code=codes.next(user))
        env["TERM"] = "xterm"
        term = Terminal(demo.ssh_args(f"{user}+web01", "-tt", port=port_a,
                                      known_hosts=demo.known_hosts_for(tmp_path, port_a)),
                        env, rows=24, cols=100)
        term.send(b"PS1='RE''ADY> '; export PS1\r")
        term.expect(b"READY> ")
        on_b = subprocess.Popen(
            [*demo.ssh_args(f"{user}+web01", port=port_b,
                            known_hosts=demo.known_hosts_for(tmp_path, port_b)),
             "echo on-b; sleep 60; echo never"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=demo.env(user, code=codes.next(user)))
        assert on_b.stdout is not None and on_b.stdout.readline() == b"on-b\n"
        rows = json.loads(broker_cli(a_cfg, "sessions", "list", "--json", "--user", user))
        live = [r for r in rows if r["status"] == "live"]
        assert len(live) == 2, rows
        [sid_a] = [r["id"] for r in live
                   if Path(str(r["recording"])).is_relative_to(tmp_path / "a")]

        # the auditor watches A's session in A's console as it happens
        watcher = login(browser, demo, auditor["user"], auditor["password"], base=base,
                        code=codes.next(auditor["user"]))
        consoles.append(watcher)
        page = watcher.open(f"#/session/{sid_a}")
        status = page.get_by_test_id("live-status")
        expect(status).to_have_attribute("data-state", "live", timeout=10_000)
        screen = page.get_by_test_id("live-player").locator(TERM)
        w = word()
        term.send(f"echo {w}\r".encode())
        term.expect(w.encode() + b"\r\n")
        expect(screen).to_contain_text(w, timeout=5_000)

        # the admin locks the user in A's console: both sessions end, on A and on B
        locker = login(browser, demo, admin["user"], admin["password"], base=base,
                       code=codes.next(admin["user"]))
        consoles.append(locker)
        lp = locker.open("#/locks")
        form = lp.locator("form.lock-form")
        form.get_by_label("Lock a").select_option("user")
        form.get_by_label("User").fill(user)
        reason = f"credential theft {word()}"
        form.get_by_label("Reason").fill(reason)
        form.get_by_role("button", name="Lock").click()
        expect(form.locator(".ok")).to_contain_text(f"Locked user {user}@")
        _, err_b = on_b.communicate(timeout=20)
        assert on_b.returncode == 255
        assert f"locked by the security team: {reason}".encode() in err_b, err_b
        term.expect(f"locked by the security team: {reason}".encode())
        assert term.close() == 255
        expect(status).to_have_attribute("data-state", "ended", timeout=15_000)
        ended = json.loads(broker_cli(a_cfg, "sessions", "list", "--json", "--user", user))
        assert all(r["status"] != "live" for r in ended), ended
        assert not _problems(*consoles), [c.problems for c in consoles]
    finally:
        for c in consoles:
            c.context.close()
        if on_b is not None and on_b.poll() is None:
            on_b.kill()
        if term is not None and term.proc.poll() is None:
            term.proc.kill()
        for p in procs:
            p.terminate()
            p.wait(20)

