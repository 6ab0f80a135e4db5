"""The security console in a real Chromium against the real demo broker: sessions made through
the real OpenSSH client and sftp, found by what they printed, replayed in the asciinema player,
their file operations, a tampered recording, a user who is not an auditor, hostile output, and
the Content-Security-Policy on everything the console loads."""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import Browser, Page, Request, Response, expect

from broker.web.api import CONSOLE_CSP
from broker.web.console_routes import load_console
from tests.browser.conftest import (
    SEARCH_WAIT,
    Console,
    login,
    run_session,
    sessions_of,
    sftp_put,
    wait_sealed,
    word,
)
from tests.conftest import Demo

pytestmark = pytest.mark.browser

TERM = "pre.ap-term-text"


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback test URL
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _search(c: Console, text: str) -> Page:
    """The search page until the session's text is indexed (it is, once the session is sealed)."""
    page = c.open(f"#/sessions?q={text}")
    row = page.locator("table.sessions tbody tr")
    expect(page.locator("section[aria-label=Results]")).not_to_contain_text("Searching",
                                                                          timeout=10_000)
    for _ in range(int(SEARCH_WAIT / 0.5)):
        if row.count():
            return page
        page.wait_for_timeout(500)
        page.reload()
        page.wait_for_selector("section[aria-label=Results] :is(table, p)")
    raise AssertionError(f"the console found no session that printed {text!r}")


def test_console_files_are_served_with_the_csp_types_and_etags(demo: Demo) -> None:
    base = demo.info["web_url"]
    names = sorted(load_console())
    assert {"index.html", "app.js", "app.css", "util.js", "replay.js"} <= set(names)
    types = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
             ".svg": "image/svg+xml"}
    paths = ["/"] + [f"/console/{n}" for n in names] + [
        "/console/player/asciinema-player.min.js", "/console/player/asciinema-player.css"]
    for path in paths:
        status, headers, body = _get(base + path)
        assert status == 200, path
        assert headers["Content-Security-Policy"] == CONSOLE_CSP, path
        assert headers["X-Content-Type-Options"] == "nosniff"
        suffix = Path(path).suffix or ".html"
        assert headers["Content-Type"].startswith(types[suffix]), (path, headers["Content-Type"])
        assert headers["Cache-Control"] == "no-cache" and headers["ETag"], path
        # revalidation: unchanged files cost a 304, which carries the policy as well
        status, again, _ = _get(base + path, {"If-None-Match": headers["ETag"]})
        assert status == 304 and again["Content-Security-Policy"] == CONSOLE_CSP, path
        assert body
    # names outside the fixed set are not files: no path from the request reaches the disk
    for path in ("/console/../api.py", "/console/player/package.json", "/console/nope.js",
                 "/console/%2e%2e%2fapi.py", "/console/player/..%2f..%2fpackage.json"):
        status, headers, _ = _get(base + path)
        assert status == 404, path
        assert headers["Content-Security-Policy"] == CONSOLE_CSP, path
    # the API keeps its own, stricter policy
    _, headers, _ = _get(base + "/api/openapi.json")
    assert headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"


def test_no_inline_script_or_style_in_the_console_files() -> None:
    files = load_console()
    html = files["index.html"].body.decode()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script in index.html"
    assert "<style" not in html and " style=" not in html and "javascript:" not in html
    for name, asset in files.items():
        if name.endswith(".js"):
            js = asset.body.decode()
            for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                           "eval(", "new Function", "setAttribute(\"style\""):
                assert banned not in js, f"{name} uses {banned}"


def test_auditor_finds_a_session_by_a_printed_word_and_replays_it(auditor: Console,
                                                                  demo: Demo) -> None:
    user = demo.take_user()
    w = word()
    s = run_session(demo, user, f"sleep 1; echo console {w} end")
    page = _search(auditor, w)
    rows = page.locator("table.sessions tbody tr")
    expect(rows).to_have_count(1)
    row = rows.first
    expect(row).to_contain_text(f"{user}@")
    expect(row).to_contain_text("web01")
    expect(row).to_contain_text("exec")
    # the start in the viewer's time zone (the context is in Berlin)
    started = datetime.fromisoformat(s["started_at"]).astimezone(ZoneInfo("Europe/Berlin"))
    expect(row).to_contain_text(started.strftime("%H:%M:%S"))
    # the hit, with its snippet, opens the session at that moment
    hit = row.locator("ul.hits li").first
    expect(hit).to_contain_text(w)
    hit.get_by_role("link").click()
    page.wait_for_url(f"**/#/session/{s['id']}*")
    expect(page.locator("section.integrity")).to_have_attribute("data-status", "verified")
    expect(page.locator(TERM)).to_contain_text(w, timeout=15_000)
    # the downloads are the real files
    cast = page.get_by_role("link", name="Download recording (.cast)")
    with page.expect_download() as dl:
        cast.click()
    saved = Path(dl.value.path()).read_text()
    assert w in saved and saved.startswith("{")
    assert not auditor.dialogs and not auditor.problems, auditor.problems


