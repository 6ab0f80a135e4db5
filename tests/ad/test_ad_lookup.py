"""ADDirectory.lookup (the registered-SSH-key path, no password) and the connection pools,
against a real Samba AD DC."""

from __future__ import annotations

import time
from typing import Any

import pytest

from broker.identity import ldap as adl
from broker.identity.ldap import ADDirectory
from tests.ad.conftest import FQDN, PASSWORD, SVC_USER, HangServer, SambaDC, ad_settings

pytestmark = pytest.mark.ad


@pytest.mark.parametrize(("user", "domain"), [
    ("alice", None), ("ALICE", "CORP"), ("CORP\\alice", None), ("alice@corp.example.test", None),
])
async def test_lookup_valid_user(ad: ADDirectory, user: str, domain: str | None) -> None:
    out = await ad.lookup(user, domain)
    assert out.reason == "account ok"
    assert out.principal is not None
    assert out.principal.key == "alice@corp.example.test"
    assert {"bastion-users", "bastion-approvers", "role:approver"} <= out.principal.groups
    assert "role:auditor" not in out.principal.groups
    # the same principal as a password login
    assert (await ad.authenticate(user, domain, PASSWORD)).principal == out.principal


async def test_lookup_nested_groups_and_roles(ad: ADDirectory) -> None:
    dora = await ad.lookup("deep-dora", None)
    assert dora.principal is not None, dora.reason
    assert dora.principal.groups == frozenset({"deep-team", "ops-team", "bastion-users"})
    ann = await ad.lookup("auditor-ann", None)
    assert ann.principal is not None
    assert "role:auditor" in ann.principal.groups
    sam = await ad.lookup("sneaky-sam", None)
    assert sam.principal is not None
    assert not any(g.startswith("role:") for g in sam.principal.groups)
    carl = await ad.lookup("carl.ops", FQDN)  # UPN prefix differs from sAMAccountName
    assert carl.principal is not None and carl.principal.username == "carl"


@pytest.mark.parametrize(("user", "reason"), [
    ("disabled-dan", "account disabled"),
    ("expired-erin", "account expired"),
    ("change-chris", "must change password"),  # a key must not bypass AD's forced change
    ("outsider-olga", "not in a required group"),
    ("nobody-at-all", "unknown user"),
    ("a(b", "unknown user"),
])
async def test_lookup_refusal_reasons(ad: ADDirectory, user: str, reason: str) -> None:
    assert await ad.lookup(user, None) == type(await ad.lookup("alice", None))(None, reason)


async def test_lookup_locked_out(ad: ADDirectory) -> None:
    assert (await ad.lookup("locked-lara", None)).ok
    for _ in range(3):
        out = await ad.authenticate("locked-lara", None, "Wrong!Passw0rd")
        assert out.reason == "bad password"
    out = await ad.lookup("locked-lara", None)
    assert (out.principal, out.reason) == (None, "account locked out")


@pytest.mark.parametrize("user", [
    "*", "a*", "alic*", "*)(sAMAccountName=*", "*)(|(sAMAccountName=*", "(", ")", "alice)",
    "(alice", "\\", "\\2a", "alice\x00", "*@corp.example.test", "alice)(objectClass=*",
    "\\5c2a", "a(b)*",
])
async def test_lookup_metacharacters_never_match(ad: ADDirectory, user: str) -> None:
    out = await ad.lookup(user, None)
    assert out.principal is None, f"{user!r} looked up as {out.principal}"
    assert out.reason in {"unknown user", "invalid character in user name", "untrusted domain",
                          "empty user name"}


@pytest.mark.parametrize(("user", "domain", "reason"), [
    ("", None, "empty user name"),
    ("  ", None, "empty user name"),
    ("al/ice", None, "invalid character in user name"),
    ("alice", "EVIL", "untrusted domain"),
    ("alice@evil.example.test", None, "untrusted domain"),
])
async def test_lookup_refused_before_any_ldap(samba_dc: SambaDC, hang_server: HangServer,
                                              user: str, domain: str | None, reason: str) -> None:
    d = ADDirectory(ad_settings(samba_dc, servers=[f"ldaps://127.0.0.1:{hang_server.port}"]))
    try:
        t = time.monotonic()
        assert await d.lookup(user, domain) == type(await d.lookup("", None))(None, reason)
        assert time.monotonic() - t < 0.2
        assert hang_server.received == b""
    finally:
        d.close()


async def test_lookup_fails_closed_on_hung_dc_and_bad_cert(samba_dc: SambaDC,
                                                           hang_server: HangServer) -> None:
    hung = ADDirectory(ad_settings(samba_dc, servers=[f"ldaps://127.0.0.1:{hang_server.port}"],
                                   connect_timeout_seconds=5, operation_timeout_seconds=1.5))
    bad = ADDirectory(ad_settings(samba_dc, ca_file=str(samba_dc.other_ca_file)))
    try:
        t = time.monotonic()
        out = await hung.lookup("alice", None)
        assert out.principal is None and out.reason.startswith("directory unavailable:")
        assert time.monotonic() - t < 2.2
        out = await bad.lookup("alice", None)
        assert out.principal is None and "certificate not valid" in out.reason, out.reason
    finally:
        hung.close()
        bad.close()


