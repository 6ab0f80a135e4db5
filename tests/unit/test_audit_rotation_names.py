"""Pure logic of audit rotation: the rotated files' names, their order, when a file is due."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from broker.domain.audit_files import RotatedName, ordered, parse_rotated, rotated_name, rotation_due

T = datetime(2026, 12, 7, 15, 4, 5, 123456, tzinfo=UTC)


def test_name_carries_the_first_event_time_in_utc_and_its_seq() -> None:
    assert rotated_name("audit.jsonl", T, 42) == "audit-20261207T150405Z-000000000042.jsonl"
    east = T.astimezone(timezone(timedelta(hours=9)))  # the same instant, another zone
    assert rotated_name("audit.jsonl", east, 42) == "audit-20261207T150405Z-000000000042.jsonl"
    # the configured name's stem and suffix are kept; a name without suffix works too
    assert rotated_name("bastion.log", T, 7) == "bastion-20261207T150405Z-000000000007.log"
    assert rotated_name("audit", T, 7) == "audit-20261207T150405Z-000000000007"


def test_parse_round_trips_and_rejects_other_files() -> None:
    name = rotated_name("audit.jsonl", T, 123)
    assert parse_rotated("audit.jsonl", name) == RotatedName(
        123, T.replace(microsecond=0), name)
    for other in ("audit.jsonl", ".audit.jsonl.rotating", "audit-20261207T150405Z-12.json",
                  "other-20261207T150405Z-000000000001.jsonl", "audit-2026120T150405Z-1.jsonl",
                  "audit-20261399T150405Z-000000000001.jsonl", "audit-x.jsonl"):
        assert parse_rotated("audit.jsonl", other) is None, other


def test_files_are_ordered_by_first_seq_even_when_the_clock_stepped_back() -> None:
    a = rotated_name("audit.jsonl", T, 0)
    b = rotated_name("audit.jsonl", T - timedelta(hours=1), 500)  # clock stepped back
    c = rotated_name("audit.jsonl", T, 1000)  # same second as a
    d = rotated_name("audit.jsonl", T, 10**12 + 5)  # more digits than the padding
    got = ordered("audit.jsonl", [d, "audit.jsonl", c, "notes.txt", b, a])
    assert [r.name for r in got] == [a, b, c, d]


def test_rotation_due_by_size() -> None:
    def due(size: int, rotate_bytes: int) -> bool:
        return rotation_due(size, T, T, rotate_bytes=rotate_bytes, rotate_daily=False)

    assert not due(0, 100)  # an empty file is never rotated
    assert not due(99, 100)
    assert due(100, 100) and due(5000, 100)
    assert not due(10**12, 0)  # 0: never by size


def test_rotation_due_on_a_new_utc_day() -> None:
    def due(first: datetime | None, now: datetime, daily: bool = True) -> bool:
        return rotation_due(10, first, now, rotate_bytes=0, rotate_daily=daily)

    late = datetime(2026, 12, 7, 23, 59, 59, tzinfo=UTC)
    assert not due(late, late + timedelta(seconds=0.5))
    assert due(late, late + timedelta(seconds=1))  # 00:00:00 the next day
    assert not due(late, late + timedelta(days=3), daily=False)
    assert not due(None, late)  # first event unreadable: size decides alone
    # the day is UTC's, whatever zone the timestamps carry
    tokyo = timezone(timedelta(hours=9))
    assert not due(datetime(2026, 12, 8, 1, 0, tzinfo=tokyo),  # 2026-12-07 16:00 UTC
                   datetime(2026, 12, 7, 20, 0, tzinfo=UTC))
