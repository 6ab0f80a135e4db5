"""Notifications, the pure part: which events exist, the outbox rows they become, how a webhook
body is rendered and signed, what an e-mail says, and when a failed delivery is tried again.

An event is stored once per channel that subscribes to it (a ``Delivery``: one outbox row), with
the event itself as JSON; the body a channel receives is rendered from it at each attempt, so a
changed ``format`` applies to what is still pending and no secret is ever stored. The dispatcher
(``broker.services.notify``) decides nothing itself: the retry schedule and what an HTTP status
means are here, with an injectable random number so tests know the exact times.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

# the events a channel may subscribe to, with the title people read
EVENTS: dict[str, str] = {
    "grant.requested": "Access requested",
    "grant.approved": "Access approved",
    "grant.rejected": "Access request rejected",
    "grant.expiring": "Access expiring soon",
    "grant.revoked": "Access revoked",
    "session.admin_started": "Admin session started",
    "lock.created": "Lock applied",
}
TEST_EVENT = "notify.test"  # ``notify test``: goes to the channels named, whatever they subscribe
TITLES = {**EVENTS, TEST_EVENT: "Test notification"}
FORMATS = ("json", "slack", "teams")
STATUSES = ("pending", "sent", "failed")
MAX_FACT = 500  # characters of one value in a chat message or e-mail (the JSON has it all)
MAX_SUMMARY = 1000  # characters of the one-line summary
MAX_ERROR = 300  # characters of a delivery's last error kept in the outbox

# retries: 5 s, 10 s, 20 s ... at most an hour apart, each between half and all of that
BACKOFF_BASE = timedelta(seconds=5)
BACKOFF_CAP = timedelta(hours=1)


class UnknownEvent(ValueError):
    """An event name no channel can subscribe to (the message lists the known ones)."""


def check_events(names: Iterable[str]) -> list[str]:
    """The names as given, or ``UnknownEvent`` naming the first unknown one and the valid ones."""
    out = []
    for n in names:
        if n not in EVENTS:
            raise UnknownEvent(f"unknown event {n!r}; known: {', '.join(EVENTS)}")
        out.append(n)
    return out


@dataclass(frozen=True, slots=True)
class Event:
    """Something people are told about. ``dedupe``: for events a fleet of brokers may each
    notice (expiring soon), the key that makes it one event however many notice it."""

    id: str
    name: str
    at: datetime
    data: Mapping[str, Any]
    dedupe: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "event": self.name, "title": TITLES.get(self.name, self.name),
                "at": self.at.isoformat(), "summary": summary(self.name, self.data),
                "data": dict(self.data)}


@dataclass(frozen=True, slots=True)
class Subscription:
    """A channel as routing sees it: its name and the events it takes."""

    channel: str
    events: frozenset[str]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One outbox row: one event for one channel, and how its delivery went so far."""

    id: str  # sent as X-Bastion-Delivery: a receiver drops a repeat of one it has seen
    event_id: str
    event: str
    channel: str
    payload: str  # the event as JSON (``Event.as_json``)
    dedupe_key: str
    status: str  # pending | sent | failed
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    updated_at: datetime
    last_error: str | None = None
    last_status: int | None = None  # the receiver's HTTP status, if it answered
    sent_at: datetime | None = None

    def event_json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.payload)
        return data


def deliveries_for(ev: Event, subs: Sequence[Subscription], now: datetime,
                   ids: Iterable[str], only: str | None = None) -> list[Delivery]:
    """The outbox rows of ``ev``: one per channel subscribed to it (or ``only`` that channel,
    for a test). ``ids`` gives each row's id."""
    payload = json.dumps(ev.as_json(), sort_keys=True, separators=(",", ":"))
    it = iter(ids)
    out = []
    for s in subs:
        if (s.channel != only) if only is not None else (ev.name not in s.events):
            continue
        out.append(Delivery(
            id=next(it), event_id=ev.id, event=ev.name, channel=s.channel, payload=payload,
            dedupe_key=f"{ev.dedupe or ev.id}/{s.channel}", status="pending", attempts=0,
            created_at=now, next_attempt_at=now, updated_at=now))
    return out


# -- what an attempt's result means --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Attempt:
    """What one send gave: ``ok``, or an error and whether trying again could help."""

    ok: bool
    retry: bool = False
    status: int | None = None  # the HTTP status, if the receiver answered
    error: str | None = None


def http_attempt(status: int) -> Attempt:
    """2xx: delivered. 408 and 429 (the receiver is busy) and anything else but 4xx: try
    again. Other 4xx: the request itself is wrong (a bad URL, a revoked hook), so never again."""
    if 200 <= status < 300:
        return Attempt(ok=True, status=status)
    permanent = 400 <= status < 500 and status not in (408, 429)
    return Attempt(ok=False, retry=not permanent, status=status, error=f"HTTP {status}")


