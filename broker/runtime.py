"""Process plumbing shared by ``serve``, ``demo`` and the workers: the event loop, systemd's
notify socket, and free loopback ports. Imports nothing of the broker's own, so every entry
point can use it without an import cycle.

The relay is bound by per-packet overhead in the loop (socket reads and writes, callbacks): uvloop
(libuv, in C) cuts that cost, which shows directly in throughput, keystroke latency and the number
of sessions one process can start per second (docs/benchmarks.md). asyncio's loop stays available
(``[ssh] event_loop = "asyncio"``) for platforms without uvloop wheels and for debugging.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
LoopKind = Literal["uvloop", "asyncio"]


def run_loop(main: Coroutine[Any, Any, T], kind: LoopKind) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    if kind == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def raise_open_files_limit() -> str | None:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; what went wrong, if so.

    Each relayed session holds three descriptors (client socket, upstream socket, recording), so
    the soft limit most shells and containers start with (1024) would refuse sessions from about
    the 330th on (docs/benchmarks.md, "Capacity"). The hard limit is the operator's ceiling; the
    soft one is only a default, which a process may raise up to it without privileges."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        return f"cannot raise the open files limit from {soft} to {hard}: {exc}"
    return None


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about state changes; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for the demo's targets and listeners, and tests)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
