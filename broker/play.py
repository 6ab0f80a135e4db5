"""Terminal replay of a recording, with speed and idle-time limits."""

from __future__ import annotations

import asyncio
import json
import sys

from broker.domain import recording as fmt


async def play(rec: fmt.ParsedRecording, *, speed: float, idle_limit: float | None) -> None:
    out = sys.stdout
    prev = 0.0
    for line in list(fmt.to_asciicast(rec))[1:]:
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
