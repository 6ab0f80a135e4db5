"""A rotating audit log to CloudWatch Logs (moto over HTTP): the rest of each rotated file is
sent before the next file, so the stream holds every line of every file, in order, once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest

from broker.audit.files import Snapshot, iter_lines
from broker.audit.jsonl import JsonlAuditLog
from tests.aws.conftest import REGION, MotoServer
from tests.aws.test_cloudwatch_shipping import drain, shipped, shipper

pytestmark = pytest.mark.aws


class _Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def test_rotated_files_are_shipped_whole_and_in_order(tmp_path: Path, moto: MotoServer) -> None:
    logs: Any = boto3.client("logs", endpoint_url=moto.url, region_name=REGION)
    group = f"/bastion/{uuid.uuid4().hex[:12]}"
    audit = JsonlAuditLog(tmp_path / "audit" / "audit.jsonl", _Clock(), rotate_bytes=3000)
    try:
        for i in range(10):
            audit.emit("session.output", session_id=f"s{i}", n=i)
        cw = shipper(tmp_path, audit, moto.url, group, batch_max_events=7)
        assert cw.step()  # 7 lines of the first file sent...
        for i in range(10, 200):  # ...then it and several after it are rotated
            audit.emit("session.output", session_id=f"s{i}", n=i)
        with Snapshot(audit.path) as snap:
            assert len(snap.rotated) >= 5
        drain(cw)
    finally:
        audit.close()
    want = [line.rstrip(b"\n").decode() for line in iter_lines(audit.path)]
    assert [e["message"] for e in shipped(logs, group)] == want
