"""ADDirectory against a real Samba AD DC: name forms, AD refusal reasons, groups, injection, TLS."""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest

from broker.identity.ldap import ADDirectory
from tests.ad.conftest import FQDN, PASSWORD, HangServer, SambaDC, ad_settings

pytestmark = pytest.mark.ad


@pytest.mark.parametrize(("user", "domain"), [
    ("alice", None), ("ALICE", None), ("alice", "CORP"), ("alice", "corp"),
    ("alice", "Corp.Example.Test"), ("CORP\\alice", None), ("alice@corp.example.test", None),
    ("alice@CORP.EXAMPLE.TEST", None),
])
async def test_name_forms_resolve_to_one_principal(
    ad: ADDirectory, user: str, domain: str | None,
) -> None:
    out = await ad.authenticate(user, domain, PASSWORD)
    assert out.ok, out.reason
    assert out.principal is not None
    assert (out.principal.domain, out.principal.username) == (FQDN, "alice")
    assert out.principal.key == "alice@corp.example.test"
    assert {"bastion-users", "bastion-approvers", "role:approver"} <= out.principal.groups
    assert "role:auditor" not in out.principal.groups


async def test_upn_prefix_differs_from_samaccountname(ad: ADDirectory) -> None:
    # carl: CN "Carl Ops", UPN carl.ops@..., sAMAccountName carl
    for user, dom in [("carl.ops", FQDN), ("carl.ops@corp.example.test", None), ("carl", "CORP")]:
        out = await ad.authenticate(user, dom, PASSWORD)
        assert out.principal is not None, (user, out.reason)
        assert out.principal.username == "carl"


@pytest.mark.parametrize(("user", "reason"), [
    ("disabled-dan", "account disabled"),
    ("expired-erin", "account expired"),
    ("change-chris", "must change password"),
    ("outsider-olga", "not in a required group"),
])
async def test_ad_refusal_reasons(ad: ADDirectory, user: str, reason: str) -> None:
    out = await ad.authenticate(user, None, PASSWORD)
    assert out == type(out)(None, reason)


async def test_wrong_password_and_unknown_user_look_the_same(ad: ADDirectory) -> None:
    bad = await ad.authenticate("wendy", None, "Wrong!Passw0rd")
    unknown = await ad.authenticate("nobody-here", None, PASSWORD)
    assert (bad.principal, bad.reason) == (None, "bad password")
    assert (unknown.principal, unknown.reason) == (None, "unknown user")
    assert (await ad.authenticate("wendy", None, PASSWORD)).ok


async def test_unknown_user_costs_about_a_wrong_password(ad: ADDirectory) -> None:
    # Warm up first: the padding draws from recent wrong passwords, and the first binds on fresh
    # pools are slower than the steady state a prober would measure.
    for i in range(4):
        for user in ("tim", f"warm-{i}"):
            assert not (await ad.authenticate(user, None, "Wrong!Passw0rd")).ok
    wrong: list[float] = []
    unknown: list[float] = []
    for i in range(10):
        for user, sink in (("tim", wrong), (f"ghost-{i}", unknown)):
            t = time.monotonic()
            out = await ad.authenticate(user, None, "Wrong!Passw0rd")
            sink.append(time.monotonic() - t)
            assert not out.ok
    w, u = statistics.median(wrong), statistics.median(unknown)
    assert abs(w - u) < 0.35 * w, f"wrong password {w * 1000:.0f} ms, unknown user {u * 1000:.0f} ms"


async def test_lockout_after_threshold(ad: ADDirectory) -> None:
    for _ in range(3):
        assert (await ad.authenticate("locked-lou", None, "Wrong!Passw0rd")).reason == "bad password"
    out = await ad.authenticate("locked-lou", None, PASSWORD)
    assert (out.principal, out.reason) == (None, "account locked out")


@pytest.mark.parametrize(("user", "groups"), [
    ("nested-nick", {"ops-team", "bastion-users"}),
    ("deep-dora", {"deep-team", "ops-team", "bastion-users"}),
])
async def test_nested_group_membership(ad: ADDirectory, user: str, groups: set[str]) -> None:
    out = await ad.authenticate(user, None, PASSWORD)
    assert out.principal is not None, out.reason
    assert out.principal.groups == frozenset(groups)


async def test_roles_from_groups(ad: ADDirectory) -> None:
    ann = await ad.authenticate("auditor-ann", None, PASSWORD)
    assert ann.principal is not None
    assert "role:auditor" in ann.principal.groups and "role:approver" not in ann.principal.groups
    # sneaky-sam is in a group whose CN is literally "role:approver": no role from that
    sam = await ad.authenticate("sneaky-sam", None, PASSWORD)
    assert sam.principal is not None, sam.reason
    assert not any(g.startswith("role:") for g in sam.principal.groups)


async def test_group_given_as_dn_or_cn(samba_dc: SambaDC) -> None:
    for required in (["CN=Ops-Team , CN=Users,DC=corp,DC=example,DC=test"], ["OPS-TEAM"]):
        d = ADDirectory(ad_settings(samba_dc, required_groups=required))
        try:
            assert (await d.authenticate("deep-dora", None, PASSWORD)).ok
            assert (await d.authenticate("alice", None, PASSWORD)).reason == "not in a required group"
        finally:
            d.close()


