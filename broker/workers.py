"""Several broker processes on one port (SO_REUSEPORT), one per core.

A Python process relays on one core. All shared state (grants, TOTP steps, throttling, the
session index, the audit chain) already lives in the store or behind file locks, so workers need
no coordination of their own: the kernel spreads new connections across them. The parent only
starts them, reports readiness once all listen, forwards SIGTERM, and restarts a worker that dies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable

import structlog

from broker import eventloop
from broker.config import BrokerConfig

log = structlog.get_logger("broker.workers")


def _prepare_state(config: BrokerConfig) -> None:
    """Create keys and migrate the embedded store once, before the workers race to do it."""
    from broker.app import open_stores
    from broker.services.totp_secrets import load_key
    from broker.ssh.keys import load_or_create_key, load_or_create_user_ca

    load_or_create_key(config.host_key_path, "bastion-broker host key")
    load_or_create_user_ca(config.ca_key_path)
    load_key(config.totp.key_file, config.totp_key_default_path)
    if config.store.backend == "sqlite":
        asyncio.run(open_stores(config).close())


def worker_count(config: BrokerConfig) -> int:
    return config.ssh.workers or os.cpu_count() or 1


def _child(config: BrokerConfig, index: int, ready_fd: int) -> None:
    from broker.app import serve

    os.environ.pop("NOTIFY_SOCKET", None)  # only the parent talks to systemd
    if index > 0:  # one API server is enough; it is stateless over the shared store
        config = config.model_copy(update={"web": config.web.model_copy(update={"enabled": False})})

    def ready(_port: int) -> None:
        os.write(ready_fd, b"r")
        os.close(ready_fd)

    try:
        eventloop.run(serve(config, on_ready=ready, reuse_port=True, notify=False),
                      config.ssh.event_loop)
    except Exception as exc:  # a worker must never take the parent down with a traceback
        log.error("worker.crashed", worker=index, error=str(exc))
        os._exit(1)
    os._exit(0)


def run_workers(config: BrokerConfig, on_ready: Callable[[int], None] | None = None) -> int:
    """Fork the workers and supervise them until SIGINT/SIGTERM; returns an exit status."""
    from broker.app import _sd_notify
    from broker.demo import free_port

    n = worker_count(config)
    port = config.ssh.listen_port or free_port(config.ssh.listen_host)
    _prepare_state(config)
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
            _child(config, index, w)
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
        _sd_notify("READY=1")
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
    _sd_notify("STOPPING=1")
    sys.stdout.flush()
    return status
