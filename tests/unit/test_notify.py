"""The pure rules of notifications: routing to channels, what an HTTP status means, the retry
schedule, payloads (JSON, Slack, Teams, e-mail) and the signature a receiver checks."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.config import BrokerConfig, load_config
from broker.domain import notify as n
from broker.domain.notify import Attempt, Event, Subscription
from broker.errors import ConfigError

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DATA = n.grant_data(grant_id="g-1", user="alice@corp.example.com", stacks=["stack-web"],
                    vpc="vpc-0demo", level="admin", state="pending", starts_at=T0,
                    expires_at=T0 + timedelta(hours=4), ticket="INC-42", trigger="incident",
                    reason="disk <!channel> full & slow", requested_by="alice", actor="alice")


def ev(name: str = "grant.requested", dedupe: str | None = None) -> Event:
    return Event("ev-1", name, T0, DATA, dedupe)


def test_rows_go_to_the_channels_that_take_the_event() -> None:
    subs = [Subscription("a", frozenset({"grant.requested"})),
            Subscription("b", frozenset({"lock.created"})),
            Subscription("c", frozenset(n.EVENTS))]
    ids = (f"dl-{i}" for i in itertools.count())
    rows = n.deliveries_for(ev(), subs, T0, ids)
    assert [(d.id, d.channel, d.dedupe_key, d.status) for d in rows] == [
        ("dl-0", "a", "ev-1/a", "pending"), ("dl-1", "c", "ev-1/c", "pending")]
    assert rows[0].event_json() == ev().as_json()
    assert rows[0].next_attempt_at == T0 and rows[0].attempts == 0
    # a test event goes to the channel named whatever it takes; a dedupe key replaces the id
    [only] = n.deliveries_for(ev(n.TEST_EVENT), subs, T0, ids, only="b")
    assert only.channel == "b"
    [keyed, _] = n.deliveries_for(ev(dedupe="k"), subs, T0, ids)
    assert keyed.dedupe_key == "k/a"


def test_unknown_event_names_are_refused_with_the_known_ones() -> None:
    assert n.check_events(["lock.created"]) == ["lock.created"]
    with pytest.raises(n.UnknownEvent, match=r"unknown event 'grant\.created'; known: grant\.req"):
        n.check_events(["lock.created", "grant.created"])


@pytest.mark.parametrize(("status", "ok", "retry"), [
    (200, True, False), (204, True, False), (299, True, False),
    (400, False, False), (401, False, False), (404, False, False), (410, False, False),
    (408, False, True), (429, False, True), (500, False, True), (503, False, True),
    (301, False, True), (100, False, True)])
def test_what_an_http_status_means(status: int, ok: bool, retry: bool) -> None:
    a = n.http_attempt(status)
    assert (a.ok, a.retry, a.status) == (ok, retry, status)
    assert (a.error is None) == ok


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    assert n.backoff(1, 0.0) == timedelta(seconds=2.5)
    assert n.backoff(1, 0.999999) < timedelta(seconds=5)
    assert n.backoff(2, 0.5) == timedelta(seconds=7.5)
    assert n.backoff(4, 1.0) == timedelta(seconds=40)
    assert n.backoff(30, 1.0) == timedelta(hours=1)
    assert n.backoff(10_000, 0.0) == timedelta(minutes=30)  # no overflow far out
    assert n.backoff(0, -1.0) == timedelta(seconds=2.5)  # clamped


def test_after_an_attempt() -> None:
    sent = n.after_attempt(1, 8, Attempt(ok=True, status=200), T0, 0.5)
    assert (sent.status, sent.http_status, sent.error) == ("sent", 200, None)
    again = n.after_attempt(3, 8, n.http_attempt(503), T0, 0.0)
    assert (again.status, again.next_attempt_at, again.error) == (
        "pending", T0 + timedelta(seconds=10), "HTTP 503")
    last = n.after_attempt(8, 8, n.http_attempt(503), T0, 0.0)
    assert (last.status, last.error) == ("failed", "HTTP 503")
    refused = n.after_attempt(1, 8, n.http_attempt(404), T0, 0.0)
    assert (refused.status, refused.http_status) == ("failed", 404)
    long = n.after_attempt(1, 8, Attempt(ok=False, retry=True, error="x" * 1000), T0, 0.0)
    assert long.error == "x" * n.MAX_ERROR


def test_signature_is_hmac_of_timestamp_dot_body_and_verify_checks_age() -> None:
    body, secret = b'{"a":1}', b"s3cret"
    sig = n.sign(secret, 1700000000, body)
    assert sig == "sha256=" + hmac.new(secret, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert n.verify(secret, "1700000000", body, sig, now=1700000100)
    assert not n.verify(secret, "1700000000", body, sig, now=1700000301)  # replayed later
    assert not n.verify(secret, "1700000001", body, sig, now=1700000000)  # other timestamp
    assert not n.verify(b"other", "1700000000", body, sig, now=1700000000)
    assert not n.verify(secret, "1700000000", body + b" ", sig, now=1700000000)
    assert not n.verify(secret, "soon", body, sig, now=1700000000)


def test_json_body_is_the_whole_event_with_the_delivery_id() -> None:
    body = json.loads(n.render_webhook("json", ev().as_json(), "dl-9"))
    assert body["delivery"] == "dl-9" and body["event"] == "grant.requested"
    assert body["data"] == {**DATA, "stacks": ["stack-web"]}
    assert body["summary"] == ("alice@corp.example.com requests stack-web (admin) access: "
                               "disk <!channel> full & slow [INC-42]")


def test_slack_body_escapes_what_users_typed() -> None:
    body = json.loads(n.render_webhook("slack", ev().as_json(), "dl-9"))
    assert body["text"].startswith("Access requested: alice@corp.example.com requests")
    assert "<!channel>" not in json.dumps(body) and "&lt;!channel&gt; full &amp; slow" in body["text"]
    assert [b["type"] for b in body["blocks"]] == ["header", "section", "section", "context"]
    fields = body["blocks"][2]["fields"]
    assert len(fields) <= 10 and fields[0] == {"type": "mrkdwn",
                                               "text": "*User*\nalice@corp.example.com"}


def test_teams_body_is_an_adaptive_card_message() -> None:
    body = json.loads(n.render_webhook("teams", ev().as_json(), "dl-9"))
    [att] = body["attachments"]
    assert body["type"] == "message"
    assert att["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = att["content"]
    assert (card["type"], card["version"]) == ("AdaptiveCard", "1.4")
    facts = {f["title"]: f["value"] for f in card["body"][2]["facts"]}
    assert facts["Ticket"] == "INC-42" and facts["Level"] == "admin"


def test_email_subject_is_one_line_and_body_lists_the_facts() -> None:
    data = {**DATA, "reason": "a\r\nBcc: evil@example.com"}
    subject, body = n.email_message(Event("ev-2", "grant.requested", T0, data).as_json())
    assert "\n" not in subject and "\r" not in subject
    assert subject.startswith("[bastion] Access requested: alice@corp.example.com requests")
    assert "User:    alice@corp.example.com\n" in body
    assert "Event: grant.requested ev-2 at 2026-03-01T12:00:00+00:00" in body
    long = Event("ev-3", "lock.created", T0, {"reason": "x" * 2000}).as_json()
    s2, b2 = n.email_message(long)
    assert len(s2) == 200
    assert f"Reason: {'x' * (n.MAX_FACT - 1)}…\n" in b2
    assert len(b2.splitlines()[0]) == n.MAX_SUMMARY


@pytest.mark.parametrize(("action", "state", "event"), [
    ("requested", "pending", "grant.requested"), ("requested", "approved", "grant.approved"),
    ("changed", "pending", "grant.requested"), ("changed", "approved", None),
    ("approved", "approved", "grant.approved"), ("approval-recorded", "pending", None),
    ("rejected", "rejected", "grant.rejected"), ("revoked", "revoked", "grant.revoked"),
    ("extended", "approved", None), ("withdrawn", "withdrawn", None), ("expired", "expired", None)])
def test_which_grant_changes_are_announced(action: str, state: str, event: str | None) -> None:
    assert n.grant_event_name(action, state) == event


def test_expiring_key_changes_with_the_end_only() -> None:
    end = T0 + timedelta(minutes=20)
    assert n.expiring_key("g-1", end) == n.expiring_key(
        "g-1", end.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Berlin")))
    assert n.expiring_key("g-1", end) != n.expiring_key("g-1", end + timedelta(hours=1))


def test_every_event_has_a_summary_of_its_own() -> None:
    texts = {n.summary(name, DATA) for name in [*n.EVENTS, n.TEST_EVENT]}
    assert len(texts) == len(n.EVENTS) + 1


def _load(tmp_path: Path, notify: str) -> BrokerConfig:
    cfg = tmp_path / "broker.toml"
    cfg.write_text(f'state_dir = "state"\n{notify}')
    return load_config(cfg)


def test_config_names_an_unknown_event_a_bad_url_and_a_repeated_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, '[[notify.webhooks]]\nname = "a"\nurl = "https://h/x"\n'
              'events = ["grant.requested", "grant.created"]\n')
    assert "key 'notify.webhooks.0.events'" in str(exc.value)
    assert "unknown event 'grant.created'; known: grant.requested" in str(exc.value)
    with pytest.raises(ConfigError, match="must be an http:// or https:// URL"):
        _load(tmp_path, '[[notify.webhooks]]\nname = "a"\nurl = "file:///etc/passwd"\n')
    with pytest.raises(ConfigError, match="two channels are named 'a'"):
        _load(tmp_path, '[[notify.webhooks]]\nname = "a"\nurl = "https://h/x"\n'
              '[[notify.email]]\nname = "a"\nto = ["x@example.com"]\nsmtp_host = "m"\n'
              'from_addr = "b@example.com"\n')
    c = _load(tmp_path, '[notify]\nmax_attempts = 3\n[[notify.webhooks]]\nname = "a"\n'
              'url = "https://h/x"\nsecret_file = "s.txt"\nformat = "slack"\n')
    [w] = c.notify.webhooks
    assert (c.notify.max_attempts, c.notify.expiring_soon_minutes) == (3, 30)
    assert w.secret_file == tmp_path / "s.txt" and w.events == list(n.EVENTS)
    assert "https://h/x" not in repr(w)  # a webhook URL may be a secret
