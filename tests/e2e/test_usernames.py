"""User names as typed, through real brokers: asyncssh's SASLprep folds fullwidth letters and
drops soft hyphens, so such names are refused (or, with ``[identity] normalize_names``, accepted)
and audited as sent; a name asyncssh cannot prepare (a control byte) drops the connection with
an audit event. With the patches (the demo) and on stock asyncssh (the raw name unknown: any
name that is not printable ASCII is refused)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh.connection
import pytest

from broker.ssh.patches import STOCK_ENV
from tests.conftest import Demo
from tests.e2e.test_durability import BrokerProcess

pytestmark = pytest.mark.e2e


def fullwidth(name: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if c.isalnum() else c for c in name)


def ssh(demo: Demo, user: str, login: str, port: int | None = None,
        known_hosts: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    args = demo.ssh_args(login, port=port, known_hosts=known_hosts)
    return subprocess.run([*args, "echo in"], capture_output=True, timeout=60,
                          env=demo.env(user))


def events(demo: Demo, event: str, since: int) -> list[dict[str, Any]]:
    return [e for e in demo.audit_lines()[since:] if e["event"] == event]


def raw_login(demo: Demo, login: str, port: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """An SSH client that sends ``login`` as is (its own SASLprep skipped): the error it gets."""
    monkeypatch.setattr(asyncssh.connection, "saslprep", lambda s: s)

    async def run() -> str:
        try:
            async with asyncssh.connect("127.0.0.1", port, username=login, known_hosts=None,
                                        password="x", config=None,
                                        preferred_auth="keyboard-interactive"):
                return "connected"
        except (asyncssh.Error, OSError) as exc:
            return repr(exc)

    return asyncio.run(run())


@pytest.fixture(scope="module")
def stock(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    tmp = tmp_path_factory.mktemp("stock-names")
    cfg = demo.variant_config(tmp)
    cfg.write_text(cfg.read_text() + "[web]\nenabled = false\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(STOCK_ENV, "1")
        broker = BrokerProcess(cfg, tmp / "broker.log")
    broker.known_hosts = demo.known_hosts_for(tmp, broker.port)  # type: ignore[attr-defined]
    try:
        yield broker
    finally:
        if broker.proc.poll() is None:
            broker.proc.send_signal(signal.SIGTERM)
        broker.wait(30)
        assert "Traceback" not in broker.text()


def test_names_that_saslprep_changes_are_refused_and_audited_as_sent(demo: Demo) -> None:
    user = demo.take_user()
    start = len(demo.audit_lines())
    for login, sent in ((fullwidth(user) + "+web01",
                         "".join(f"\\u{ord(c):04x}" for c in fullwidth(user)) + "+web01"),
                        (user[:2] + "\u00ad" + user[2:] + "+web01",
                         user[:2] + "\\xad" + user[2:] + "+web01")):
        r = ssh(demo, user, login)
        assert r.returncode == 255 and b"in\n" not in r.stdout, r.stderr
        refused = events(demo, "auth.username_refused", start)
        assert refused and refused[-1]["user_as_sent"] == sent, refused
        assert refused[-1]["user"] == user + "+web01"  # what asyncssh made of it
        assert "normalize_names" in refused[-1]["reason"]
    assert ssh(demo, user, user + "+web01").stdout == b"in\n"  # the name as is still works


def test_normalize_names_accepts_them_and_audits_both(demo: Demo, tmp_path: Path) -> None:
    cfg = demo.variant_config(tmp_path, identity="normalize_names = true")
    cfg.write_text(cfg.read_text() + "[web]\nenabled = false\n")
    broker = BrokerProcess(cfg, tmp_path / "broker.log")
    try:
        kh = demo.known_hosts_for(tmp_path, broker.port)
        user = demo.take_user()
        start = len(demo.audit_lines())
        r = ssh(demo, user, fullwidth(user) + "+web01", broker.port, kh)
        assert r.returncode == 0 and r.stdout == b"in\n", r.stderr
        (ev,) = events(demo, "auth.username_normalized", start)
        assert ev["user"] == user + "+web01" and ev["user_as_sent"].startswith("\\uff")
    finally:
        broker.proc.send_signal(signal.SIGTERM)
        broker.wait(30)


def test_a_control_byte_in_a_name_is_audited(demo: Demo,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    start = len(demo.audit_lines())
    err = raw_login(demo, "ali\x00ce+web01", demo.port, monkeypatch)
    assert "connected" not in err
    (ev,) = events(demo, "connection.refused", start)
    assert ev["user_as_sent"] == "ali\\x00ce+web01" and "illegal user name" in ev["reason"]


def test_stock_asyncssh_refuses_names_that_are_not_printable_ascii(
        demo: Demo, stock: BrokerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    user = demo.take_user()
    kh: Path = stock.known_hosts  # type: ignore[attr-defined]
    start = len(demo.audit_lines())
    r = ssh(demo, user, user + "\u00e9+web01", stock.port, kh)
    assert r.returncode == 255
    (ev,) = events(demo, "auth.username_refused", start)
    assert ev["user"] == user + "\u00e9+web01" and "user_as_sent" not in ev
    assert "not printable ASCII" in ev["reason"]
    assert ssh(demo, user, user + "+web01", stock.port, kh).stdout == b"in\n"

    err = raw_login(demo, "ali\x01ce", stock.port, monkeypatch)
    assert "connected" not in err
    (ev,) = events(demo, "connection.refused", start)
    assert "illegal user name" in ev["reason"]