def test_player_controls_speed_idle_and_seek(auditor: Console, demo: Demo) -> None:
    user = demo.take_user()
    first, second = word("zqa"), word("zqb")
    s = run_session(demo, user, f"echo {first}; sleep 3; echo {second}")
    page = auditor.open(f"#/session/{s['id']}")
    expect(page.locator(TERM)).to_be_visible(timeout=10_000)
    page.get_by_label("Speed").select_option("4")
    page.get_by_label("Idle time limit").select_option("1")
    # seeking by the whole-session position slider to its end shows the later output
    slider = page.get_by_label("Position")
    slider.fill(str(int(float(str(slider.get_attribute("max"))))))
    expect(page.locator(TERM)).to_contain_text(second, timeout=15_000)
    expect(page.locator(TERM)).to_contain_text(first)
    # markers: finding a word in the session lists its hit, and the hit seeks the player
    page.get_by_label("Find in this session").fill(first)
    page.get_by_role("button", name="Find").click()
    hit = page.locator("ol.hits li button").first
    expect(hit).to_be_visible(timeout=10_000)
    hit.click()
    expect(page.locator(TERM)).to_contain_text(first, timeout=10_000)
    expect(page.locator(".ap-marker-container")).not_to_have_count(0)
    assert not auditor.problems, auditor.problems


def test_a_large_recording_plays_on_across_windows_from_one_response(auditor: Console,
                                                                    demo: Demo) -> None:
    """6 MiB over 4 s: the first window is about 1 MiB and the rest come in windows of about
    4 MiB, read from the one response the first window started."""
    user = demo.take_user()
    w = word()
    program = ("import sys,time\n"
               "for i in range(40):\n"
               "    sys.stdout.write(''.join('%06d %s filler text for the window test\\n'"
               " % (i * 3000 + j, 'x' * 12) for j in range(3000))); sys.stdout.flush()\n"
               "    time.sleep(0.1)\n"
               f"print('{w}')\n")
    s = run_session(demo, user, f'python3 -c "{program}"')
    assert int(s["bytes_out"]) > 5 * 2**20
    casts: list[str] = []
    page = auditor.page

    def record(req: Request) -> None:
        if "recording.cast" in req.url:
            casts.append(req.url)

    page.on("request", record)
    try:
        auditor.open(f"#/session/{s['id']}?t=0")  # plays from the start
        expect(page.get_by_test_id("window")).to_contain_text("Loaded: 0:00", timeout=10_000)
        expect(page.locator(TERM)).to_contain_text(w, timeout=30_000)
        # ~1 MiB, then ~4 MiB, then the rest: three windows shown one after the other
        assert int(page.get_by_test_id("window").get_attribute("data-shown") or 0) >= 3
        expect(page.get_by_test_id("window")).to_contain_text("end")
    finally:
        page.remove_listener("request", record)
    assert len(casts) == 1, casts
    assert not auditor.problems, auditor.problems


def test_jump_sessions_are_grouped_under_their_connection(auditor: Console, demo: Demo,
                                                          tmp_path: Path) -> None:
    user = demo.take_user()
    w = word()
    kh = tmp_path / "known_hosts_targets"
    kh.write_text(demo.cli("ca", "known-hosts").stdout)
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"Host bastion\n  HostName 127.0.0.1\n  Port {demo.port}\n  User {user}\n"
        f"  UserKnownHostsFile {demo.known_hosts}\n  StrictHostKeyChecking yes\n"
        "  PreferredAuthentications keyboard-interactive\n  BatchMode no\n"
        f"Host web01\n  ProxyJump bastion\n  UserKnownHostsFile {kh}\n"
        "  StrictHostKeyChecking yes\n  BatchMode no\n")
    r = subprocess.run(["ssh", "-F", str(cfg), "web01", f"echo {w}"], capture_output=True,
                       timeout=90, env=demo.env(user))
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30
    while not (len(rows := sessions_of(demo, user)) == 2 and all(s["ended_at"] for s in rows)):
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    (jump,) = [s for s in rows if s["kind"] == "jump"]
    (inner,) = [s for s in rows if s["kind"] == "exec"]
    wait_sealed(demo, inner)
    # the list shows connections: the jump, not the session inside it
    page = auditor.open(f"#/sessions?user={user}")
    listed = page.locator("table.sessions tbody tr")
    expect(listed).to_have_count(1)
    expect(listed.first).to_contain_text("jump")
    listed.first.get_by_role("link").click()
    page.wait_for_url(f"**/#/session/{jump['id']}*")
    expect(page.locator("section[aria-labelledby=tunnel-h]")).to_contain_text("forward web01:22")
    kids = page.locator("section[aria-labelledby=kids-h] table.sessions tbody tr")
    expect(kids).to_have_count(1)
    expect(kids.first).to_contain_text(w)  # its command
    kids.first.get_by_role("link").click()
    page.wait_for_url(f"**/#/session/{inner['id']}*")
    back = page.locator("section.summary").get_by_role("link", name=jump["id"])
    expect(back).to_be_visible()
    expect(page.locator(TERM)).to_be_visible(timeout=10_000)


