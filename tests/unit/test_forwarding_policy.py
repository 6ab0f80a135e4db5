"""The forwarding policy: inventory instances by id/name/address, grants, ports per OS/stack,
forbidden addresses (metadata, link-local, loopback, the bastion's own listeners)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.domain import forwarding as fwd
from broker.domain.models import Decision, Grant, GrantState, Instance, Level

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
GRANT = Grant("g-1", "alice", "corp", ("stack-a",), "vpc-1", Level.READ_ONLY, GrantState.APPROVED,
              NOW - timedelta(hours=1), NOW + timedelta(hours=1))
LINUX = Instance("i-0lin", "lin01", "stack-a", "vpc-1", "10.0.0.5", 22, "linux")
WIN = Instance("i-0win", "win01", "stack-a", "vpc-1", "10.0.0.6", 22, "windows")
WIN_LAB = Instance("i-0winlab", "winlab", "stack-a", "vpc-1", "127.0.0.1", 33389, "windows")
OTHER = Instance("i-0oth", "oth01", "stack-b", "vpc-1", "10.0.0.7", 22, "linux")
POLICY = fwd.PortPolicy()
OWN = frozenset({("127.0.0.1", 2222), ("10.0.0.1", 2222), ("10.0.0.5", 8443)})
OK = Decision(True, "granted", GRANT)
NO = Decision(False, "no grant covers this user, stack and VPC")


def by_name(inst: Instance, decision: Decision = OK, port: int = 3389,
            policy: fwd.PortPolicy = POLICY) -> fwd.Verdict:
    return fwd.decide(inst.name, port, named=(inst, decision), resolved=[], reachable=[],
                      policy=policy, own=OWN)


def by_address(host: str, port: int, resolved: list[str],
               reachable: list[tuple[Instance, Grant]]) -> fwd.Verdict:
    return fwd.decide(host, port, named=None, resolved=resolved, reachable=reachable,
                      policy=POLICY, own=OWN)


def test_windows_rdp_by_name() -> None:
    v = by_name(WIN)
    assert v.allowed
    assert (v.dial_host, v.dial_port, v.service, v.grant) == ("10.0.0.6", 3389, "rdp", GRANT)


def test_windows_inventory_port_is_its_rdp_port() -> None:
    v = by_name(WIN_LAB)
    assert (v.dial_host, v.dial_port) == ("127.0.0.1", 33389)


def test_linux_ssh_port_is_proxyjump_unless_raw_allowed() -> None:
    v = by_name(LINUX, port=22)
    assert v.allowed
    assert v.service == "ssh"
    raw = fwd.PortPolicy(raw_ssh_targets=frozenset({"lin01"}))
    assert by_name(LINUX, port=22, policy=raw).service == "ssh-raw"


def test_ungranted_and_unknown_look_the_same_to_the_user() -> None:
    v = by_name(OTHER, NO, port=22)
    assert not v.allowed
    assert v.reason == fwd.NO_GRANT
    assert "i-0oth" in v.detail
    u = by_address("nosuch", 22, [], [])
    assert u.reason == fwd.NO_GRANT


@pytest.mark.parametrize(("inst", "port"), [(WIN, 22), (LINUX, 3389), (LINUX, 8080), (WIN, 445)])
def test_ports_not_allowed_for_the_os(inst: Instance, port: int) -> None:
    v = by_name(inst, port=port)
    assert not v.allowed
    assert v.reason.startswith(f"port {port} is not open for forwarding to {inst.name}")


def test_stack_ports_replace_the_os_list() -> None:
    policy = fwd.PortPolicy(stack_ports={"stack-a": frozenset({5432})})
    assert by_name(LINUX, port=5432, policy=policy).allowed
    assert not by_name(LINUX, port=22, policy=policy).allowed
    assert by_name(OTHER, Decision(True, "granted", GRANT), port=22, policy=policy).allowed


@pytest.mark.parametrize(("addr", "reason"), [
    ("169.254.169.254", "metadata"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("fd00:ec2::254", "metadata"), ("::ffff:169.254.169.254", "metadata"),
    ("127.0.0.1", "bastion itself"), ("127.1.2.3", "bastion itself"), ("::1", "bastion itself"),
    ("0.0.0.0", "bastion itself"), ("224.0.0.1", "multicast"), ("255.255.255.255", "broadcast"),  # noqa: S104
])
def test_forbidden_addresses(addr: str, reason: str) -> None:
    v = by_address(addr, 3389, [addr], [(WIN, GRANT)])
    assert not v.allowed
    assert reason in v.reason


def test_address_of_a_granted_instance() -> None:
    v = by_address("10.0.0.6", 3389, ["10.0.0.6"], [(LINUX, GRANT), (WIN, GRANT)])
    assert v.allowed
    assert v.instance == WIN


def test_name_resolving_to_an_ungranted_address_is_refused() -> None:
    v = by_address("evil.example", 3389, ["10.0.0.6", "10.9.9.9"], [(WIN, GRANT)])
    assert not v.allowed
    assert "10.9.9.9" in v.detail
    ok = by_address("win.example", 3389, ["10.0.0.6"], [(WIN, GRANT)])
    assert ok.allowed
    assert ok.dial_host == "10.0.0.6"  # the checked address is dialled, not the name again


def test_name_resolving_to_metadata_is_refused() -> None:
    v = by_address("rebind.example", 80, ["169.254.169.254"], [(WIN, GRANT)])
    assert not v.allowed
    assert "metadata" in v.reason


def test_own_listeners_are_refused_even_for_an_instance() -> None:
    inst = Instance("i-0self", "self", "stack-a", "vpc-1", "10.0.0.1", 2222, "linux")
    v = by_name(inst, port=22)
    assert not v.allowed
    assert v.reason == "the bastion itself is not a forwarding destination"
    web = fwd.decide("lin01", 8443, named=(LINUX, OK), resolved=[], reachable=[],
                     policy=fwd.PortPolicy(stack_ports={"stack-a": frozenset({8443})}), own=OWN)
    assert not web.allowed


@pytest.mark.parametrize(("host", "port"), [("", 22), ("a b", 22), ("x" * 300, 22),
                                            ("lin01", 0), ("lin01", 70000), ("a\x00b", 22)])
def test_invalid_requests(host: str, port: int) -> None:
    v = fwd.decide(host, port, named=None, resolved=["10.0.0.5"], reachable=[(LINUX, GRANT)],
                   policy=POLICY, own=OWN)
    assert not v.allowed
    assert v.reason.startswith("not a valid destination")


def test_summary() -> None:
    v = by_name(WIN_LAB)
    assert fwd.summary("winlab", 3389, v) == "forward winlab:3389 -> i-0winlab 127.0.0.1:33389"
    assert fwd.summary("x", 1, fwd.Verdict(False, "r", "r")) == "forward x:1"


@pytest.mark.parametrize(("host", "dial"), [
    ("localhost", "localhost"), ("LOCALHOST", "localhost"), ("127.0.0.1", "127.0.0.1"),
    ("127.3.4.5", "127.3.4.5"), ("::1", "::1"), ("[::1]", "::1")])
def test_inside_a_jump_the_target_loopback_is_allowed(host: str, dial: str) -> None:
    v = fwd.decide_target_local(host, 8080, LINUX, OK, enabled=True)
    assert v.allowed
    assert (v.dial_host, v.dial_port, v.service, v.instance, v.grant) == (
        dial, 8080, "target-local", LINUX, GRANT)
    assert fwd.summary(host, 8080, v) == f"forward {host}:8080 -> i-0lin (from the target) {dial}:8080"


@pytest.mark.parametrize("host", ["10.0.0.5", "lin01", "i-0oth", "169.254.169.254", "0.0.0.0",  # noqa: S104
                                  "localhost.evil.example", "::ffff:10.0.0.7", ""])
def test_inside_a_jump_nothing_else_is_reachable(host: str) -> None:
    v = fwd.decide_target_local(host, 22, LINUX, OK, enabled=True)
    assert not v.allowed
    assert v.reason == fwd.TARGET_LOCAL_ONLY


def test_inside_a_jump_the_grant_and_the_switch_still_decide() -> None:
    assert fwd.decide_target_local("localhost", 80, LINUX, NO, enabled=True).reason == fwd.NO_GRANT
    off = fwd.decide_target_local("localhost", 80, LINUX, OK, enabled=False)
    assert not off.allowed
    assert "disabled" in off.reason
    assert not fwd.decide_target_local("localhost", 0, LINUX, OK, enabled=True).allowed


@pytest.mark.parametrize("port", [22, 2222])
def test_inside_a_jump_the_target_ssh_port_is_refused(port: int) -> None:
    inst = Instance("i-0lab", "lab01", "stack-a", "vpc-1", "127.0.0.1", 2222, "linux")
    v = fwd.decide_target_local("localhost", port, inst, OK, enabled=True)
    assert not v.allowed
    assert v.reason == fwd.TARGET_SSH_PORT


def test_inside_a_jump_a_windows_target_has_no_ssh_to_forward_from() -> None:
    v = fwd.decide_target_local("localhost", 8080, WIN, OK, enabled=True)
    assert not v.allowed
    assert "Linux" in v.reason
