"""Pure parts of the AD backend: bind-error parsing, name checks, settings; no DC needed."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from broker.errors import ConfigError
from broker.identity import ad_rules
from broker.identity import ldap as adl
from broker.identity.ad_rules import (
    group_matches,
    normalize_dn,
    parse_ad_bind_error,
    password_problem,
    split_login,
    username_problem,
)
from broker.identity.ad_settings import ADSettings, parse_server_uri
from broker.identity.ldap import ADDirectory


def _msg(code: str) -> str:
    return f"80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data {code}, v4563"


@pytest.mark.parametrize(("code", "reason"), [
    ("52e", "bad password"), ("525", "no such user"), ("530", "logon time restriction"),
    ("531", "workstation restriction"), ("532", "password expired"), ("533", "account disabled"),
    ("701", "account expired"), ("773", "must change password"), ("775", "account locked out"),
    ("52E", "bad password"), ("0000052e", "bad password"),
])
def test_bind_error_codes(code: str, reason: str) -> None:
    assert parse_ad_bind_error(_msg(code)) == reason


@pytest.mark.parametrize("message", [None, "", "invalid credentials", "data", "datum 52e"])
def test_bind_error_without_code(message: str | None) -> None:
    assert parse_ad_bind_error(message) == "invalid credentials"


def test_bind_error_unknown_code() -> None:
    assert parse_ad_bind_error(_msg("52f")) == "invalid credentials (AD code 52f)"


@pytest.mark.parametrize("name", ["alice", "a(b)", "j.doe", "O'Brien", "x" * 256, "日本"])
def test_usernames_accepted(name: str) -> None:
    assert username_problem(name) is None


@pytest.mark.parametrize("name", [
    "", " ", "a/b", "a\\b", "a[b", "a]b", "a:b", "a;b", "a|b", "a=b", "a,b", "a+b", "*", "a?b",
    "a<b", "a>b", 'a"b', "a\x00b", "a\nb", "a\x7fb", " alice", "alice ", "x" * 257,
])
def test_usernames_refused(name: str) -> None:
    assert username_problem(name) is not None


@pytest.mark.parametrize(("pw", "ok"), [
    ("x", True), (" s p ", True), ("", False), ("   ", False), ("\t\n", False), ("a\x00b", False),
])
def test_password_problem(pw: str, ok: bool) -> None:
    assert (password_problem(pw) is None) is ok


@pytest.mark.parametrize(("name", "expected"), [
    ("alice", ("alice", None)), ("CORP\\alice", ("alice", "CORP")),
    ("alice@corp.example.test", ("alice", "corp.example.test")), ("a@b@c.d", ("a@b", "c.d")),
])
def test_split_login(name: str, expected: tuple[str, str | None]) -> None:
    assert split_login(name) == expected


def test_normalize_dn_and_group_matching() -> None:
    assert normalize_dn("CN=Ops Team , OU=G,DC=corp") == normalize_dn("cn=ops team,ou=g,dc=CORP")
    assert normalize_dn("CN=Smith\\, J,DC=x") == "cn=smith\\, j,dc=x"
    dns = {normalize_dn("CN=ops,DC=corp")}
    assert group_matches(["CN=OPS, DC=corp"], dns, {"ops"})
    assert group_matches(["Ops"], dns, {"ops"})
    assert not group_matches(["CN=ops,DC=other"], dns, {"ops"})
    assert not group_matches([], dns, {"ops"})


def test_server_uris() -> None:
    a = parse_server_uri("ldaps://dc1.corp.example.test")
    assert (a.host, a.port, a.ldaps) == ("dc1.corp.example.test", 636, True)
    b = parse_server_uri("ldap://10.0.0.1:3890")
    assert (b.host, b.port, b.ldaps) == ("10.0.0.1", 3890, False)
    assert parse_server_uri("ldaps://[::1]:636").host == "::1"
    for bad in ("http://x", "x:636", "ldaps://", "ldaps://u:p@x", "ldaps://x/dc=x", "ldaps://x:99999"):
        with pytest.raises(ValueError, match=r"server URI|invalid"):
            parse_server_uri(bad)


def _ca(tmp_path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit-ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    p = tmp_path / "ca.pem"
    p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return p


def _settings(tmp_path: Path, **over: Any) -> dict[str, Any]:
    dom: dict[str, Any] = {
        "fqdn": "corp.example.test", "netbios": "CORP", "servers": ["ldaps://127.0.0.1:1"],
        "base_dn": "DC=corp,DC=example,DC=test", "bind_user": "svc@corp.example.test",
        "bind_password": "Sekr1t-value", "ca_file": str(_ca(tmp_path)),
        "required_groups": ["bastion-users"],
    }
    top = {k: over.pop(k) for k in list(over) if k in ("default_domain", "operation_timeout_seconds")}
    dom.update(over)
    return {"domains": [dom], **top}


def test_settings_mask_password_and_are_strict(tmp_path: Path) -> None:
    s = ADSettings.model_validate(_settings(tmp_path))
    assert "Sekr1t" not in repr(s) and "Sekr1t" not in str(s.model_dump())
    with pytest.raises(ValidationError):
        ADSettings.model_validate({**_settings(tmp_path), "surprise": 1})
    with pytest.raises(ValidationError):
        s.max_concurrency = 3  # type: ignore[misc]


@pytest.mark.parametrize(("over", "match"), [
    ({"bind_password": None}, "exactly one"),
    ({"bind_password_file": "/x"}, "exactly one"),
    ({"required_groups": []}, "at least 1"),
    ({"servers": ["ldapi:///x"]}, "ldaps://"),
    ({"fqdn": "corp"}, "DNS domain"),
    ({"default_domain": "OTHER"}, "not a configured domain"),
])
def test_settings_refused(tmp_path: Path, over: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        ADSettings.model_validate(_settings(tmp_path, **over))


def test_password_file_and_missing_files(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    d = ADDirectory(ADSettings.model_validate(_settings(tmp_path, bind_password=None,
                                                       bind_password_file=str(pw))))
    d.close()
    with pytest.raises(ConfigError, match="bind password file not found"):
        ADDirectory(ADSettings.model_validate(_settings(
            tmp_path, bind_password=None, bind_password_file=str(tmp_path / "nope"))))
    with pytest.raises(ConfigError, match="CA file not found"):
        ADDirectory(ADSettings.model_validate(_settings(tmp_path, ca_file=str(tmp_path / "no.pem"))))


def test_canonical_domain(tmp_path: Path) -> None:
    d = ADDirectory(ADSettings.model_validate(_settings(tmp_path)))
    try:
        assert d.canonical_domain(None) == "corp.example.test"
        assert d.canonical_domain("corp") == "corp.example.test"
        assert d.canonical_domain("CORP.Example.Test.") == "corp.example.test"
        assert d.canonical_domain("evil") is None
    finally:
        d.close()


async def test_worker_exception_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = ADDirectory(ADSettings.model_validate(_settings(tmp_path)))

    def boom(*_a: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(d, "_login", boom)
    try:
        out = await d.authenticate("alice", None, "pw")
        assert (out.principal, out.reason) == (None, "directory error: RuntimeError")
    finally:
        d.close()


async def test_overall_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = ADDirectory(ADSettings.model_validate(_settings(tmp_path, operation_timeout_seconds=0.3)))
    monkeypatch.setattr(d, "_login", lambda *_a: time.sleep(1.5))
    try:
        t = time.monotonic()
        out = await d.authenticate("alice", None, "pw")
        assert out.reason == "directory unavailable: no answer within 0.3 s"
        assert time.monotonic() - t < 0.6
        await asyncio.sleep(0)
    finally:
        d.close()


def test_failure_cost_pads_unknown_users() -> None:
    c = adl._FailureCost()
    assert c.pad(0.01) == 0.0  # nothing known about wrong passwords yet
    c.record(0.2)
    # padded by (a wrong password's bind) - (the median dummy bind so far: 0.01)
    assert c.pad(0.05) == pytest.approx(0.19)
    assert c.pad(0.05) == pytest.approx(0.17)  # median of 0.01, 0.05 is 0.03
    for _ in range(10):
        c.record(0.01)
        c.pad(0.5)
    assert c.pad(0.5) == 0.0  # a dummy bind never waits less than it took


def _ft(epoch: float) -> str:
    return str(int(epoch * 10_000_000) + 116444736000000000)


@pytest.mark.parametrize(("attrs", "reason"), [
    ({"userAccountControl": ["512"], "accountExpires": ["9223372036854775807"],
      "msDS-User-Account-Control-Computed": ["0"], "lockoutTime": []}, None),
    ({"userAccountControl": ["512"], "accountExpires": ["0"]}, None),
    ({"userAccountControl": ["514"]}, "account disabled"),
    ({"userAccountControl": ["66050"]}, "account disabled"),  # 0x10202
    ({"userAccountControl": []}, "account state unreadable"),
    ({}, "account state unreadable"),
    ({"userAccountControl": ["x"]}, "account state unreadable"),
    ({"userAccountControl": ["512"], "accountExpires": [_ft(1_000_000 - 1)]}, "account expired"),
    ({"userAccountControl": ["512"], "accountExpires": [_ft(1_000_000 + 60)]}, None),
    ({"userAccountControl": ["512"], "msDS-User-Account-Control-Computed": ["16"]},
     "account locked out"),
    # the computed flag wins over a stale lockoutTime (the lockout duration has passed)
    ({"userAccountControl": ["512"], "msDS-User-Account-Control-Computed": ["0"],
      "lockoutTime": ["133000000000000000"]}, None),
    # without it (not AD?), a lockoutTime that is set fails closed
    ({"userAccountControl": ["512"], "lockoutTime": ["133000000000000000"]}, "account locked out"),
    ({"userAccountControl": ["512"], "lockoutTime": ["0"]}, None),
    ({"userAccountControl": 512, "accountExpires": 0}, None),  # scalars, not lists
    ({"userAccountControl": ["512"], "pwdLastSet": ["0"]}, "must change password"),
    ({"userAccountControl": ["512"], "pwdLastSet": ["133000000000000000"]}, None),
    ({"userAccountControl": ["512"], "msDS-User-Account-Control-Computed": ["8388608"]},
     "password expired"),  # 0x800000
])
def test_account_state(attrs: dict[str, Any], reason: str | None) -> None:
    assert ad_rules.account_state_problem(attrs, 1_000_000) == reason


class _FakeConn:
    def __init__(self) -> None:
        self.unbound = False

    def unbind(self) -> None:
        self.unbound = True


def test_pool_bounds_and_idle_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(adl.time, "monotonic", lambda: now[0])
    p = adl._Pool(size=2, max_idle=60)
    assert p.get() is None
    a, b, c = _FakeConn(), _FakeConn(), _FakeConn()
    p.put(a)
    p.put(b)
    p.put(c)  # over the bound: closed, not kept
    assert c.unbound and len(p) == 2
    assert p.get() is b  # most recently used first
    p.put(b)
    now[0] += 61
    assert p.get() is None  # both idle too long: closed
    assert a.unbound and b.unbound and len(p) == 0
    d = _FakeConn()
    p.put(d)
    p.clear()
    assert d.unbound and p.get() is None


def test_stale_connection_detection() -> None:
    assert adl._stale(adl._DCFailure("closed: bind got no answer"))
    assert not adl._stale(adl._DCFailure("bind answered busy"))
    assert not adl._stale(OSError("timed out"))
    assert not adl._stale(TimeoutError())
    assert adl._stale(OSError("connection reset by peer"))


def test_group_search_base() -> None:
    assert adl._domain_dn("corp.example.test", "DC=corp,DC=example,DC=test") == \
        "DC=corp,DC=example,DC=test"
    assert adl._domain_dn("corp.example.test", "OU=People, DC=Corp,DC=example,DC=test") == \
        "DC=corp,DC=example,DC=test"
    assert adl._domain_dn("corp.example.test", "DC=other,DC=test") == "DC=other,DC=test"


async def test_lookup_refusals_need_no_dc(tmp_path: Path) -> None:
    d = ADDirectory(ADSettings.model_validate(_settings(tmp_path)))
    try:
        assert (await d.lookup("", None)).reason == "empty user name"
        assert (await d.lookup("a*", None)).reason == "invalid character in user name"
        assert (await d.lookup("alice", "EVIL")).reason == "untrusted domain"
        assert (await d.lookup("alice@evil.test", None)).reason == "untrusted domain"
    finally:
        d.close()


async def test_lookup_worker_exception_fails_closed(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    d = ADDirectory(ADSettings.model_validate(_settings(tmp_path)))

    def boom(*_a: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(d, "_login", boom)
    try:
        out = await d.lookup("alice", None)
        assert (out.principal, out.reason) == (None, "directory error: RuntimeError")
    finally:
        d.close()
