"""An inventory read from AWS: the EC2 instances of CloudFormation stacks, cached and fail-closed.

Two ways to find a stack's instances:

* ``stacks`` without ``stack_tag_key``: CloudFormation is asked for each stack's resources
  (``AWS::EC2::Instance``, the instances of ``AWS::AutoScaling::AutoScalingGroup``, and those of
  nested stacks); EC2 then describes them.
* ``stack_tag_key`` (e.g. ``aws:cloudformation:stack-name``): EC2 is asked for the instances
  carrying that tag, restricted to the tag values in ``stacks`` when given. No CloudFormation
  permission needed. ``aws:`` tags cannot be written by users, other tags are as trustworthy as
  whoever holds ``ec2:CreateTags``.

``Instance.stack_id`` is the CloudFormation **stack name** (AMS stack IDs such as
``stack-0a1b2c3d4e5f67890`` are stack names), or the tag value in tag mode, unless the opt-in
``stack_id_tag`` is present on the instance. ``address`` is always the private IP.

Example ``[inventory.aws]``::

    region = "eu-west-1"
    stacks = ["stack-0a1b2c3d4e5f67890"]
    vpc_ids = ["vpc-0c2d3e4f"]
    host_ca_keys = ["ssh-ed25519 AAAA... fleet-host-ca"]
    host_key_tag = "bastion:host-key"

Credentials come only from the standard boto3 chain (environment, profile, instance role).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker.aws_names import check_endpoint, check_region
from broker.domain.models import Instance

log = structlog.get_logger("broker.inventory.aws")

STALE_FACTOR = 10  # a snapshot older than STALE_FACTOR x TTL is never served
LIVE_STATES = ("pending", "running")
FILTER_BATCH = 200  # ids per instance-id filter: well under EC2's limits on filter values
ASG_BATCH = 50
MAX_NESTING = 5  # nested CloudFormation stacks followed at most this deep
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")  # what a user can type after '+'
_LOGIN_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")

Clock = Callable[[], float]


def _valid_ssh_key(key: str) -> str | None:
    """Why ``key`` is not an OpenSSH public key, or None if it is one."""
    import asyncssh  # here: reading a config (every CLI command does) needs no SSH stack

    try:
        asyncssh.import_public_key(key)
    except (asyncssh.KeyImportError, ValueError) as exc:
        return str(exc) or "not an SSH public key"
    return None


class AwsInventorySettings(BaseModel):
    """``[inventory.aws]``: where to look and how to turn EC2 instances into targets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    region: str
    endpoint_url: str | None = None  # an emulator (moto, LocalStack); None for AWS itself
    # stack names or ARNs; with stack_tag_key, the tag values to accept (empty: any)
    stacks: list[str] = Field(default_factory=list)
    stack_tag_key: str | None = None  # discover by this tag instead of asking CloudFormation
    stack_id_tag: str | None = None  # opt-in per-instance override of stack_id (trusts taggers)
    vpc_ids: list[str] = Field(default_factory=list)  # empty: any VPC
    auto_scaling: bool = True  # include the instances of stack Auto Scaling groups
    cache_ttl_seconds: float = Field(default=60.0, gt=0, le=86400)
    refresh_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    read_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    max_attempts: int = Field(default=3, ge=1, le=10)  # botocore "standard" retry mode
    port_linux: int = Field(default=22, ge=1, le=65535)
    port_windows: int = Field(default=3389, ge=1, le=65535)
    name_tag: str = Field(default="Name", min_length=1)
    host_ca_keys: list[str] = Field(default_factory=list)  # trusted for every instance
    host_key_tag: str | None = None  # tag holding host public keys, comma-separated
    admin_login_tag: str | None = None
    read_only_login_tag: str | None = None

    _region = field_validator("region")(check_region)
    _endpoint = field_validator("endpoint_url")(check_endpoint)

    @field_validator("stacks", "vpc_ids")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("entries must not be empty")
        return v

    @field_validator("host_ca_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        for k in v:
            problem = _valid_ssh_key(k)
            if problem:
                raise ValueError(f"not an SSH public key: {problem}")
        return v

    @model_validator(mode="after")
    def _source(self) -> AwsInventorySettings:
        if not self.stacks and not self.stack_tag_key:
            raise ValueError("set stacks, stack_tag_key, or both")
        return self

    @property
    def stale_limit_seconds(self) -> float:
        return self.cache_ttl_seconds * STALE_FACTOR

    @property
    def retry_interval_seconds(self) -> float:
        """After a failed refresh, callers are served the old snapshot without waiting on AWS."""
        return min(max(self.cache_ttl_seconds / 4, 1.0), 30.0)


# ---------------------------------------------------------------------------------------------
# Pure helpers: EC2/CloudFormation shapes -> Instance, unit-tested without AWS


def tags_of(raw: Mapping[str, Any]) -> dict[str, str]:
    """EC2's ``[{"Key": k, "Value": v}]`` as a dict."""
    return {str(t["Key"]): str(t.get("Value", "")) for t in raw.get("Tags") or () if "Key" in t}


def host_keys_from_tag(value: str | None, instance_id: str = "") -> tuple[str, ...]:
    """Valid OpenSSH public keys from a comma-separated tag value; invalid ones are dropped.

    A bad key must not reach the upstream connection, where it would fail every session.
    """
    keys: list[str] = []
    for part in (value or "").split(","):
        k = part.strip()
        if not k:
            continue
        problem = _valid_ssh_key(k)
        if problem:
            log.warning("aws_inventory_bad_host_key", instance=instance_id, error=problem)
            continue
        keys.append(k)
    return tuple(keys)


def _login_from_tag(tags: Mapping[str, str], key: str | None, instance_id: str) -> str | None:
    if not key or key not in tags:
        return None
    value = tags[key].strip()
    if not _LOGIN_RE.match(value):
        log.warning("aws_inventory_bad_login_tag", instance=instance_id, tag=key)
        return None
    return value


def instance_from_ec2(
    raw: Mapping[str, Any], stack_id: str, settings: AwsInventorySettings
) -> Instance | None:
    """One DescribeInstances ``Instance`` as an ``Instance``; None if it cannot be a target.

    Not a target: not pending/running, outside ``vpc_ids``, or without a VPC or private IP (a
    grant is scoped to a VPC, so an instance whose VPC is unknown is never offered).
    """
    iid = str(raw.get("InstanceId") or "")
    state = str((raw.get("State") or {}).get("Name") or "")
    vpc = str(raw.get("VpcId") or "")
    address = str(raw.get("PrivateIpAddress") or "")
    if not iid or state not in LIVE_STATES or not vpc or not address:
        return None
    if settings.vpc_ids and vpc not in settings.vpc_ids:
        return None
    tags = tags_of(raw)
    tag_name = tags.get(settings.name_tag, "").strip()
    name = tag_name if _NAME_RE.match(tag_name) else iid
    if settings.stack_id_tag and tags.get(settings.stack_id_tag, "").strip():
        stack_id = tags[settings.stack_id_tag].strip()
    windows = str(raw.get("Platform") or "").lower() == "windows"
    host_keys = (
        host_keys_from_tag(tags.get(settings.host_key_tag), iid) if settings.host_key_tag else ()
    )
    return Instance(
        id=iid, name=name, stack_id=stack_id, vpc_id=vpc, address=address,
        port=settings.port_windows if windows else settings.port_linux,
        os="windows" if windows else "linux",
        host_keys=host_keys, host_ca_keys=tuple(settings.host_ca_keys),
        admin_login=_login_from_tag(tags, settings.admin_login_tag, iid),
        read_only_login=_login_from_tag(tags, settings.read_only_login_tag, iid),
    )


def instances_from_page(
    page: Mapping[str, Any],
    stack_of: Callable[[Mapping[str, Any]], str | None],
    settings: AwsInventorySettings,
) -> list[Instance]:
    """The targets of one DescribeInstances page; ``stack_of`` names an instance's stack (or None)."""
    out: list[Instance] = []
    for reservation in page.get("Reservations") or ():
        for raw in reservation.get("Instances") or ():
            stack = stack_of(raw)
            if stack is None:
                continue
            inst = instance_from_ec2(raw, stack, settings)
            if inst is not None:
                out.append(inst)
    return out


def build_index(instances: Iterable[Instance]) -> dict[str, Instance]:
    """Casefolded id and name -> instance. Ids always resolve; a name only if it is unique.

    A shared Name tag, or a name equal to another instance's id, would let a selector reach a
    host the user did not mean: such names resolve to nothing.
    """
    index: dict[str, Instance] = {}
    insts = list(instances)
    for inst in insts:
        index[inst.id.casefold()] = inst
    names: dict[str, list[Instance]] = {}
    for inst in insts:
        names.setdefault(inst.name.casefold(), []).append(inst)
    for key, owners in names.items():
        if len(owners) == 1 and key not in index:
            index[key] = owners[0]
    return index


def ambiguous_names(instances: Iterable[Instance]) -> list[str]:
    """Names (casefolded) that more than one instance carries, for a warning."""
    seen: dict[str, int] = {}
    for inst in instances:
        if inst.name != inst.id:
            seen[inst.name.casefold()] = seen.get(inst.name.casefold(), 0) + 1
    return sorted(k for k, n in seen.items() if n > 1)


def stack_name_of(ref: str) -> str:
    """The stack name in a stack ARN (``arn:aws:cloudformation:R:A:stack/NAME/UUID``), else ``ref``.

    Saves a DescribeStacks call per stack and refresh (CloudFormation throttles early).
    """
    if ref.startswith("arn:"):
        _, _, rest = ref.partition(":stack/")
        name = rest.split("/", 1)[0]
        if name:
            return name
    return ref


def batched(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


# ---------------------------------------------------------------------------------------------
# The backend


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the inventory knew at one moment (``fetched_at`` on the injected clock)."""

    instances: tuple[Instance, ...]
    index: Mapping[str, Instance]
    fetched_at: float


@dataclass(slots=True)
class _Clients:
    ec2: Any
    cfn: Any
    asg: Any


@dataclass(slots=True)
class _State:
    snapshot: Snapshot | None = None
    task: asyncio.Task[None] | None = None
    last_failure: float | None = None
    last_error: str | None = None
    closed_logged: bool = False
    refreshes: int = 0
    failures: int = 0


class AwsInventory:
    """``Inventory`` over EC2, cached for ``cache_ttl_seconds``; one refresh at a time.

    A failed refresh keeps the last good snapshot for up to ``STALE_FACTOR`` x TTL, then the
    inventory fails closed (``resolve`` returns None, ``instances`` is empty): a grant is never
    checked against a VPC nobody could confirm recently.
    """

    def __init__(self, settings: AwsInventorySettings, *, clock: Clock = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._clients: _Clients | None = None
        self._st = _State()

    # -- Inventory port ------------------------------------------------------------------------

    async def resolve(self, name: str) -> Instance | None:
        snap = await self._current()
        if snap is None:
            return None
        return snap.index.get(name.strip().casefold())

    async def instances(self) -> Sequence[Instance]:
        snap = await self._current()
        return list(snap.instances) if snap else []

    # -- operations ----------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Refresh now (joining one in flight); True if a fresh snapshot is in place."""
        await self._join_refresh()
        snap = self._st.snapshot
        return snap is not None and self._clock() - snap.fetched_at < self._settings.cache_ttl_seconds

    @property
    def refreshes(self) -> int:
        """Refresh attempts so far (successful or not), for metrics and tests."""
        return self._st.refreshes

    @property
    def failures(self) -> int:
        """Failed refreshes so far."""
        return self._st.failures

    @property
    def last_error(self) -> str | None:
        """Why the last refresh failed; None once one succeeded."""
        return self._st.last_error

    # -- cache ---------------------------------------------------------------------------------

    async def _current(self) -> Snapshot | None:
        s = self._settings
        st = self._st
        snap = st.snapshot
        now = self._clock()
        if snap is not None and now - snap.fetched_at < s.cache_ttl_seconds:
            return snap
        in_backoff = st.last_failure is not None and now - st.last_failure < s.retry_interval_seconds
        if st.task is not None or not in_backoff:
            await self._join_refresh()
        snap = st.snapshot
        if snap is None:
            self._log_closed("no inventory snapshot yet")
            return None
        age = self._clock() - snap.fetched_at
        if age < s.stale_limit_seconds:
            return snap
        self._log_closed(f"last good snapshot is {age:.0f} s old")
        return None

    async def _join_refresh(self) -> None:
        st = self._st
        loop = asyncio.get_running_loop()
        if st.task is not None and st.task.get_loop() is not loop:
            st.task = None  # left behind by an event loop that is gone
        if st.task is None:
            st.task = loop.create_task(self._refresh())
        try:
            await asyncio.wait_for(asyncio.shield(st.task), self._settings.refresh_timeout_seconds)
        except TimeoutError:
            # the worker thread cannot be cancelled; later callers join the same task
            log.error("aws_inventory_refresh_slow", timeout=self._settings.refresh_timeout_seconds)

    async def _refresh(self) -> None:
        st = self._st
        st.refreshes += 1
        started = time.monotonic()
        try:
            instances = await asyncio.to_thread(self._fetch)
        except Exception as exc:
            st.failures += 1
            st.last_failure = self._clock()
            st.last_error = f"{type(exc).__name__}: {exc}"[:500]
            age = None if st.snapshot is None else round(self._clock() - st.snapshot.fetched_at, 1)
            log.error("aws_inventory_refresh_failed", error=st.last_error, snapshot_age=age)
            return
        finally:
            st.task = None
        snap = Snapshot(tuple(instances), build_index(instances), self._clock())
        st.snapshot = snap
        st.last_failure = None
        st.last_error = None
        st.closed_logged = False
        dup = ambiguous_names(instances)
        if dup:
            log.warning("aws_inventory_ambiguous_names", names=dup[:20])
        log.info("aws_inventory_refreshed", instances=len(instances),
                 seconds=round(time.monotonic() - started, 3))

    def _log_closed(self, why: str) -> None:
        if not self._st.closed_logged:
            self._st.closed_logged = True
            log.error("aws_inventory_unavailable", reason=why, error=self._st.last_error)

    # -- AWS calls (worker thread) -------------------------------------------------------------

    def _make_clients(self) -> _Clients:
        import boto3
        from botocore.config import Config

        s = self._settings
        cfg = Config(
            region_name=s.region,
            connect_timeout=s.connect_timeout_seconds,
            read_timeout=s.read_timeout_seconds,
            retries={"mode": "standard", "max_attempts": s.max_attempts},
            user_agent_extra="bastion-broker",
        )
        session = boto3.session.Session(region_name=s.region)
        kw: dict[str, Any] = {"config": cfg}
        if s.endpoint_url:
            kw["endpoint_url"] = s.endpoint_url
        return _Clients(session.client("ec2", **kw), session.client("cloudformation", **kw),
                        session.client("autoscaling", **kw))

    def _fetch(self) -> list[Instance]:
        """The whole inventory, blocking; raises on any AWS error so the old snapshot stays."""
        if self._clients is None:
            self._clients = self._make_clients()
        if self._settings.stack_tag_key:
            return self._fetch_by_tag(self._clients, self._settings.stack_tag_key)
        return self._fetch_by_stacks(self._clients)

    def _base_filters(self) -> list[dict[str, Any]]:
        f: list[dict[str, Any]] = [{"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
        if self._settings.vpc_ids:
            f.append({"Name": "vpc-id", "Values": list(self._settings.vpc_ids)})
        return f

    def _fetch_by_tag(self, c: _Clients, key: str) -> list[Instance]:
        filters = self._base_filters()
        if self._settings.stacks:
            filters.append({"Name": f"tag:{key}", "Values": list(self._settings.stacks)})
        else:
            filters.append({"Name": "tag-key", "Values": [key]})

        def stack_of(raw: Mapping[str, Any]) -> str | None:
            return tags_of(raw).get(key, "").strip() or None

        out: list[Instance] = []
        for page in c.ec2.get_paginator("describe_instances").paginate(Filters=filters):
            out.extend(instances_from_page(page, stack_of, self._settings))
        return out

    def _fetch_by_stacks(self, c: _Clients) -> list[Instance]:
        owner: dict[str, str] = {}  # instance id -> stack name
        conflicts: set[str] = set()
        for ref in self._settings.stacks:
            name = stack_name_of(ref)
            for iid in self._stack_instance_ids(c, ref, 0):
                if owner.get(iid, name) != name:
                    conflicts.add(iid)
                owner[iid] = name
        if conflicts:  # a host claimed by two stacks would satisfy grants for either
            log.warning("aws_inventory_instance_in_two_stacks", instances=sorted(conflicts)[:20])
            for iid in conflicts:
                del owner[iid]

        def stack_of(raw: Mapping[str, Any]) -> str | None:
            return owner.get(str(raw.get("InstanceId") or ""))

        out: list[Instance] = []
        paginator = c.ec2.get_paginator("describe_instances")
        # a filter, not InstanceIds: one id CloudFormation still lists but EC2 has forgotten
        # would fail the whole call with InvalidInstanceID.NotFound
        for batch in batched(sorted(owner), FILTER_BATCH):
            filters = [*self._base_filters(), {"Name": "instance-id", "Values": batch}]
            for page in paginator.paginate(Filters=filters):
                out.extend(instances_from_page(page, stack_of, self._settings))
        return out

    def _stack_instance_ids(self, c: _Clients, stack: str, depth: int) -> list[str]:
        """Instance ids of a stack, its Auto Scaling groups and nested stacks; [] if it is gone.

        Any other error propagates: a throttled call must not look like an empty stack.
        """
        from botocore.exceptions import ClientError

        ids: list[str] = []
        groups: list[str] = []
        try:
            pages = list(c.cfn.get_paginator("list_stack_resources").paginate(StackName=stack))
        except ClientError as exc:
            err = exc.response.get("Error", {})
            if err.get("Code") == "ValidationError" and "does not exist" in str(err.get("Message")):
                log.warning("aws_inventory_stack_missing", stack=stack)
                return []
            raise
        for page in pages:
            for r in page.get("StackResourceSummaries") or ():
                physical = str(r.get("PhysicalResourceId") or "")
                status = str(r.get("ResourceStatus") or "")
                if not physical or status.startswith("DELETE_"):
                    continue
                rtype = r.get("ResourceType")
                if rtype == "AWS::EC2::Instance":
                    ids.append(physical)
                elif rtype == "AWS::AutoScaling::AutoScalingGroup" and self._settings.auto_scaling:
                    groups.append(physical)
                elif rtype == "AWS::CloudFormation::Stack":
                    if depth < MAX_NESTING:
                        ids.extend(self._stack_instance_ids(c, physical, depth + 1))
                    else:
                        log.warning("aws_inventory_nesting_too_deep", stack=physical)
        if groups:
            pager = c.asg.get_paginator("describe_auto_scaling_groups")
            for batch in batched(groups, ASG_BATCH):
                for page in pager.paginate(AutoScalingGroupNames=batch):
                    for g in page.get("AutoScalingGroups") or ():
                        ids.extend(str(i["InstanceId"]) for i in g.get("Instances") or ())
        return ids
