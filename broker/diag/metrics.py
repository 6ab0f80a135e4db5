"""The broker's Prometheus metrics, in a registry of its own.

Two kinds, so that the relay's hot path does no work for them:

* counters and histograms that the services bump once per login, grant check, session, or store
  or directory call (``PrometheusMetrics``, the ``Metrics`` port);
* values computed when ``/metrics`` is scraped (``BrokerCollector``): live sessions and the bytes
  relayed (the session service's live byte counters plus its totals of ended sessions), how far
  the recordings' flush to disk lags, free space on the recordings disk, the shipping backlog
  and the locked and throttled accounts. The last three are read, each with a timeout, before
  every scrape (``refresh``); a source that fails or times out is left out of that scrape and
  ``bastion_broker_metrics_source_up`` says so.

Several workers (``[ssh] workers`` > 1): each process serves its own metrics on a port of its
own (``broker.diag.server``), so every counter here is one process's; sum them over the
scrape targets. The gauges of shared state (accounts, backlog, disk) are the same in every
worker: take their ``max``, not their sum.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from broker.diag.checks import DiskState, SingleFlight
from broker.ports import ThrottleSummary
from broker.services.sessions import SessionService

log = structlog.get_logger("broker.diag")

# session kinds the broker records (SessionRequest.kind): reported even with nothing live
KINDS = ("shell", "exec", "subsystem", "tunnel", "jump")

_LOGIN_METHODS = {
    "password+totp": "password_totp",
    "publickey+totp": "publickey_totp",
    "password+reauth-window": "password_reauth_window",
    "publickey+reauth-window": "publickey_reauth_window",
    "password+totp-enrolment": "totp_enrolment",
}
_FAILURE_REASONS = {
    # the broker's own (services/auth.py)
    "no TOTP enrolled": "totp_not_enrolled",
    "bad TOTP code": "totp_bad",
    "TOTP code reused": "totp_reused",
    # the directories' (identity/static.py, identity/ldap.py)
    "bad password": "bad_password",
    "empty or invalid password": "bad_password",
    "empty password": "bad_password",
    "invalid password (NUL)": "bad_password",
    "invalid credentials": "bad_password",
    "unknown user": "unknown_user",
    "no such user": "unknown_user",
    "ambiguous user name": "unknown_user",
    "empty user name": "bad_user_name",
    "user name too long": "bad_user_name",
    "invalid character in user name": "bad_user_name",
    "invalid user name (surrounding spaces)": "bad_user_name",
    "untrusted domain": "untrusted_domain",
    "not in a required group": "not_in_group",
    "account disabled": "account_state",
    "account expired": "account_state",
    "account locked out": "account_state",
    "password expired": "account_state",
    "must change password": "account_state",
    "logon time restriction": "account_state",
    "workstation restriction": "account_state",
    "account state unreadable": "directory_unavailable",
}
_FAILURE_PREFIXES = (
    ("locked (", "locked"),  # "locked (source) ...", "locked (account, unknown source) ..."
    ("throttled (", "throttled"),
    ("self-enrolment", "enrolment_failed"),
    ("directory unavailable", "directory_unavailable"),
    ("directory error", "directory_unavailable"),
    ("bind refused", "directory_unavailable"),
    ("invalid credentials (AD code", "bad_password"),
)


def login_reason(ok: bool, reason: str) -> str:
    """The ``reason`` label of a login: the method of a success, a bounded code for the audit
    reason of a failure ("other" for a reason not known here: never the text itself)."""
    if ok:
        return _LOGIN_METHODS.get(reason, "other")
    code = _FAILURE_REASONS.get(reason)
    if code is not None:
        return code
    for prefix, name in _FAILURE_PREFIXES:
        if reason.startswith(prefix):
            return name
    return "other"


def session_outcome(exit_status: str | None) -> str:
    """The ``outcome`` label of an ended session, from its ``session.end`` exit status."""
    if exit_status is None:
        return "no_status"  # the client or the target went away without an exit status
    if exit_status == "0":
        return "ok"
    if exit_status.isdigit():
        return "exit_nonzero"
    if exit_status.startswith("signal:"):
        return "signal"
    if exit_status.startswith("terminated:"):
        return "terminated"  # the broker ended it: grant gone, idle, disk, shutdown
    if exit_status == "closed":
        return "closed"  # a tunnel that either side closed
    return "error"  # a tunnel that failed ("start failed", "target error", "cut:not rdp"...)


def _buckets(*values: float) -> tuple[float, ...]:
    return (*values, float("inf"))


class PrometheusMetrics:
    """The ``Metrics`` port over prometheus-client, with a registry of the broker's own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # no ``*_created`` series beside every counter and histogram (twice the lines for a
        # start time that process_start_time_seconds already gives); the broker's process has
        # no other user of prometheus-client that this setting could surprise
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.logins = Counter(
            "bastion_broker_logins", "Logins that ended (SSH and API), by result and reason: "
            "the method of a success, a bounded code of the audit reason of a failure. "
            "Counted by this process.", ["result", "reason"], registry=r)
        self.login_duration = Histogram(
            "bastion_broker_login_duration_seconds", "Time from the first check of a login to "
            "its answer (directory, TOTP and store calls), by outcome: success, failure, "
            "enrolment.", ["outcome"], registry=r,
            buckets=_buckets(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.account_locks = Counter(
            "bastion_broker_account_locks", "Accounts that reached their lock threshold "
            "([limits] account_lock_after) in this process.", registry=r)
        self.decisions = Counter(
            "bastion_broker_grant_decisions", "Grant checks: at login with a user+target name "
            "and again when each session or tunnel starts. allow, deny (no live grant), "
            "unknown_target (not an inventory instance; a tunnel may then resolve it by DNS).",
            ["decision"], registry=r)
        self.sessions = Counter(
            "bastion_broker_sessions", "Recorded sessions that ended, by kind and outcome "
            "(ok, exit_nonzero, signal, terminated, closed, no_status, error).",
            ["kind", "outcome"], registry=r)
        self.directory = Histogram(
            "bastion_broker_directory_call_duration_seconds", "Directory calls of logins "
            "(authenticate: password check; lookup: account check after a registered key).",
            ["op"], registry=r,
            buckets=_buckets(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.store = Histogram(
            "bastion_broker_store_call_duration_seconds", "Store calls (SQLite: waiting for the "
            "database thread included; PostgreSQL: waiting for a pooled connection included).",
            registry=r, buckets=_buckets(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                         0.25, 0.5, 1, 2.5, 5))
        self.loop_lag = Histogram(
            "bastion_broker_event_loop_lag_seconds", "How late a 1 s timer on the broker's event "
            "loop fired (sampled every second): every relayed byte waits as long.",
            registry=r, buckets=_buckets(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                         2.5, 5))
        for decision in ("allow", "deny", "unknown_target"):
            self.decisions.labels(decision)
        for result, reason in (("success", "password_totp"), ("failure", "bad_password"),
                               ("failure", "totp_bad")):
            self.logins.labels(result, reason)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, memory, open fds

    # -- the Metrics port ----------------------------------------------------------------------
    def login(self, ok: bool, reason: str) -> None:
        self.logins.labels("success" if ok else "failure", login_reason(ok, reason)).inc()

    def login_seconds(self, outcome: str, seconds: float) -> None:
        self.login_duration.labels(outcome).observe(seconds)

    def account_locked(self) -> None:
        self.account_locks.inc()

    def access_decision(self, decision: str) -> None:
        self.decisions.labels(decision).inc()

    def session_ended(self, kind: str, exit_status: str | None) -> None:
        self.sessions.labels(kind, session_outcome(exit_status)).inc()

    def directory_call(self, op: str, seconds: float) -> None:
        self.directory.labels(op).observe(seconds)

    def store_call(self, seconds: float) -> None:
        self.store.observe(seconds)

    # -- the event loop -------------------------------------------------------------------------
    async def watch_loop(self, interval: float = 1.0) -> None:
        """Sample the event loop's lag every ``interval`` seconds until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(0.0, loop.time() - due))


class Backlog(Protocol):
    """What waits to be shipped (broker/shipping/backlog.py)."""

    @property
    def sessions(self) -> int: ...

    @property
    def files(self) -> int: ...

    @property
    def bytes(self) -> int: ...

    @property
    def oldest_seconds(self) -> float: ...

    @property
    def audit_bytes(self) -> Mapping[str, int]: ...


@dataclass(frozen=True, slots=True)
class _Figures:
    """The values read before a scrape; None where the source is off, failed or timed out."""

    disk: DiskState | None = None
    backlog: Backlog | None = None
    accounts: ThrottleSummary | None = None


class BrokerCollector(Collector):
    """Values computed at scrape time from state the broker keeps anyway."""

    def __init__(self, sessions: SessionService, *,
                 disk: Callable[[], DiskState] | None = None,
                 backlog: Callable[[], Backlog | None] | None = None,
                 accounts: Callable[[], Awaitable[ThrottleSummary]] | None = None,
                 refusals: Callable[[], Mapping[str, int]] | None = None,
                 timeout: float = 2.0) -> None:
        self._sessions = sessions
        self._refusals = refusals  # the PROXY protocol listener's, by code (None: not on)
        self._sources: dict[str, SingleFlight[object]] = {}
        if disk is not None:
            self._sources["recordings_disk"] = SingleFlight(_in_thread(disk), timeout)
        if backlog is not None:
            self._sources["shipping_backlog"] = SingleFlight(_in_thread(backlog), timeout)
        if accounts is not None:
            self._sources["accounts"] = SingleFlight(accounts, timeout)
        self._figures = _Figures()
        self._up: dict[str, bool] = {}

    async def refresh(self) -> None:
        """Read the slow sources (each in a thread or on the store, each with the timeout)."""
        names = list(self._sources)
        results = await asyncio.gather(*(self._sources[n].run() for n in names),
                                       return_exceptions=True)
        got: dict[str, object] = {}
        for name, result in zip(names, results, strict=True):
            self._up[name] = not isinstance(result, BaseException)
            if isinstance(result, BaseException):
                log.warning("diag.source_failed", source=name, error=str(result) or repr(result))
            else:
                got[name] = result
        self._figures = _Figures(disk=got.get("recordings_disk"),  # type: ignore[arg-type]
                                 backlog=got.get("shipping_backlog"),  # type: ignore[arg-type]
                                 accounts=got.get("accounts"))  # type: ignore[arg-type]

    def close(self) -> None:
        for flight in self._sources.values():
            flight.cancel()

    def collect(self) -> Iterable[Metric]:
        yield from self._session_metrics()
        lag = self._sessions.sync_lag()
        if lag is not None:
            yield GaugeMetricFamily(
                "bastion_broker_recording_sync_lag_seconds", "Age of the oldest recorded data "
                "that may not be on disk yet (an upper bound: since the last completed flush "
                "of the live recordings started). Near [recordings] sync_interval_seconds "
                "when healthy; grows while fsync stalls.", value=lag)
        yield from self._figures_metrics(self._figures)
        if self._refusals is not None:
            refused = CounterMetricFamily(
                "bastion_broker_proxy_refusals", "Connections the PROXY protocol listener of "
                "this process closed before any SSH byte, by reason: untrusted_peer (not in "
                "[ssh] trusted_proxies), header_timeout, bad_header, closed_before_header (a "
                "balancer's plain TCP check), listener_closed. The audit's connection.refused "
                "has each one's detail.", labels=["reason"])
            for reason, n in sorted(self._refusals().items()):
                refused.add_metric([reason], n)
            yield refused
        if self._up:
            up = GaugeMetricFamily(
                "bastion_broker_metrics_source_up", "1 if the source was read for this scrape, "
                "0 if it failed or timed out (its metrics are then missing).",
                labels=["source"])
            for name, ok in sorted(self._up.items()):
                up.add_metric([name], 1.0 if ok else 0.0)
            yield up

    def _session_metrics(self) -> Iterable[Metric]:
        active = dict.fromkeys(KINDS, 0)
        relayed = dict(self._sessions.ended_bytes)  # a copy: the loop may not change it meanwhile
        for live in list(self._sessions.live.values()):
            kind = live.request.kind
            active[kind] = active.get(kind, 0) + 1
            relayed[kind, "in"] = relayed.get((kind, "in"), 0) + live.bytes_in
            relayed[kind, "out"] = relayed.get((kind, "out"), 0) + live.bytes_out
        gauge = GaugeMetricFamily(
            "bastion_broker_sessions_active", "Recorded sessions open in this process, by kind.",
            labels=["kind"])
        for kind, n in sorted(active.items()):
            gauge.add_metric([kind], n)
        yield gauge
        counter = CounterMetricFamily(
            "bastion_broker_relayed_bytes", "Bytes relayed by recorded sessions of this process "
            "(live and ended), by direction (in: client to target; out: target to client) "
            "and kind. A jump session carries the encrypted bytes of the sessions inside it, "
            "which count again under their own kinds.", labels=["direction", "kind"])
        for kind in sorted({k for k, _ in relayed} | set(KINDS)):
            for direction in ("in", "out"):
                counter.add_metric([direction, kind], relayed.get((kind, direction), 0))
        yield counter

    @staticmethod
    def _figures_metrics(f: _Figures) -> Iterable[Metric]:
        shared = " Shared by every worker and bastion on this state: max, not sum."
        if f.disk is not None:
            yield GaugeMetricFamily("bastion_broker_recordings_disk_free_bytes",
                                    "Free bytes for the broker on the recordings file system.",
                                    value=f.disk.free_bytes)
            yield GaugeMetricFamily("bastion_broker_recordings_disk_total_bytes",
                                    "Size of the recordings file system.",
                                    value=f.disk.total_bytes)
        if f.backlog is not None:
            b = f.backlog
            yield GaugeMetricFamily("bastion_broker_shipping_backlog_sessions",
                                    "Ended sessions not yet verified in S3." + shared,
                                    value=b.sessions)
            yield GaugeMetricFamily("bastion_broker_shipping_backlog_files",
                                    "Local files of those sessions." + shared, value=b.files)
            yield GaugeMetricFamily("bastion_broker_shipping_backlog_bytes",
                                    "Bytes of those files." + shared, value=b.bytes)
            yield GaugeMetricFamily("bastion_broker_shipping_backlog_oldest_seconds",
                                    "Age of the oldest session waiting for S3 (0 if none)."
                                    + shared, value=b.oldest_seconds)
            audit = GaugeMetricFamily("bastion_broker_shipping_audit_backlog_bytes",
                                      "Audit log bytes a shipper has not read yet." + shared,
                                      labels=["shipper"])
            for name, n in sorted(b.audit_bytes.items()):
                audit.add_metric([name], n)
            yield audit
        if f.accounts is not None:
            yield GaugeMetricFamily("bastion_broker_accounts_locked",
                                    "Accounts locked after too many failed logins (until "
                                    "`bastion-broker auth unlock`)." + shared,
                                    value=f.accounts.locked)
            yield GaugeMetricFamily("bastion_broker_accounts_throttled",
                                    "Accounts (not locked) waiting out a login back-off now."
                                    + shared, value=f.accounts.throttled)


def _in_thread(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    async def run() -> object:
        return await asyncio.to_thread(fn)
    return run
