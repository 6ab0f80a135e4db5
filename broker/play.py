"""Terminal replay of a recording, with speed and idle-time limits."""

from __future__ import annotations

import asyncio
import json
import sys

from broker.domain import recording as fmt
from broker.domain.sanitize import safe_asciicast


async def play(rec: fmt.Recording, *, speed: float, idle_limit: float | None) -> None:
    """Replay output events in real time (scaled), one frame read at a time."""
    out = sys.stdout
    prev = 0.0
    # never raw: the viewer's terminal must not run what the target printed (OSC 52, queries)
    lines = safe_asciicast(fmt.to_asciicast(rec))
    next(lines, None)  # the header
    for line in lines:
        t, code, data = json.loads(line)
        if code != "o":
            continue
        delay = (t - prev) / speed
        if idle_limit is not None:
            delay = min(delay, idle_limit)
        prev = t
        if delay > 0:
            await asyncio.sleep(delay)
        out.write(data)
        out.flush()
