"""A check that runs every ``interval`` seconds in a task of its own, until stopped.

The grant enforcer and the account enforcer both re-check live sessions this way: one run's
failure is logged and the next run comes as planned, and a reload may change the interval
between runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("broker.services")


class Periodic:
    """``check()`` now, then every ``interval()`` seconds. A failure of a type in ``errors`` is
    logged as ``failed_event`` and does not stop the loop."""

    def __init__(self, check: Callable[[], Awaitable[object]], interval: Callable[[], float],
                 *, failed_event: str, errors: tuple[type[Exception], ...]) -> None:
        self._check = check
        self._interval = interval
        self._failed_event = failed_event
        self._errors = errors
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self._check()
            except self._errors as exc:
                log.error(self._failed_event, error=str(exc)[:300])
            await asyncio.sleep(self._interval())
