"""The grant workflow's pure transitions: every state change, permission rule and validation."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.domain import workflow as wf
from broker.domain.models import Grant, GrantState, Instance, Level, Principal, Trigger
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
    assert e.action == "extended"
    assert e.details == {"expires_at": {"before": g.expires_at.isoformat(),
                                        "after": g2.expires_at.isoformat()}}
    with pytest.raises(WorkflowError, match="already ends then"):
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
    with pytest.raises(WorkflowError, match=r"expired .* a new request is needed") as exc:
        wf.extend(g, CAROL, g.expires_at, POLICY, g.expires_at + timedelta(hours=1))
    assert kind(exc) == "conflict"


def test_extend_until_earlier_shortens_but_never_before_now() -> None:
    g = approved()  # 12:00 to 20:00
    short, e = wf.extend(g, CAROL, NOW, POLICY, NOW + timedelta(hours=2), "done sooner")
    assert short.expires_at == NOW + timedelta(hours=2) and short.state is GrantState.APPROVED
    assert (e.action, e.comment) == ("changed", "done sooner")
    assert e.details == {"expires_at": {"before": g.expires_at.isoformat(),
                                        "after": short.expires_at.isoformat()}}
    for until in (NOW, NOW - timedelta(minutes=1)):
        with pytest.raises(WorkflowError, match="not in the future; to end access now, revoke"
                           ) as exc:
            wf.extend(g, CAROL, NOW, POLICY, until)
        assert (kind(exc), exc.value.field) == ("invalid", "until")
    later = approved(starts_at=NOW + timedelta(hours=3))
    with pytest.raises(WorkflowError, match="after the grant's start"):
        wf.extend(later, CAROL, NOW, POLICY, NOW + timedelta(hours=2))
    # shortening narrows: one's own admin grant too, but still an approver's act
    own = Actor(ALICE.name, frozenset({Role.APPROVER}))
    admin = approved(level=Level.ADMIN)
    assert wf.extend(admin, own, NOW, POLICY, NOW + timedelta(hours=1))[0].expires_at == \
        NOW + timedelta(hours=1)
    with pytest.raises(WorkflowError) as exc:
        wf.extend(g, ALICE, NOW, POLICY, NOW + timedelta(hours=1))
    assert kind(exc) == "forbidden"


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


# -- requests checked against the inventory ---------------------------------------------------
KNOWN = {"stack-0a1b": frozenset({"vpc-0c2d"}), "stack-multi": frozenset({"vpc-0c2d", "vpc-9"})}


def test_scopes_of_an_inventory() -> None:
    def inst(i: str, stack: str, vpc: str) -> Instance:
        return Instance(i, i, stack, vpc, "10.0.0.1")

    assert wf.scopes_of([inst("a", "s1", "vpc-1"), inst("b", "s1", "vpc-2"),
                         inst("c", "s2", "vpc-1")]) == {
        "s1": frozenset({"vpc-1", "vpc-2"}), "s2": frozenset({"vpc-1"})}


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"stack_ids": ("stack-nope",)}, "stacks", "unknown stack 'stack-nope': not in the inventory"),
    ({"stack_ids": ("STACK-0A1B",)}, "stacks", "did you mean stack-0a1b"),
    ({"stack_ids": ("stack-0a1b", "stack-x")}, "stacks", "unknown stack 'stack-x'"),
    ({"vpc_id": "vpc-0other"}, "vpc", "vpc-0other is not a VPC of stack stack-0a1b"),
    ({"stack_ids": ("stack-multi", "stack-0a1b"), "vpc_id": "vpc-9"}, "vpc",
     "not a VPC of stack stack-0a1b"),
])
def test_unknown_stack_or_foreign_vpc_is_refused(fields: dict[str, object], field: str,
                                                 message: str) -> None:
    with pytest.raises(WorkflowError, match=message) as exc:
        wf.create("g-1", req(**fields), ALICE, NOW, POLICY, known=KNOWN)
    assert (kind(exc), exc.value.field) == ("invalid", field)


def test_scope_check_accepts_known_and_is_skipped_without_an_inventory() -> None:
    g, _ = wf.create("g-1", req(stack_ids=("stack-multi",), vpc_id="vpc-9"), ALICE, NOW, POLICY,
                     known=KNOWN)
    assert g.state is GrantState.PENDING
    wf.create("g-2", req(stack_ids=("anything",)), ALICE, NOW, POLICY, known=None)
    with pytest.raises(WorkflowError, match="lists no stacks now") as exc:
        wf.create("g-3", req(), ALICE, NOW, POLICY, known={})
    assert exc.value.field == "stacks"


def test_edits_and_changes_check_only_a_new_scope() -> None:
    with pytest.raises(WorkflowError, match="unknown stack"):
        wf.update(pending(), req(stack_ids=("stack-0a1b", "stack-new")), ALICE, NOW, POLICY,
                  KNOWN)
    with pytest.raises(WorkflowError, match="not a VPC"):
        wf.change(approved(), req(vpc_id="vpc-9"), ALICE, NOW, POLICY, KNOWN)
    # the inventory lost the stack since: narrowing what was granted still works
    gone = approved(stack_ids=("stack-gone", "stack-0a1b"))
    g, e = wf.change(gone, req(stack_ids=("stack-gone",)), ALICE, NOW, POLICY, KNOWN)
    assert e.action == "changed" and g.stack_ids == ("stack-gone",)


# -- undecided requests expire -------------------------------------------------------------------
H = timedelta(hours=1)


def entry(at: datetime, state: str, action: str = "x") -> wf.HistoryEntry:
    return wf.HistoryEntry("g-1", at, "bob", action, state=state)


def test_pending_since_is_when_the_last_wait_began() -> None:
    assert wf.pending_since([], NOW) == NOW
    assert wf.pending_since([entry(NOW, "pending", "requested"),
                             entry(NOW + H, "pending", "updated"),
                             entry(NOW + 2 * H, "pending", "approval-recorded")], NOW) == NOW
    # approved, then widened: the new wait counts from the change
    assert wf.pending_since([entry(NOW, "pending"), entry(NOW + H, "approved"),
                             entry(NOW + 5 * H, "pending", "changed-needs-approval")],
                            NOW) == NOW + 5 * H


def test_a_pending_request_past_its_deadline_reads_expired_and_is_refused() -> None:
    g = pending()
    deadline = NOW + POLICY.pending_expiry
    assert POLICY.pending_expiry == timedelta(hours=24)
    before = deadline - timedelta(seconds=1)
    assert wf.state_at(g, before, deadline) is GrantState.PENDING
    assert wf.state_at(g, deadline, deadline) is GrantState.EXPIRED
    assert wf.state_at(g, deadline, None) is GrantState.PENDING  # no deadline known: as stored
    ok, _ = wf.approve(g, BOB, before, POLICY, pending_deadline=deadline)
    assert ok.state is GrantState.APPROVED
    steps = [
        lambda: wf.approve(g, BOB, deadline, POLICY, pending_deadline=deadline),
        lambda: wf.reject(g, BOB, deadline, "no", pending_deadline=deadline),
        lambda: wf.withdraw(g, ALICE, deadline, pending_deadline=deadline),
        lambda: wf.update(g, req(), ALICE, deadline, POLICY, pending_deadline=deadline),
        lambda: wf.revoke(g, BOB, deadline, pending_deadline=deadline),
    ]
    for step in steps:
        with pytest.raises(WorkflowError, match=r"request g-1 expired at 2026-05-02 12:00 UTC "
                           "without a decision: a new request is needed") as exc:
            step()
        assert kind(exc) == "conflict"


def test_expire_stores_the_state_with_before_and_after() -> None:
    g = pending()
    deadline = NOW + POLICY.pending_expiry
    with pytest.raises(WorkflowError):
        wf.expire(g, deadline - timedelta(seconds=1), deadline)
    with pytest.raises(WorkflowError):
        wf.expire(approved(), deadline, deadline)
    new, e = wf.expire(g, deadline + H, deadline)
    assert new.state is GrantState.EXPIRED and not new.live_at(deadline + H)
    assert (e.actor, e.action, e.state) == ("system", "expired", "expired")
    assert e.details == {"state": {"before": "pending", "after": "expired"}}


# -- history says what changed ---------------------------------------------------------------------
def test_history_details_hold_before_and_after_of_each_changed_field() -> None:
    g = pending(starts_at=NOW - H)  # requested with a start in the past: moved at approval
    a, e = wf.approve(g, BOB, NOW + H, POLICY, "ok")
    assert e.details["state"] == {"before": "pending", "after": "approved"}
    assert e.details["approved_by"] == {"before": [], "after": [BOB.name]}
    assert e.details["expires_at"]["after"] == a.expires_at.isoformat()
    assert set(e.details) == {"state", "approved_by", "starts_at", "expires_at"}
    _, e = wf.change(approved(stack_ids=("s-a", "s-b")),
                     req(stack_ids=("s-a",), level=Level.READ_ONLY, ticket="INC-2"), ALICE, NOW,
                     POLICY)
    assert e.details["stacks"] == {"before": ["s-a", "s-b"], "after": ["s-a"]}
    assert e.details["ticket"] == {"before": "INC-1", "after": "INC-2"}
    _, e = wf.change(approved(), req(level=Level.ADMIN, duration=timedelta(hours=2)), ALICE,
                     NOW, POLICY)
    assert e.details["level"] == {"before": "read-only", "after": "admin"}
    assert e.details["state"] == {"before": "approved", "after": "pending"}
    assert e.details["approved_by"] == {"before": [BOB.name], "after": []}
    _, e = wf.reject(pending(), BOB, NOW, "no")
    assert e.details == {"state": {"before": "pending", "after": "rejected"}}
    _, e = wf.approve(pending(level=Level.ADMIN), BOB, NOW, GrantPolicy(
        two_approvers_for_admin=True))
    assert e.details == {"approved_by": {"before": [], "after": [BOB.name]},
                         "approvals": 1, "needed": 2}
    _, e = wf.create("g-2", req(), ALICE, NOW, POLICY)
    assert e.details == {}  # nothing before a request
