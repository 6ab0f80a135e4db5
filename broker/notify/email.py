"""E-mail notifications over SMTP: TLS verified or the delivery fails, never a fall back to plaintext.

The standard library's smtplib speaks the protocol in a worker thread (``asyncio.to_thread``), so
e-mail adds no dependency. ``timeout_seconds`` bounds the whole delivery, not only each read: a
server that answers slowly but forever would otherwise hold a thread of the shared default
executor. Every failure is a ``NotifyError`` whose message names the server and the reason and is
safe for the delivery log (never the username or password, never the server's reply to AUTH).
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import socket
import ssl
import threading
import unicodedata
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import Literal, get_args

from broker.errors import NotifyError

Security = Literal["starttls", "tls", "none"]


class EmailSender:
    """One SMTP server and sender address; ``send`` delivers one text/plain message or raises.

    ``starttls`` requires the server to offer STARTTLS (refused otherwise), ``tls`` is implicit TLS
    (SMTPS, port 465), ``none`` is plaintext and then refuses to send credentials. The server
    certificate is verified against the system store, or only ``ca_file`` when given, with the
    host name checked. A message goes to all recipients or to none: a refused recipient aborts
    before DATA, so a retry cannot duplicate it for the others.
    """

    def __init__(self, host: str, port: int, security: Security, username: str | None,
                 password: str | None, from_addr: str, ca_file: Path | None,
                 timeout_seconds: float) -> None:
        if security not in get_args(Security):
            raise ValueError(f"security must be one of {get_args(Security)}, not {security!r}")
        if not timeout_seconds > 0:
            raise ValueError("timeout_seconds must be positive")
        self._host = host
        self._port = port
        self._security = security
        self._username = username
        self._password = password
        self._from = from_addr
        self._ca_file = ca_file
        self._timeout = timeout_seconds
        self._where = f"{host}:{port}"

    def __repr__(self) -> str:
        return f"EmailSender({self._where}, security={self._security})"

    async def send(self, to: list[str], subject: str, body: str) -> None:
        """Deliver, or raise ``NotifyError``; returns within about ``timeout_seconds``.

        Cancelling the caller does not stop the worker thread; it ends at the deadline at most.
        """
        payload, sender, recipients, utf8 = self._compose(to, subject, body)
        await asyncio.to_thread(self._deliver, payload, sender, recipients, utf8)

    def _compose(self, to: list[str], subject: str,
                 body: str) -> tuple[bytes, str, list[str], bool]:
        if not to:
            raise NotifyError("no e-mail recipients")
        _single_line(subject, "e-mail subject")
        sender = _address(self._from, "sender address")
        recipients = [_address(value, "recipient address") for value in to]
        domain = sender.rpartition("@")[2]
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise NotifyError(f"sender address has an invalid domain: {domain!r}") from None
        message = EmailMessage()
        try:
            message["From"] = self._from
            message["To"] = ", ".join(to)
            message["Subject"] = subject
            message["Date"] = format_datetime(datetime.now(UTC))
            message["Message-ID"] = make_msgid(domain=domain)
            message["Auto-Submitted"] = "auto-generated"
            # 8-bit bodies need 8BITMIME; quoted-printable is 7-bit and still readable raw
            message.set_content(body, cte=None if body.isascii() else "quoted-printable")
            utf8 = not all(address.isascii() for address in (sender, *recipients))
            payload = message.as_bytes(policy=SMTPUTF8 if utf8 else SMTP)
        except (ValueError, TypeError, UnicodeError) as exc:
            raise NotifyError(f"cannot compose the e-mail: {exc}") from None
        return payload, sender, recipients, utf8

    def _deliver(self, payload: bytes, sender: str, recipients: list[str], utf8: bool) -> None:
        if self._username is not None and self._security == "none":
            raise NotifyError(f"refusing to send SMTP credentials to {self._where} without TLS "
                              "(security is none)")
        context = self._tls_context() if self._security != "none" else None
        smtp = (_SMTPS(self._host, self._timeout, context) if self._security == "tls"
                else _SMTP(self._host, self._timeout))
        watchdog = _Watchdog(smtp, self._timeout)
        try:
            self._converse(smtp, context, payload, sender, recipients, utf8)
        except NotifyError:
            if watchdog.fired:
                raise self._explain(TimeoutError(), fired=True) from None
            raise
        except Exception as exc:
            raise self._explain(exc, fired=watchdog.fired) from None
        finally:
            watchdog.stop()
            smtp.close()

    def _converse(self, smtp: smtplib.SMTP, context: ssl.SSLContext | None, payload: bytes,
                  sender: str, recipients: list[str], utf8: bool) -> None:
        code, reply = smtp.connect(self._host, self._port)
        if code != 220:
            raise NotifyError(f"SMTP server {self._where} refused the connection: "
                              f"{code} {_text(reply)}")
        if smtp.sock is not None:
            smtp.local_hostname = _address_literal(smtp.sock.getsockname()[0])
        smtp.ehlo_or_helo_if_needed()
        if self._security == "starttls":
            if not smtp.has_extn("starttls"):
                raise NotifyError(f"SMTP server {self._where} does not offer STARTTLS; "
                                  "not sending without TLS")
            smtp.starttls(context=context)
            smtp.ehlo_or_helo_if_needed()
        if self._username is not None:
            smtp.login(self._username, self._password or "")
        if utf8 and not smtp.has_extn("smtputf8"):
            raise NotifyError(f"SMTP server {self._where} does not offer SMTPUTF8, which the "
                              "non-ASCII addresses need")
        code, reply = smtp.mail(sender, ["SMTPUTF8"] if utf8 else [])
        if code != 250:
            raise NotifyError(f"SMTP server {self._where} refused the sender {sender}: "
                              f"{code} {_text(reply)}")
        refused = []
        for recipient in recipients:
            code, reply = smtp.rcpt(recipient)
            if code not in (250, 251):
                refused.append(f"{recipient} ({code} {_text(reply)})")
        if refused:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.rset()
            raise NotifyError(f"SMTP server {self._where} refused {', '.join(refused)}; "
                              "sent to nobody")
        code, reply = smtp.data(payload)
        if code != 250:
            raise NotifyError(f"SMTP server {self._where} did not accept the message: "
                              f"{code} {_text(reply)}")
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()

    def _tls_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(
                cafile=None if self._ca_file is None else str(self._ca_file))
        except OSError as exc:  # ssl.SSLError included
            raise NotifyError(f"cannot load the CA file {self._ca_file}: "
                              f"{exc.strerror or exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def _explain(self, exc: BaseException, *, fired: bool) -> NotifyError:
        where, seconds = self._where, f"{self._timeout:g} s"
        if fired:
            return NotifyError(f"SMTP server {where} did not complete the delivery in {seconds}")
        # smtplib's exceptions derive from OSError, ssl's too: most specific first
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            return NotifyError(f"SMTP server {where} refused the login ({exc.smtp_code})")
        if isinstance(exc, smtplib.SMTPNotSupportedError):
            return NotifyError(f"SMTP server {where}: {exc}")
        if isinstance(exc, smtplib.SMTPServerDisconnected):
            if isinstance(exc.__context__, TimeoutError):  # smtplib's reads report it so
                return NotifyError(f"SMTP server {where} did not answer within {seconds}")
            return NotifyError(f"SMTP server {where} closed the connection")
        if isinstance(exc, smtplib.SMTPResponseException):
            return NotifyError(f"SMTP server {where} answered {exc.smtp_code} "
                               f"{_text(exc.smtp_error)}")
        if isinstance(exc, smtplib.SMTPException):
            return NotifyError(f"SMTP with {where} failed: {exc}")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return NotifyError(f"TLS certificate of SMTP server {where} not accepted: "
                               f"{exc.verify_message}")
        if isinstance(exc, ssl.SSLError):
            return NotifyError(f"TLS with SMTP server {where} failed: {exc.reason or exc}")
        if isinstance(exc, TimeoutError):
            return NotifyError(f"SMTP server {where} did not answer within {seconds}")
        if isinstance(exc, ConnectionRefusedError):
            return NotifyError(f"cannot connect to SMTP server {where}: connection refused")
        if isinstance(exc, socket.gaierror):
            return NotifyError(f"cannot resolve SMTP server {self._host}: {exc.strerror}")
        if isinstance(exc, OSError):
            return NotifyError(f"cannot talk to SMTP server {where}: "
                               f"{exc.strerror or type(exc).__name__}")
        return NotifyError(f"e-mail to {where} failed: {type(exc).__name__}")


class _SMTP(smtplib.SMTP):
    """Not yet connected: smtplib connects in ``__init__`` when given the host, before a watchdog
    could hold the client, but takes the TLS server name only from there (``_host``)."""

    def __init__(self, host: str, timeout: float) -> None:
        # a placeholder EHLO name: smtplib would look up this host's FQDN, unbounded
        super().__init__(local_hostname="localhost", timeout=timeout)
        self._host = host


class _SMTPS(smtplib.SMTP_SSL):
    """``_SMTP`` for implicit TLS."""

    def __init__(self, host: str, timeout: float, context: ssl.SSLContext | None) -> None:
        super().__init__(local_hostname="localhost", timeout=timeout, context=context)
        self._host = host


class _Watchdog:
    """Shuts the connection down at the deadline, which unblocks a read in the worker thread.

    Socket timeouts bound each read only. It retries until stopped because the socket object
    changes under STARTTLS, and ``stop`` joins it so it never touches a closed (reused) descriptor.
    """

    def __init__(self, smtp: smtplib.SMTP, seconds: float) -> None:
        self.fired = False
        self._smtp = smtp
        self._seconds = seconds
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smtp-deadline", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._stopped.wait(self._seconds):
            return
        self.fired = True
        while not self._stopped.is_set():
            sock = self._smtp.sock
            if sock is not None:
                try:
                    # the plain socket's shutdown: SSLSocket.shutdown would drop its SSL state
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    return
                except OSError:
                    pass
            self._stopped.wait(0.05)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def _single_line(value: str, what: str) -> None:
    """Refuse line breaks and control characters: in a header or SMTP command they inject more."""
    if any(ch != "\t" and unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in value):
        raise NotifyError(f"{what} contains a line break or control character: refused")


def _address(value: str, what: str) -> str:
    """The bare address of ``value`` (which may carry a display name), checked."""
    _single_line(value, what)
    address = parseaddr(value)[1]
    local, _, domain = address.rpartition("@")
    if not local or not domain or any(ch.isspace() for ch in address):
        raise NotifyError(f"{what} is not an e-mail address: {value!r}")
    return address


def _address_literal(ip: str) -> str:
    """EHLO's argument (RFC 5321 4.1.3): the client's own address, no name lookup needed."""
    return f"[IPv6:{ip.partition('%')[0]}]" if ":" in ip else f"[{ip}]"


def _text(reply: bytes | str) -> str:
    """A server reply for the delivery log: one printable line, bounded."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)
    return " ".join(text.split())[:200]
