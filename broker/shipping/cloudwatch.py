"""Audit lines to CloudWatch Logs: in file order, batched, retried, nothing dropped.

The audit file is the spool: lines are read from a persisted offset, sent with one
``PutLogEvents`` at a time, and the offset moves only after CloudWatch accepted the batch. When
the endpoint is down the offset stays put and the lines wait in the file; a crash between an
accepted batch and the offset update sends that batch again (at-least-once; each message carries
the audit ``seq`` and hash chain, so a reader can drop repeats and check the chain).
Timestamps come from the lines and never go backwards, which CloudWatch requires within a batch.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from broker.shipping.aws import backoff, make_client
from broker.shipping.settings import CloudWatchShippingSettings
from broker.shipping.spool import AuditTail, Spool

log = structlog.get_logger("broker.shipping.cloudwatch")

MAX_BATCH_BYTES = 1_048_576  # PutLogEvents: sum of (UTF-8 message bytes + 26)
EVENT_OVERHEAD = 26
MAX_EVENT_BYTES = 256 * 1024 - EVENT_OVERHEAD
MAX_SPAN_MS = 23 * 3600 * 1000  # a batch may not span more than 24 hours


def _ts_ms(raw: bytes, fallback: int) -> int:
    try:
        ts = json.loads(raw)["ts"]
        return int(datetime.fromisoformat(ts).timestamp() * 1000)
    except (ValueError, KeyError, TypeError):
        return fallback


def _message(raw: bytes) -> str:
    text = raw.rstrip(b"\n").decode("utf-8", errors="replace")
    if len(text.encode()) > MAX_EVENT_BYTES:  # cannot be sent whole; say so rather than drop it
        text = text.encode()[: MAX_EVENT_BYTES - 64].decode("utf-8", errors="ignore") + \
            " ...[truncated by bastion-broker]"
    return text


def build_batch(lines: list[bytes], last_ts: int, now_ms: int,
                max_events: int) -> tuple[list[dict[str, Any]], int]:
    """The longest prefix of ``lines`` that fits one PutLogEvents call: (events, lines used)."""
    events: list[dict[str, Any]] = []
    size = 0
    first_ts: int | None = None
    for raw in lines:
        if len(events) >= max_events:
            break
        msg = _message(raw)
        n = len(msg.encode()) + EVENT_OVERHEAD
        ts = max(_ts_ms(raw, now_ms), last_ts)
        if first_ts is not None and (size + n > MAX_BATCH_BYTES or ts - first_ts > MAX_SPAN_MS):
            break
        first_ts = ts if first_ts is None else first_ts
        events.append({"timestamp": ts, "message": msg})
        size += n
        last_ts = ts
    return events, len(events)


class CloudWatchShipper:
    """Runs in its shipping thread only; every call is blocking."""

    def __init__(self, settings: CloudWatchShippingSettings, spool: Spool, audit_path: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.stream = settings.log_stream or socket.gethostname()
        self._tail = AuditTail(audit_path, spool, "cloudwatch")
        self._clock = clock
        self._client: Any = None
        self._last_ts = 0
        self._failures = 0
        self.pause_until = 0.0
        self.sent_batches = 0

    def _logs(self) -> Any:
        if self._client is None:
            self._client = make_client("logs", self.settings)
        return self._client

    def step(self) -> bool:
        """Send one batch if lines are waiting; True if one was sent (more may wait)."""
        if self._clock() < self.pause_until:
            return False
        # no more than one call can carry (a longer line is still read whole)
        lines, inode, offset = self._tail.read(self.settings.batch_max_events, MAX_BATCH_BYTES)
        if not lines:
            return False
        now_ms = int(self._clock() * 1000)
        events, used = build_batch(lines, self._last_ts, now_ms, self.settings.batch_max_events)
        end = offset - sum(len(x) for x in lines[used:])
        try:
            self._put(events)
        except Exception as exc:  # the shipper never dies; the lines stay in the file
            self._failures += 1
            wait = backoff(self.settings, self._failures)
            self.pause_until = self._clock() + wait
            log.warning("cloudwatch.put_failed", error=str(exc), events=len(events),
                        attempt=self._failures, retry_in_s=round(wait, 2))
            return False
        self._failures = 0
        self._last_ts = events[-1]["timestamp"]
        self._tail.commit(inode, end)
        self.sent_batches += 1
        return True

    def _put(self, events: list[dict[str, Any]]) -> None:
        from botocore.exceptions import ClientError

        logs = self._logs()
        s = self.settings
        try:
            r = logs.put_log_events(logGroupName=s.log_group, logStreamName=self.stream,
                                    logEvents=events)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "DataAlreadyAcceptedException":
                return
            if code != "ResourceNotFoundException" or not s.create_log_group:
                raise
            self._create()
            r = logs.put_log_events(logGroupName=s.log_group, logStreamName=self.stream,
                                    logEvents=events)
        rejected = r.get("rejectedLogEventsInfo")
        if rejected:  # too old/new for CloudWatch: cannot be resent; the local file keeps them
            log.error("cloudwatch.rejected", info=rejected)

    def _create(self) -> None:
        from botocore.exceptions import ClientError

        logs = self._logs()
        for call, kw in ((logs.create_log_group, {"logGroupName": self.settings.log_group}),
                         (logs.create_log_stream, {"logGroupName": self.settings.log_group,
                                                   "logStreamName": self.stream})):
            try:
                call(**kw)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ResourceAlreadyExistsException":
                    raise
