"""Pure parts of the AWS inventory: EC2 shapes -> Instance, name index, settings, cache rules.

No emulator: AWS calls are replaced by fakes, time by a hand-moved clock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import asyncssh
import pytest
from pydantic import ValidationError

from broker.domain.models import Instance
from broker.inventory import aws as aws_mod
from broker.inventory.aws import (
    AwsInventory,
    AwsInventorySettings,
    _Clients,
    ambiguous_names,
    build_index,
    host_keys_from_tag,
    instance_from_ec2,
    instances_from_page,
    stack_name_of,
    tags_of,
)

KEY = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
KEY2 = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
CA = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def settings(**kw: Any) -> AwsInventorySettings:
    kw.setdefault("stacks", ["stack-0a1b2c3d"])
    return AwsInventorySettings(region="eu-west-1", **kw)


def raw(iid: str = "i-0abc", *, name: str | None = "web01", state: str = "running",
        vpc: str | None = "vpc-1", ip: str | None = "10.0.0.5", platform: str | None = None,
        tags: dict[str, str] | None = None) -> dict[str, Any]:
    t = dict(tags or {})
    if name is not None:
        t["Name"] = name
    r: dict[str, Any] = {"InstanceId": iid, "State": {"Code": 16, "Name": state},
                         "PublicIpAddress": "203.0.113.9",
                         "Tags": [{"Key": k, "Value": v} for k, v in t.items()]}
    if vpc is not None:
        r["VpcId"] = vpc
    if ip is not None:
        r["PrivateIpAddress"] = ip
    if platform is not None:
        r["Platform"] = platform
    return r


def inst(iid: str, name: str) -> Instance:
    return Instance(id=iid, name=name, stack_id="s", vpc_id="v", address="10.0.0.1")


# ---------------------------------------------------------------------------------------------
# mapping


def test_linux_instance_mapping() -> None:
    got = instance_from_ec2(raw(), "stack-0a1b2c3d", settings(host_ca_keys=[CA]))
    assert got == Instance(id="i-0abc", name="web01", stack_id="stack-0a1b2c3d", vpc_id="vpc-1",
                           address="10.0.0.5", port=22, os="linux", host_ca_keys=(CA,))


@pytest.mark.parametrize("platform", ["windows", "Windows"])
def test_windows_instance_gets_rdp_port(platform: str) -> None:
    got = instance_from_ec2(raw(platform=platform), "s", settings(port_windows=13389))
    assert got is not None and (got.os, got.port) == ("windows", 13389)


def test_moto_style_linux_platform_is_linux() -> None:
    got = instance_from_ec2(raw(platform="Linux/UNIX"), "s", settings(port_linux=2222))
    assert got is not None and (got.os, got.port) == ("linux", 2222)


@pytest.mark.parametrize("state", ["stopped", "stopping", "terminated", "shutting-down", ""])
def test_only_live_instances(state: str) -> None:
    assert instance_from_ec2(raw(state=state), "s", settings()) is None


def test_pending_is_live() -> None:
    assert instance_from_ec2(raw(state="pending"), "s", settings()) is not None


def test_never_without_vpc_or_private_ip() -> None:
    assert instance_from_ec2(raw(vpc=None), "s", settings()) is None
    assert instance_from_ec2(raw(ip=None), "s", settings()) is None  # never the public IP


def test_vpc_filter() -> None:
    assert instance_from_ec2(raw(vpc="vpc-2"), "s", settings(vpc_ids=["vpc-1"])) is None
    assert instance_from_ec2(raw(vpc="vpc-1"), "s", settings(vpc_ids=["vpc-1"])) is not None


@pytest.mark.parametrize(("tag", "expected"), [
    (None, "i-0abc"), ("", "i-0abc"), ("web 01", "i-0abc"), ("a+b", "i-0abc"),
    ("db01.prod", "db01.prod"), ("  Web01 ", "Web01"),
])
def test_name_from_tag_or_id(tag: str | None, expected: str) -> None:
    got = instance_from_ec2(raw(name=tag), "s", settings())
    assert got is not None and got.name == expected


def test_custom_name_tag() -> None:
    got = instance_from_ec2(raw(tags={"Hostname": "h1"}), "s", settings(name_tag="Hostname"))
    assert got is not None and got.name == "h1"


def test_host_keys_and_logins_from_tags() -> None:
    s = settings(host_key_tag="bastion:host-key", admin_login_tag="adm", read_only_login_tag="ro")
    got = instance_from_ec2(
        raw(tags={"bastion:host-key": f"{KEY}, not-a-key ,{KEY2}", "adm": "root", "ro": "a b"}),
        "s", s)
    assert got is not None
    assert got.host_keys == (KEY, KEY2)  # the bad one is dropped, not passed upstream
    assert got.admin_login == "root" and got.read_only_login is None  # invalid login ignored


def test_tags_ignored_unless_configured() -> None:
    got = instance_from_ec2(raw(tags={"bastion:host-key": KEY, "ams:stack": "x"}), "s", settings())
    assert got is not None and got.host_keys == () and got.stack_id == "s"


def test_stack_id_tag_override() -> None:
    s = settings(stack_id_tag="ams:stack")
    got = instance_from_ec2(raw(tags={"ams:stack": "stack-beef"}), "stack-name", s)
    assert got is not None and got.stack_id == "stack-beef"
    got = instance_from_ec2(raw(tags={"ams:stack": "  "}), "stack-name", s)
    assert got is not None and got.stack_id == "stack-name"


def test_host_keys_from_tag() -> None:
    assert host_keys_from_tag(None) == ()
    assert host_keys_from_tag(f" {KEY} ") == (KEY,)
    assert host_keys_from_tag("ssh-ed25519 AAAAgarbage") == ()


def test_stack_name_of() -> None:
    arn = "arn:aws:cloudformation:eu-west-1:123456789012:stack/stack-0a1b2c/9ab52ad7-b6f1"
    assert stack_name_of(arn) == "stack-0a1b2c"
    assert stack_name_of("stack-0a1b2c") == "stack-0a1b2c"
    assert stack_name_of("arn:weird") == "arn:weird"


def test_tags_of() -> None:
    assert tags_of({"Tags": [{"Key": "a", "Value": "1"}, {"Key": "b"}]}) == {"a": "1", "b": ""}
    assert tags_of({}) == {}


def test_instances_from_page() -> None:
    page = {"Reservations": [
        {"Instances": [raw("i-1"), raw("i-2", state="stopped")]},
        {"Instances": [raw("i-3", name="other"), raw("i-4", name="x")]},
    ]}
    stacks = {"i-1": "stack-a", "i-2": "stack-a", "i-3": "stack-b"}  # i-4 in no stack
    got = instances_from_page(page, lambda r: stacks.get(r["InstanceId"]), settings())
    assert [(i.id, i.stack_id) for i in got] == [("i-1", "stack-a"), ("i-3", "stack-b")]
    assert instances_from_page({}, lambda r: "s", settings()) == []


# ---------------------------------------------------------------------------------------------
# index


def test_index_by_id_and_unique_name() -> None:
    a, b = inst("i-1", "Web01"), inst("i-2", "db01")
    idx = build_index([a, b])
    assert idx["i-1"] is a and idx["web01"] is a and idx["db01"] is b


def test_shared_name_is_ambiguous_ids_still_work() -> None:
    a, b, c = inst("i-1", "twin"), inst("i-2", "TWIN"), inst("i-3", "solo")
    idx = build_index([a, b, c])
    assert "twin" not in idx
    assert idx["i-1"] is a and idx["i-2"] is b and idx["solo"] is c
    assert ambiguous_names([a, b, c]) == ["twin"]


def test_name_equal_to_another_id_never_shadows_it() -> None:
    a, b = inst("i-1", "i-1"), inst("i-2", "I-1")
    idx = build_index([a, b])
    assert idx["i-1"] is a and idx["i-2"] is b
    assert ambiguous_names([inst("i-1", "i-1"), inst("i-2", "i-2")]) == []


# ---------------------------------------------------------------------------------------------
# settings


def test_settings_defaults_and_frozen() -> None:
    s = settings()
    assert (s.cache_ttl_seconds, s.port_linux, s.port_windows, s.name_tag) == (60, 22, 3389, "Name")
    assert s.stale_limit_seconds == 600 and s.retry_interval_seconds == 15
    with pytest.raises(ValidationError):
        s.region = "us-east-1"


@pytest.mark.parametrize("bad", [
    {"aws_access_key_id": "AKIA"}, {"aws_secret_access_key": "x"}, {"profile": "p"},
    {"region": "Europe"}, {"endpoint_url": "ftp://x"}, {"endpoint_url": "http://u:p@127.0.0.1:1"},
    {"stacks": []}, {"stacks": [" "]}, {"host_ca_keys": ["not a key"]},
    {"cache_ttl_seconds": 0}, {"port_windows": 0}, {"max_attempts": 0},
])
def test_settings_rejects(bad: dict[str, Any]) -> None:
    kw: dict[str, Any] = {"region": "eu-west-1", "stacks": ["stack-1"], **bad}
    with pytest.raises(ValidationError):
        AwsInventorySettings(**kw)


def test_tag_mode_needs_no_stack_list() -> None:
    s = AwsInventorySettings(region="us-gov-west-1", stack_tag_key="aws:cloudformation:stack-name")
    assert s.stacks == []


# ---------------------------------------------------------------------------------------------
# CloudFormation traversal with fake clients


class _Pager:
    def __init__(self, pages: Any) -> None:
        self._pages = pages
        self.calls: list[dict[str, Any]] = []

    def paginate(self, **kw: Any) -> Iterator[dict[str, Any]]:
        self.calls.append(kw)
        yield from self._pages(**kw)


class FakeCfn:
    def __init__(self, stacks: dict[str, list[tuple[str, str, str]]]) -> None:
        self.stacks = stacks  # name -> [(type, physical id, status)], two per page

    def get_paginator(self, op: str) -> _Pager:
        assert op == "list_stack_resources"

        def pages(StackName: str) -> Iterator[dict[str, Any]]:
            from botocore.exceptions import ClientError

            name = stack_name_of(StackName)
            if name not in self.stacks:
                raise ClientError({"Error": {"Code": "ValidationError",
                                             "Message": f"Stack with id {name} does not exist"}},
                                  "ListStackResources")
            rs = self.stacks[name]
            for i in range(0, len(rs), 2):
                yield {"StackResourceSummaries": [
                    {"ResourceType": t, "PhysicalResourceId": p, "ResourceStatus": st}
                    for t, p, st in rs[i:i + 2]]}
        return _Pager(pages)


class FakeAsg:
    def __init__(self, groups: dict[str, list[str]]) -> None:
        self.groups = groups

    def get_paginator(self, op: str) -> _Pager:
        def pages(AutoScalingGroupNames: list[str]) -> Iterator[dict[str, Any]]:
            yield {"AutoScalingGroups": [
                {"Instances": [{"InstanceId": i} for i in self.groups[g]]}
                for g in AutoScalingGroupNames]}
        return _Pager(pages)


class FakeEc2:
    def __init__(self, known: dict[str, dict[str, Any]]) -> None:
        self.known = known
        self.pager = _Pager(self._pages)

    def _pages(self, Filters: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        ids = next(f["Values"] for f in Filters if f["Name"] == "instance-id")
        assert len(ids) <= aws_mod.FILTER_BATCH
        yield {"Reservations": [{"Instances": [self.known[i] for i in ids if i in self.known]}]}

    def get_paginator(self, op: str) -> _Pager:
        assert op == "describe_instances"
        return self.pager


EC2 = "AWS::EC2::Instance"
ASG = "AWS::AutoScaling::AutoScalingGroup"
NESTED = "AWS::CloudFormation::Stack"


def test_stack_traversal_nested_asg_deleted_missing() -> None:
    cfn = FakeCfn({
        "stack-top": [(EC2, "i-1", "CREATE_COMPLETE"), (ASG, "fleet", "CREATE_COMPLETE"),
                      (EC2, "i-old", "DELETE_COMPLETE"), (EC2, "", "CREATE_FAILED"),
                      (NESTED, "arn:aws:cloudformation:eu-west-1:1:stack/stack-child/uuid",
                       "CREATE_COMPLETE"),
                      ("AWS::S3::Bucket", "bucket", "CREATE_COMPLETE")],
        "stack-child": [(EC2, "i-nested", "UPDATE_COMPLETE")],
        "stack-other": [(EC2, "i-9", "CREATE_COMPLETE"), (EC2, "i-gone", "CREATE_COMPLETE")],
    })
    ec2 = FakeEc2({i: raw(i, name=i) for i in ("i-1", "i-a", "i-b", "i-nested", "i-9", "i-old")})
    inv = AwsInventory(settings(stacks=["stack-top", "stack-missing", "stack-other"]))
    got = inv._fetch_by_stacks(_Clients(ec2, cfn, FakeAsg({"fleet": ["i-a", "i-b"]})))
    assert {(i.id, i.stack_id) for i in got} == {
        ("i-1", "stack-top"), ("i-a", "stack-top"), ("i-b", "stack-top"),
        ("i-nested", "stack-top"), ("i-9", "stack-other")}
    # stack-other's i-gone is unknown to EC2: filtered, so the rest of its batch still counts


def test_instance_claimed_by_two_stacks_is_dropped() -> None:
    cfn = FakeCfn({"a": [(EC2, "i-1", "CREATE_COMPLETE"), (EC2, "i-2", "CREATE_COMPLETE")],
                   "b": [(EC2, "i-2", "CREATE_COMPLETE")]})
    ec2 = FakeEc2({i: raw(i, name=i) for i in ("i-1", "i-2")})
    got = AwsInventory(settings(stacks=["a", "b"]))._fetch_by_stacks(_Clients(ec2, cfn, None))
    assert [i.id for i in got] == ["i-1"]


def test_instance_ids_are_batched() -> None:
    ids = [f"i-{n:05d}" for n in range(450)]
    cfn = FakeCfn({"big": [(EC2, i, "CREATE_COMPLETE") for i in ids]})
    ec2 = FakeEc2({i: raw(i, name=None) for i in ids})
    got = AwsInventory(settings(stacks=["big"]))._fetch_by_stacks(_Clients(ec2, cfn, None))
    assert len(got) == 450
    sizes = [len(next(f["Values"] for f in c["Filters"] if f["Name"] == "instance-id"))
             for c in ec2.pager.calls]
    assert sizes == [200, 200, 50]
    states = next(f["Values"] for f in ec2.pager.calls[0]["Filters"]
                  if f["Name"] == "instance-state-name")
    assert set(states) == {"pending", "running"}


# ---------------------------------------------------------------------------------------------
# cache: TTL, single-flight, stale-while-error, fail closed (fetch replaced)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeFetch:
    """Stands in for the blocking AWS fetch; runs in the worker thread like the real one."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail: Exception | None = None
        self.items = [inst("i-1", "web01")]
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self) -> list[Instance]:
        self.calls += 1
        assert self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        return list(self.items)


