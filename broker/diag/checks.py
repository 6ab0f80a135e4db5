"""Readiness: named checks, each bounded by a timeout, at most one run of each in flight.

A check that does not answer in time fails with "no answer within N s", and its run goes on in
the background: the next probe waits for that same run instead of starting another, so a hung
file system or database never piles up threads or connections behind the probes. Blocking
work (``statvfs``, opening files) runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")

# a probe answers a short detail ("12.3 GiB free") when all is well, and raises when not
Probe = Callable[[], Awaitable[str]]


class CheckFailed(Exception):
    """A probe's answer: not ready, and why."""


class SingleFlight(Generic[T]):
    """``fn()`` with at most one run in flight; each caller waits at most ``timeout`` seconds."""

    def __init__(self, fn: Callable[[], Awaitable[T]], timeout: float) -> None:
        self._fn = fn
        self._timeout = timeout
        self._task: asyncio.Future[T] | None = None
        self._since = 0.0

    async def run(self) -> T:
        task = self._task
        if task is None or task.done():
            task = self._task = asyncio.ensure_future(self._fn())
            task.add_done_callback(_retrieve)
            self._since = time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(task), self._timeout)
        except TimeoutError:
            running = time.monotonic() - self._since
            raise TimeoutError(f"no answer within {self._timeout:g} s (this run started "
                               f"{running:.1f} s ago)") from None

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A run nobody waited for to the end (timed out) must not log "exception never retrieved"."""
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail,
                "seconds": round(self.seconds, 4)}


class Check:
    def __init__(self, name: str, probe: Probe, timeout: float) -> None:
        self.name = name
        self._flight = SingleFlight(probe, timeout)

    async def run(self) -> CheckResult:
        started = time.monotonic()
        try:
            detail, ok = await self._flight.run(), True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of the probe is "not ready", with its text
            detail, ok = (str(exc) or type(exc).__name__), False
        return CheckResult(self.name, ok, detail, time.monotonic() - started)

    def cancel(self) -> None:
        self._flight.cancel()


class Readiness:
    """Every check, run concurrently; ready when all pass."""

    def __init__(self, checks: Sequence[Check]) -> None:
        names = [c.name for c in checks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate check names: {names}")
        self.checks = list(checks)

    async def run(self) -> list[CheckResult]:
        return list(await asyncio.gather(*(c.run() for c in self.checks)))

    def close(self) -> None:
        for c in self.checks:
            c.cancel()


# -- probes ---------------------------------------------------------------------------------------

def in_thread(fn: Callable[[], str]) -> Probe:
    """A blocking probe, run in a worker thread."""
    async def probe() -> str:
        return await asyncio.to_thread(fn)
    return probe


def appendable(path: Path) -> Callable[[], str]:
    """The file opens for appending, as the audit log does (nothing is written, and a file that
    is gone is not created again: it fails)."""
    def check() -> str:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise CheckFailed(f"{path}: cannot open for append: {exc.strerror}") from None
        os.close(fd)
        return f"{path} opens for append"
    return check


class DiskState(Protocol):
    """What ``DiskGuard.status`` says (broker/recordings/diskguard.py)."""

    @property
    def level(self) -> enum.Enum: ...

    @property
    def free_bytes(self) -> int: ...

    @property
    def total_bytes(self) -> int: ...


def disk_above_threshold(status: Callable[[], DiskState]) -> Callable[[], str]:
    """``DiskGuard.status`` says OK: above ``[recordings]`` min free (new sessions may start)."""
    def check() -> str:
        st = status()
        free = f"{_gib(st.free_bytes)} free of {_gib(st.total_bytes)}"
        if st.level.name != "OK":
            raise CheckFailed(f"recordings disk {st.level.value}: {free}, below its free-space "
                              "threshold: new sessions are refused")
        return free
    return check


def draining_probe(since: Callable[[], datetime | None]) -> Probe:
    """Fails from the moment a drain begins (``Broker.drain``), on purpose: the balancer's
    health check takes this bastion out before its listener closes."""
    async def probe() -> str:
        began = since()
        if began is not None:
            raise CheckFailed(f"draining since {began.isoformat(timespec='seconds')}: new "
                              "connections belong on another bastion")
        return "not draining"
    return probe


def reachable(ping: Callable[[], Awaitable[None]], what: str) -> Probe:
    async def probe() -> str:
        await ping()
        return what
    return probe


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"
