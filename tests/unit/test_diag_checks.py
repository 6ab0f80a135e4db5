"""Readiness checks: timeouts, one run in flight, and the probes on real files and disks."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from broker.diag.checks import (
    Check,
    CheckFailed,
    Readiness,
    appendable,
    disk_above_threshold,
    in_thread,
    reachable,
)
from broker.errors import ConfigError, StoreError
from broker.identity.passwords import hash_password
from broker.identity.static import StaticDirectory, load_users
from broker.recordings.diskguard import DiskGuard


async def test_a_probe_that_hangs_fails_in_time_and_is_not_started_twice() -> None:
    started = 0
    release = asyncio.Event()

    async def hung() -> str:
        nonlocal started
        started += 1
        await release.wait()
        return "answered late"

    check = Check("store", hung, timeout=0.1)
    t0 = time.monotonic()
    first = await check.run()
    assert time.monotonic() - t0 < 1
    assert not first.ok
    assert first.detail.startswith("no answer within 0.1 s")
    second = await check.run()
    assert not second.ok
    assert started == 1  # the second probe waited for the same run
    release.set()
    third = await check.run()
    assert (third.ok, third.detail, started) == (True, "answered late", 1)
    fourth = await check.run()  # that run is over: a new one starts
    assert fourth.ok
    assert started == 2


async def test_a_failing_probe_is_not_ready_with_its_reason() -> None:
    async def down() -> None:
        raise StoreError("the PostgreSQL store does not answer: connection refused")

    result = await Check("store", reachable(down, "answers"), 1.0).run()
    assert not result.ok
    assert result.detail == "the PostgreSQL store does not answer: connection refused"


async def test_readiness_runs_every_check_and_lists_them_in_order() -> None:
    async def ok() -> str:
        return "fine"

    async def bad() -> str:
        raise CheckFailed("broken")

    r = Readiness([Check("a", ok, 1), Check("b", bad, 1), Check("c", ok, 1)])
    results = await r.run()
    assert [(x.name, x.ok, x.detail) for x in results] == [
        ("a", True, "fine"), ("b", False, "broken"), ("c", True, "fine")]
    with pytest.raises(ValueError, match="duplicate"):
        Readiness([Check("a", ok, 1), Check("a", ok, 1)])


async def test_audit_file_must_open_for_append_and_is_not_created_or_written(
    tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.jsonl"
    audit.write_bytes(b'{"event": "x"}\n')
    ok = await Check("audit", in_thread(appendable(audit)), 1).run()
    assert ok.ok
    assert audit.read_bytes() == b'{"event": "x"}\n'
    gone = tmp_path / "rotated-away.jsonl"
    missing = await Check("audit", in_thread(appendable(gone)), 1).run()
    assert not missing.ok
    assert "cannot open for append" in missing.detail
    assert not gone.exists()
    (tmp_path / "dir.jsonl").mkdir()
    not_a_file = await Check("audit", in_thread(appendable(tmp_path / "dir.jsonl")), 1).run()
    assert not not_a_file.ok


async def test_recordings_disk_below_its_threshold_is_not_ready(tmp_path: Path) -> None:
    total = os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize
    fine = DiskGuard(tmp_path, min_free_percent=0, min_free_bytes=0,
                     critical_free_percent=0, critical_free_bytes=0)
    result = await Check("recordings_disk", in_thread(disk_above_threshold(fine.status)), 2).run()
    assert result.ok
    assert "GiB free of" in result.detail
    full = DiskGuard(tmp_path, min_free_percent=0, min_free_bytes=total + 1,
                     critical_free_percent=0, critical_free_bytes=0)
    result = await Check("recordings_disk", in_thread(disk_above_threshold(full.status)), 2).run()
    assert not result.ok
    assert "recordings disk low" in result.detail
    assert "below its free-space threshold" in result.detail


async def test_static_directory_ping_reads_its_users_file(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    users.write_text(f'[[users]]\nname = "alice"\npassword_hash = "{hash_password("pw")}"\n')
    d = StaticDirectory.from_file(users, "corp.example.com", {})
    await d.ping()
    from_data = StaticDirectory(load_users(users), "corp.example.com", {})
    users.unlink()
    users.mkdir()  # unreadable as a file (root reads any file whatever its mode)
    with pytest.raises(ConfigError, match="cannot read users file"):
        await d.ping()
    result = await Check("directory", reachable(d.ping, "reachable"), 1).run()
    assert not result.ok
    assert str(users) in result.detail
    await from_data.ping()  # built from data, not a file: nothing to read again