@pytest.fixture
def cached(monkeypatch: pytest.MonkeyPatch) -> tuple[AwsInventory, FakeFetch, Clock]:
    clock = Clock()
    inv = AwsInventory(settings(cache_ttl_seconds=60, refresh_timeout_seconds=1), clock=clock)
    fetch = FakeFetch()
    monkeypatch.setattr(inv, "_fetch", fetch)
    return inv, fetch, clock


async def test_ttl(cached: tuple[AwsInventory, FakeFetch, Clock]) -> None:
    inv, fetch, clock = cached
    assert await inv.resolve("WEB01") is not None
    fetch.items.append(inst("i-2", "db01"))
    clock.t += 59.9
    assert await inv.resolve("db01") is None and fetch.calls == 1
    clock.t += 0.1
    assert await inv.resolve("db01") is not None and fetch.calls == 2


async def test_single_flight_while_fetch_is_slow(
    cached: tuple[AwsInventory, FakeFetch, Clock]
) -> None:
    inv, fetch, _ = cached
    fetch.gate.clear()
    tasks = [asyncio.create_task(inv.resolve("web01")) for _ in range(10)]
    await asyncio.sleep(0.05)
    fetch.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r is not None for r in results)
    assert fetch.calls == 1 and inv.refreshes == 1