def backoff(attempts: int, rand: float, base: timedelta = BACKOFF_BASE,
            cap: timedelta = BACKOFF_CAP) -> timedelta:
    """The wait after the ``attempts``-th failed attempt: doubling from ``base`` up to ``cap``,
    each a random point of its upper half (``rand`` in [0, 1)) so that a fleet of brokers
    retrying one receiver do not all come back at once."""
    step: timedelta = min(cap, base * (2 ** min(max(attempts - 1, 0), 30)))
    half: timedelta = step / 2
    return half + half * min(max(rand, 0.0), 1.0)


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where a delivery goes after an attempt."""

    status: str  # pending (try again at ``next_attempt_at``) | sent | failed
    next_attempt_at: datetime
    error: str | None
    http_status: int | None


def after_attempt(attempts: int, max_attempts: int, result: Attempt, now: datetime,
                  rand: float) -> Outcome:
    """``attempts`` counts this one. Delivered -> sent; a permanent error or the last allowed
    attempt -> failed; otherwise pending again after ``backoff``."""
    err = result.error[:MAX_ERROR] if result.error else None
    if result.ok:
        return Outcome("sent", now, None, result.status)
    if not result.retry or attempts >= max_attempts:
        return Outcome("failed", now, err, result.status)
    return Outcome("pending", now + backoff(attempts, rand), err, result.status)


# -- what people read ------------------------------------------------------------------------------
def _s(v: Any) -> str:
    if isinstance(v, list | tuple):
        return ", ".join(str(x) for x in v)
    return "" if v is None else str(v)


def summary(name: str, d: Mapping[str, Any]) -> str:
    """One line for a chat message, an e-mail subject or a log (at most ``MAX_SUMMARY``)."""
    text = _summary(name, d)
    return text if len(text) <= MAX_SUMMARY else text[:MAX_SUMMARY - 1] + "…"


def _summary(name: str, d: Mapping[str, Any]) -> str:
    user, stacks, level = _s(d.get("user")), _s(d.get("stacks")), _s(d.get("level"))
    scope = f"{stacks} ({level})" if level else stacks
    by = _s(d.get("actor"))
    if name == "grant.requested":
        return f"{user} requests {scope} access: {_s(d.get('reason'))} [{_s(d.get('ticket'))}]"
    if name == "grant.approved":
        return f"{user}: {scope} access approved by {by} until {_s(d.get('expires_at'))}"
    if name == "grant.rejected":
        return f"{user}: {scope} access request rejected by {by}"
    if name == "grant.revoked":
        return f"{user}: {scope} access revoked by {by}"
    if name == "grant.expiring":
        return f"{user}: {scope} access ends at {_s(d.get('expires_at'))}"
    if name == "session.admin_started":
        return (f"{user} started an admin {_s(d.get('kind'))} session on "
                f"{_s(d.get('target_name')) or _s(d.get('target'))} as {_s(d.get('login'))}")
    if name == "lock.created":
        return (f"{_s(d.get('kind'))} {_s(d.get('value'))} locked by {_s(d.get('created_by'))}: "
                f"{_s(d.get('reason'))}")
    if name == TEST_EVENT:
        return f"Test notification for channel {_s(d.get('channel'))} from {_s(d.get('by'))}"
    return TITLES.get(name, name)


# (data key, label) in the order people read them
_FACTS = (("user", "User"), ("stacks", "Stacks"), ("vpc", "VPC"), ("level", "Level"),
          ("state", "State"), ("ticket", "Ticket"), ("trigger", "Trigger"), ("reason", "Reason"),
          ("starts_at", "Starts"), ("expires_at", "Ends"), ("actor", "By"),
          ("comment", "Comment"), ("grant_id", "Grant"), ("target_name", "Target"),
          ("target", "Instance"), ("login", "Login"), ("kind", "Kind"), ("peer", "From"),
          ("session_id", "Session"), ("value", "Locked"), ("lock_id", "Lock"),
          ("created_by", "Locked by"), ("channel", "Channel"), ("by", "Sent by"))


def facts(ev: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, text) of an event's non-empty fields, each cut to ``MAX_FACT`` characters."""
    d = ev.get("data") or {}
    out = []
    for key, label in _FACTS:
        text = _s(d.get(key)).strip()
        if text:
            out.append((label, text if len(text) <= MAX_FACT else text[:MAX_FACT - 1] + "…"))
    return out


