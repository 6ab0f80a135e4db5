"""GrantEnforcer decisions with a fake clock, a fake grant reader and a recording fake control.

One fake clock gives both readings: ``now`` (grant times) and ``monotonic`` (the idle timeout),
as ``SystemClock`` does in the broker; sessions stamp their activity on it."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.domain.models import Grant, GrantState, Instance, Level, Principal, Trigger
from broker.services.clock import SystemClock
from broker.services.enforcement import GrantEnforcer
from broker.services.sessions import LiveSession, SessionRequest, SessionService

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.t = T0
        self.mono = 1000.0  # seconds; moved by hand like ``t``

    def now(self) -> datetime:
        return self.t

    def monotonic(self) -> float:
        return self.mono


class Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def emit(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))


class Control:
    def __init__(self) -> None:
        self.notes: list[str] = []
        self.ended: list[str] = []

    def notify(self, text: str) -> None:
        self.notes.append(text)

    def terminate(self, reason: str) -> None:
        self.ended.append(reason)


class Grants:
    def __init__(self, g: Grant | None) -> None:
        self.g = g

    async def get_many(self, grant_ids: list[str]) -> dict[str, Grant]:
        return {self.g.id: self.g} if self.g and self.g.id in grant_ids else {}


class Sessions:
    def __init__(self, live: LiveSession) -> None:
        self.live = {live.id: live}


class NullWriter:
    location = ""

    def write(self, kind: bytes, data: bytes) -> None:
        return None

    def close(self) -> None:
        return None


def grant(hours: float = 1.0) -> Grant:
    return Grant("g-1", "alice", "corp.example.com", ("stack-a",), "vpc-0a", Level.READ_ONLY,
                 GrantState.APPROVED, T0, T0 + timedelta(hours=hours), Trigger.INCIDENT)


def request(g: Grant, kind: str = "shell") -> SessionRequest:
    inst = Instance("i-1", "web01", "stack-a", "vpc-0a", "10.0.0.1")
    return SessionRequest(Principal("corp.example.com", "alice"), inst, g, "ro", kind, None,
                          "xterm", 80, 24, "peer")


def setup(hours: float = 1.0, *, idle_timeout: float = 0.0, kind: str = "shell",
          grants: Grants | DownGrants | None = None,
          ) -> tuple[GrantEnforcer, Grants, Control, Clock, Audit, LiveSession]:
    g = grant(hours)
    clock, audit, reader = Clock(), Audit(), Grants(g)
    # as SessionService.start does: the session stamps activity on the service's clock
    live = LiveSession("s-1", request(g, kind), NullWriter(), T0, monotonic=clock.monotonic)
    control = Control()
    live.control = control
    enf = GrantEnforcer(Sessions(live), grants or reader, audit, clock,  # type: ignore[arg-type]
                        interval=1.0, warn_before=timedelta(minutes=5),
                        idle_timeout=idle_timeout)
    return enf, reader, control, clock, audit, live


async def test_nothing_happens_while_the_grant_is_live_and_far_from_its_end() -> None:
    enf, _, control, _, audit, _ = setup()
    await enf.check_once()
    assert control.notes == []
    assert control.ended == []
    assert audit.events == []


async def test_warning_once_before_the_end_then_terminated_at_expiry() -> None:
    enf, _, control, clock, audit, _ = setup()
    clock.t = T0 + timedelta(minutes=56)
    await enf.check_once()
    await enf.check_once()
    assert len(control.notes) == 1
    assert "ends at 10:00 UTC (in about 4 min)" in control.notes[0]
    clock.t = T0 + timedelta(hours=1)
    await enf.check_once()
    assert control.ended == ["grant expired"]
    assert [e for e, _ in audit.events] == ["session.warned", "session.terminated"]


async def test_revoked_or_deleted_grant_ends_the_session() -> None:
    enf, grants, control, _, _, _ = setup()
    assert grants.g is not None
    grants.g = replace(grants.g, state=GrantState.REVOKED)
    await enf.check_once()
    assert control.ended == ["grant revoked"]
    enf2, grants2, control2, _, _, _ = setup()
    grants2.g = None
    await enf2.check_once()
    assert control2.ended == ["grant deleted"]


async def test_extension_moves_the_deadline_and_rearms_the_warning() -> None:
    enf, grants, control, clock, audit, live = setup()
    clock.t = T0 + timedelta(minutes=57)
    await enf.check_once()
    assert len(control.notes) == 1
    assert grants.g is not None
    grants.g = replace(grants.g, expires_at=T0 + timedelta(hours=3))
    await enf.check_once()
    assert live.deadline == T0 + timedelta(hours=3)
    assert not live.warned
    assert ("session.deadline_moved" in [e for e, _ in audit.events])
    clock.t = T0 + timedelta(hours=2, minutes=58)
    await enf.check_once()
    assert len(control.notes) == 2
    assert control.ended == []


class DownGrants:
    async def get_many(self, grant_ids: list[str]) -> dict[str, Grant]:
        from broker.errors import StoreError

        raise StoreError("store down")


async def test_a_session_with_no_traffic_either_way_ends_at_the_idle_timeout() -> None:
    idle, _, control, clock, audit, live = setup(idle_timeout=600)
    assert live.last_activity == clock.mono  # stamped at the start, on the injected clock
    clock.mono += 599
    await idle.check_once()
    assert control.ended == []
    live.output(b"progress 50%\r\n", False, lambda: None)  # output counts as activity
    assert live.last_activity == clock.mono
    clock.mono += 599
    await idle.check_once()
    live.input(b"k", lambda: None)  # and so does input
    assert live.last_activity == clock.mono
    clock.mono += 599
    await idle.check_once()
    assert control.ended == []
    clock.mono += 1
    await idle.check_once()
    assert control.ended == ["idle timeout"]
    assert audit.events[-1][0] == "session.terminated"
    assert audit.events[-1][1]["reason"] == "idle timeout"
    assert audit.events[-1][1]["idle_s"] == 600.0


async def test_the_idle_timeout_applies_while_the_store_is_down_and_is_off_by_default() -> None:
    from broker.errors import StoreError

    enf, _, control, clock, _, _ = setup(idle_timeout=60, grants=DownGrants())
    clock.mono += 61
    await enf.check_once()  # ended before the grants are read: nothing left to query
    assert control.ended == ["idle timeout"]

    # tunnels keep their own idle timer ([forwarding]): the session timeout leaves them alone
    enf3, _, control3, clock3, _, _ = setup(idle_timeout=60, kind="tunnel")
    clock3.mono += 3600
    await enf3.check_once()
    assert control3.ended == []

    off, _, control2, clock2, _, _ = setup(grants=DownGrants())
    clock2.mono += 86400
    with pytest.raises(StoreError):  # the grant check still needs the store
        await off.check_once()
    assert control2.ended == []  # no idle timeout configured: the session stays


class NoSink:
    """Recording off: the service never opens a recording."""

    def open(self, session_id: str, meta: dict[str, object]) -> NullWriter:
        raise AssertionError("recording is off")


class Index:
    async def started(self, rec: object) -> None:
        return None

    async def ended(self, session_id: str, ended_at: datetime, exit_status: str | None,
                    bytes_in: int, bytes_out: int) -> None:
        return None


async def test_sessions_the_service_starts_stamp_activity_on_the_clock_the_enforcer_reads() -> None:
    clock, audit = Clock(), Audit()
    g = grant()
    svc = SessionService(NoSink(), Index(), audit, clock,  # type: ignore[arg-type]
                         recording_enabled=False)
    live = await svc.start(request(g))
    assert live.last_activity == clock.mono
    clock.mono += 30
    live.input(b"ls\r", lambda: None)
    assert live.last_activity == clock.mono
    assert live.idle_seconds() == 0.0
    control = Control()
    live.control = control
    enf = GrantEnforcer(svc, Grants(g), audit, clock, interval=1.0,  # type: ignore[arg-type]
                        warn_before=timedelta(minutes=5), idle_timeout=60)
    clock.mono += 59.5
    await enf.check_once()
    assert control.ended == []
    clock.mono += 0.5
    await enf.check_once()
    assert control.ended == ["idle timeout"]


def test_the_system_clock_s_monotonic_reading_is_the_builtin_itself() -> None:
    # stamped on every relayed chunk: no Python frame in between (see SystemClock)
    assert SystemClock().monotonic is time.monotonic
