"""The metrics: bounded label values, and the values computed at scrape time from a real session
service (SQLite index, local recordings) as the relay drives it."""

from __future__ import annotations

import ast
import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import broker
from broker.diag.metrics import (
    BrokerCollector,
    PrometheusMetrics,
    login_reason,
    session_outcome,
)
from broker.domain.models import Grant, GrantState, Instance, Level, Principal, Trigger
from broker.identity.ad_rules import AD_BIND_CODES
from broker.ports import ThrottleSummary
from broker.recordings.local import LocalRecordingSink
from broker.services.clock import SystemClock
from broker.services.sessions import SessionRequest, SessionService
from broker.store.sqlite import SqliteDatabase, SqliteSessionIndex

ROOT = Path(broker.__file__).parent
T0 = datetime.now(UTC)


def _literal_failure_reasons() -> set[str]:
    """Every ``AuthOutcome(None, "literal")`` in the broker: the reasons a login can fail with."""
    found: set[str] = set()
    for path in [*ROOT.joinpath("identity").glob("*.py"), ROOT / "services" / "auth.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "AuthOutcome"
                    and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value is None):
                reason = node.args[1]
                values = ([reason.body, reason.orelse] if isinstance(reason, ast.IfExp)
                          else [reason])
                found |= {v.value for v in values
                          if isinstance(v, ast.Constant) and isinstance(v.value, str)}
    return found


def test_every_known_failure_reason_has_a_label_of_its_own() -> None:
    reasons = _literal_failure_reasons() | set(AD_BIND_CODES.values())
    assert {"bad password", "unknown user", "bad TOTP code", "TOTP code reused"} <= reasons
    unmapped = sorted(r for r in reasons if login_reason(False, r) == "other")
    assert unmapped == [], "map these in broker/diag/metrics.py"


@pytest.mark.parametrize(("ok", "reason", "label"), [
    (True, "password+totp", "password_totp"),
    (True, "publickey+reauth-window", "publickey_reauth_window"),
    (False, "bad TOTP code", "totp_bad"),
    (False, "locked (account, unknown source) after 50 failures", "locked"),
    (False, "locked (source) after 50 failures", "locked"),
    (False, "throttled (account, unknown source) for 12.5 s more", "throttled"),
    (False, "throttled (source) for 1.0 s more", "throttled"),
    (False, "directory unavailable: ldaps://dc1: timed out", "directory_unavailable"),
    (False, "directory error: KeyError", "directory_unavailable"),
    (False, "invalid credentials (AD code 9999)", "bad_password"),
    (False, "self-enrolment: bad TOTP code", "enrolment_failed"),
    (False, "alice's cat walked on the keyboard", "other"),  # never the free text itself
    (True, "carrier pigeon", "other"),
])
def test_login_reason_labels_are_bounded(ok: bool, reason: str, label: str) -> None:
    assert login_reason(ok, reason) == label


@pytest.mark.parametrize(("status", "outcome"), [
    ("0", "ok"), ("3", "exit_nonzero"), ("255", "exit_nonzero"), ("signal:TERM", "signal"),
    ("terminated:grant expired", "terminated"), (None, "no_status"), ("closed", "closed"),
    ("start failed", "error"), ("cut:not rdp", "error"),
])
def test_session_outcome(status: str | None, outcome: str) -> None:
    assert session_outcome(status) == outcome


