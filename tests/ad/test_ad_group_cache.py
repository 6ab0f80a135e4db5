"""The group cache against a real Samba AD DC: fewer searches, and what a change costs to see."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ldap3  # type: ignore[import-untyped]
import pytest

from broker.identity.ldap import ADDirectory
from tests.ad.conftest import PASSWORD, SambaDC, ad_settings

pytestmark = pytest.mark.ad


def _count_group_searches(d: ADDirectory) -> list[str]:
    seen: list[str] = []
    real = d._search

    def spy(conn: Any, deadline: float, what: str, base: str, flt: str, **kw: Any) -> None:
        seen.append(what)
        real(conn, deadline, what, base, flt, **kw)

    d._search = spy  # type: ignore[method-assign]
    return seen


@contextmanager
def _removed(dc: SambaDC, group: str, member_dn: str) -> Iterator[None]:
    """``member_dn`` out of ``group`` for the block, back in afterwards (the DC is shared)."""
    conn = dc.admin()
    try:
        conn.modify(dc.groups[group], {"member": [(ldap3.MODIFY_DELETE, [member_dn])]})
        yield
    finally:
        conn.modify(dc.groups[group], {"member": [(ldap3.MODIFY_ADD, [member_dn])]})
        conn.unbind()


async def test_nested_groups_are_searched_once_per_ttl(samba_dc: SambaDC) -> None:
    d = ADDirectory(ad_settings(samba_dc, group_cache_seconds=60))
    try:
        searches = _count_group_searches(d)
        first = await d.authenticate("deep-dora", None, PASSWORD)
        assert first.principal is not None, first.reason
        assert searches.count("group search") == 3  # deep-team, ops-team, bastion-users
        searches.clear()
        again = await d.authenticate("deep-dora", None, PASSWORD)
        nick = await d.authenticate("nested-nick", None, PASSWORD)
        assert again.principal is not None and nick.principal is not None
        assert again.principal.groups == first.principal.groups
        assert nick.principal.groups == frozenset({"ops-team", "bastion-users"})
        assert searches == ["user search", "user search"]  # the user's entry is always read
    finally:
        d.close()


async def test_removing_a_user_from_a_group_counts_at_once(samba_dc: SambaDC) -> None:
    d = ADDirectory(ad_settings(samba_dc, group_cache_seconds=600))
    try:
        assert (await d.authenticate("nested-nick", None, PASSWORD)).ok
        with _removed(samba_dc, "ops-team", samba_dc.users["nested-nick"]):
            out = await d.authenticate("nested-nick", None, PASSWORD)
            assert out.reason == "not in a required group"
        assert (await d.authenticate("nested-nick", None, PASSWORD)).ok
    finally:
        d.close()


@pytest.mark.parametrize("ttl", [0.0, 3.0])  # 3 s: the cached login must fit in it under load
async def test_removing_a_group_from_its_parent_counts_after_the_ttl(
    samba_dc: SambaDC, ttl: float,
) -> None:
    d = ADDirectory(ad_settings(samba_dc, group_cache_seconds=ttl))
    try:
        assert (await d.authenticate("nested-nick", None, PASSWORD)).ok
        with _removed(samba_dc, "bastion-users", samba_dc.groups["ops-team"]):
            cached = await d.authenticate("nested-nick", None, PASSWORD)
            assert cached.ok == (ttl > 0), cached.reason  # the documented delay, and no longer
            await asyncio.sleep(ttl)
            out = await d.authenticate("nested-nick", None, PASSWORD)
            assert out.reason == "not in a required group"
    finally:
        d.close()