def _slack_escape(text: str) -> str:
    """Slack mrkdwn: a user's reason must not become a link or an @channel mention."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(ev: Mapping[str, Any]) -> dict[str, Any]:
    """What a Slack incoming webhook takes: ``text`` (notifications, old clients) and blocks."""
    text = _slack_escape(f"{ev['title']}: {ev['summary']}")
    fields = [{"type": "mrkdwn", "text": f"*{label}*\n{_slack_escape(value)}"}
              for label, value in facts(ev)][:10]  # Slack takes at most 10 fields
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": str(ev["title"])[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(ev["summary"])}},
    ]
    if fields:
        blocks.append({"type": "section", "fields": fields})
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": _slack_escape(f"{ev['event']} · {ev['id']} · {ev['at']}")}]})
    return {"text": text, "blocks": blocks}


def teams_body(ev: Mapping[str, Any]) -> dict[str, Any]:
    """An Adaptive Card in the message envelope Teams incoming webhooks (Workflows) take."""
    card = {
        "type": "AdaptiveCard", "version": "1.4",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "body": [
            {"type": "TextBlock", "text": str(ev["title"]), "weight": "Bolder",
             "size": "Medium", "wrap": True},
            {"type": "TextBlock", "text": str(ev["summary"]), "wrap": True},
            {"type": "FactSet", "facts": [{"title": k, "value": v} for k, v in facts(ev)]},
            {"type": "TextBlock", "text": f"{ev['event']} · {ev['id']} · {ev['at']}",
             "isSubtle": True, "size": "Small", "wrap": True},
        ],
    }
    return {"type": "message", "attachments": [
        {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None,
         "content": card}]}


def render_webhook(fmt: str, ev: Mapping[str, Any], delivery_id: str) -> bytes:
    """The POST body: the whole event (``json``, with the delivery id), or a chat message."""
    if fmt == "slack":
        body: dict[str, Any] = slack_body(ev)
    elif fmt == "teams":
        body = teams_body(ev)
    else:
        body = {**ev, "delivery": delivery_id}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """``X-Bastion-Signature``: ``sha256=`` and the hex HMAC-SHA256 of ``TIMESTAMP.BODY``. The
    timestamp is signed too, so a captured request cannot be replayed later (the receiver
    refuses an old ``X-Bastion-Timestamp``), as Stripe's and Slack's signatures do."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, now: float,
           tolerance: float = 300.0) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(now - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")


def email_message(ev: Mapping[str, Any]) -> tuple[str, str]:
    """(subject, plain-text body). The subject is one line: no user text can add a header."""
    subject = _HEADER_UNSAFE.sub(" ", f"[bastion] {ev['title']}: {ev['summary']}")
    if len(subject) > 200:
        subject = subject[:199] + "…"
    width = max((len(k) for k, _ in facts(ev)), default=0)
    lines = [str(ev["summary"]), ""]
    lines += [f"{k + ':':<{width + 1}} {v}" for k, v in facts(ev)]
    lines += ["", f"Event: {ev['event']} {ev['id']} at {ev['at']}",
              "-- ", "Sent by bastion-broker ([notify] in its configuration)."]
    return subject, "\n".join(lines) + "\n"


def grant_data(*, grant_id: str, user: str, stacks: Sequence[str], vpc: str, level: str,
               state: str, starts_at: datetime, expires_at: datetime, ticket: str,
               trigger: str, reason: str, requested_by: str, actor: str,
               comment: str | None = None) -> dict[str, Any]:
    return {"grant_id": grant_id, "user": user, "stacks": list(stacks), "vpc": vpc,
            "level": level, "state": state, "starts_at": starts_at.isoformat(),
            "expires_at": expires_at.isoformat(), "ticket": ticket, "trigger": trigger,
            "reason": reason, "requested_by": requested_by, "actor": actor,
            "comment": comment or None}


def grant_event_name(action: str, state: str) -> str | None:
    """The event a grant history entry makes, if any: a request (or a change that needs
    approval again) asks approvers; a decision or revocation tells the requester."""
    if action == "requested":
        return "grant.approved" if state == "approved" else "grant.requested"
    if action == "changed" and state == "pending":
        return "grant.requested"
    return {"approved": "grant.approved", "rejected": "grant.rejected",
            "revoked": "grant.revoked"}.get(action)


def expiring_key(grant_id: str, expires_at: datetime) -> str:
    """One "expiring soon" per grant and end time: an extension moves the end, so it re-arms."""
    return f"grant.expiring:{grant_id}:{expires_at.astimezone(UTC).isoformat()}"


def delivery_json(d: Delivery) -> dict[str, Any]:
    """A delivery as the log shows it (``notify deliveries``, ``GET /api/notify/deliveries``):
    never the body sent or anything of the channel but its name."""
    try:
        text = str(d.event_json().get("summary", ""))
    except ValueError:
        text = ""
    return {"id": d.id, "event_id": d.event_id, "event": d.event, "channel": d.channel,
            "status": d.status, "attempts": d.attempts, "created_at": d.created_at.isoformat(),
            "updated_at": d.updated_at.isoformat(),
            "next_attempt_at": d.next_attempt_at.isoformat() if d.status == "pending" else None,
            "sent_at": d.sent_at.isoformat() if d.sent_at else None,
            "last_status": d.last_status, "last_error": d.last_error, "summary": text}
