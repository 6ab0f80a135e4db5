"""ADDirectory against a real Samba AD DC: name forms, AD refusal reasons, groups, injection, TLS."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import pytest

from broker.identity.ldap import ADDirectory, _FailureCost
from tests.ad.conftest import FQDN, PASSWORD, HangServer, SambaDC, ad_settings

pytestmark = pytest.mark.ad
WRONG = "Wrong!Passw0rd"


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


class SeenCost(_FailureCost):
    """A domain's wrong-password timing record (the unknown-user padding) that also keeps what
    went in and what came out."""

    def __init__(self) -> None:
        super().__init__()
        self.wrong: list[float] = []  # bind durations of wrong passwords, as recorded
        self.dummies: list[float] = []  # bind durations of unknown users' dummy binds
        self.waits: list[float] = []  # what each dummy bind was told to wait

    def record(self, seconds: float) -> None:
        self.wrong.append(seconds)
        super().record(seconds)

    def pad(self, seconds: float) -> float:
        wait = super().pad(seconds)
        self.dummies.append(seconds)
        self.waits.append(wait)
        return wait


async def test_an_unknown_user_binds_as_a_wrong_password_does_then_waits_out_the_difference(
    samba_dc: SambaDC, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The mechanism, not the wall clock (the clock on a shared machine flaked): what the DC
    # answered, what was recorded and what the unknown user was made to wait. The timing it
    # buys is measured by bench/ad_timing.py (docs/benchmarks.md).
    slept: list[float] = []
    d = ADDirectory(ad_settings(samba_dc), sleep=slept.append)
    cost = d._fail_cost[FQDN] = SeenCost()
    dummy_dn = d._domains[FQDN].dummy_dn
    binds: list[tuple[str, bytes, str | None]] = []  # every user bind the DC answered
    user_bind = d._user_bind

    def seen_bind(conn: Any, dn: str, password: bytes, deadline: float) -> str | None:
        answer = user_bind(conn, dn, password, deadline)
        binds.append((dn, password, answer))
        return answer

    monkeypatch.setattr(d, "_user_bind", seen_bind)
    try:
        # no wrong password seen yet: nothing to wait for
        assert (await d.authenticate("ghost-0", None, WRONG)).reason == "unknown user"
        assert slept == [0.0]
        for _ in range(5):
            assert (await d.authenticate("tim", None, WRONG)).reason == "bad password"
        assert len(cost.wrong) == 5  # one bind duration per wrong password
        assert all(s > 0 for s in cost.wrong)
        assert slept == [0.0]  # a wrong password itself never waits
        for i in range(1, 6):
            assert (await d.authenticate(f"ghost-{i}", None, WRONG)).reason == "unknown user"
        assert (await d.authenticate("wendy", None, PASSWORD)).ok
        assert (await d.authenticate("disabled-dan", None, PASSWORD)).reason == "account disabled"
    finally:
        d.close()
    # the unknown users bound for real, as a wrong password does: a DN that does not exist, with
    # a random password (never the one typed), and the DC refused it with a wrong password's
    # own answer (AD data 52e)
    unknown = [b for b in binds if b[0] == dummy_dn]
    wrong = [b for b in binds if b[0] == samba_dc.users["tim"]]
    assert (len(unknown), len(wrong)) == (6, 5)
    assert {pw for _, pw, _ in unknown} == {d._dummy_password}
    assert d._dummy_password != WRONG.encode()
    assert {a for _, _, a in unknown} == {a for _, _, a in wrong} == {"bad password"}
    # a right password and a refused account are neither recorded nor padded
    assert len(cost.wrong) == 5
    assert len(cost.waits) == 6
    # each unknown user waited what the padding said: a wrong password's bind duration (drawn
    # from those recorded) less the typical dummy bind before it, never less than nothing
    assert slept == cost.waits
    for k in range(1, 6):
        base = statistics.median(cost.dummies[:k])
        wait = cost.waits[k]
        if wait > 0:
            assert any(math.isclose(wait + base, w, abs_tol=1e-9) for w in cost.wrong), k
        else:
            assert min(cost.wrong) <= base, k


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
