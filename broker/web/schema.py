"""Strict parsing of API input and the JSON shapes of grants, shared by the API and the CLI.

Every field is checked here before anything reaches the workflow, so a bad request gets a 400
naming the field instead of a confusing error from deeper down.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.domain import workflow as wf
from broker.domain.models import Grant, Level, Trigger
from broker.domain.workflow import GrantRequest, HistoryEntry

SCOPES = ("grants:read", "grants:write", "grants:approve", "sessions:read", "audit:read")
STATES = ("pending", "approved", "rejected", "revoked", "withdrawn", "expired", "active")
MAX_HOURS = 24 * 30
MIN_HOURS = 1 / 3600  # a second: anything shorter rounds to no grant at all
REQUEST_FIELDS = {"user", "domain", "stacks", "vpc", "level", "trigger", "ticket", "reason",
                  "hours", "starts_at"}
RELATIVE_RE = re.compile(r"^(\d{1,5})([mhdw])$")


class ApiError(Exception):
    """An error the client sees as ``{"error": ..., "detail": ...}`` with ``status``."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.detail: dict[str, str] = {"message": message}
        if field is not None:
            self.detail["field"] = field


def invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid", f"{field}: {message}", field)


def check_keys(body: dict[str, Any], allowed: set[str], required: tuple[str, ...] = ()) -> None:
    for k in body:
        if k not in allowed:
            raise invalid(k, "unknown field")
    for k in required:
        if k not in body:
            raise invalid(k, "is required")


def get_str(body: dict[str, Any], name: str, *, max_len: int = 2000,
            default: str | None = None) -> str | None:
    v = body.get(name, default)
    if v is None:
        return None
    if not isinstance(v, str):
        raise invalid(name, "must be a string")
    if len(v) > max_len:
        raise invalid(name, f"must be at most {max_len} characters")
    if any(ord(c) < 0x20 and c not in "\t\n" for c in v):
        raise invalid(name, "must not contain control characters")
    return v


def get_hours(body: dict[str, Any], name: str = "hours") -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise invalid(name, "must be a number")
    if not MIN_HOURS <= v <= MAX_HOURS:
        raise invalid(name, f"must be at least one second ({MIN_HOURS:.6f}) and at most "
                            f"{MAX_HOURS}")
    return float(v)


def parse_time(name: str, v: object, now: datetime) -> datetime:
    """RFC 3339 with a time zone, or a relative ``30m``/``12h``/``7d``/``2w`` before ``now``."""
    if not isinstance(v, str) or len(v) > 64:
        raise invalid(name, "must be an RFC 3339 time with a time zone, or like 12h or 7d")
    m = RELATIVE_RE.match(v)
    if m:
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
        return now - timedelta(**{unit: int(m.group(1))})
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise invalid(name, "must be an RFC 3339 time with a time zone, or like 12h or 7d") from None
    if t.tzinfo is None:
        raise invalid(name, "needs a time zone (e.g. 2030-01-01T10:00:00Z)")
    return t.astimezone(UTC)


def get_stacks(body: dict[str, Any]) -> tuple[str, ...] | None:
    v = body.get("stacks")
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise invalid("stacks", "must be a list of stack IDs")
    if not 1 <= len(v) <= 50:
        raise invalid("stacks", "between 1 and 50 stack IDs are required")
    return tuple(v)


def get_enum(body: dict[str, Any], name: str, kind: type[Level] | type[Trigger]
             ) -> Level | Trigger | None:
    v = body.get(name)
    if v is None:
        return None
    try:
        return kind(v)
    except ValueError:
        raise invalid(name, "must be one of " + ", ".join(x.value for x in kind)) from None