def test_sftp_upload_is_on_the_file_timeline(auditor: Console, demo: Demo, tmp_path: Path
                                             ) -> None:
    user = demo.take_user()
    data = uuid.uuid4().bytes * 1000
    local = tmp_path / "payload.bin"
    local.write_bytes(data)
    remote = f"bb-console-{uuid.uuid4().hex[:8]}.bin"
    before = {x["id"] for x in sessions_of(demo, user)}
    sftp_put(demo, user, local, remote)
    (s,) = [x for x in sessions_of(demo, user) if x["id"] not in before]
    wait_sealed(demo, s)
    page = auditor.open(f"#/session/{s['id']}")
    files = page.locator("section[aria-labelledby=files-h]")
    upload = files.locator("li.op-close")
    expect(upload).to_contain_text(remote)
    expect(upload).to_contain_text("upload")
    expect(upload).to_contain_text(hashlib.sha256(data).hexdigest())
    expect(files.locator("li.op-open")).to_contain_text(remote)


def test_a_tampered_recording_is_flagged_as_failed(auditor: Console, demo: Demo) -> None:
    user = demo.take_user()
    w = word()
    s = run_session(demo, user, f"echo {w}")
    cast = Path(str(s["recording"])).with_suffix(".cast")
    text = cast.read_text()
    assert w in text
    cast.write_text(text.replace(w, "zz" + w[2:]))  # same size, other bytes
    page = auditor.open(f"#/session/{s['id']}")
    banner = page.locator("section.integrity")
    expect(banner).to_have_attribute("data-status", "failed")
    expect(banner).to_have_attribute("role", "alert")
    expect(banner).to_contain_text("FAILED")
    expect(banner.locator("li")).not_to_have_count(0)


def test_a_user_sees_only_their_own_sessions(browser: Browser, demo: Demo) -> None:
    mine, other = demo.take_user(), demo.take_user()
    first = run_session(demo, mine, "echo mine")
    own = run_session(demo, mine, "echo mine again")
    theirs = run_session(demo, other, "echo theirs")
    c = login(browser, demo, mine, demo.info["password"])
    try:
        page = c.page
        rows = page.locator("table.sessions tbody tr")
        expect(rows.first).to_be_visible()
        users = rows.locator("td:nth-child(2)").all_inner_texts()
        assert users and all(u == f"{mine}@{demo.info['domain']}" for u in users), users
        expect(page.locator(f"a[href^='#/session/{own['id']}']")).to_have_count(1)
        # keyset paging: one a page, newest first, "More sessions" until there is no more
        c.open("#/sessions?limit=1")
        more = page.get_by_role("button", name="More sessions")
        expect(rows).to_have_count(1)
        expect(rows.first.locator(f"a[href^='#/session/{own['id']}']")).to_have_count(1)
        more.click()
        expect(rows).to_have_count(2)
        expect(rows.nth(1).locator(f"a[href^='#/session/{first['id']}']")).to_have_count(1)
        expect(more).to_be_hidden()  # the second page was the last
        expect(page.get_by_role("link", name="Audit log")).to_be_hidden()
        # another user's session by its address: refused, nothing of it shown
        c.open(f"#/session/{theirs['id']}")
        expect(page.locator("main [role=alert]")).to_be_visible()
        expect(page.locator("section.integrity")).to_have_count(0)
        expect(page.locator("main")).not_to_contain_text("theirs")
        c.open("#/audit")
        expect(page.locator("main")).to_contain_text("for auditors")
    finally:
        c.context.close()