async def test_lookup_fails_over_to_the_next_dc(samba_dc: SambaDC, hang_server: HangServer) -> None:
    d = ADDirectory(ad_settings(
        samba_dc, servers=[f"ldaps://127.0.0.1:{hang_server.port}", "ldaps://127.0.0.1:636"],
        connect_timeout_seconds=1, operation_timeout_seconds=5))
    try:
        assert (await d.lookup("alice", None)).ok
    finally:
        d.close()


# -- connection pools ---------------------------------------------------------------------------


def _count_connects(d: ADDirectory, monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    made: list[str | None] = []
    real = d._connect

    def counting(dom: Any, dc: Any, user: str | None, password: bytes | None,
                 deadline: float) -> Any:
        made.append(user)
        return real(dom, dc, user, password, deadline)

    monkeypatch.setattr(d, "_connect", counting)
    return made


async def test_pooled_connections_are_reused(samba_dc: SambaDC,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    d = ADDirectory(ad_settings(samba_dc, pool_size=4))
    made = _count_connects(d, monkeypatch)
    try:
        assert (await d.authenticate("alice", None, PASSWORD)).ok
        assert made == [f"{SVC_USER}@{FQDN}", None]  # one service, one bind connection
        for user in ("wendy", "nested-nick", "alice"):
            assert (await d.authenticate(user, None, PASSWORD)).ok
            assert (await d.lookup(user, None)).ok
        assert (await d.authenticate("wendy", None, "Wrong!Passw0rd")).reason == "bad password"
        assert (await d.authenticate("ghost", None, "Wrong!Passw0rd")).reason == "unknown user"
        assert (await d.authenticate("alice", None, PASSWORD)).ok  # after a refused bind
        assert len(made) == 2, made  # no new handshake, no new service bind
    finally:
        d.close()


async def test_user_bound_connections_never_search(samba_dc: SambaDC,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    d = ADDirectory(ad_settings(samba_dc, pool_size=2, max_concurrency=4))
    user_bound: set[int] = set()
    real_bind, real_search = d._user_bind, d._search

    def user_bind(conn: Any, *a: Any) -> Any:
        user_bound.add(id(conn))
        return real_bind(conn, *a)

    def search(conn: Any, *a: Any, **kw: Any) -> Any:
        assert id(conn) not in user_bound, "a user-bound connection was used for a search"
        assert conn.user == f"{SVC_USER}@{FQDN}"
        return real_search(conn, *a, **kw)

    monkeypatch.setattr(d, "_user_bind", user_bind)
    monkeypatch.setattr(d, "_search", search)
    try:
        import asyncio

        calls = [d.authenticate(u, None, pw) for u in ("alice", "wendy", "ghost", "deep-dora")
                 for pw in (PASSWORD, "Wrong!Passw0rd")] * 3
        calls += [d.lookup(u, None) for u in ("alice", "deep-dora", "ghost")] * 3
        outs = await asyncio.gather(*calls)
        assert sum(o.ok for o in outs) == 3 * 3 + 3 * 2
        assert user_bound
    finally:
        d.close()


async def test_pool_survives_a_dc_restart(samba_dc: SambaDC,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Pooled connections die with the DC; the first login after it is back still succeeds
    (a dead pooled connection is replaced, not blamed on the DC)."""
    d = ADDirectory(ad_settings(samba_dc, connect_timeout_seconds=2, operation_timeout_seconds=6))
    try:
        assert (await d.authenticate("alice", None, PASSWORD)).ok
        assert (await d.lookup("alice", None)).ok
        samba_dc.stop()
        samba_dc.start()
        made = _count_connects(d, monkeypatch)
        out = await d.authenticate("alice", None, PASSWORD)
        assert out.ok, out.reason
        assert made == [f"{SVC_USER}@{FQDN}", None]
        assert (await d.lookup("alice", None)).ok
    finally:
        d.close()


async def test_pool_size_zero_opens_a_connection_per_login(samba_dc: SambaDC,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    d = ADDirectory(ad_settings(samba_dc, pool_size=0))
    made = _count_connects(d, monkeypatch)
    try:
        for _ in range(2):
            assert (await d.authenticate("alice", None, PASSWORD)).ok
        assert len(made) == 4
    finally:
        d.close()


async def test_close_empties_the_pools(samba_dc: SambaDC) -> None:
    d = ADDirectory(ad_settings(samba_dc))
    assert (await d.authenticate("alice", None, PASSWORD)).ok
    pools = list(d._pools.values())
    assert sum(len(p) for p in pools) == 2
    d.close()
    assert sum(len(p) for p in pools) == 0
    assert isinstance(pools[0], adl._Pool)
