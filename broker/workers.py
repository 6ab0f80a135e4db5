"""Several broker processes on one port (SO_REUSEPORT), one per core.

A Python process relays on one core. All shared state (grants, TOTP steps, throttling, the
session index, the audit chain) already lives in the store or behind file locks, so workers need
no coordination of their own: the kernel spreads new connections across them. The parent only
starts them, reports readiness once all listen, passes SIGTERM, SIGQUIT and SIGHUP on, and
restarts a worker that dies.

SIGHUP: every worker reloads the configuration itself (and logs and audits the outcome); a worker
still starting gets the signal once it listens. The parent reads the file again too, so that a
worker it starts later runs with what the others run.

SIGQUIT (drain, ``broker.app.Broker.drain``): every worker drains itself (its ``/readyz`` fails,
its listener closes after the accept window, it exits when its last session has ended); the
parent restarts none of them and exits 0 once all have. A worker still starting gets the signal
once it listens.
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

# serves one worker: (config, worker index, on_ready) -> returns when that worker has stopped
ServeWorker = Callable[[BrokerConfig, int, Callable[[int], None]], None]
# the parent's reload: the running config -> the one to start workers with from now (raises
# for an invalid file; the parent then keeps what it had)
Reread = Callable[[BrokerConfig], BrokerConfig]

_HANDLED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}


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
        serve(config, index, ready)
    except Exception as exc:  # a worker must never take the parent down with a traceback
        log.error("worker.crashed", worker=index, error=str(exc))
        os._exit(1)
    os._exit(0)


def _kill(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def run_workers(config: BrokerConfig, serve: ServeWorker, prepare: Callable[[], None],
                on_ready: Callable[[int], None] | None = None, *,
                reread: Reread | None = None) -> int:
    """Fork the workers and supervise them until SIGINT/SIGTERM, or until a drain (SIGQUIT) is
    over; returns an exit status.

    ``prepare`` runs once in the parent before the fork (keys, store migrations) so that workers
    do not race to create them; ``serve`` runs one worker; ``reread`` (None: no reloads) is the
    parent's part of SIGHUP. ``broker.app`` passes them."""
    n = worker_count(config)
    stopping = False
    children: dict[int, int] = {}  # pid -> worker index
    starting: dict[int, bool] = {}  # pid of a worker not listening yet -> SIGHUP came meanwhile
    draining = False  # SIGQUIT came: passed on to each worker once it listens
    rereading = False
    again = False

    def hup(_sig: int, _frame: object) -> None:
        # no logging here: the handler may run while the main code holds the log's lock
        nonlocal config, rereading, again
        for pid in list(children):
            if pid in starting:
                starting[pid] = True
            else:
                _kill(pid, signal.SIGHUP)
        if reread is None:
            return
        if rereading:  # a SIGHUP while this handler reads the file: read it once more
            again = True
            return
        rereading = again = True
        try:
            while again:
                again = False
                try:
                    config = reread(config)
                except Exception:  # noqa: S112 - each worker logs and audits why
                    continue
        finally:
            rereading = False

    def drain(_sig: int, _frame: object) -> None:
        nonlocal draining
        draining = True  # from now on, a worker that exits is not restarted
        for pid in list(children):
            if pid not in starting:
                _kill(pid, signal.SIGQUIT)

    signal.signal(signal.SIGHUP, hup)  # before prepare(): a reload request is never fatal
    signal.signal(signal.SIGQUIT, drain)  # nor a drain request (SIGQUIT's default dumps core)
    port = config.ssh.listen_port or free_port(config.ssh.listen_host)
    prepare()
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)  # a reload in between would be lost
    config = config.model_copy(update={"ssh": config.ssh.model_copy(update={"listen_port": port})})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)

    def spawn(index: int) -> tuple[int, int]:
        """Fork worker ``index``; returns its pid and the pipe it reports readiness on."""
        r, w = os.pipe()
        # no handler of the parent may run in the child, nor one in the parent before the
        # child is in ``children`` (a SIGHUP would miss it)
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        pid = os.fork()
        if pid == 0:
            os.close(r)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until its event loop handles it
            signal.signal(signal.SIGQUIT, signal.SIG_IGN)  # (its default would dump core)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
            _child(config, index, w, serve)
        os.close(w)
        children[pid] = index
        starting[pid] = False
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        return pid, r

    def await_ready(pid: int, r: int) -> bool:
        ok = os.read(r, 1) == b"r"
        os.close(r)
        if starting.pop(pid, False) and ok:
            _kill(pid, signal.SIGHUP)  # the reload it missed while it started
        if draining and ok:
            _kill(pid, signal.SIGQUIT)  # the drain it missed while it started
        return ok

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            if not _kill(pid, signal.SIGTERM):
                children.pop(pid, None)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    started = [spawn(i) for i in range(n)]
    for pid, r in started:
        if not await_ready(pid, r) and not stopping:
            stop(signal.SIGTERM, None)
            log.error("workers.start_failed")
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
        starting.pop(pid, None)
        if index is None:
            continue
        if not stopping and not draining:
            log.error("worker.died", worker=index, status=code)
            time.sleep(1)  # no tight restart loop if a worker cannot start at all
            await_ready(*spawn(index))
        elif code != 0:
            status = 1
    sd_notify("STOPPING=1")
    log.info("broker.stopped", pid=os.getpid(), workers=n, status=status)
    sys.stdout.flush()
    return status