def test_keyboard_only_login_as_the_demo_approver(browser: Browser, demo: Demo) -> None:
    """The login form and the pages work from the keyboard alone (labels, real links and
    buttons, visible focus); the demo approver has the approver role, not the auditor's."""
    a = demo.info["approver"]
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    try:
        page = context.new_page()
        page.goto(demo.info["web_url"] + "/")
        expect(page.get_by_label("User")).to_be_focused()
        page.keyboard.type(a["user"])
        page.keyboard.press("Tab")
        expect(page.get_by_label("Password")).to_be_focused()
        page.keyboard.type(a["password"])
        page.keyboard.press("Tab")
        page.keyboard.type(demo.next_code(a["user"]))
        page.keyboard.press("Enter")
        page.wait_for_url("**/#/sessions")
        expect(page.locator("#who")).to_contain_text("approver")
        expect(page.locator("#who")).not_to_contain_text("auditor")
        expect(page.get_by_role("link", name="Audit log")).to_be_hidden()
        expect(page.locator("main")).to_contain_text("You see your own sessions")
        # each page focuses its heading; backwards from it: log out, the pages, the skip link
        expect(page.get_by_role("heading", name="Sessions")).to_be_focused()
        page.keyboard.press("Shift+Tab")
        expect(page.get_by_role("button", name="Log out")).to_be_focused()
        for name in ("Approvals", "Access", "Sessions", "Dashboard"):  # no Audit log, Locks
            page.keyboard.press("Shift+Tab")
            expect(page.get_by_role("link", name=name, exact=True)).to_be_focused()
        page.keyboard.press("Shift+Tab")
        skip = page.get_by_role("link", name="Skip to content")
        expect(skip).to_be_focused()
        outline = skip.evaluate("e => getComputedStyle(e).outlineStyle")
        assert outline not in ("", "none"), outline
        page.keyboard.press("Tab")
        expect(page.get_by_role("link", name="Dashboard")).to_be_focused()
        page.keyboard.press("Enter")
        page.wait_for_url("**/#/dashboard")
        expect(page.get_by_role("heading", name="Dashboard")).to_be_focused()
    finally:
        context.close()


def test_hostile_output_is_shown_as_text(auditor: Console, demo: Demo) -> None:
    user = demo.take_user()
    payload = "<script>alert(1)</script>"
    img = "<img src=x onerror=alert(2)>"
    # a title change (OSC 0) and a clipboard write (OSC 52) around the markup
    s = run_session(demo, user, f"printf '\\033]0;pwned\\007{payload}\\n\\033]52;c;cHduZWQ=\\007"
                                f"{img}\\n'")
    page = auditor.open(f"#/session/{s['id']}")
    expect(page.locator(TERM)).to_be_visible(timeout=10_000)
    page.locator(".ap-player").first.click()  # play
    expect(page.locator(TERM)).to_contain_text(payload, timeout=15_000)
    expect(page.locator(TERM)).to_contain_text(img)
    expect(page.locator("section.summary dl.facts")).to_contain_text(payload)  # the command, as text
    # nothing ran and nothing was added: the console's two scripts, no image, the same title
    assert page.locator("script").count() == 2
    assert page.locator("main img").count() == 0
    assert page.title().endswith("· bastion-broker") and "pwned" not in page.title()
    page.wait_for_timeout(500)
    assert not auditor.dialogs, auditor.dialogs


def test_every_console_response_in_the_browser_carries_the_csp(browser: Browser,
                                                               auditor: Console) -> None:
    seen: list[Response] = []
    page = auditor.page

    def record(r: Response) -> None:
        seen.append(r)

    page.on("response", record)
    try:
        page.goto(auditor.base + "/?reload=1#/dashboard")
        expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
        auditor.open("#/audit")
        expect(page.locator("table.audit tbody tr").first).to_be_visible()
    finally:
        page.remove_listener("response", record)
    console = [r for r in seen if re.match(r"^/(console/|$|\?)", _path(r.url))]
    assert {_path(r.url).split("?")[0] for r in console} >= {
        "/", "/console/app.js", "/console/app.css", "/console/util.js"}
    for r in console:
        assert r.headers["content-security-policy"] == CONSOLE_CSP, r.url
    assert not auditor.problems, auditor.problems


def _path(url: str) -> str:
    return "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"


def test_the_dashboard_shows_the_fleet_to_auditors_only(auditor: Console, demo: Demo,
                                                         browser: Browser) -> None:
    """The bastions' heartbeats (GET /api/bastions): this one alive, with its open sessions; a
    requester sees neither the section nor the API."""
    import socket

    page = auditor.open("#/dashboard")
    section = page.get_by_role("region", name="Bastions")
    this = section.locator("tbody tr", has_text="(this one)")
    expect(this).to_have_count(1, timeout=10_000)
    expect(this.locator("td").first).to_have_text(f"{socket.gethostname()} (this one)")
    expect(this.locator(".badge")).to_have_text("alive")
    assert re.fullmatch(r"\d+", this.locator("td").nth(4).inner_text())
    assert not auditor.problems, auditor.problems
    user = demo.take_user()
    requester = login(browser, demo, user, demo.info["password"])
    try:
        p = requester.open("#/dashboard")
        expect(p.get_by_role("heading", name="Dashboard")).to_be_visible()
        expect(p.locator(".cards")).to_be_visible()
        expect(p.get_by_role("region", name="Bastions")).to_have_count(0)
        status = p.evaluate("fetch('/api/bastions').then((r) => r.status)")
        assert status == 403
    finally:
        requester.context.close()
