"""A real SMTP server (aiosmtpd) with STARTTLS or implicit TLS and AUTH, for e-mail tests.

Use it from a fixture of your own::

    from tests import smtpserver

    @pytest.fixture
    def smtp(tmp_path: Path) -> Iterator[smtpserver.SmtpServer]:
        certs = smtpserver.make_certs(tmp_path)        # throwaway CA + cert for 127.0.0.1/localhost
        with smtpserver.running(certs) as server:      # STARTTLS required, AUTH only after it
            yield server

    sender = EmailSender(smtp.host, smtp.port, "starttls", smtp.username, smtp.password,
                         "bastion@example.com", smtp.ca_file, 5.0)
    ...
    [mail] = await smtp.wait(1)                       # Received: mail_from, rcpt_tos, tls, login
    assert mail.message["Subject"] == "..."           # parsed EmailMessage; mail.raw = the bytes

``running(certs, mode="tls")`` is implicit TLS (SMTPS), ``mode="none"`` a plaintext server (no
STARTTLS; AUTH accepted in clear, so a client that wrongly sends credentials there is seen);
``refuse={"x@example.com"}`` answers 550 to that recipient. ``server.commands`` lists each
AUTH/MAIL/RCPT/DATA the server got with whether it came over TLS. The server runs in its own
thread on a free loopback port and is stopped when the ``with`` block ends.
"""

from __future__ import annotations

import asyncio
import email
import ipaddress
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

USERNAME = "notify"
PASSWORD = "smtp-test-password"  # a throwaway server's


@dataclass(frozen=True)
class Certs:
    """PEM files: the CA to trust (``ca_file``) and the server certificate it signed, with key."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_certs(directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost"),
               ca_name: str = "SMTP test CA") -> Certs:
    """A fresh CA and a server certificate for ``names`` (IPs or DNS names) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    certs = Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    certs.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return certs


@dataclass(frozen=True)
class Received:
    """One message the server accepted (DATA answered 250)."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    tls: bool
    login: str | None

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.raw, policy=default_policy)


@dataclass
class SmtpServer:
    """What a running server was told; appended to from the server's thread."""

    host: str
    port: int
    username: str
    password: str
    ca_file: Path | None
    messages: list[Received] = field(default_factory=list)
    commands: list[tuple[str, bool]] = field(default_factory=list)

    async def wait(self, count: int = 1, within: float = 10.0) -> list[Received]:
        """The first ``count`` messages, waiting for them without blocking the event loop."""
        deadline = time.monotonic() + within
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.messages)} of {count} e-mails within {within} s")
            await asyncio.sleep(0.02)
        return self.messages[:count]


def _over_tls(server: SMTP) -> bool:
    return server.transport is not None and \
        server.transport.get_extra_info("ssl_object") is not None


class _Handler:
    def __init__(self, record: SmtpServer, refuse: frozenset[str]) -> None:
        self._record = record
        self._refuse = refuse
        self._lock = threading.Lock()

    def _note(self, verb: str, server: SMTP) -> None:
        with self._lock:
            self._record.commands.append((verb, _over_tls(server)))

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        self._note("MAIL", server)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        self._note("RCPT", server)
        if address in self._refuse:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._note("DATA", server)
        content = envelope.original_content or b""
        login = session.auth_data.login.decode() \
            if isinstance(session.auth_data, LoginPassword) and session.authenticated else None
        self._record.messages.append(Received(
            mail_from=envelope.mail_from or "", rcpt_tos=list(envelope.rcpt_tos), raw=content,
            tls=_over_tls(server), login=login))
        return "250 OK: queued"

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                     auth_data: Any) -> AuthResult:
        self._note("AUTH", server)
        ok = isinstance(auth_data, LoginPassword) and \
            auth_data.login == self._record.username.encode() and \
            auth_data.password == self._record.password.encode()
        return AuthResult(success=ok, handled=False, auth_data=auth_data)


class _Controller(Controller):
    """Binds port 0 (no race for a free port) and reads back the port the kernel chose."""

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


@contextmanager
def running(certs: Certs | None, *, mode: Literal["starttls", "tls", "none"] = "starttls",
            username: str = USERNAME, password: str = PASSWORD,
            refuse: frozenset[str] | set[str] = frozenset()) -> Iterator[SmtpServer]:
    """Start a server on 127.0.0.1 (see the module docstring); ``certs`` may be None for none."""
    if mode != "none" and certs is None:
        raise ValueError(f"mode {mode} needs certs")
    record = SmtpServer("127.0.0.1", 0, username, password,
                        certs.ca_file if certs is not None else None)
    handler = _Handler(record, frozenset(refuse))
    options: dict[str, Any] = {"authenticator": handler.authenticate, "hostname": "127.0.0.1",
                               "port": 0, "ready_timeout": 30.0}
    if mode == "starttls":
        assert certs is not None
        options.update(tls_context=certs.server_context(), require_starttls=True,
                       auth_require_tls=True)
    elif mode == "tls":
        assert certs is not None
        # aiosmtpd counts only STARTTLS as TLS for AUTH; here the whole connection is TLS
        options.update(ssl_context=certs.server_context(), auth_require_tls=False)
    else:
        options.update(auth_require_tls=False)
    controller = _Controller(handler, **options)
    controller.start()
    try:
        record.port = controller.port
        yield record
    finally:
        controller.stop()
