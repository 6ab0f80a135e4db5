"""Failover, hung and stopped DCs, and concurrency: logins fail closed in time and recover alone."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time

import pytest

from broker.identity.ldap import ADDirectory
from tests.ad.conftest import PASSWORD, HangServer, SambaDC, ad_settings

pytestmark = pytest.mark.ad


async def test_hung_dc_first_in_list_fails_over(samba_dc: SambaDC, hang_server: HangServer) -> None:
    d = ADDirectory(ad_settings(
        samba_dc, servers=[f"ldaps://127.0.0.1:{hang_server.port}", "ldaps://127.0.0.1:636"],
        connect_timeout_seconds=1.5, operation_timeout_seconds=6))
    try:
        t = time.monotonic()
        first = await d.authenticate("alice", None, PASSWORD)
        first_s = time.monotonic() - t
        assert first.ok, first.reason
        assert 1.4 < first_s < 3.5, first_s  # one handshake timeout, then the real DC
        t = time.monotonic()
        assert (await d.authenticate("alice", None, PASSWORD)).ok
        assert time.monotonic() - t < 1.0  # the hung DC is now tried last
    finally:
        d.close()


async def test_only_hung_dc_fails_closed_within_timeout(samba_dc: SambaDC,
                                                        hang_server: HangServer) -> None:
    d = ADDirectory(ad_settings(
        samba_dc, servers=[f"ldaps://127.0.0.1:{hang_server.port}"] * 1,
        connect_timeout_seconds=5, operation_timeout_seconds=2))
    try:
        t = time.monotonic()
        out = await d.authenticate("alice", None, PASSWORD)
        took = time.monotonic() - t
        assert out.principal is None
        assert out.reason.startswith("directory unavailable:"), out.reason
        assert took < 2.6, took
    finally:
        d.close()


async def test_dc_stopped_then_back_without_restart(samba_dc: SambaDC) -> None:
    d = ADDirectory(ad_settings(samba_dc, connect_timeout_seconds=2, operation_timeout_seconds=4))
    try:
        assert (await d.authenticate("alice", None, PASSWORD)).ok
        samba_dc.stop()
        try:
            t = time.monotonic()
            out = await d.authenticate("alice", None, PASSWORD)
            assert out.principal is None
            assert out.reason.startswith("directory unavailable:"), out.reason
            assert time.monotonic() - t < 4.5
        finally:
            samba_dc.start()
        out = await d.authenticate("alice", None, PASSWORD)
        assert out.ok, out.reason
    finally:
        d.close()


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    period = 0.005
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(period)
        lags.append(time.monotonic() - t - period)


async def test_concurrent_logins_do_not_block_the_loop(samba_dc: SambaDC,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    d = ADDirectory(ad_settings(samba_dc, connect_timeout_seconds=5, operation_timeout_seconds=30))
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(lags, stop))
    try:
        await d.authenticate("alice", None, PASSWORD)  # warm-up
        outs = await asyncio.gather(*(d.authenticate("alice", None, PASSWORD) for _ in range(20)))
        assert all(o.ok for o in outs), [o.reason for o in outs if not o.ok]

        # Latency under 20 concurrent callers, 10 logins each.
        latencies: list[float] = []

        async def caller() -> None:
            for _ in range(10):
                t = time.monotonic()
                out = await d.authenticate("alice", None, PASSWORD)
                latencies.append(time.monotonic() - t)
                assert out.ok, out.reason

        t0 = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(20)))
        wall = time.monotonic() - t0
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        d.close()
    q = statistics.quantiles(latencies, n=100)
    max_lag = max(lags)
    with capsys.disabled():
        sys.stdout.write(
            f"\nAD login latency, 20 concurrent callers x 10: p50 {q[49] * 1000:.0f} ms, "
            f"p99 {q[98] * 1000:.0f} ms, {len(latencies) / wall:.1f} logins/s; "
            f"event-loop lag max {max_lag * 1000:.1f} ms, p99 "
            f"{statistics.quantiles(lags, n=100)[98] * 1000:.1f} ms\n")
    # A login takes ~1 s under this load: a loop that waited on LDAP would lag that much every
    # time. Single ticks of ~0.1 s happen on 2 cores with Samba and 16 workers fighting for the GIL,
    # and a p99 of 50-60 ms was seen in CI with the rest of the suite's processes alive: the
    # bound says "never waits for LDAP", not how fast this machine is (bench/ad_logins.py is).
    assert statistics.quantiles(lags, n=100)[98] < 0.2, "event loop lag p99 over 200 ms"
    assert max_lag < 0.5, f"event loop stalled {max_lag * 1000:.0f} ms"
