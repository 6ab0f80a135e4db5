"""The event loop the broker runs on: uvloop by default, asyncio's own on request.

The relay is bound by per-packet overhead in the loop (socket reads and writes, callbacks): uvloop
(libuv, in C) cuts that cost, which shows directly in throughput, keystroke latency and the number
of sessions one process can start per second (docs/benchmarks.md). asyncio's loop stays available
(``[ssh] event_loop = "asyncio"``) for platforms without uvloop wheels and for debugging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
LoopKind = Literal["uvloop", "asyncio"]


def run(main: Coroutine[Any, Any, T], kind: LoopKind) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    if kind == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
