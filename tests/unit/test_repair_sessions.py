"""SessionService durability decisions with fakes: disk guard policies, flush failures, SIGTERM
drain. Real recording files on a temporary directory; the guard, index and control are fakes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.domain import recording as fmt
from broker.domain.models import Grant, GrantState, Instance, Level, Principal, Trigger
from broker.errors import RecordingDiskFull, RecordingError
from broker.ports import DiskLevel, DiskStatus, SessionRecord
from broker.recordings.local import OPEN_DIR, LocalRecordingSink
from broker.services.sessions import LiveSession, SessionRequest, SessionService, ShuttingDown
from tests.unit.test_services_enforcement import Audit, Clock, Control

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


def _relayed() -> None:
    """The relay's action after a frame is recorded (unused here: no channel)."""


class Guard:
    def __init__(self) -> None:
        self.level = DiskLevel.OK

    def status(self) -> DiskStatus:
        return DiskStatus(self.level, 1000, 100_000)


class Index:
    def __init__(self) -> None:
        self.rows: dict[str, SessionRecord] = {}
        self.exits: dict[str, str | None] = {}

    async def started(self, rec: SessionRecord) -> None:
        self.rows[rec.id] = rec

    async def ended(self, session_id: str, ended_at: datetime, exit_status: str | None,
                    bytes_in: int, bytes_out: int) -> None:
        self.exits[session_id] = exit_status


class EndingControl(Control):
    """A relay that ends its session when told to terminate (as the real one does)."""

    def __init__(self, service: SessionService, live: LiveSession) -> None:
        super().__init__()
        self._service = service
        self._live = live
        self.finishes: list[object] = []

    def terminate(self, reason: str) -> None:
        super().terminate(reason)
        self.finishes.append(asyncio.get_running_loop().create_task(
            self._service.finish(self._live, f"terminated:{reason}")))


def request() -> SessionRequest:
    g = Grant("g-1", "alice", "corp.example.com", ("stack-a",), "vpc-0a", Level.READ_ONLY,
              GrantState.APPROVED, T0, T0 + timedelta(hours=1), Trigger.INCIDENT)
    inst = Instance("i-1", "web01", "stack-a", "vpc-0a", "10.0.0.1")
    return SessionRequest(Principal("corp.example.com", "alice"), inst, g, "ro", "exec", "id",
                          None, 0, 0, "peer")


def service(tmp: Path, policy: str = "strict") -> tuple[SessionService, Guard, Index, Audit]:
    guard, index, audit = Guard(), Index(), Audit()
    svc = SessionService(LocalRecordingSink(tmp / "rec"), index, audit,  # type: ignore[arg-type]
                         Clock(), guard=guard, disk_policy=policy)  # type: ignore[arg-type]
    return svc, guard, index, audit


def events(audit: Audit, name: str) -> list[dict[str, object]]:
    return [f for e, f in audit.events if e == name]


async def test_low_disk_refuses_new_sessions_with_a_clear_reason(tmp_path: Path) -> None:
    svc, guard, _index, audit = service(tmp_path)
    guard.level = DiskLevel.LOW
    with pytest.raises(RecordingDiskFull) as err:
        await svc.start(request())
    assert "almost full" in err.value.user_message
    assert events(audit, "session.refused")[0]["reason"] == "recording_disk_low"
    assert not list((tmp_path / "rec").rglob("*.rec"))


async def test_critical_strict_ends_each_live_session_once(tmp_path: Path) -> None:
    svc, guard, _index, audit = service(tmp_path)
    live = await svc.start(request())
    control = Control()
    live.control = control
    guard.level = DiskLevel.CRITICAL
    await svc.check_disk()
    await svc.check_disk()
    assert control.ended == ["recording unavailable"]
    assert control.notes == ["bastion-broker: recording storage is full"]
    assert len(events(audit, "session.recording_failed")) == 1


async def test_critical_best_effort_suspends_recording_and_audits_it(tmp_path: Path) -> None:
    svc, guard, index, audit = service(tmp_path, "best-effort")
    live = await svc.start(request())
    live.control = Control()
    live.output(b"recorded", False, _relayed)
    guard.level = DiskLevel.CRITICAL
    await svc.check_disk()
    live.output(b"not recorded", False, _relayed)
    assert live.bytes_out == len(b"recorded") + len(b"not recorded")
    (ev,) = events(audit, "session.recording_suspended")
    assert ev["policy"] == "best-effort"
    await svc.finish(live, "0")
    parsed = fmt.parse(Path(live.writer.location).read_bytes())  # noqa: ASYNC240
    assert fmt.output_bytes(parsed.frames) == b"recorded"
    (end,) = events(audit, "session.end")
    assert end["recording_suspended"]
    assert index.exits == {live.id: "0"}


async def test_write_error_strict_raises_best_effort_suspends(tmp_path: Path) -> None:
    for policy, raises in (("strict", True), ("best-effort", False)):
        svc, _guard, _index, audit = service(tmp_path / policy, policy)
        live = await svc.start(request())
        live.writer.close()  # every further write fails, as on a full or broken disk
        if raises:
            with pytest.raises(RecordingError):
                live.output(b"x", False, _relayed)
        else:
            live.output(b"x", False, _relayed)
            assert live.recording_suspended is not None
            assert events(audit, "session.recording_suspended")


async def test_periodic_flush_syncs_dirty_writers(tmp_path: Path) -> None:
    svc, _guard, _index, _audit = service(tmp_path)
    live = await svc.start(request())
    live.output(b"data", False, _relayed)
    assert live.writer.dirty  # type: ignore[attr-defined]
    await svc.sync_all()
    assert not live.writer.dirty  # type: ignore[attr-defined]


async def test_shutdown_notifies_ends_and_closes_everything(tmp_path: Path) -> None:
    svc, _guard, index, audit = service(tmp_path)
    cooperative = await svc.start(request())
    stuck = await svc.start(request())  # its relay never ends it: the service does
    c1 = EndingControl(svc, cooperative)
    c2 = Control()
    cooperative.control, stuck.control = c1, c2
    await svc.shutdown(0.6)
    assert not svc.live
    for c in (c1, c2):
        assert c.notes[0].startswith("bastion-broker: the bastion is shutting down")
        assert c.ended == ["bastion shutting down"]
    assert index.exits == {cooperative.id: "terminated:bastion shutting down",
                           stuck.id: "terminated:bastion shutting down"}
    assert len(events(audit, "session.end")) == 2
    assert not any((tmp_path / "rec" / OPEN_DIR).iterdir())
    with pytest.raises(ShuttingDown):
        await svc.start(request())
