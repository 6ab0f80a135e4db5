"""E-mail notifications end to end: a real broker (in this process, sharing the demo's state)
sends through a real SMTP server (aiosmtpd, ``tests.smtpserver``) with STARTTLS required, its
CA given as ``ca_file`` and AUTH with the password from ``password_file``; the events come from
the operator CLI (a lock, a test event), as they would on a bastion host."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.app import Broker
from broker.config import load_config
from tests import smtpserver
from tests.conftest import Demo
from tests.conftest import broker_cli as cli
from tests.notify_receiver import until

pytestmark = pytest.mark.e2e


@pytest.fixture
def smtp(tmp_path: Path) -> Iterator[smtpserver.SmtpServer]:
    with smtpserver.running(smtpserver.make_certs(tmp_path / "certs")) as server:
        yield server


async def test_a_lock_and_a_test_event_arrive_by_mail_over_starttls(
        demo: Demo, tmp_path: Path, smtp: smtpserver.SmtpServer) -> None:
    tag = secrets.token_hex(3)
    name = f"mail-{tag}"
    (tmp_path / "smtp.password").write_text(smtp.password + "\n")
    cfg = demo.variant_config(tmp_path, extra=(
        "[web]\nenabled = false\n[notify]\n[[notify.email]]\n"
        f'name = "{name}"\nto = ["security@example.com", "oncall@example.com"]\n'
        'events = ["lock.created"]\n'
        f'smtp_host = "{smtp.host}"\nsmtp_port = {smtp.port}\nsecurity = "starttls"\n'
        f'username = "{smtp.username}"\npassword_file = "smtp.password"\n'
        f'from_addr = "bastion@example.com"\nca_file = "{smtp.ca_file}"\n'))
    broker = Broker(load_config(cfg))
    await broker.start()
    try:
        lock = json.loads(cli(cfg, "lock", "--user", demo.take_user(), "--ttl", "1h",
                              "--reason", f"phished {tag}\nBcc: evil@example.com", "--json"))
        cli(cfg, "lock", "remove", lock["id"])
        cli(cfg, "notify", "test", "--channel", name)
        got = await smtp.wait(2, within=30)

        async def logged() -> bool:
            return sum(d.channel == name
                       for d in await broker.dispatcher.deliveries("sent", 1000)) == 2
        await until(logged, 10, "both deliveries in the log")
    finally:
        await broker.stop()
    by_subject = {m.message["Subject"]: m for m in got}
    [locked] = [m for s, m in by_subject.items() if s.startswith("[bastion] Lock applied: ")]
    [test] = [m for s, m in by_subject.items() if s.startswith("[bastion] Test notification")]
    assert locked.tls and locked.login == smtp.username
    assert sorted(locked.rcpt_tos) == ["oncall@example.com", "security@example.com"]
    assert locked.message["Bcc"] is None and "\n" not in locked.message["Subject"]
    body = locked.message.get_content()
    assert f"Lock:      {lock['id']}" in body and f"phished {tag}" in body
    assert f"channel {name}" in test.message["Subject"]
