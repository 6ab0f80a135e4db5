"""The diagnostics listener (``[diag]``, off by default): plain HTTP for monitoring.

* ``GET /healthz``: 200 while the process is alive and its event loop answers (the handler runs
  on that loop: a stuck loop answers nothing, and the probe times out);
* ``GET /readyz``: 200 if every readiness check passes, else 503; JSON naming every check, with
  the failing ones in ``failing`` (``draining`` from the moment a drain begins: a balancer's
  health check then sends new connections elsewhere);
* ``GET /metrics``: Prometheus text format, from the broker's own registry.

Several workers (``[ssh] workers`` > 1): every worker process runs its own listener, on the
first port of ``listen_port`` .. ``listen_port + workers - 1`` still free (a restarted worker
takes the port its predecessor left). Each worker's ``/healthz`` speaks for its own event loop
and its ``/metrics`` for its own logins and sessions, so a scrape configuration lists every
port; readiness checks the state all workers share, the same in each. (prometheus-client's
multiprocess mode was not used: the values computed at scrape time, such as live sessions and
their bytes, exist only inside the process that relays them.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from broker.config import DiagSettings
from broker.diag.checks import (
    Check,
    DiskState,
    Probe,
    Readiness,
    appendable,
    disk_above_threshold,
    draining_probe,
    in_thread,
    reachable,
)
from broker.diag.metrics import Backlog, BrokerCollector, PrometheusMetrics
from broker.ports import Database, ThrottleStore
from broker.services.sessions import SessionService

log = structlog.get_logger("broker.diag")


class DiagServer:
    def __init__(self, settings: DiagSettings, metrics: PrometheusMetrics,
                 collector: BrokerCollector, readiness: Readiness, *,
                 ports: Sequence[int] | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._collector = collector
        self._readiness = readiness
        self._ports = list(ports) if ports else [settings.listen_port]
        self._runner: web.AppRunner | None = None
        self._loop_watch: asyncio.Task[None] | None = None
        self.url: str | None = None
        metrics.registry.register(collector)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        return app

    async def start(self) -> str | None:
        """Listen on the first free port of the range; returns the base URL, or None (logged) if
        none was free: SSH service matters more than its monitoring."""
        host = self._settings.listen_host
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        errors: list[str] = []
        for port in self._ports:
            try:
                sock = _listening_socket(host, port)
            except OSError as exc:
                errors.append(f"{port}: {exc.strerror or exc}")
                continue
            await web.SockSite(runner, sock).start()
            break
        else:
            await runner.cleanup()
            log.error("diag.unavailable", host=host, ports=self._ports, error="; ".join(errors))
            return None
        self._runner = runner
        bound = next(a for a in runner.addresses if isinstance(a, tuple) and len(a) >= 2)
        shown = host if ":" not in host else f"[{host}]"
        self.url = f"http://{shown}:{int(bound[1])}"
        self._loop_watch = asyncio.create_task(self._metrics.watch_loop())
        log.info("diag.listening", url=self.url)
        return self.url

    async def stop(self) -> None:
        if self._loop_watch is not None:
            self._loop_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_watch
            self._loop_watch = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._readiness.close()
        self._collector.close()

    # -- handlers ---------------------------------------------------------------------------------
    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        results = await self._readiness.run()
        failing = [r.name for r in results if not r.ok]
        return web.json_response(
            {"status": "not ready" if failing else "ready", "failing": failing,
             "checks": [r.as_json() for r in results]},
            status=503 if failing else 200)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        await self._collector.refresh()
        return web.Response(body=generate_latest(self._metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


def diag_server_for(settings: DiagSettings, metrics: PrometheusMetrics, sessions: SessionService,
                    *, database: Database, audit_path: Path, directory: Callable[[], object],
                    throttle: ThrottleStore, disk: Callable[[], DiskState] | None = None,
                    backlog: Callable[[], Backlog | None] | None = None,
                    ports: Sequence[int] | None = None,
                    draining: Callable[[], datetime | None] | None = None,
                    refusals: Callable[[], Mapping[str, int]] | None = None) -> DiagServer:
    """The listener with its readiness checks and scrape-time sources.

    ``directory`` returns the directory in use at each check (a reload may replace it); ``disk``
    is None when nothing is recorded, ``backlog`` None when nothing is shipped; ``draining``
    says since when this broker drains (None: it does not); ``refusals`` counts the PROXY
    protocol listener's refusals by code (None: the listener does not take the protocol).
    """
    t = settings.check_timeout_seconds
    checks = [Check("store", reachable(database.ping, "answers"), t),
              Check("audit", in_thread(appendable(audit_path)), t)]
    if disk is not None:
        checks.append(Check("recordings_disk", in_thread(disk_above_threshold(disk)), t))
    checks.append(Check("directory", _directory_probe(directory), t))
    if draining is not None:
        checks.append(Check("draining", draining_probe(draining), t))
    collector = BrokerCollector(sessions, disk=disk, backlog=backlog,
                                accounts=lambda: throttle.summary(time.time()),
                                refusals=refusals, timeout=t)
    return DiagServer(settings, metrics, collector, Readiness(checks), ports=ports)


def _directory_probe(current: Callable[[], object]) -> Probe:
    """AD: a base search on a pooled connection of each domain; static: the users file reads."""
    async def probe() -> str:
        ping = getattr(current(), "ping", None)
        if ping is None:
            return "this directory has no check"
        await ping()
        return "reachable"
    return probe


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bound and listening, or OSError. Two workers may both bind one port (SO_REUSEADDR, so a
    restart is not refused for connections in TIME_WAIT) until one listens: ``listen`` is where
    the loser learns it, so it is called here, before the event loop gets the socket (uvloop's
    ``create_server`` would hand back a server without a socket)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