async def test_stale_while_error_backoff_then_fail_closed(
    cached: tuple[AwsInventory, FakeFetch, Clock]
) -> None:
    inv, fetch, clock = cached
    good = await inv.resolve("web01")
    fetch.fail = ConnectionError("endpoint down")
    clock.t += 61
    assert await inv.resolve("web01") == good and fetch.calls == 2
    assert inv.last_error == "ConnectionError: endpoint down"
    clock.t += 14  # inside the retry interval: served without asking AWS
    assert await inv.resolve("web01") == good and fetch.calls == 2
    clock.t += 1
    assert await inv.resolve("web01") == good and fetch.calls == 3
    clock.t += 600 - 76
    assert await inv.resolve("web01") is None
    assert await inv.instances() == []
    fetch.fail = None  # AWS back: served again
    clock.t += 15
    assert await inv.resolve("web01") == good and inv.last_error is None


async def test_cold_start_failure_fails_closed(cached: tuple[AwsInventory, FakeFetch, Clock]) -> None:
    inv, fetch, clock = cached
    fetch.fail = RuntimeError("no credentials")
    assert await inv.resolve("web01") is None
    assert await inv.resolve("i-1") is None and fetch.calls == 1  # backoff: no retry storm
    clock.t += 15
    fetch.fail = None
    assert await inv.resolve("i-1") is not None


