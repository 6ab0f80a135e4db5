"""The readiness check of the AD directory against the real Samba DC: a base search on a pooled
service-account connection, failing with the DC's own reason when no DC of a domain answers."""

from __future__ import annotations

import time

import pytest

from broker.errors import BrokerError
from broker.identity.ldap import ADDirectory
from tests.ad.conftest import PASSWORD, HangServer, SambaDC, ad_settings

pytestmark = pytest.mark.ad


async def test_ping_answers_and_reuses_the_service_connection(samba_dc: SambaDC) -> None:
    d = ADDirectory(ad_settings(samba_dc))
    try:
        await d.ping()
        assert (await d.authenticate("alice", None, PASSWORD)).ok  # the pooled one still works
        t = time.monotonic()
        await d.ping()
        assert time.monotonic() - t < 1.0
    finally:
        d.close()


async def test_ping_names_the_domain_when_its_only_dc_hangs(samba_dc: SambaDC,
                                                            hang_server: HangServer) -> None:
    d = ADDirectory(ad_settings(samba_dc, servers=[f"ldaps://127.0.0.1:{hang_server.port}"],
                                connect_timeout_seconds=1, operation_timeout_seconds=2))
    try:
        t = time.monotonic()
        with pytest.raises(BrokerError, match="directory unavailable: ") as info:
            await d.ping()
        assert time.monotonic() - t < 3.5
        assert f"127.0.0.1:{hang_server.port}" in str(info.value)
    finally:
        d.close()


async def test_ping_fails_over_to_the_next_dc(samba_dc: SambaDC,
                                              hang_server: HangServer) -> None:
    d = ADDirectory(ad_settings(
        samba_dc, servers=[f"ldaps://127.0.0.1:{hang_server.port}", "ldaps://127.0.0.1:636"],
        connect_timeout_seconds=1, operation_timeout_seconds=6))
    try:
        await d.ping()
        t = time.monotonic()
        assert (await d.authenticate("alice", None, PASSWORD)).ok
        assert time.monotonic() - t < 1.0  # the ping left the hung DC marked down
    finally:
        d.close()


async def test_ping_says_the_service_account_is_refused(samba_dc: SambaDC) -> None:
    d = ADDirectory(ad_settings(samba_dc, bind_password="not-the-password"))
    try:
        with pytest.raises(BrokerError, match="service account bind refused"):
            await d.ping()
    finally:
        d.close()
