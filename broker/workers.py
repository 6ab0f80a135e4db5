"""Several broker processes on one port (SO_REUSEPORT), one per core.

A Python process relays on one core. All shared state (grants, TOTP steps, throttling, the
session index, the audit chain) already lives in the store or behind file locks, so workers need
no coordination of their own: the kernel spreads new connections across them. The parent only
starts them, reports readiness once all listen, forwards SIGTERM, and restarts a worker that dies.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

import structlog

from broker.config import BrokerConfig
from broker.runtime import free_port, sd_notify

log = structlog.get_logger("broker.workers")

# serves one worker: (config, on_ready) -> returns when that worker has stopped
ServeWorker = Callable[[BrokerConfig, Callable[[int], None]], None]


def worker_count(config: BrokerConfig) -> int:
    return config.ssh.workers or os.cpu_count() or 1


def _child(config: BrokerConfig, index: int, ready_fd: int, serve: ServeWorker) -> None:
    os.environ.pop("NOTIFY_SOCKET", None)  # only the parent talks to systemd
    if index > 0:  # one API server is enough; it is stateless over the shared store
        config = config.model_copy(update={"web": config.web.model_copy(update={"enabled": False})})

    def ready(_port: int) -> None:
        os.write(ready_fd, b"r")
        os.close(ready_fd)

    try:
        serve(config, ready)
    except Exception as exc:  # a worker must never take the parent down with a traceback
        log.error("worker.crashed", worker=index, error=str(exc))
        os._exit(1)
    os._exit(0)


def run_workers(config: BrokerConfig, serve: ServeWorker, prepare: Callable[[], None],
                on_ready: Callable[[int], None] | None = None) -> int:
    """Fork the workers and supervise them until SIGINT/SIGTERM; returns an exit status.

    ``prepare`` runs once in the parent before the fork (keys, store migrations) so that workers
    do not race to create them; ``serve`` runs one worker. ``broker.app`` passes both."""
    n = worker_count(config)
    port = config.ssh.listen_port or free_port(config.ssh.listen_host)
    prepare()
    config = config.model_copy(update={"ssh": config.ssh.model_copy(update={"listen_port": port})})
    stopping = False
    children: dict[int, int] = {}  # pid -> worker index

    def spawn(index: int) -> int:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _child(config, index, w, serve)
        os.close(w)
        children[pid] = index
        return r

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                children.pop(pid, None)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    pipes = [spawn(i) for i in range(n)]
    for r in pipes:
        if os.read(r, 1) != b"r":
            stop(signal.SIGTERM, None)
            log.error("workers.start_failed")
        os.close(r)
    if not stopping:
        log.info("workers.listening", port=port, workers=n)
        if on_ready:
            on_ready(port)
        sd_notify("READY=1")
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is None:
            continue
        if not stopping:
            log.error("worker.died", worker=index, status=code)
            time.sleep(1)  # no tight restart loop if a worker cannot start at all
            r = spawn(index)
            os.read(r, 1)
            os.close(r)
        elif code != 0:
            status = 1
    sd_notify("STOPPING=1")
    sys.stdout.flush()
    return status
