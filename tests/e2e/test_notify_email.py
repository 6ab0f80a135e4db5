"""E-mail notifications against a real SMTP server (aiosmtpd): delivered only over verified TLS.

Every refusal is checked on the server's side too: no message, and no AUTH or MAIL in clear.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.errors import NotifyError
from broker.notify.email import EmailSender, Security
from tests import smtpserver

FROM = "Bastion <bastion@example.com>"
SUBJECT = "Zugriff genehmigt: prod-db ✓"
BODY = "Grant 42 for alice on prod-db was approved by bob.\nGrüße, the bastion\n"


@pytest.fixture
def certs(tmp_path: Path) -> smtpserver.Certs:
    return smtpserver.make_certs(tmp_path / "pki")


@pytest.fixture
def smtp(certs: smtpserver.Certs) -> Iterator[smtpserver.SmtpServer]:
    with smtpserver.running(certs) as server:
        yield server


def sender(server: smtpserver.SmtpServer, security: Security = "starttls", *,
           password: str | None = None, ca_file: Path | None = None,
           login: bool = True, timeout: float = 10.0) -> EmailSender:
    return EmailSender(server.host, server.port, security,
                       server.username if login else None,
                       (password or server.password) if login else None,
                       FROM, ca_file or server.ca_file, timeout)


def nothing_sent(server: smtpserver.SmtpServer) -> bool:
    """No message, and no AUTH/MAIL/RCPT/DATA reached the server (over TLS or not)."""
    return server.messages == [] and server.commands == []


async def test_delivered_over_starttls_with_login(smtp: smtpserver.SmtpServer) -> None:
    await sender(smtp).send(["alice@example.com", "Bob <bob@example.org>"], SUBJECT, BODY)

    [mail] = await smtp.wait(1)
    assert mail.tls and mail.login == smtp.username
    assert mail.mail_from == "bastion@example.com"
    assert mail.rcpt_tos == ["alice@example.com", "bob@example.org"]
    assert {verb for verb, _ in smtp.commands} == {"AUTH", "MAIL", "RCPT", "DATA"}
    assert all(tls for _, tls in smtp.commands)
    message = mail.message
    assert message["From"] == FROM
    assert message["To"] == "alice@example.com, Bob <bob@example.org>"
    assert message["Subject"] == SUBJECT
    assert b"=?utf-8?" in mail.raw  # an encoded word: the server need not speak SMTPUTF8
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Message-ID"].endswith("@example.com>")
    assert abs(message["Date"].datetime - datetime.now(UTC)) < timedelta(minutes=1)
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    assert message.get_content().replace("\r\n", "\n") == BODY
    assert max(mail.raw) < 0x80  # 7-bit on the wire


async def test_each_message_has_its_own_message_id(smtp: smtpserver.SmtpServer) -> None:
    client = sender(smtp)
    await client.send(["alice@example.com"], "one", "1")
    await client.send(["alice@example.com"], "two", "2")
    first, second = await smtp.wait(2)
    assert first.message["Message-ID"] != second.message["Message-ID"]


async def test_wrong_password_is_refused_and_never_echoed(smtp: smtpserver.SmtpServer) -> None:
    with pytest.raises(NotifyError, match="refused the login") as caught:
        await sender(smtp, password="wrong-password-123").send(["alice@example.com"], "s", "b")
    text = str(caught.value) + repr(caught.value) + caught.value.user_message
    assert "wrong-password-123" not in text and smtp.username not in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert smtp.messages == []
    assert ("MAIL", True) not in smtp.commands and ("AUTH", True) in smtp.commands


async def test_a_certificate_from_another_ca_is_refused(
        smtp: smtpserver.SmtpServer, tmp_path: Path) -> None:
    other = smtpserver.make_certs(tmp_path / "other", ca_name="Someone else's CA")
    with pytest.raises(NotifyError, match=r"certificate .* not accepted"):
        await sender(smtp, ca_file=other.ca_file).send(["alice@example.com"], "s", "b")
    assert nothing_sent(smtp)


async def test_a_certificate_for_another_host_is_refused(tmp_path: Path) -> None:
    certs = smtpserver.make_certs(tmp_path, names=("mail.example.net",))
    with smtpserver.running(certs) as server:
        with pytest.raises(NotifyError, match=r"certificate .* not accepted"):
            await sender(server).send(["alice@example.com"], "s", "b")
        assert nothing_sent(server)


async def test_the_system_store_does_not_trust_a_private_ca(tmp_path: Path) -> None:
    certs = smtpserver.make_certs(tmp_path)
    with smtpserver.running(certs) as server:
        client = EmailSender(server.host, server.port, "starttls", server.username,
                             server.password, FROM, None, 10.0)
        with pytest.raises(NotifyError, match=r"certificate .* not accepted"):
            await client.send(["alice@example.com"], "s", "b")
        assert nothing_sent(server)


async def test_no_starttls_offered_means_nothing_sent_in_clear() -> None:
    # this server would accept AUTH and mail in clear: a client falling back would be seen
    with smtpserver.running(None, mode="none") as server:
        with pytest.raises(NotifyError, match="does not offer STARTTLS"):
            await sender(server).send(["alice@example.com"], "s", "b")
        assert nothing_sent(server)


async def test_delivered_over_implicit_tls(certs: smtpserver.Certs) -> None:
    with smtpserver.running(certs, mode="tls") as server:
        await sender(server, "tls").send(["alice@example.com"], SUBJECT, BODY)
        [mail] = await server.wait(1)
        assert mail.tls and mail.login == server.username
        assert mail.message["Subject"] == SUBJECT
        assert all(tls for _, tls in server.commands)


async def test_implicit_tls_against_a_plaintext_port_fails(certs: smtpserver.Certs) -> None:
    with smtpserver.running(certs) as server:
        with pytest.raises(NotifyError, match=r"TLS|closed|answer"):
            await sender(server, "tls", timeout=3.0).send(["alice@example.com"], "s", "b")
        assert nothing_sent(server)


async def test_plaintext_relay_without_login_delivers() -> None:
    with smtpserver.running(None, mode="none") as server:
        await sender(server, "none", login=False).send(["alice@example.com"], "s", BODY)
        [mail] = await server.wait(1)
        assert not mail.tls and mail.login is None


async def test_credentials_are_never_sent_without_tls() -> None:
    with smtpserver.running(None, mode="none") as server:
        with pytest.raises(NotifyError, match="without TLS"):
            await sender(server, "none").send(["alice@example.com"], "s", "b")
        assert nothing_sent(server)


async def test_a_refused_recipient_means_nobody_gets_it(certs: smtpserver.Certs) -> None:
    with smtpserver.running(certs, refuse={"gone@example.com"}) as server:
        with pytest.raises(NotifyError, match=r"refused gone@example.com \(550 .*sent to nobody"):
            await sender(server).send(["alice@example.com", "gone@example.com"], "s", "b")
        assert server.messages == []
        assert ("DATA", True) not in server.commands


LINE_BREAK = "line break or control character"


@pytest.mark.parametrize(("to", "subject", "from_addr", "error"), [
    (["alice@example.com"], "Approved\r\nBcc: mallory@example.com", FROM, LINE_BREAK),
    (["alice@example.com"], "Approved\nBcc: mallory@example.com", FROM, LINE_BREAK),
    (["alice@example.com"], "Approved\u2028Bcc: mallory@example.com", FROM, LINE_BREAK),
    (["alice@example.com"], "Approved\x00", FROM, LINE_BREAK),
    (["alice@example.com\r\nRCPT TO:<mallory@example.com>"], "s", FROM, LINE_BREAK),
    (["Alice\n <alice@example.com>"], "s", FROM, LINE_BREAK),
    (["alice@example.com"], "s", "bastion@example.com\r\nBcc: mallory@example.com", LINE_BREAK),
    (["not an address"], "s", FROM, "not an e-mail address"),
    ([], "s", FROM, "no e-mail recipients"),
])
async def test_injection_and_bad_addresses_are_refused_before_connecting(
        smtp: smtpserver.SmtpServer, to: list[str], subject: str, from_addr: str,
        error: str) -> None:
    client = EmailSender(smtp.host, smtp.port, "starttls", smtp.username, smtp.password,
                         from_addr, smtp.ca_file, 10.0)
    with pytest.raises(NotifyError, match=error):
        await client.send(to, subject, "b")
    assert nothing_sent(smtp)


async def test_connection_refused(smtp: smtpserver.SmtpServer) -> None:
    # a bound socket that does not listen: connecting is refused, and no one else gets the port
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        client = EmailSender("127.0.0.1", closed.getsockname()[1], "starttls", None, None, FROM,
                             smtp.ca_file, 5.0)
        started = time.monotonic()
        with pytest.raises(NotifyError, match="connection refused"):
            await client.send(["alice@example.com"], "s", "b")
        assert time.monotonic() - started < 5.0


async def test_a_server_that_never_answers_times_out(smtp: smtpserver.SmtpServer) -> None:
    # the kernel completes the handshake for the backlog; nobody ever sends a greeting
    with socket.create_server(("127.0.0.1", 0)) as silent:
        client = EmailSender("127.0.0.1", silent.getsockname()[1], "starttls", None, None, FROM,
                             smtp.ca_file, 1.0)
        started = time.monotonic()
        with pytest.raises(NotifyError,
                           match=r"did not (answer within|complete the delivery in) 1 s"):
            await client.send(["alice@example.com"], "s", "b")
        elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 1.0 + 4.0  # slack for a loaded machine, far below the test timeout


@pytest.fixture
async def dripping_server() -> AsyncIterator[int]:
    """Answers the greeting one continuation line every 0.2 s, forever: each read succeeds."""
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                writer.write(b"220-still greeting you\r\n")
                await writer.drain()
                await asyncio.sleep(0.2)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(drip, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_the_timeout_bounds_the_whole_delivery(
        dripping_server: int, smtp: smtpserver.SmtpServer) -> None:
    client = EmailSender("127.0.0.1", dripping_server, "starttls", None, None, FROM,
                         smtp.ca_file, 1.0)
    started = time.monotonic()
    with pytest.raises(NotifyError, match="did not complete the delivery in 1 s"):
        await client.send(["alice@example.com"], "s", "b")
    assert time.monotonic() - started < 1.0 + 4.0


def test_the_password_is_not_in_the_repr() -> None:
    client = EmailSender("mail.example.com", 587, "starttls", "notify", "hunter2-secret", FROM,
                         None, 10.0)
    assert "hunter2-secret" not in repr(client)