def samples(metrics: PrometheusMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def v(metrics: PrometheusMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def test_counters_and_histograms_of_the_metrics_port() -> None:
    m = PrometheusMetrics()
    m.login(True, "password+totp")
    m.login(False, "bad TOTP code")
    m.login(False, "bad TOTP code")
    m.login(False, "something new")
    m.login_seconds("success", 0.2)
    m.access_decision("deny")
    m.session_ended("exec", "0")
    m.session_ended("exec", None)
    m.directory_call("authenticate", 0.07)
    m.store_call(0.003)
    m.account_locked()
    assert v(m, "bastion_broker_logins_total", result="success", reason="password_totp") == 1
    assert v(m, "bastion_broker_logins_total", result="failure", reason="totp_bad") == 2
    assert v(m, "bastion_broker_logins_total", result="failure", reason="other") == 1
    assert v(m, "bastion_broker_logins_total", result="failure", reason="bad_password") == 0
    assert v(m, "bastion_broker_login_duration_seconds_bucket", outcome="success",
             le="0.25") == 1
    assert v(m, "bastion_broker_login_duration_seconds_bucket", outcome="success",
             le="0.1") == 0
    assert v(m, "bastion_broker_grant_decisions_total", decision="deny") == 1
    assert v(m, "bastion_broker_grant_decisions_total", decision="allow") == 0
    assert v(m, "bastion_broker_sessions_total", kind="exec", outcome="ok") == 1
    assert v(m, "bastion_broker_sessions_total", kind="exec", outcome="no_status") == 1
    assert v(m, "bastion_broker_directory_call_duration_seconds_count", op="authenticate") == 1
    assert v(m, "bastion_broker_store_call_duration_seconds_count") == 1
    assert v(m, "bastion_broker_account_locks_total") == 1
    assert not any(name.endswith("_created") for name, _ in samples(m))


def test_two_brokers_in_one_process_keep_their_own_counts() -> None:
    a, b = PrometheusMetrics(), PrometheusMetrics()
    a.access_decision("allow")
    assert v(a, "bastion_broker_grant_decisions_total", decision="allow") == 1
    assert v(b, "bastion_broker_grant_decisions_total", decision="allow") == 0


class Audit:
    def __init__(self) -> None:
        self.events: list[str] = []

    def emit(self, event: str, **fields: object) -> None:
        self.events.append(event)


def request(kind: str) -> SessionRequest:
    g = Grant("g-1", "alice", "corp.example.com", ("stack-a",), "vpc-0a", Level.READ_ONLY,
              GrantState.APPROVED, T0, T0 + timedelta(hours=1), Trigger.INCIDENT)
    inst = Instance("i-1", "web01", "stack-a", "vpc-0a", "10.0.0.1")
    return SessionRequest(Principal("corp.example.com", "alice"), inst, g, "ro", kind,
                          "cat" if kind == "exec" else None, None, 0, 0, "10.0.0.9:5000")


@pytest.fixture
def service(tmp_path: Path) -> SessionService:
    db = SqliteDatabase(tmp_path / "broker.db")
    return SessionService(LocalRecordingSink(tmp_path / "recordings"), SqliteSessionIndex(db),
                          Audit(), SystemClock(), metrics=None)


def relayed(m: PrometheusMetrics, direction: str, kind: str) -> float | None:
    return v(m, "bastion_broker_relayed_bytes_total", direction=direction, kind=kind)


async def test_live_sessions_and_relayed_bytes_are_read_at_scrape_time(
    service: SessionService,
) -> None:
    m = PrometheusMetrics()
    m.registry.register(BrokerCollector(service))
    assert v(m, "bastion_broker_sessions_active", kind="exec") == 0
    assert relayed(m, "in", "tunnel") == 0
    exec_ = await service.start(request("exec"))
    shell = await service.start(request("shell"))
    sent: list[bytes] = []
    exec_.input(b"12345", lambda: sent.append(b"in"))
    exec_.output(b"1234567890", False, lambda: sent.append(b"out"))
    shell.output(b"ab", True, lambda: sent.append(b"err"))
    exec_.flush()
    shell.flush()
    assert v(m, "bastion_broker_sessions_active", kind="exec") == 1
    assert v(m, "bastion_broker_sessions_active", kind="shell") == 1
    assert (relayed(m, "in", "exec"), relayed(m, "out", "exec")) == (5, 10)
    assert relayed(m, "out", "shell") == 2
    await service.finish(exec_, "0")
    # the ended session's bytes moved to the totals: the counter did not go back
    assert (relayed(m, "in", "exec"), relayed(m, "out", "exec")) == (5, 10)
    assert v(m, "bastion_broker_sessions_active", kind="exec") == 0
    second = await service.start(request("exec"))
    second.output(b"xyz", False, lambda: None)
    second.flush()
    assert relayed(m, "out", "exec") == 13
    await service.finish(second, "signal:TERM")
    await service.finish(shell, None)
    assert (relayed(m, "out", "exec"), relayed(m, "out", "shell")) == (13, 2)
    assert v(m, "bastion_broker_sessions_active", kind="shell") == 0
    await service.drain()


async def test_session_service_reports_ended_sessions(tmp_path: Path) -> None:
    m = PrometheusMetrics()
    db = SqliteDatabase(tmp_path / "broker.db")
    service = SessionService(LocalRecordingSink(tmp_path / "recordings"),
                             SqliteSessionIndex(db), Audit(), SystemClock(), metrics=m)
    live = await service.start(request("exec"))
    await service.finish(live, "terminated:grant expired")
    await service.finish(live, "0")  # a second finish of the same session counts nothing
    assert v(m, "bastion_broker_sessions_total", kind="exec", outcome="terminated") == 1
    assert v(m, "bastion_broker_sessions_total", kind="exec", outcome="ok") is None


async def test_sync_lag_grows_until_the_next_flush(service: SessionService) -> None:
    m = PrometheusMetrics()
    m.registry.register(BrokerCollector(service))
    assert v(m, "bastion_broker_recording_sync_lag_seconds") is None  # nothing flushed yet
    service.start_maintenance()
    try:
        live = await service.start(request("shell"))
        live.output(b"x" * 100, False, lambda: None)
        live.flush()
        await service.sync_all()
        fresh = v(m, "bastion_broker_recording_sync_lag_seconds")
        assert fresh is not None
        assert 0 <= fresh < 0.5
        await service.stop_maintenance()  # as if fsync had stalled: no flush from now on
        service.start_maintenance()
        service.synced_through = service.synced_through - 5  # type: ignore[operator]
        stale = v(m, "bastion_broker_recording_sync_lag_seconds")
        assert stale is not None
        assert stale >= 5
        await service.sync_all()
        again = v(m, "bastion_broker_recording_sync_lag_seconds")
        assert again is not None
        assert again < 1
        await service.finish(live, "0")
    finally:
        await service.stop_maintenance()
        await service.drain()


class Disk:
    free_bytes = 7 << 30
    total_bytes = 100 << 30
    level = None


async def test_slow_and_failing_sources_are_left_out_and_said_so(
    service: SessionService,
) -> None:
    calls = {"accounts": 0}
    release = asyncio.Event()

    async def accounts() -> ThrottleSummary:
        calls["accounts"] += 1
        await release.wait()
        return ThrottleSummary(2, 3)

    def backlog() -> None:
        raise OSError("spool unreadable")

    m = PrometheusMetrics()
    collector = BrokerCollector(service, disk=Disk, accounts=accounts,  # type: ignore[arg-type]
                                backlog=backlog, timeout=0.2)
    m.registry.register(collector)
    await collector.refresh()
    assert v(m, "bastion_broker_metrics_source_up", source="accounts") == 0
    assert v(m, "bastion_broker_metrics_source_up", source="shipping_backlog") == 0
    assert v(m, "bastion_broker_metrics_source_up", source="recordings_disk") == 1
    assert v(m, "bastion_broker_accounts_locked") is None
    assert v(m, "bastion_broker_recordings_disk_free_bytes") == 7 << 30
    await collector.refresh()  # the hung read is still the one in flight: not a second one
    assert calls["accounts"] == 1
    release.set()
    await collector.refresh()
    assert v(m, "bastion_broker_accounts_locked") == 2
    assert v(m, "bastion_broker_accounts_throttled") == 3
    assert v(m, "bastion_broker_metrics_source_up", source="accounts") == 1
    collector.close()