async def test_filter_metacharacters_in_real_name(ad: ADDirectory) -> None:
    assert (await ad.authenticate("a(b)", None, PASSWORD)).ok
    assert (await ad.authenticate("a(b", None, PASSWORD)).reason == "unknown user"


@pytest.mark.parametrize("user", [
    "*", "a*", "alic*", "*)(sAMAccountName=*", "*)(|(sAMAccountName=*", "(", ")", "alice)",
    "(alice", "\\", "\\2a", "alice\x00", "\x00", "al\x00ice", "*@corp.example.test",
    "alice)(objectClass=*", "\\5c2a",
])
async def test_injection_never_matches_anyone(ad: ADDirectory, user: str) -> None:
    out = await ad.authenticate(user, None, PASSWORD)
    assert out.principal is None, f"{user!r} authenticated as {out.principal}"
    assert out.reason in {"unknown user", "invalid character in user name", "untrusted domain",
                          "empty user name"}


@pytest.mark.parametrize(("user", "password", "reason"), [
    ("alice", "", "empty password"),
    ("alice", "   ", "empty password"),
    ("alice", "Corr3ct!Horse-bb\x00", "invalid password (NUL)"),
    ("", PASSWORD, "empty user name"),
    ("  ", PASSWORD, "empty user name"),
    ("al/ice", PASSWORD, "invalid character in user name"),
])
async def test_refused_before_any_bind(samba_dc: SambaDC, hang_server: HangServer,
                                       user: str, password: str, reason: str) -> None:
    # Pointed at a server that never answers: a quick answer proves no LDAP work was done.
    d = ADDirectory(ad_settings(samba_dc, servers=[f"ldaps://127.0.0.1:{hang_server.port}"]))
    try:
        t = time.monotonic()
        out = await d.authenticate(user, None, password)
        assert (out.principal, out.reason) == (None, reason)
        assert time.monotonic() - t < 0.2
        assert hang_server.received == b""
    finally:
        d.close()


async def test_untrusted_domain(ad: ADDirectory) -> None:
    assert (await ad.authenticate("alice", "EVIL", PASSWORD)).reason == "untrusted domain"
    out = await ad.authenticate("alice@evil.example.test", None, PASSWORD)
    assert out.reason == "untrusted domain"
    assert ad.canonical_domain(None) == FQDN
    assert ad.canonical_domain("corp") == FQDN
    assert ad.canonical_domain("CORP.example.TEST") == FQDN
    assert ad.canonical_domain("example.test") is None


async def test_starttls_on_389(samba_dc: SambaDC) -> None:
    d = ADDirectory(ad_settings(samba_dc, servers=["ldap://127.0.0.1:389"]))
    try:
        assert (await d.authenticate("alice", None, PASSWORD)).ok
    finally:
        d.close()


async def test_hostname_is_checked(samba_dc: SambaDC) -> None:
    # The DC certificate names dc1.corp.example.test, localhost and 127.0.0.1, not ::1.
    ok = ADDirectory(ad_settings(samba_dc, servers=["ldaps://localhost:636"]))
    bad = ADDirectory(ad_settings(samba_dc, servers=["ldaps://[::1]:636"]))
    try:
        assert (await ok.authenticate("alice", None, PASSWORD)).ok
        out = await bad.authenticate("alice", None, PASSWORD)
        assert out.principal is None
        assert out.reason.startswith("directory unavailable:"), out.reason
        assert "certificate" in out.reason.lower() or "hostname" in out.reason.lower(), out.reason
    finally:
        ok.close()
        bad.close()


async def test_untrusted_ca_fails_closed(samba_dc: SambaDC) -> None:
    d = ADDirectory(ad_settings(samba_dc, ca_file=str(samba_dc.other_ca_file)))
    try:
        t = time.monotonic()
        out = await d.authenticate("alice", None, PASSWORD)
        assert out.principal is None
        assert out.reason.startswith("directory unavailable:"), out.reason
        assert "certificate not valid" in out.reason, out.reason
        assert time.monotonic() - t < 6
    finally:
        d.close()


async def test_wrong_service_password_fails_closed(samba_dc: SambaDC) -> None:
    d = ADDirectory(ad_settings(samba_dc, bind_password="not-the-password"))
    try:
        out = await d.authenticate("alice", None, PASSWORD)
        assert out.principal is None
        assert out.reason == "directory unavailable: service account bind refused (bad password)"
    finally:
        d.close()


async def test_plain_ldap_never_binds_before_starttls(
    samba_dc: SambaDC, hang_server: HangServer,
) -> None:
    d = ADDirectory(ad_settings(samba_dc, servers=[f"ldap://127.0.0.1:{hang_server.port}"],
                                connect_timeout_seconds=1, operation_timeout_seconds=3))
    try:
        out = await d.authenticate("alice", None, PASSWORD)
        assert out.principal is None and out.reason.startswith("directory unavailable:")
        data = bytes(hang_server.received)
        assert b"1.3.6.1.4.1.1466.20037" in data  # the StartTLS request, and nothing else
        assert b"Svc!Acc0unt" not in data and PASSWORD.encode() not in data
        assert b"svc-bastion" not in data
    finally:
        d.close()


def _settings_repr_has_no_secret(s: Any) -> bool:
    return "Svc!Acc0unt" not in repr(s) and "Svc!Acc0unt" not in str(s.model_dump())


def test_settings_mask_the_service_password(samba_dc: SambaDC) -> None:
    assert _settings_repr_has_no_secret(ad_settings(samba_dc))