def build_request(body: dict[str, Any], base: Grant | None, now: datetime, *,
                  default_user: str, default_domain: str, change: bool = False) -> GrantRequest:
    """A full ``GrantRequest`` from API fields; fields left out keep ``base``'s values (edit of a
    pending request, or change of an approved grant). Used by the API and the operator CLI, so
    both check input the same way, naming the field at fault."""
    check_keys(body, REQUEST_FIELDS,
               () if base else ("stacks", "vpc", "level", "ticket", "reason"))
    user = get_str(body, "user", max_len=64)
    domain = get_str(body, "domain", max_len=255)
    if user is not None and not wf.USER_RE.match(user):
        raise invalid("user", "is not a valid AD user name")
    if domain is not None and not wf.DOMAIN_RE.match(domain):
        raise invalid("domain", "must be the FQDN of the AD domain")
    stacks = get_stacks(body)
    for s in stacks or ():
        if not wf.STACK_RE.match(s):
            raise invalid("stacks", f"stack ID {s!r} is malformed")
    vpc = get_str(body, "vpc", max_len=64)
    if vpc is not None and not wf.VPC_RE.match(vpc):
        raise invalid("vpc", "must look like vpc-0abc123")
    level = get_enum(body, "level", Level)
    trigger = get_enum(body, "trigger", Trigger)
    ticket = get_str(body, "ticket", max_len=wf.MAX_TEXT)
    reason = get_str(body, "reason", max_len=wf.MAX_TEXT)
    for name, value in (("ticket", ticket), ("reason", reason)):
        if value is not None and not value.strip():
            raise invalid(name, "must not be empty")
    hours = get_hours(body)
    starts: datetime | None = None
    if "starts_at" in body:
        if RELATIVE_RE.match(str(body["starts_at"])):
            raise invalid("starts_at", "must be an absolute time")
        starts = parse_time("starts_at", body["starts_at"], now)
    duration = timedelta(hours=hours) if hours is not None else None
    if base is not None:
        if duration is None:
            if change:  # keep the end where it is (1 s margin, so it is not a widening)
                left = base.expires_at - max(base.starts_at, now)
                duration = max(timedelta(seconds=int(left.total_seconds()) - 1),
                               timedelta(seconds=1))
            else:
                duration = base.expires_at - base.starts_at
        if starts is None and not change and base.starts_at > now:
            starts = base.starts_at
    return GrantRequest(
        username=user if user is not None else (base.username if base else default_user),
        domain=domain if domain is not None else (base.domain if base else default_domain),
        stack_ids=stacks if stacks is not None else (base.stack_ids if base else ()),
        vpc_id=vpc if vpc is not None else (base.vpc_id if base else ""),
        level=Level(level if level is not None else (base.level if base else Level.READ_ONLY)),
        trigger=Trigger(trigger if trigger is not None
                        else (base.trigger if base else Trigger.SERVICE_REQUEST)),
        ticket=ticket if ticket is not None else (base.ticket if base else ""),
        reason=reason if reason is not None else (base.reason if base else ""),
        duration=duration, starts_at=starts,
    )


def grant_json(g: Grant, now: datetime) -> dict[str, Any]:
    """The one JSON shape of a grant (API responses and ``--json`` in both CLI modes)."""
    return {
        "id": g.id, "user": g.username, "domain": g.domain, "stacks": list(g.stack_ids),
        "vpc": g.vpc_id, "level": str(g.level), "state": str(g.effective_state(now)),
        # approved and inside its window now: the CLI's state column shows it as "active"
        "active": g.live_at(now),
        "starts_at": g.starts_at.isoformat(), "expires_at": g.expires_at.isoformat(),
        "trigger": str(g.trigger), "ticket": g.ticket, "reason": g.reason,
        "requested_by": g.requested_by,
        "approved_by": [a for a in g.approved_by.split(",") if a],
        "created_at": g.created_at.isoformat() if g.created_at else None,
        "version": g.version,
    }


def history_json(e: HistoryEntry) -> dict[str, Any]:
    return {"at": e.at.isoformat(), "actor": e.actor, "action": e.action,
            "comment": e.comment, "state": e.state, "details": e.details}
