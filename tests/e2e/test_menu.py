"""The interactive menu (``ssh user@bastion`` in a terminal) with the real OpenSSH client in a
pty: pick by number and by part of a name, each pick a recorded session of its own, back at the
menu when it ends (also when the security team kills it), ``q``/Ctrl-C/Ctrl-D exit 0, a lock on
the user ends the connection, window changes reach the target; without a terminal, the list."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Demo
from tests.e2e.test_durability import BrokerProcess
from tests.e2e.test_terminal import Terminal

pytestmark = pytest.mark.e2e

PROMPT = b"Target (number or name, q quits): "


def _menu(demo: Demo, user: str, rows: int = 24, cols: int = 120, *,
          port: int | None = None, known_hosts: Path | None = None) -> Terminal:
    env = demo.env(user)
    env["TERM"] = "xterm"
    term = Terminal(demo.ssh_args(user, port=port, known_hosts=known_hosts), env, rows=rows,
                    cols=cols)
    term.expect(b"may reach now")
    term.expect(PROMPT)
    return term


def _shell_ready(term: Terminal, tag: str) -> None:
    term.send(f"PS1='RE''ADY-{tag}> '; export PS1\r".encode())
    term.expect(f"READY-{tag}> ".encode())


def _events(demo: Demo, name: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in demo.audit_lines() if e["event"] == name
            and all(e.get(k) == v for k, v in match.items())]


def _rows(demo: Demo, user: str) -> list[dict[str, Any]]:
    return sorted((s for s in demo.sessions() if s["user"].startswith(user + "@")),
                  key=lambda s: str(s["started_at"]))


def _replay(demo: Demo, sid: str) -> tuple[str, str]:
    """What the recording holds: (output, input), every byte (``export --raw``)."""
    events = [json.loads(line) for line in
              demo.cli("export", "--raw", sid).stdout.splitlines()[1:]]
    return ("".join(e[2] for e in events if e[1] == "o"),
            "".join(e[2] for e in events if e[1] == "i"))


def _end(term: Terminal) -> None:
    if term.proc.poll() is None:
        term.proc.kill()
        term.proc.wait(10)


def test_pick_by_number_then_by_name_each_a_recorded_session(demo: Demo) -> None:
    user = demo.take_user()
    term = _menu(demo, user)
    try:
        term.send(b"1\r")
        term.expect(b"Connecting to web01")
        _shell_ready(term, "A")
        term.send(b"echo MARK\"\"ONE\r")
        term.expect(b"MARKONE\r\n")
        term.send(b"exit\r")
        term.expect(b"Back from web01 (exit status 0).")
        term.expect(PROMPT)
        # typing narrows the list: "0" matches both, "02" only web02
        term.send(b"0")
        screen = term.expect(PROMPT + b"0")
        assert b"web01" in screen and b"web02" in screen
        term.send(b"2")
        screen = term.expect(PROMPT + b"02")
        assert b"web02" in screen and b"web01" not in screen
        term.send(b"\r")
        term.expect(b"Connecting to web02")
        _shell_ready(term, "B")
        term.send(b"echo MARK\"\"TWO\r")
        term.expect(b"MARKTWO\r\n")
        term.send(b"exit 3\r")
        term.expect(b"Back from web02 (exit status 3).")
        term.expect(PROMPT)
        term.send(b"q")
        assert term.close() == 0
    finally:
        _end(term)
    first, second = _rows(demo, user)
    assert (first["target_name"], first["kind"], first["exit_status"]) == ("web01", "shell", "0")
    assert (second["target_name"], second["kind"], second["exit_status"]) == (
        "web02", "shell", "3")
    out1, in1 = _replay(demo, first["id"])
    out2, in2 = _replay(demo, second["id"])
    assert "MARKONE" in out1 and "MARKTWO" not in out1 and "READY-B" not in out1
    assert "MARKTWO" in out2 and "MARKONE" not in out2 and "READY-A" not in out2
    for out, typed in ((out1, in1), (out2, in2)):  # the menu is in neither recording
        assert "may reach now" not in out and "Target (number" not in out
        assert "02\r" not in typed and not typed.startswith("1")
    [start] = _events(demo, "menu.start", user=first["user"])
    picks = _events(demo, "menu.pick", menu_id=start["menu_id"])
    assert [p["target_name"] for p in picks] == ["web01", "web02"]
    [end] = _events(demo, "menu.end", menu_id=start["menu_id"])
    assert end["sessions"] == [first["id"], second["id"]] and end["reason"] == "quit"


def test_a_target_not_granted_cannot_be_picked(demo: Demo) -> None:
    user = demo.take_user()
    denied = demo.info["denied_target"]
    log_path = Path(demo.info["target_logs"][denied])
    before = log_path.stat().st_size
    term = _menu(demo, user)
    try:
        term.send(f"{denied}\r".encode())
        term.expect(f"(no target matches '{denied}')".encode())
        term.expect(PROMPT)
        term.send(b"\x03")  # Ctrl-C at the menu: a clean end
        assert term.close() == 0
    finally:
        _end(term)
    assert _rows(demo, user) == []
    assert "Connection from" not in log_path.read_bytes()[before:].decode()


def test_killed_session_returns_to_the_menu_with_the_reason(demo: Demo) -> None:
    user = demo.take_user()
    term = _menu(demo, user)
    try:
        term.send(b"web01\r")
        term.expect(b"Connecting to web01")
        _shell_ready(term, "K")
        [live] = [s for s in _rows(demo, user) if s["status"] == "live"]
        demo.cli("sessions", "kill", live["id"], "--reason", "menu drill")
        term.expect(b"Back from web01: access ended (ended by the security team: menu drill).",
                    timeout=20)
        term.expect(PROMPT)
        term.send(b"2\r")  # still logged in: another pick works
        term.expect(b"Connecting to web02")
        _shell_ready(term, "L")
        term.send(b"exit\r")
        term.expect(PROMPT)
        term.send(b"\x04")  # Ctrl-D at the menu
        assert term.close() == 0
    finally:
        _end(term)
    killed, other = _rows(demo, user)
    assert killed["exit_status"] == "terminated:ended by the security team: menu drill"
    assert other["target_name"] == "web02" and other["exit_status"] == "0"


def test_a_lock_on_the_user_ends_the_menu_connection(demo: Demo) -> None:
    user = demo.take_user()
    term = _menu(demo, user)
    lock_id = ""
    try:
        term.send(b"1\r")
        _shell_ready(term, "M")
        lock_id = json.loads(demo.cli("lock", "--user", user, "--ttl", "1h", "--reason",
                                      "menu lock drill", "--json").stdout)["id"]
        term.expect(f"locked by the security team: menu lock drill (lock {lock_id})".encode(),
                    timeout=20)
        assert term.close() == 255
    finally:
        _end(term)
        if lock_id:
            demo.cli("lock", "remove", lock_id)
    [start] = _events(demo, "menu.start", user=_rows(demo, user)[0]["user"])
    [end] = _events(demo, "menu.end", menu_id=start["menu_id"])
    assert end["reason"] == f"lock {lock_id}"


def test_window_changes_reach_the_picked_session(demo: Demo) -> None:
    user = demo.take_user()
    term = _menu(demo, user, rows=30, cols=100)
    try:
        term.resize(35, 120)  # at the menu: the size the next pick's pty gets
        os.kill(term.proc.pid, signal.SIGWINCH)
        term.expect(PROMPT)
        term.send(b"1\r")
        _shell_ready(term, "R")
        term.send(b"stty size; echo END\"\"1\r")
        assert b"35 120" in term.expect(b"END1\r\n")
        term.resize(40, 132)
        os.kill(term.proc.pid, signal.SIGWINCH)
        deadline = time.monotonic() + 10
        while True:  # the window-change travels client -> bastion -> target
            term.send(b"stty size; echo END\"\"2\r")
            if b"40 132" in term.expect(b"END2\r\n") or time.monotonic() > deadline:
                break
        term.send(b"stty size; echo END\"\"3\r")
        assert b"40 132" in term.expect(b"END3\r\n")
        term.send(b"exit\r")
        term.expect(PROMPT)
        term.send(b"q")
        assert term.close() == 0
    finally:
        _end(term)


def test_without_a_terminal_the_list_is_printed(demo: Demo) -> None:
    user = demo.take_user()
    for command in (None, "list"):
        r = demo.ssh(user, None, command, extra=("-t",) if command else ())
        assert r.returncode == 0, r.stderr
        out = r.stdout.decode()
        assert "may reach now" in out and "web01" in out and "web02" in out
        assert demo.info["denied_target"] not in out and "Target (" not in out
    assert _rows(demo, user) == []


def test_idle_timeout_ends_a_pick_then_the_menu(demo: Demo, tmp_path: Path) -> None:
    cfg = demo.variant_config(tmp_path, ssh="session_idle_timeout_seconds = 2")
    cfg.write_text(cfg.read_text() + "[web]\nenabled = false\n"
                   "[grants]\nenforce_interval_seconds = 0.2\n")
    broker = BrokerProcess(cfg, tmp_path / "broker.log")
    user = demo.take_user()
    try:
        term = _menu(demo, user, port=broker.port,
                     known_hosts=demo.known_hosts_for(tmp_path, broker.port))
        try:
            term.send(b"1\r")
            _shell_ready(term, "I")
            t0 = time.monotonic()
            term.expect(b"Back from web01: access ended (idle timeout).", timeout=30)
            term.expect(PROMPT)
            assert time.monotonic() - t0 >= 1.5
            term.expect(b"idle timeout at the menu", timeout=30)
            assert term.close() == 255
        finally:
            _end(term)
    finally:
        broker.kill()
    assert "Traceback" not in broker.text()
    [row] = _rows(demo, user)
    assert row["exit_status"] == "terminated:idle timeout"
    [end] = _events(demo, "menu.end", sessions=[row["id"]])
    assert end["reason"] == "idle timeout"