async def test_hung_refresh_times_out_and_is_joined_not_duplicated(
    cached: tuple[AwsInventory, FakeFetch, Clock]
) -> None:
    inv, fetch, clock = cached
    assert await inv.resolve("web01") is not None
    fetch.gate.clear()
    clock.t += 61
    stale = await inv.resolve("web01")  # waits refresh_timeout (1 s), then the stale snapshot
    assert stale is not None
    assert await inv.resolve("web01") is not None
    assert fetch.calls == 2  # the second caller joined the hung refresh
    fetch.gate.set()
    await asyncio.sleep(0.1)
    assert await inv.refresh()
    assert fetch.calls == 3


def test_throttled_stack_listing_fails_the_refresh() -> None:
    """Only a missing stack is skipped; any other error must keep the old snapshot instead."""
    from botocore.exceptions import ClientError

    class Throttled(FakeCfn):
        def get_paginator(self, op: str) -> _Pager:
            def pages(StackName: str) -> Iterator[dict[str, Any]]:
                raise ClientError({"Error": {"Code": "Throttling", "Message": "Rate exceeded"}},
                                  "ListStackResources")
                yield {}
            return _Pager(pages)

    inv = AwsInventory(settings(stacks=["a"]))
    with pytest.raises(ClientError):
        inv._fetch_by_stacks(_Clients(FakeEc2({}), Throttled({}), None))
