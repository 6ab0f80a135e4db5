"""A moto server (AWS emulator) on loopback for the AWS inventory tests; never real AWS.

Fake credentials and a loopback endpoint are forced for the whole session, and shared config
files and the instance-metadata service are switched off, so nothing can reach AWS by accident.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest

from broker.inventory.aws import AwsInventorySettings
from tests.s3.proxy import TcpProxy

REGION = "eu-west-1"
LINUX_AMI = "ami-760aaa0f"    # moto's Amazon Linux image: no Platform
WINDOWS_AMI = "ami-12c6146b"  # moto's Windows Server image: Platform "windows"
MOTO_SERVER = Path(sys.executable).parent / "moto_server"
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    assert host == "127.0.0.1", f"tests must only talk to a local emulator, not {url}"


@dataclass
class MotoServer:
    """One ``moto_server`` subprocess; ``stop`` makes the endpoint refuse connections."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_moto(log_dir: Path) -> MotoServer:
    """Start ``moto_server`` on a free loopback port and wait until it answers."""
    last = ""
    for _ in range(5):  # the free port may be taken between probing and binding
        port = _free_port()
        log = log_dir / f"moto-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return MotoServer(proc, port, log)
            except OSError:
                time.sleep(0.05)
        last = log.read_text(errors="replace")[-2000:]
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise RuntimeError(f"moto_server did not start: {last}")


@pytest.fixture(scope="session")
def fake_aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ROLE_ARN",
                  "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                  "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
            mp.delenv(k, raising=False)
        for k, v in FAKE_ENV.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="session")
def moto(fake_aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    assert MOTO_SERVER.exists(), f"{MOTO_SERVER} missing: run scripts/bootstrap"
    server = start_moto(tmp_path_factory.mktemp("moto"))
    assert_loopback(server.url)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[TcpProxy]:
    """A loopback TCP proxy in front of moto that a test can stop, hang or cut."""
    p = TcpProxy(moto.port)
    p.start()
    try:
        yield p
    finally:
        p.stop()


@dataclass
class Lab:
    """boto3 clients on the emulator plus helpers that build stacks the way AMS does."""

    url: str

    def __post_init__(self) -> None:
        assert_loopback(self.url)
        self.ec2: Any = boto3.client("ec2", endpoint_url=self.url, region_name=REGION)
        self.cfn: Any = boto3.client("cloudformation", endpoint_url=self.url, region_name=REGION)

    def settings(self, **kw: Any) -> AwsInventorySettings:
        kw.setdefault("endpoint_url", self.url)
        assert_loopback(kw["endpoint_url"])
        kw.setdefault("max_attempts", 1)
        kw.setdefault("connect_timeout_seconds", 2)
        kw.setdefault("read_timeout_seconds", 10)
        return AwsInventorySettings(region=REGION, **kw)

    def vpc(self, cidr: str) -> tuple[str, str]:
        """A new VPC with one subnet: (vpc id, subnet id)."""
        vpc = self.ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
        net = cidr.rsplit(".", 2)[0]
        sub = self.ec2.create_subnet(VpcId=vpc, CidrBlock=f"{net}.1.0/24")["Subnet"]["SubnetId"]
        return vpc, sub

    def stack(self, subnet: str, instances: dict[str, dict[str, Any]], *,
              asg_size: int = 0, name: str | None = None) -> tuple[str, str, dict[str, str]]:
        """A CloudFormation stack of instances (logical id -> {name, os, tags}) and optionally an
        Auto Scaling group: (stack name, StackId ARN, logical id -> instance id)."""
        name = name or f"stack-{uuid.uuid4().hex[:17]}"
        res: dict[str, Any] = {}
        for logical, spec in instances.items():
            tags = [{"Key": k, "Value": v} for k, v in spec.get("tags", {}).items()]
            if "name" in spec:
                tags.append({"Key": "Name", "Value": spec["name"]})
            res[logical] = {"Type": "AWS::EC2::Instance", "Properties": {
                "ImageId": WINDOWS_AMI if spec.get("os") == "windows" else LINUX_AMI,
                "InstanceType": "t3.micro", "SubnetId": subnet, "Tags": tags}}
        if asg_size:
            res["LT"] = {"Type": "AWS::EC2::LaunchTemplate", "Properties": {
                "LaunchTemplateData": {"ImageId": LINUX_AMI, "InstanceType": "t3.micro"}}}
            res["Fleet"] = {"Type": "AWS::AutoScaling::AutoScalingGroup", "Properties": {
                "MinSize": str(asg_size), "MaxSize": str(asg_size),
                "DesiredCapacity": str(asg_size), "VPCZoneIdentifier": [subnet],
                "LaunchTemplate": {"LaunchTemplateId": {"Ref": "LT"},
                                   "Version": {"Fn::GetAtt": ["LT", "LatestVersionNumber"]}}}}
        stack_id = self.cfn.create_stack(
            StackName=name, TemplateBody=json.dumps({"Resources": res}))["StackId"]
        ids: dict[str, str] = {}
        for page in self.cfn.get_paginator("list_stack_resources").paginate(StackName=name):
            for r in page["StackResourceSummaries"]:
                ids[r["LogicalResourceId"]] = r["PhysicalResourceId"]
        return name, stack_id, ids

    def run(self, subnet: str, *, name: str | None = None, os_: str = "linux",
            tags: dict[str, str] | None = None) -> str:
        """An instance made outside CloudFormation (for the tag-discovery path)."""
        all_tags = dict(tags or {})
        if name is not None:
            all_tags["Name"] = name
        spec = [{"ResourceType": "instance",
                 "Tags": [{"Key": k, "Value": v} for k, v in all_tags.items()]}] if all_tags else []
        r = self.ec2.run_instances(
            ImageId=WINDOWS_AMI if os_ == "windows" else LINUX_AMI, InstanceType="t3.micro",
            MinCount=1, MaxCount=1, SubnetId=subnet, TagSpecifications=spec)
        return str(r["Instances"][0]["InstanceId"])

    def private_ip(self, instance_id: str) -> str:
        r = self.ec2.describe_instances(InstanceIds=[instance_id])
        return str(r["Reservations"][0]["Instances"][0]["PrivateIpAddress"])


@pytest.fixture(scope="session")
def lab(moto: MotoServer) -> Lab:
    return Lab(moto.url)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
