"""The diagnostics listener over real sockets: its three pages, and the port each worker takes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from broker.config import DiagSettings
from broker.diag.checks import Check, CheckFailed, Readiness
from broker.diag.metrics import BrokerCollector, PrometheusMetrics
from broker.diag.server import DiagServer
from broker.recordings.local import LocalRecordingSink
from broker.services.clock import SystemClock
from broker.services.sessions import SessionService
from broker.store.sqlite import SqliteDatabase, SqliteSessionIndex


class Audit:
    def emit(self, event: str, **fields: object) -> None:
        return None


def server(tmp_path: Path, *, ready: bool = True, ports: list[int] | None = None) -> DiagServer:
    service = SessionService(LocalRecordingSink(tmp_path / "rec"),
                             SqliteSessionIndex(SqliteDatabase(tmp_path / "b.db")), Audit(),
                             SystemClock())

    async def fine() -> str:
        return "fine"

    async def broken() -> str:
        raise CheckFailed("recordings disk low: 0.1 GiB free")

    checks = [Check("store", fine, 1), Check("recordings_disk", fine if ready else broken, 1)]
    return DiagServer(DiagSettings(enabled=True, listen_port=0), PrometheusMetrics(),
                      BrokerCollector(service), Readiness(checks), ports=ports)


async def test_health_readiness_and_metrics(tmp_path: Path) -> None:
    srv = server(tmp_path)
    url = await srv.start()
    assert url is not None
    assert url.startswith("http://127.0.0.1:")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/healthz") as r:
                assert r.status == 200
                assert await r.json() == {"status": "alive"}
            async with http.get(url + "/readyz") as r:
                assert r.status == 200
                body = await r.json()
            assert body["status"] == "ready"
            assert [c["name"] for c in body["checks"]] == ["store", "recordings_disk"]
            await asyncio.sleep(1.2)  # one sample of the event loop's lag
            async with http.get(url + "/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                text = await r.text()
            assert 'bastion_broker_sessions_active{kind="shell"} 0.0' in text
            assert "bastion_broker_event_loop_lag_seconds_count 1.0" in text \
                or "bastion_broker_event_loop_lag_seconds_count 2.0" in text
            async with http.post(url + "/metrics") as r:
                assert r.status == 405
    finally:
        await srv.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http, http.get(url + "/healthz"):
            pass


async def test_not_ready_is_503_naming_the_failing_check(tmp_path: Path) -> None:
    srv = server(tmp_path, ready=False)
    url = await srv.start()
    assert url is not None
    try:
        async with aiohttp.ClientSession() as http, http.get(url + "/readyz") as r:
            assert r.status == 503
            body = await r.json()
        assert body["status"] == "not ready"
        assert body["failing"] == ["recordings_disk"]
        disk = body["checks"][1]
        assert disk == {"name": "recordings_disk", "ok": False,
                        "detail": "recordings disk low: 0.1 GiB free",
                        "seconds": disk["seconds"]}
    finally:
        await srv.stop()


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_worker_takes_the_next_port_when_another_has_the_first(
    tmp_path: Path, busy_port: int,
) -> None:
    free = _free()
    srv = server(tmp_path, ports=[busy_port, free])
    url = await srv.start()
    try:
        assert url == f"http://127.0.0.1:{free}"
    finally:
        await srv.stop()


async def test_no_free_port_leaves_the_broker_without_diagnostics(
    tmp_path: Path, busy_port: int,
) -> None:
    srv = server(tmp_path, ports=[busy_port])
    assert await srv.start() is None
    await srv.stop()
