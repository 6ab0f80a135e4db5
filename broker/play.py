"""Terminal replay of a recording, with speed and idle-time limits."""

from __future__ import annotations

import asyncio
import json
import sys

from broker.domain import recording as fmt
from broker.domain.sanitize import safe_asciicast


async def play(rec: fmt.ParsedRecording, *, speed: float, idle_limit: float | None) -> None:
    out = sys.stdout
    prev = 0.0
    # never raw: the viewer's terminal must not run what the target printed (OSC 52, queries)
    for line in list(safe_asciicast(fmt.to_asciicast(rec)))[1:]:
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
