"""Audit lines to CloudWatch Logs against moto over HTTP: order, batches, outages, restarts."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest

from broker.audit.jsonl import JsonlAuditLog
from broker.shipping.cloudwatch import CloudWatchShipper
from broker.shipping.settings import CloudWatchShippingSettings
from broker.shipping.spool import Spool
from tests.aws.conftest import REGION, MotoServer
from tests.s3.proxy import TcpProxy

pytestmark = pytest.mark.aws


class _Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@pytest.fixture
def logs(moto: MotoServer) -> Any:
    return boto3.client("logs", endpoint_url=moto.url, region_name=REGION)


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[JsonlAuditLog]:
    log = JsonlAuditLog(tmp_path / "audit" / "audit.jsonl", _Clock())
    try:
        yield log
    finally:
        log.close()


def shipper(tmp_path: Path, audit: JsonlAuditLog, endpoint: str, group: str,
            **kw: Any) -> CloudWatchShipper:
    kw.setdefault("backoff_initial_seconds", 0.05)
    kw.setdefault("backoff_max_seconds", 0.2)
    kw.setdefault("connect_timeout_seconds", 2)
    kw.setdefault("max_attempts", 1)
    settings = CloudWatchShippingSettings(region=REGION, endpoint_url=endpoint, log_group=group,
                                          log_stream="bastion-1", **kw)
    return CloudWatchShipper(settings, Spool(tmp_path / "shipping" / "spool.db"), audit.path)


def drain(cw: CloudWatchShipper, timeout: float = 60) -> None:
    """Step until the whole file is shipped."""
    deadline = time.monotonic() + timeout
    while True:
        lines, _, _ = cw._tail.read(1)
        if not lines:
            return
        assert time.monotonic() < deadline, "CloudWatch shipping did not finish in time"
        if not cw.step():
            time.sleep(0.05)


def shipped(logs: Any, group: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    token = None
    while True:
        kw: dict[str, Any] = {"logGroupName": group, "logStreamName": "bastion-1",
                              "startFromHead": True, "limit": 10000}
        if token:
            kw["nextToken"] = token
        r = logs.get_log_events(**kw)
        out.extend(r["events"])
        if not r["events"] or r["nextForwardToken"] == token:
            return out
        token = r["nextForwardToken"]


def file_lines(audit: JsonlAuditLog) -> list[str]:
    return audit.path.read_text().splitlines()


def test_lines_arrive_in_order_in_batches(tmp_path: Path, audit: JsonlAuditLog, proxy: TcpProxy,
                                          logs: Any) -> None:
    group = f"/bastion/{uuid.uuid4().hex[:12]}"
    for i in range(2500):
        audit.emit("session.output", session_id=f"s{i}", n=i)
    cw = shipper(tmp_path, audit, proxy.url, group, batch_max_events=1000)
    drain(cw)
    assert cw.sent_batches == 3
    events = shipped(logs, group)
    assert [e["message"] for e in events] == file_lines(audit)
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)
    assert [json.loads(e["message"])["seq"] for e in events] == list(range(2500))


def test_endpoint_down_then_up_nothing_lost_nothing_twice(
        tmp_path: Path, audit: JsonlAuditLog, proxy: TcpProxy, logs: Any) -> None:
    group = f"/bastion/{uuid.uuid4().hex[:12]}"
    cw = shipper(tmp_path, audit, proxy.url, group, batch_max_events=50)
    audit.emit("broker.start", listen="127.0.0.1:2222")
    drain(cw)
    proxy.stop()
    for i in range(120):
        audit.emit("auth.success", user=f"u{i}")
    for _ in range(5):  # each attempt fails; the offset must not move
        cw.pause_until = 0
        assert not cw.step()
    assert cw._tail.read(1)[0], "the unsent lines are still waiting"
    proxy.start()
    drain(cw)
    events = shipped(logs, group)
    assert [e["message"] for e in events] == file_lines(audit)


def test_restart_resumes_from_the_persisted_offset(tmp_path: Path, audit: JsonlAuditLog,
                                                   proxy: TcpProxy, logs: Any) -> None:
    group = f"/bastion/{uuid.uuid4().hex[:12]}"
    for i in range(10):
        audit.emit("grant.created", grant_id=f"g{i}")
    drain(shipper(tmp_path, audit, proxy.url, group))
    for i in range(5):
        audit.emit("grant.revoked", grant_id=f"g{i}")
    second = shipper(tmp_path, audit, proxy.url, group)  # a new process on the same spool
    drain(second)
    assert second.sent_batches == 1
    assert [e["message"] for e in shipped(logs, group)] == file_lines(audit)


def test_missing_group_is_created_or_refused(tmp_path: Path, audit: JsonlAuditLog,
                                             proxy: TcpProxy, logs: Any) -> None:
    group = f"/bastion/{uuid.uuid4().hex[:12]}"
    audit.emit("broker.start")
    cw = shipper(tmp_path, audit, proxy.url, group, create_log_group=False)
    assert not cw.step()  # refused: no group, and creating it is not allowed
    assert cw._tail.read(1)[0]
    cw = shipper(tmp_path, audit, proxy.url, group)
    drain(cw)
    assert logs.describe_log_groups(logGroupNamePrefix=group)["logGroups"][0]["logGroupName"] == group
    assert len(shipped(logs, group)) == 1
