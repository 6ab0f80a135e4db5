"""The shipping threads, started and stopped with the broker.

Each shipper (S3, CloudWatch) runs in its own daemon thread so that neither a slow endpoint nor
hashing a large recording can ever delay the event loop that relays sessions. Of several broker
processes (``[ssh] workers``) on one state directory, the one holding a lock file ships; the
others try again every few seconds and take over if it dies. Audit events about shipping are
handed to the event loop, which owns the audit writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from broker.errors import BrokerError
from broker.ports import AuditSink
from broker.shipping.settings import (
    CloudWatchShippingSettings,
    S3ShippingSettings,
    ShippingSettings,
)

log = structlog.get_logger("broker.shipping")

LEADER_RETRY_SECONDS = 5.0


class _Leader:
    """An exclusive, non-blocking ``flock`` held for the life of the process."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1

    def acquire(self) -> bool:
        if self._fd >= 0:
            return True
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Worker(threading.Thread):
    """One shipper's loop: become leader, then step/idle until asked to stop."""

    def __init__(self, name: str, lock: Path, body: Callable[[threading.Event], None]) -> None:
        super().__init__(name=f"shipping-{name}", daemon=True)
        self._leader = _Leader(lock)
        self._body = body
        self.stopping = threading.Event()

    def run(self) -> None:
        # A shipper must outlive its failures: a body that raises (its spool could not be
        # opened, say) is logged and started again, keeping the leadership it holds.
        try:
            while not self.stopping.is_set():
                try:
                    if self._leader.acquire():
                        self._body(self.stopping)
                        if self.stopping.is_set():
                            return
                except Exception as exc:  # logged, never a traceback on stderr
                    log.error("shipping.thread_failed", thread=self.name, error=str(exc),
                              retry_in_s=LEADER_RETRY_SECONDS)
                self.stopping.wait(LEADER_RETRY_SECONDS)
        finally:
            self._leader.release()


class Shipping:
    """Owns the shipping threads of one broker process."""

    def __init__(self, settings: ShippingSettings, spool_dir: Path, recordings_dir: Path,
                 audit_path: Path, audit: AuditSink) -> None:
        self.settings = settings
        self.spool_dir = spool_dir
        self._recordings = recordings_dir
        self._audit_path = audit_path
        self._audit = audit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[_Worker] = []

    @property
    def enabled(self) -> bool:
        return self.settings.s3 is not None or self.settings.cloudwatch is not None

    def _emit(self, event: str, **fields: Any) -> None:
        """Called from a shipping thread: the audit writer belongs to the event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def emit() -> None:
            try:
                self._audit.emit(event, **fields)
            except BrokerError as exc:
                log.error("shipping.audit_failed", event=event, error=str(exc))

        with contextlib.suppress(RuntimeError):  # loop closed meanwhile (shutdown)
            loop.call_soon_threadsafe(emit)

    def start(self) -> None:
        if not self.enabled:
            return
        self._loop = asyncio.get_running_loop()
        self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        s3, cw = self.settings.s3, self.settings.cloudwatch
        if s3 is not None:
            self._threads.append(_Worker("s3", self.spool_dir / "s3.lock",
                                         lambda stop: self._run_s3(s3, stop)))
        if cw is not None:
            self._threads.append(_Worker("cloudwatch", self.spool_dir / "cloudwatch.lock",
                                         lambda stop: self._run_cloudwatch(cw, stop)))
        for t in self._threads:
            t.start()
        log.info("shipping.started", s3=self.settings.s3 is not None,
                 cloudwatch=self.settings.cloudwatch is not None)

    async def stop(self, wait_seconds: float = 5.0) -> None:
        """Ask the threads to stop and wait a little: an upload in flight is abandoned (the
        spool still holds it, and the next start resumes it without a duplicate)."""
        for t in self._threads:
            t.stopping.set()
        for t in self._threads:
            await asyncio.to_thread(t.join, wait_seconds)
            if t.is_alive():
                log.warning("shipping.stop_timeout", thread=t.name)
        self._threads = []
        await asyncio.sleep(0)  # audit events the threads handed over are written before close

    def _run_s3(self, settings: S3ShippingSettings, stopping: threading.Event) -> None:
        from broker.shipping.s3 import S3Shipper
        from broker.shipping.spool import Spool

        spool = Spool(self.spool_dir / "spool.db")
        try:
            s3 = S3Shipper(settings, spool, self._recordings, self._audit_path,
                           self._emit)
            while not stopping.is_set():
                try:
                    s3.scan_audit()
                    worked = s3.step()
                    s3.retention()
                except Exception as exc:  # e.g. the spool's disk is full: retry later
                    log.error("s3.loop_failed", error=str(exc))
                    worked = False
                if not worked:
                    stopping.wait(settings.scan_interval_seconds)
        finally:
            spool.close()

    def _run_cloudwatch(self, settings: CloudWatchShippingSettings,
                        stopping: threading.Event) -> None:
        from broker.shipping.cloudwatch import CloudWatchShipper
        from broker.shipping.spool import Spool

        spool = Spool(self.spool_dir / "spool.db")
        try:
            cw = CloudWatchShipper(settings, spool, self._audit_path)
            while True:
                try:
                    sent = cw.step()
                except Exception as exc:
                    log.error("cloudwatch.loop_failed", error=str(exc))
                    sent = False
                if stopping.is_set():
                    return
                if not sent:
                    stopping.wait(settings.poll_seconds)
        finally:
            spool.close()
