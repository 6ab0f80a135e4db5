"""The channels of ``[notify]``: a sender for each webhook and e-mail list, and what each takes.

Secret files are read once here, at start (a missing or empty one is a config error naming the
file, never its content).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from broker.config import EmailChannel, NotifySettings, WebhookChannel
from broker.domain.notify import Attempt, Delivery, Subscription, email_message
from broker.errors import ConfigError, NotifyError
from broker.notify.email import EmailSender
from broker.notify.webhook import ClientSessions, WebhookSender
from broker.ports import AuditSink, Clock, NotificationSender, NotificationStore
from broker.services.notify import Notifier


def subscriptions(settings: NotifySettings) -> list[Subscription]:
    channels: list[WebhookChannel | EmailChannel] = [*settings.webhooks, *settings.email]
    return [Subscription(c.name, frozenset(c.events)) for c in channels]


def _secret(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not data:
        raise ConfigError(f"{what}: {path} is empty")
    return data


class EmailChannelSender:
    """An e-mail list as a channel: the event rendered as a plain-text message."""

    def __init__(self, name: str, to: list[str], sender: EmailSender) -> None:
        self.name = name
        self._to = to
        self._sender = sender

    async def send(self, delivery: Delivery) -> Attempt:
        subject, body = email_message(delivery.event_json())
        try:
            await self._sender.send(self._to, subject, body)
        except NotifyError as exc:
            return Attempt(ok=False, retry=True, error=str(exc)[:300])
        return Attempt(ok=True)


def _email(c: EmailChannel, timeout: float) -> EmailChannelSender:
    password = None
    if c.password_file is not None:
        password = _secret(c.password_file, f"[[notify.email]] {c.name} password_file").decode()
    sender = EmailSender(c.smtp_host, c.smtp_port, c.security, c.username, password,
                         c.from_addr, c.ca_file, timeout)
    return EmailChannelSender(c.name, list(c.to), sender)


def check_files(settings: NotifySettings) -> int:
    """Read every channel's secret and password file and load every e-mail CA file, as a start
    would (``config check``); ConfigError names the first that fails. Returns the channels."""
    for w in settings.webhooks:
        if w.secret_file is not None:
            _secret(w.secret_file, f"[[notify.webhooks]] {w.name} secret_file")
    for e in settings.email:
        if e.password_file is not None:
            _secret(e.password_file, f"[[notify.email]] {e.name} password_file")
        if e.ca_file is not None:
            try:
                ssl.create_default_context(cafile=str(e.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"[[notify.email]] {e.name} ca_file: cannot load {e.ca_file}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
    return len(settings.webhooks) + len(settings.email)


def senders(settings: NotifySettings, sessions: ClientSessions
            ) -> dict[str, NotificationSender]:
    out: dict[str, NotificationSender] = {}
    for w in settings.webhooks:
        secret = (_secret(w.secret_file, f"[[notify.webhooks]] {w.name} secret_file")
                  if w.secret_file is not None else None)
        out[w.name] = WebhookSender(w.name, w.url, secret, w.format, sessions,
                                    settings.timeout_seconds)
    for e in settings.email:
        out[e.name] = _email(e, settings.timeout_seconds)
    return out


def notifier(settings: NotifySettings, store: NotificationStore, audit: AuditSink,
             clock: Clock) -> Notifier:
    """What a command that acts (``grant approve``, ``lock``) queues its events with; the
    brokers' dispatchers send them."""
    return Notifier(store, audit, clock, subscriptions(settings))
