"""AwsInventory against moto: CloudFormation and tag discovery, cache, single-flight, fail-closed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from broker.inventory.aws import AwsInventory
from tests.aws.conftest import LINUX_AMI, FakeClock, Lab, MotoServer, assert_loopback, start_moto

pytestmark = pytest.mark.aws

CFN_TAG = "aws:cloudformation:stack-name"
HOST_KEY = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
HOST_CA = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


@dataclass
class World:
    """Two stacks in two VPCs, as an AMS account would hold them."""

    vpc1: str
    sub1: str
    vpc2: str
    sub2: str
    web_stack: str
    web_stack_arn: str
    web: dict[str, str]
    db_stack: str
    db: dict[str, str]
    loose: str  # an instance in VPC 1 that belongs to no stack


@pytest.fixture(scope="module")
def world(lab: Lab) -> World:
    vpc1, sub1 = lab.vpc("10.11.0.0/16")
    vpc2, sub2 = lab.vpc("10.12.0.0/16")
    web_stack, web_arn, web = lab.stack(sub1, {
        "Web": {"name": "Web01", "tags": {"bastion:host-key": HOST_KEY,
                                           "bastion:admin-login": "ec2-user",
                                           "bastion:read-only-login": "viewer"}},
        "Win": {"name": "win01", "os": "windows"},
        "Stopped": {"name": "stopped01"},
        "Gone": {"name": "gone01"},
        "NoName": {},
    }, asg_size=2)
    db_stack, _, db = lab.stack(sub2, {"Db": {"name": "db01"}})
    lab.ec2.stop_instances(InstanceIds=[web["Stopped"]])
    lab.ec2.terminate_instances(InstanceIds=[web["Gone"]])
    loose = lab.run(sub1, name="loose01")
    return World(vpc1, sub1, vpc2, sub2, web_stack, web_arn, web, db_stack, db, loose)


@pytest.fixture
def inv(lab: Lab, world: World) -> AwsInventory:
    return AwsInventory(lab.settings(
        stacks=[world.web_stack, world.db_stack], host_ca_keys=[HOST_CA],
        host_key_tag="bastion:host-key", admin_login_tag="bastion:admin-login",
        read_only_login_tag="bastion:read-only-login"))


async def test_resolve_by_id_and_name_case_insensitive(inv: AwsInventory, world: World) -> None:
    web_id = world.web["Web"]
    for key in (web_id, web_id.upper(), "Web01", "web01", "WEB01", " web01 "):
        got = await inv.resolve(key)
        assert got is not None and got.id == web_id, key
    assert (await inv.resolve("db01")) is not None
    assert await inv.resolve("nosuchhost") is None
    assert inv.refreshes == 1  # all of the above from one snapshot


async def test_stack_vpc_address_port(inv: AwsInventory, world: World, lab: Lab) -> None:
    web = await inv.resolve("web01")
    db = await inv.resolve("db01")
    assert web is not None and db is not None
    assert web.stack_id == world.web_stack  # the stack name, not the ARN
    assert web.stack_id.startswith("stack-")
    assert db.stack_id == world.db_stack
    assert web.vpc_id == world.vpc1 and db.vpc_id == world.vpc2
    assert web.address == lab.private_ip(web.id) and web.address.startswith("10.11.")
    assert (web.os, web.port) == ("linux", 22)


async def test_windows_gets_rdp_port(inv: AwsInventory) -> None:
    win = await inv.resolve("WIN01")
    assert win is not None
    assert (win.os, win.port) == ("windows", 3389)


async def test_trust_and_logins_from_settings_and_tags(inv: AwsInventory) -> None:
    web = await inv.resolve("web01")
    win = await inv.resolve("win01")
    assert web is not None and win is not None
    assert web.host_keys == (HOST_KEY,)
    assert web.host_ca_keys == (HOST_CA,) and win.host_ca_keys == (HOST_CA,)
    assert (web.admin_login, web.read_only_login) == ("ec2-user", "viewer")
    assert win.host_keys == () and win.admin_login is None and win.read_only_login is None


async def test_stopped_terminated_and_unstacked_instances_are_not_targets(
    inv: AwsInventory, world: World
) -> None:
    ids = {i.id for i in await inv.instances()}
    for key in ("stopped01", "gone01", "loose01", world.web["Stopped"], world.web["Gone"],
                world.loose):
        assert await inv.resolve(key) is None, key
    assert world.web["Stopped"] not in ids and world.web["Gone"] not in ids
    assert world.loose not in ids


async def test_auto_scaling_group_instances(inv: AwsInventory, lab: Lab, world: World) -> None:
    tags = lab.ec2.describe_instances(Filters=[
        {"Name": "tag:aws:autoscaling:groupName", "Values": [world.web["Fleet"]]}])
    fleet = {i["InstanceId"] for r in tags["Reservations"] for i in r["Instances"]}
    assert len(fleet) == 2
    listed = {i.id: i for i in await inv.instances()}
    for iid in fleet:
        assert listed[iid].stack_id == world.web_stack
        assert listed[iid].name == iid  # no Name tag: the id is the name
    expected = {world.web["Web"], world.web["Win"], world.web["NoName"], world.db["Db"], *fleet}
    assert set(listed) == expected

    no_asg = AwsInventory(lab.settings(stacks=[world.web_stack], auto_scaling=False))
    assert {i.id for i in await no_asg.instances()} == {
        world.web["Web"], world.web["Win"], world.web["NoName"]}


async def test_stack_by_arn_still_reports_the_name(lab: Lab, world: World) -> None:
    inv = AwsInventory(lab.settings(stacks=[world.web_stack_arn]))
    web = await inv.resolve("web01")
    assert web is not None and web.stack_id == world.web_stack


async def test_vpc_filter(lab: Lab, world: World) -> None:
    inv = AwsInventory(lab.settings(stacks=[world.web_stack, world.db_stack], vpc_ids=[world.vpc2]))
    assert {i.id for i in await inv.instances()} == {world.db["Db"]}
    assert await inv.resolve("web01") is None


async def test_missing_stack_is_skipped_not_fatal(lab: Lab, world: World) -> None:
    inv = AwsInventory(lab.settings(stacks=["stack-doesnotexist0000", world.db_stack]))
    db = await inv.resolve("db01")
    assert db is not None and inv.last_error is None


async def test_tag_discovery(lab: Lab, world: World) -> None:
    """The same stacks found through the reserved CloudFormation tag, no CloudFormation calls."""
    inv = AwsInventory(lab.settings(stack_tag_key=CFN_TAG, stacks=[world.web_stack]))
    listed = {i.id: i for i in await inv.instances()}
    # moto does not copy the stack tags onto Auto Scaling instances; AWS does
    assert {world.web["Web"], world.web["Win"], world.web["NoName"]} <= set(listed)
    assert world.db["Db"] not in listed and world.loose not in listed
    assert all(i.stack_id == world.web_stack and i.vpc_id == world.vpc1 for i in listed.values())
    win = await inv.resolve("win01")
    assert win is not None and win.port == 3389


async def test_tag_discovery_without_stack_list(lab: Lab) -> None:
    """A custom stack tag, every value accepted: instances made outside CloudFormation."""
    key = f"bastion:stack-{uuid.uuid4().hex[:8]}"
    vpc, sub = lab.vpc("10.13.0.0/16")
    a = lab.run(sub, name="tagged-a", tags={key: "stack-aaaa"})
    b = lab.run(sub, name="tagged-b", os_="windows", tags={key: "stack-bbbb"})
    lab.run(sub, name="untagged")
    inv = AwsInventory(lab.settings(stack_tag_key=key))
    listed = {i.id: i for i in await inv.instances()}
    assert set(listed) == {a, b}
    assert listed[a].stack_id == "stack-aaaa" and listed[b].stack_id == "stack-bbbb"
    assert listed[b].port == 3389 and listed[a].vpc_id == vpc


async def test_stack_id_tag_overrides(lab: Lab) -> None:
    _, sub = lab.vpc("10.14.0.0/16")
    name, _, ids = lab.stack(sub, {"A": {"name": "plain"},
                                   "B": {"name": "tagged", "tags": {"ams:stack-id": "stack-cafe"}}})
    inv = AwsInventory(lab.settings(stacks=[name], stack_id_tag="ams:stack-id"))
    plain, tagged = await inv.resolve("plain"), await inv.resolve(ids["B"])
    assert plain is not None and tagged is not None
    assert plain.stack_id == name and tagged.stack_id == "stack-cafe"


async def test_ambiguous_names_resolve_to_nothing(lab: Lab) -> None:
    _, sub = lab.vpc("10.15.0.0/16")
    name, _, ids = lab.stack(sub, {"A": {"name": "twin"}, "B": {"name": "TWIN"},
                                   "C": {"name": "single"}})
    inv = AwsInventory(lab.settings(stacks=[name]))
    assert await inv.resolve("twin") is None
    assert await inv.resolve("Twin") is None
    a, b = await inv.resolve(ids["A"]), await inv.resolve(ids["B"])
    assert a is not None and a.name == "twin" and b is not None and b.name == "TWIN"
    assert await inv.resolve("single") is not None
    assert len(await inv.instances()) == 3


async def test_new_instance_appears_only_after_ttl(lab: Lab, clock: FakeClock) -> None:
    _, sub = lab.vpc("10.16.0.0/16")
    name, _, _ = lab.stack(sub, {"A": {"name": "first"}})
    inv = AwsInventory(lab.settings(stacks=[name], cache_ttl_seconds=60), clock=clock)
    assert await inv.resolve("first") is not None

    tpl = {"Resources": {
        logical: {"Type": "AWS::EC2::Instance", "Properties": {
            "ImageId": LINUX_AMI, "InstanceType": "t3.micro", "SubnetId": sub,
            "Tags": [{"Key": "Name", "Value": n}]}}
        for logical, n in (("A", "first"), ("B", "second"))}}
    lab.cfn.update_stack(StackName=name, TemplateBody=json.dumps(tpl))

    clock.advance(59)
    assert await inv.resolve("second") is None
    assert inv.refreshes == 1
    clock.advance(1.5)
    second = await inv.resolve("second")
    assert second is not None and second.stack_id == name
    assert inv.refreshes == 2


async def test_single_flight(lab: Lab, world: World, clock: FakeClock) -> None:
    inv = AwsInventory(lab.settings(stacks=[world.web_stack, world.db_stack]), clock=clock)
    results = await asyncio.gather(*(inv.resolve("web01") for _ in range(10)))
    assert all(r is not None and r.id == world.web["Web"] for r in results)
    assert inv.refreshes == 1
    clock.advance(61)  # expired: the next burst again shares one refresh
    again = await asyncio.gather(*(inv.resolve(world.db["Db"]) for _ in range(10)),
                                 *(inv.instances() for _ in range(5)))
    assert all(again)
    assert inv.refreshes == 2


@pytest.fixture
def own_moto(fake_aws_env: None, tmp_path: Path) -> Iterator[MotoServer]:
    """A private moto server this test may stop."""
    server = start_moto(tmp_path)
    assert_loopback(server.url)
    try:
        yield server
    finally:
        server.stop()


async def test_endpoint_down_serves_stale_then_fails_closed(
    own_moto: MotoServer, clock: FakeClock
) -> None:
    lab = Lab(own_moto.url)
    _, sub = lab.vpc("10.20.0.0/16")
    name, _, ids = lab.stack(sub, {"A": {"name": "app01"}})
    inv = AwsInventory(lab.settings(stacks=[name], cache_ttl_seconds=60,
                                    connect_timeout_seconds=1), clock=clock)
    app = await inv.resolve("app01")
    assert app is not None

    own_moto.stop()
    clock.advance(61)
    assert await inv.resolve("app01") == app  # AWS down: the last good snapshot, still in limit
    assert (inv.refreshes, inv.failures) == (2, 1) and inv.last_error is not None
    assert "connect" in inv.last_error.lower()
    clock.advance(1)  # within the retry interval (15 s): no new attempt, no waiting
    assert await inv.resolve(ids["A"]) == app
    assert inv.refreshes == 2

    clock.advance(600 - 62 - 1)  # 599 s old: still served
    assert await inv.resolve("app01") == app
    assert inv.refreshes == 3
    clock.advance(2)  # 601 s old: past 10 x TTL, fail closed
    assert await inv.resolve("app01") is None
    assert await inv.resolve(ids["A"]) is None
    assert await inv.instances() == []


async def test_unreachable_from_the_start_fails_closed(lab: Lab, clock: FakeClock) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    inv = AwsInventory(lab.settings(endpoint_url=url, stacks=["stack-x"],
                                    connect_timeout_seconds=1), clock=clock)
    assert await inv.resolve("anything") is None
    assert await inv.instances() == []
    assert inv.last_error is not None
