"""The grant workflow's pure transitions: every state change, permission rule and validation."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.domain import workflow as wf
from broker.domain.models import Grant, GrantState, Level, Principal, Trigger
from broker.domain.workflow import (
    Actor,
    AutoApprove,
    GrantPolicy,
    GrantRequest,
    Role,
    WorkflowError,
)

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
POLICY = GrantPolicy()
ALICE = Actor("alice@corp.example.com", frozenset({Role.REQUESTER}))
BOB = Actor("bob@corp.example.com", frozenset({Role.REQUESTER, Role.APPROVER}))
CAROL = Actor("carol@corp.example.com", frozenset({Role.REQUESTER, Role.APPROVER}))
AUDITOR = Actor("audrey@corp.example.com", frozenset({Role.REQUESTER, Role.AUDITOR}))
ADMIN = Actor("operator:root", frozenset({Role.ADMIN}))


def req(**kw: object) -> GrantRequest:
    base: dict[str, object] = dict(
        username="alice", domain="corp.example.com", stack_ids=("stack-0a1b",),
        vpc_id="vpc-0c2d", level=Level.READ_ONLY, trigger=Trigger.INCIDENT, ticket="INC-1",
        reason="disk alarm")
    base.update(kw)
    return GrantRequest(**base)  # type: ignore[arg-type]


def pending(**kw: object) -> Grant:
    g, entry = wf.create("g-1", req(**kw), ALICE, NOW, POLICY)
    assert entry.action == "requested"
    return g


def approved(**kw: object) -> Grant:
    g, _ = wf.approve(pending(**kw), BOB, NOW, POLICY)
    return g


def kind(exc: pytest.ExceptionInfo[WorkflowError]) -> str:
    return exc.value.kind


def test_request_defaults_to_eight_hours_pending() -> None:
    g = pending()
    assert g.state is GrantState.PENDING
    assert g.expires_at - g.starts_at == timedelta(hours=8)
    assert g.requested_by == ALICE.name
    assert not g.live_at(NOW)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("username", "", "username"),
    ("username", "al ice ", "username"),
    ("username", "a*b", "username"),
    ("domain", "corp", "FQDN"),
    ("stack_ids", (), "stack IDs"),
    ("stack_ids", ("stack-1", "stack-1"), "repeat"),
    ("stack_ids", ("bad stack",), "malformed"),
    ("vpc_id", "0c2d", "VPC"),
    ("ticket", " ", "ticket"),
    ("reason", "", "reason"),
    ("reason", "x\x00", "control"),
    ("reason", "x" * 2001, "too long"),
    ("duration", timedelta(0), "positive"),
    ("duration", timedelta(hours=25), "maximum"),
    ("starts_at", datetime(2026, 5, 1, 12, 0), "time zone"),  # noqa: DTZ001 - the point
    ("starts_at", NOW + timedelta(days=31), "30 days"),
])
def test_request_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(WorkflowError, match=message) as exc:
        wf.create("g-1", req(**{field: value}), ALICE, NOW, POLICY)
    assert kind(exc) == "invalid"


def test_admin_maximum_is_shorter_than_read_only() -> None:
    wf.create("g-1", req(duration=timedelta(hours=24)), ALICE, NOW, POLICY)
    with pytest.raises(WorkflowError, match="maximum for admin"):
        wf.create("g-1", req(level=Level.ADMIN, duration=timedelta(hours=13)), ALICE, NOW, POLICY)


def test_future_start_is_kept_and_window_starts_at_approval_when_past() -> None:
    later = NOW + timedelta(hours=2)
    g = pending(starts_at=later)
    assert g.starts_at == later
    approved_g, _ = wf.approve(g, BOB, NOW, POLICY)
    assert approved_g.starts_at == later
    assert not approved_g.live_at(NOW)
    assert approved_g.live_at(later)
    # approved an hour after it was requested: the 8 hours count from approval
    late, _ = wf.approve(pending(), BOB, NOW + timedelta(hours=1), POLICY)
    assert late.starts_at == NOW + timedelta(hours=1)
    assert late.expires_at == NOW + timedelta(hours=9)


def test_auto_approve_read_only_by_group_or_trigger_never_admin() -> None:
    policy = GrantPolicy(auto_approve_read_only=(
        AutoApprove(groups=("oncall",)), AutoApprove(triggers=(Trigger.ALERT,))))
    g, e = wf.create("g-1", req(), ALICE, NOW, policy, frozenset({"OnCall"}))
    assert g.state is GrantState.APPROVED
    assert e.action == "requested+auto-approved"
    g, _ = wf.create("g-2", req(trigger=Trigger.ALERT), ALICE, NOW, policy)
    assert g.state is GrantState.APPROVED
    g, _ = wf.create("g-3", req(level=Level.ADMIN, trigger=Trigger.ALERT), ALICE, NOW, policy,
                     frozenset({"oncall"}))
    assert g.state is GrantState.PENDING
    g, _ = wf.create("g-4", req(trigger=Trigger.PATCH), ALICE, NOW, policy)
    assert g.state is GrantState.PENDING


def test_approval_needs_the_approver_role() -> None:
    with pytest.raises(WorkflowError) as exc:
        wf.approve(pending(), AUDITOR, NOW, POLICY)
    assert kind(exc) == "forbidden"


def test_nobody_approves_their_own_admin_request() -> None:
    own = Actor("alice@corp.example.com", frozenset({Role.APPROVER}))
    with pytest.raises(WorkflowError, match="own admin") as exc:
        wf.approve(pending(level=Level.ADMIN), own, NOW, POLICY)
    assert kind(exc) == "forbidden"
    # as requester for someone else too
    g, _ = wf.create("g-9", req(username="dave", level=Level.ADMIN), BOB, NOW, POLICY)
    with pytest.raises(WorkflowError, match="own admin"):
        wf.approve(g, BOB, NOW, POLICY)
    # an own read-only request may be approved
    ro, _ = wf.approve(pending(), own, NOW, POLICY)
    assert ro.state is GrantState.APPROVED


def test_two_approvers_for_admin_when_configured() -> None:
    policy = GrantPolicy(two_approvers_for_admin=True)
    g, e = wf.approve(pending(level=Level.ADMIN), BOB, NOW, policy)
    assert g.state is GrantState.PENDING
    assert e.action == "approval-recorded"
    with pytest.raises(WorkflowError, match="already approved") as exc:
        wf.approve(g, BOB, NOW, policy)
    assert kind(exc) == "conflict"
    g, e = wf.approve(g, CAROL, NOW, policy)
    assert g.state is GrantState.APPROVED
    assert g.approved_by == f"{BOB.name},{CAROL.name}"
    # read-only still needs one
    ro, _ = wf.approve(pending(), BOB, NOW, policy)
    assert ro.state is GrantState.APPROVED


def test_reject_needs_approver_and_comment() -> None:
    with pytest.raises(WorkflowError, match="comment"):
        wf.reject(pending(), BOB, NOW, "")
    with pytest.raises(WorkflowError) as exc:
        wf.reject(pending(), ALICE, NOW, "no")
    assert kind(exc) == "forbidden"
    g, e = wf.reject(pending(), BOB, NOW, "not justified")
    assert g.state is GrantState.REJECTED
    assert e.comment == "not justified"


def test_update_and_withdraw_only_while_pending_by_the_requester() -> None:
    g, e = wf.update(pending(), req(reason="new reason"), ALICE, NOW, POLICY)
    assert g.reason == "new reason"
    assert e.action == "updated"
    with pytest.raises(WorkflowError) as exc:
        wf.update(pending(), req(), BOB, NOW, POLICY)
    assert kind(exc) == "forbidden"
    wf.update(pending(), req(), ADMIN, NOW, POLICY)
    with pytest.raises(WorkflowError) as exc:
        wf.update(approved(), req(), ALICE, NOW, POLICY)
    assert kind(exc) == "conflict"
    g, _ = wf.withdraw(pending(), ALICE, NOW)
    assert g.state is GrantState.WITHDRAWN
    with pytest.raises(WorkflowError) as exc:
        wf.withdraw(approved(), ALICE, NOW)
    assert kind(exc) == "conflict"


def test_extend_by_an_approver_within_the_maximum() -> None:
    g = approved()
    g2, e = wf.extend(g, CAROL, NOW, POLICY, g.expires_at + timedelta(hours=4))
    assert g2.expires_at == g.expires_at + timedelta(hours=4)
    assert e.details["previous"] == g.expires_at.isoformat()
    with pytest.raises(WorkflowError, match="later"):
        wf.extend(g, CAROL, NOW, POLICY, g.expires_at)
    with pytest.raises(WorkflowError, match="exceed"):
        wf.extend(g, CAROL, NOW, POLICY, NOW + timedelta(hours=25))
    with pytest.raises(WorkflowError) as exc:
        wf.extend(g, ALICE, NOW, POLICY, g.expires_at + timedelta(hours=1))
    assert kind(exc) == "forbidden"
    own_admin = approved(level=Level.ADMIN)
    with pytest.raises(WorkflowError, match="own admin"):
        wf.extend(own_admin, Actor(ALICE.name, frozenset({Role.APPROVER})), NOW, POLICY,
                  own_admin.expires_at + timedelta(hours=1))
    # an expired grant cannot be extended: request anew
    with pytest.raises(WorkflowError, match="expired") as exc:
        wf.extend(g, CAROL, g.expires_at, POLICY, g.expires_at + timedelta(hours=1))
    assert kind(exc) == "conflict"


def test_revoke_by_approver_or_grantee() -> None:
    g, _ = wf.revoke(approved(), BOB, NOW, "incident closed")
    assert g.state is GrantState.REVOKED
    g, _ = wf.revoke(approved(), ALICE, NOW)  # the grantee gives access up
    assert g.state is GrantState.REVOKED
    with pytest.raises(WorkflowError) as exc:
        wf.revoke(approved(), Actor("eve@corp.example.com", frozenset({Role.REQUESTER})), NOW)
    assert kind(exc) == "forbidden"
    with pytest.raises(WorkflowError) as exc:
        wf.revoke(g, BOB, NOW)
    assert kind(exc) == "conflict"


def test_change_narrowing_applies_widening_needs_approval() -> None:
    g = approved(stack_ids=("stack-a", "stack-b"))
    narrowed, e = wf.change(g, req(stack_ids=("stack-a",)), ALICE, NOW, POLICY)
    assert narrowed.state is GrantState.APPROVED
    assert narrowed.stack_ids == ("stack-a",)
    assert e.action == "changed"
    for wider in (req(stack_ids=("stack-a", "stack-c")), req(stack_ids=("stack-a",),
                  vpc_id="vpc-0other"), req(stack_ids=("stack-a",), level=Level.ADMIN),
                  req(stack_ids=("stack-a",), duration=timedelta(hours=12))):
        w, e = wf.change(g, wider, ALICE, NOW, POLICY)
        assert w.state is GrantState.PENDING, wider
        assert e.action == "changed-needs-approval"
    with pytest.raises(WorkflowError, match="user and domain"):
        wf.change(g, req(username="mallory"), ALICE, NOW, POLICY)
    with pytest.raises(WorkflowError) as exc:
        wf.change(g, req(), Actor("eve@corp.example.com", frozenset()), NOW, POLICY)
    assert kind(exc) == "forbidden"


def test_effective_state_expires_by_itself() -> None:
    g = approved()
    assert g.effective_state(g.expires_at - timedelta(seconds=1)) is GrantState.APPROVED
    assert g.effective_state(g.expires_at) is GrantState.EXPIRED
    assert replace(g, state=GrantState.REVOKED).effective_state(g.expires_at) is \
        GrantState.REVOKED


def test_actor_roles() -> None:
    assert ADMIN.has(Role.APPROVER)
    assert not ALICE.has(Role.APPROVER)
    zed = Actor.of(Principal("corp.example.com", "Zed"), frozenset())
    assert zed.has(Role.REQUESTER)
    assert zed.name == "zed@corp.example.com"
