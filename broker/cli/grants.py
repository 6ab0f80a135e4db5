"""``bastion-broker grant ...`` and ``login``/``logout``: the grant workflow from a terminal.

Two modes with the same semantics, because both end in ``GrantService``:
- operator, on the bastion host (``--config``): acts on the store directly as
  ``operator:<unix user>`` with the admin role; every change is audited like any other;
- remote (``--api URL`` or ``$BASTION_BROKER_API``): calls the HTTP API with the session saved by
  ``bastion-broker login`` or with ``$BASTION_BROKER_TOKEN``.

``grant request --wait`` then polls the grant (either mode) until it is decided, like
``tsh request create``: exit 0 approved, 1 rejected, expired, withdrawn or revoked, 3 on timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from broker.cli.common import config_path, leaf, unix_user
from broker.cli.output import out as _out
from broker.cli.output import printable
from broker.cli.output import table as _table
from broker.domain.models import Level, Trigger
from broker.domain.workflow import WorkflowError
from broker.errors import BrokerError, UsageError

Op = tuple[str, dict[str, Any]]  # (operation, arguments), run by either backend


class RemoteError(BrokerError):
    """The API refused or failed; the message is the server's."""

    @property
    def user_message(self) -> str:  # type: ignore[override]
        return str(self)


def session_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "bastion-broker" / "session.json"


# -- remote mode -------------------------------------------------------------------------------
class Remote:
    """The HTTP API, authenticated by $BASTION_BROKER_TOKEN or the saved login session."""

    def __init__(self, api: str, *, need_auth: bool = True) -> None:
        self.api = api.rstrip("/")
        self.headers: dict[str, str] = {"Accept": "application/json"}
        self.csrf = ""
        token = os.environ.get("BASTION_BROKER_TOKEN")
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        elif need_auth:
            sess = self._session()
            self.headers["Cookie"] = f"{sess['cookie_name']}={sess['cookie']}"
            self.csrf = str(sess["csrf"])

    def _session(self) -> dict[str, Any]:
        path = session_path()
        try:
            sess = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            sess = None
        if not isinstance(sess, dict) or sess.get("api") != self.api:
            raise UsageError(f"not logged in to {self.api}: run 'bastion-broker --api "
                             f"{self.api} login' or set BASTION_BROKER_TOKEN")
        return sess

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> tuple[Any, dict[str, list[str]]]:
        url = self.api + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        if not url.startswith(("http://", "https://")):
            raise UsageError("--api must be an http:// or https:// URL")
        headers = dict(self.headers)
        data = None
        if method != "GET":
            data = json.dumps(body or {}).encode()
            headers["Content-Type"] = "application/json"
            if self.csrf:
                headers["X-CSRF-Token"] = self.csrf
        req = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - scheme checked
                raw, hdrs = resp.read(), resp.headers
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw, hdrs, status = exc.read(), exc.headers, exc.code
        except (urllib.error.URLError, OSError) as exc:
            raise RemoteError(f"cannot reach {self.api}: {getattr(exc, 'reason', exc)}") from None
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            raise RemoteError(f"{self.api} answered {status} without JSON") from None
        if status >= 400:
            detail = payload.get("detail") if isinstance(payload, dict) else None
            msg = detail.get("message") if isinstance(detail, dict) else None
            err = payload.get("error") if isinstance(payload, dict) else None
            if status == 401 and "Authorization" not in self.headers and path != "/api/login":
                msg = (msg or "") + " (session expired? run 'bastion-broker login' again)"
            raise RemoteError(f"{status} {err or 'error'}: {msg or ''}".rstrip(": "))
        return payload, {k.lower(): hdrs.get_all(k) or [] for k in set(hdrs.keys())}

    def run(self, op: Op) -> Any:
        name, a = op
        gid = urllib.parse.quote(str(a.get("grant_id", "")), safe="")
        base = f"/api/grants/{gid}"
        comment = {"comment": a["comment"]} if a.get("comment") is not None else {}
        if name == "request":
            return self.call("POST", "/api/grants", a["fields"])[0]
        if name == "change":
            current = self.call("GET", base)[0]
            if current["state"] == "pending":
                return self.call("PATCH", base, a["fields"])[0]
            return self.call("POST", base + "/change", a["fields"])[0]
        if name in ("withdraw", "approve", "reject", "revoke"):
            return self.call("POST", f"{base}/{name}", comment)[0]
        if name == "extend":
            body = {k: a[k] for k in ("until", "hours") if a.get(k) is not None}
            return self.call("POST", base + "/extend", {**body, **comment})[0]
        if name == "show":
            return self.call("GET", base)[0]
        if name == "list":
            return self.call("GET", "/api/grants", query=a["filters"])[0]
        raise UsageError(f"'grant {name}' is an operator command: run it on the bastion host "
                         "with --config")


# -- operator mode -----------------------------------------------------------------------------
async def _run_local(config_arg: str | None, op: Op) -> Any:
    from broker.config import load_config
    from broker.domain.workflow import Actor, Role
    from broker.notify.channels import notifier
    from broker.services.grants import GrantFilter, GrantService
    from broker.services.roles import grant_policy
    from broker.stores import connect_stores
    from broker.web import schema as S
    from broker.wiring import build_inventory

    config = load_config(config_path(argparse.Namespace(config=config_arg)))
    stores = await connect_stores(config, "read" if op[0] in ("list", "show") else "command")
    try:
        # read only by requests and changes (stacks and VPC checked against it)
        inventory = functools.cache(lambda: build_inventory(config))
        svc = GrantService(stores.grants, stores.audit, stores.clock, grant_policy(config.grants),
                           inventory=inventory, notifier=notifier(
                               config.notify, stores.notify, stores.audit, stores.clock))
        actor = Actor(f"operator:{unix_user()}", frozenset({Role.ADMIN, Role.REQUESTER}))
        now = stores.clock.now()
        name, a = op
        gid = str(a.get("grant_id", ""))
        comment = a.get("comment") or ""
        domain = config.identity.effective_default_domain
        if name in ("request", "add"):
            fields = dict(a["fields"])
            if "user" not in fields:
                raise UsageError("--user is required on the bastion host")
            req = S.build_request(fields, None, now, default_user="", default_domain=domain)
            if name == "request":
                g = await svc.request(actor, req)
            else:
                g = await _operator_add(svc, stores, actor, req, now)
        elif name == "change":
            base = await svc.load(actor, gid)
            pending = base.effective_state(now).value == "pending"
            req = S.build_request(a["fields"], base, now, default_user="",
                                  default_domain=domain, change=not pending)
            g = await (svc.update if pending else svc.change)(actor, gid, req)
        elif name == "withdraw":
            g = await svc.withdraw(actor, gid, comment)
        elif name == "approve":
            g = await svc.approve(actor, gid, comment)
        elif name == "reject":
            g = await svc.reject(actor, gid, comment)
        elif name == "revoke":
            g = await svc.revoke(actor, gid, comment)
        elif name == "extend":
            if a.get("until") is not None:
                until = S.parse_time("until", a["until"], now)
            else:
                until = (await svc.load(actor, gid)).expires_at + timedelta(hours=a["hours"])
            g = await svc.extend(actor, gid, until, comment)
        elif name == "show":
            g, history = await svc.show(actor, gid)
            return {**S.grant_json(g, now), "history": [S.history_json(e) for e in history]}
        elif name == "list":
            f = a["filters"]
            if f.get("state") is not None and f["state"] not in S.STATES:
                raise UsageError("--state must be one of " + ", ".join(S.STATES))
            limit = int(f.get("limit", 500))
            if not 1 <= limit <= 1000:
                raise UsageError("--limit must be from 1 to 1000")
            rows = await svc.search(actor, GrantFilter(
                username=f.get("user"), stack=f.get("stack"), state=f.get("state"),
                since=S.parse_time("since", f["since"], now) if "since" in f else None,
                until=S.parse_time("until", f["until"], now) if "until" in f else None,
                limit=limit))
            return [S.grant_json(r, now) for r in rows]
        else:
            raise UsageError(f"unknown operation {name}")
        return S.grant_json(g, stores.clock.now())
    finally:
        await stores.close()


async def _operator_add(svc: Any, stores: Any, actor: Any, req: Any, now: datetime) -> Any:
    """The operator shortcut: a grant approved at once by the operator (policy limits apply),
    stored with its history entry and audited as ``grant.added``."""
    import uuid

    from broker.domain import workflow as wf
    from broker.domain.models import GrantState

    g, entry = wf.create("g-" + uuid.uuid4().hex[:16], req, actor, now, svc.policy,
                         known=await svc.known_scopes())
    g = replace(g, state=GrantState.APPROVED, approved_by=actor.name)
    entry = replace(entry, action="added-by-operator", state=str(g.state))
    await stores.grants.create(g, entry)
    stores.audit.emit("grant.added", grant_id=g.id, actor=actor.name,
                      user=f"{g.username}@{g.domain}", stacks=list(g.stack_ids), vpc=g.vpc_id,
                      level=str(g.level), state=str(g.state),
                      expires_at=g.expires_at.isoformat(), ticket=g.ticket,
                      trigger=str(g.trigger), comment=None)
    return g


# -- dispatch and output -----------------------------------------------------------------------
def _api_of(args: argparse.Namespace) -> str | None:
    """``--api`` wins; then an explicit ``--config`` (operator); then $BASTION_BROKER_API."""
    if getattr(args, "api", None):
        return str(args.api)
    if getattr(args, "config", None):
        return None
    return os.environ.get("BASTION_BROKER_API") or None


def _execute(args: argparse.Namespace, op: Op) -> Any:
    from broker.web.schema import ApiError

    api = _api_of(args)
    try:
        if api:
            return Remote(api).run(op)
        return asyncio.run(_run_local(getattr(args, "config", None), op))
    except (ApiError, WorkflowError) as exc:
        raise UsageError(str(exc)) from None


def _when(iso: str | None) -> str:
    if not iso:
        return ""
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _state(g: dict[str, Any]) -> str:
    """What the state column says: "active" for an approved grant inside its window (the
    ``--state active`` filter), "approved" for one that starts later, else the state."""
    return "active" if g.get("active") else str(g["state"])


def _row(g: dict[str, Any]) -> dict[str, Any]:
    return {**g, "user": f"{g['user']}@{g['domain']}", "stacks": ",".join(g["stacks"]),
            "state": _state(g), "starts_at": _when(g["starts_at"]),
            "expires_at": _when(g["expires_at"])}


_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT")


def _value(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v) or "-"
    if isinstance(v, str) and _TIME_RE.match(v):
        return _when(v)
    return "-" if v in (None, "") else str(v)


def changes_text(details: dict[str, Any]) -> str:
    """``field: before -> after`` for each change in a history entry, then other details."""
    parts = []
    for k, v in details.items():
        if isinstance(v, dict) and set(v) == {"before", "after"}:
            parts.append(f"{k}: {_value(v['before'])} -> {_value(v['after'])}")
        else:
            parts.append(f"{k}: {_value(v)}")
    return "; ".join(parts)


def _print_grant(g: dict[str, Any], as_json: bool, verb: str = "") -> None:
    if as_json:
        _out(json.dumps(g, indent=2))
        return
    _out(printable(
        f"grant {g['id']}{(' ' + verb) if verb else ''}: {_state(g)} {g['level']} for "
        f"{g['user']}@{g['domain']} on {','.join(g['stacks'])} ({g['vpc']}) "
        f"from {_when(g['starts_at'])} until {_when(g['expires_at'])} UTC"))


def _print_show(g: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _out(json.dumps(g, indent=2))
        return
    for k in ("id", "state", "user", "domain", "stacks", "vpc", "level", "trigger", "ticket",
              "reason", "starts_at", "expires_at", "requested_by", "approved_by"):
        v = g.get(k)
        if isinstance(v, list):
            v = ",".join(v)
        if k in ("starts_at", "expires_at"):
            v = _when(v) + " UTC"
        if k == "state":
            v = _state(g)
        _out(f"{k + ':':14}{printable(v)}")  # reason, ticket: requester-supplied text
    _out()
    _table([{**h, "at": _when(h["at"]), "changes": changes_text(h.get("details") or {})}
            for h in g.get("history", [])],
           ["at", "actor", "action", "state", "changes", "comment"])


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    f: dict[str, Any] = {}
    for arg, key in (("user", "user"), ("domain", "domain"), ("stack", "stacks"),
                     ("vpc", "vpc"), ("level", "level"), ("trigger", "trigger"),
                     ("ticket", "ticket"), ("reason", "reason"), ("hours", "hours"),
                     ("start", "starts_at")):
        v = getattr(args, arg, None)
        if v is not None:
            f[key] = v
    return f


WAIT_POLL_SECONDS = 2.0  # between looks at a request being waited for
WAIT_TIMEOUT = 3
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smh]?)$")


def parse_timeout(text: str) -> float:
    """``--timeout``: seconds, or a number with s, m or h (90, 90s, 10m, 2h)."""
    m = DURATION_RE.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise UsageError("--timeout must be a positive duration like 90, 90s, 10m or 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _decision(g: dict[str, Any]) -> str:
    """Who decided and why, from the last history entry (the comment a rejection must have)."""
    last = (g.get("history") or [{}])[-1]
    who = f" by {last['actor']}" if last.get("actor") not in (None, "", "system") else ""
    why = f": {last['comment']}" if last.get("comment") else ""
    return printable(f"grant {g['id']} {g['state']}{who}{why}")


def wait_for_decision(args: argparse.Namespace, g: dict[str, Any], timeout: float | None,
                      poll: float = WAIT_POLL_SECONDS) -> int:
    """Poll the request until it leaves pending (approved: 0; refused or ended: 1) or
    ``timeout`` seconds pass (3; the request stays pending)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if g["state"] == "pending":
        sys.stderr.write(f"bastion-broker: waiting for a decision on grant {g['id']} "
                         "(Ctrl-C stops waiting; the request stays pending)\n")
        sys.stderr.flush()
    approvals = len(g.get("approved_by") or [])
    try:
        while g["state"] == "pending":
            if deadline is not None and time.monotonic() >= deadline:
                _out(f"grant {g['id']} still pending: gave up waiting after {timeout:g} s")
                return WAIT_TIMEOUT
            left = poll if deadline is None else min(poll, max(deadline - time.monotonic(), 0))
            time.sleep(left)
            g = _execute(args, ("show", {"grant_id": g["id"]}))
            if len(g.get("approved_by") or []) > approvals and g["state"] == "pending":
                approvals = len(g["approved_by"])
                sys.stderr.write(f"bastion-broker: approval recorded by {g['approved_by'][-1]}; "
                                 "another approver is needed\n")
    except KeyboardInterrupt:
        sys.stderr.write(f"bastion-broker: stopped waiting; grant {g['id']} stays pending\n")
        return 130
    if args.json:
        _out(json.dumps(g, indent=2))
    else:
        _out(_decision(g) if g.get("history") else f"grant {g['id']} {g['state']}")
    return 0 if g["state"] == "approved" else 1


def cmd_request(args: argparse.Namespace) -> int:
    timeout = parse_timeout(args.timeout) if args.timeout is not None else None
    if timeout is not None and not args.wait:
        raise UsageError("--timeout needs --wait")
    g = _execute(args, ("request", {"fields": _fields(args)}))
    if not args.wait:
        _print_grant(g, args.json)
        return 0
    if not args.json:
        _print_grant(g, False)
    return wait_for_decision(args, g, timeout)


def cmd_add(args: argparse.Namespace) -> int:
    if _api_of(args):
        raise UsageError("'grant add' is an operator command on the bastion host (--config); "
                         "remotely, use 'grant request' and have it approved")
    g = _execute(args, ("add", {"fields": _fields(args)}))
    if args.json:
        _out(json.dumps(g))
    else:
        _out(f"grant {g['id']}: {g['level']} for {g['user']}@{g['domain']} on "
             f"{','.join(g['stacks'])} ({g['vpc']}) until {_when(g['expires_at'])} UTC")
    return 0


def _simple(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        g = _execute(args, (name, {"grant_id": args.grant_id, "comment": args.comment}))
        past = {"approve": "approved", "reject": "rejected", "withdraw": "withdrawn",
                "revoke": "revoked"}[name]
        if args.json:
            _print_grant(g, True)
        elif name == "approve" and g["state"] == "pending":
            _out(f"grant {g['id']}: approval recorded ({len(g['approved_by'])} so far); "
                 "another approver is needed")
        elif name == "revoke":
            _out(f"grant {g['id']} revoked")
        else:
            _print_grant(g, False, past)
        return 0

    return run


def cmd_extend(args: argparse.Namespace) -> int:
    if (args.until is None) == (args.hours is None):
        raise UsageError("give either --until TIME or --hours H")
    before = None
    if args.until is not None:
        before = _execute(args, ("show", {"grant_id": args.grant_id}))["expires_at"]
    g = _execute(args, ("extend", {"grant_id": args.grant_id, "until": args.until,
                                   "hours": args.hours, "comment": args.comment}))
    shorter = before is not None and (datetime.fromisoformat(g["expires_at"])
                                      < datetime.fromisoformat(before))
    _print_grant(g, args.json, "shortened" if shorter else "extended")
    return 0


def cmd_change(args: argparse.Namespace) -> int:
    fields = _fields(args)
    if not fields:
        raise UsageError("nothing to change: give --stack, --vpc, --level, --hours, ...")
    g = _execute(args, ("change", {"grant_id": args.grant_id, "fields": fields}))
    _print_grant(g, args.json, "changed")
    if not args.json and g["state"] == "pending":
        _out("the change widens access: it needs approval again")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    _print_show(_execute(args, ("show", {"grant_id": args.grant_id})), args.json)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    filters = {k: str(v) for k, v in (("user", args.user), ("stack", args.stack),
                                      ("state", args.state), ("since", args.since),
                                      ("until", args.until), ("limit", args.limit))
               if v is not None}
    rows = _execute(args, ("list", {"filters": filters}))
    if args.json:
        _out(json.dumps(rows, indent=2))
    else:
        _table([_row(g) for g in rows], ["id", "user", "stacks", "vpc", "level", "state",
                                         "starts_at", "expires_at", "ticket"])
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    api = _api_of(args) or os.environ.get("BASTION_BROKER_API")
    if not api:
        raise UsageError("give the API URL: --api URL or $BASTION_BROKER_API")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
        code = sys.stdin.readline().strip()
    else:
        password = getpass.getpass("Password: ")
        code = getpass.getpass("Verification code: ").strip()
    user = args.user or getpass.getuser()
    remote = Remote(api, need_auth=False)
    body, headers = remote.call("POST", "/api/login",
                                {"user": user, "password": password, "code": code})
    cookie: SimpleCookie = SimpleCookie()
    for line in headers.get("set-cookie", []):
        cookie.load(line)
    name = next((k for k in cookie if k.endswith("bb_session")), None)
    if name is None:
        raise RemoteError("the API did not set a session cookie")
    path = session_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"api": remote.api, "user": body["user"], "cookie_name": name,
                   "cookie": cookie[name].value, "csrf": body["csrf"],
                   "expires_at": body["expires_at"]}, f)
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    _out(f"logged in to {remote.api} as {body['user']} ({', '.join(body['roles'])}) until "
         f"{_when(body['expires_at'])} UTC")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    path = session_path()
    api = _api_of(args) or os.environ.get("BASTION_BROKER_API")
    if not path.exists():
        _out("not logged in")
        return 0
    try:
        sess = json.loads(path.read_text(encoding="utf-8"))
        Remote(api or sess["api"]).call("POST", "/api/logout")
    except (BrokerError, ValueError, KeyError) as exc:
        sys.stderr.write(f"bastion-broker: warning: the server did not confirm: {exc}\n")
    path.unlink()
    _out("logged out")
    return 0


def register(sub: Any) -> None:
    """Add ``grant``, ``login`` and ``logout`` to the top-level subcommands."""
    common = argparse.ArgumentParser(add_help=False, parents=leaf())
    common.add_argument("--json", action="store_true", help="machine-readable output")

    g = sub.add_parser("grant", help="access grants: request, approve, list, ...",
                       description="Operator mode with --config (on the bastion host), remote "
                       "mode with --api URL / $BASTION_BROKER_API.").add_subparsers(
                           dest="sub", required=True)

    def request_fields(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--user", required=False, help="AD user name (default: yourself)")
        p.add_argument("--domain", help="FQDN of the AD domain")
        p.add_argument("--stack", required=required, action="append",
                       help="stack ID (repeatable)")
        p.add_argument("--vpc", required=required, help="VPC ID of the stacks")
        p.add_argument("--level", required=required, choices=[lv.value for lv in Level])
        p.add_argument("--trigger", choices=[t.value for t in Trigger])
        p.add_argument("--ticket", required=required, help="ticket reference")
        p.add_argument("--reason", required=required)
        p.add_argument("--hours", type=float, help="duration in hours (default 8)")
        p.add_argument("--start", help="start time, RFC 3339 with time zone (default: now)")

    s = g.add_parser("request", parents=[common], help="request access")
    request_fields(s, True)
    s.add_argument("--wait", action="store_true",
                   help="wait for the decision: exit 0 approved, 1 rejected or expired")
    s.add_argument("--timeout", help="with --wait: give up after this long (90s, 10m, 2h; "
                   "exit 3, the request stays pending)")
    s.set_defaults(func=cmd_request)

    s = g.add_parser("add", parents=[common], help="add an approved grant (operator only)")
    s.add_argument("--user", required=True, help="AD username (sAMAccountName)")
    s.add_argument("--domain", required=True, help="FQDN of the trusted AD domain")
    s.add_argument("--stack", required=True, action="append", help="stack ID (repeatable)")
    s.add_argument("--vpc", required=True, help="VPC ID of the stacks")
    s.add_argument("--level", required=True, choices=[lv.value for lv in Level])
    s.add_argument("--hours", type=float, default=8.0, help="duration (default 8)")
    s.add_argument("--trigger", default=Trigger.SERVICE_REQUEST.value,
                   choices=[t.value for t in Trigger])
    s.add_argument("--ticket", required=True, help="ticket reference")
    s.add_argument("--reason", required=True)
    s.set_defaults(func=cmd_add)

    for name, text in (("approve", "approve a pending request"),
                       ("reject", "reject a pending request (--comment required)"),
                       ("withdraw", "withdraw your pending request"),
                       ("revoke", "end a grant now")):
        s = g.add_parser(name, parents=[common], help=text)
        s.add_argument("grant_id")
        s.add_argument("--comment", required=name == "reject")
        s.set_defaults(func=_simple(name))

    s = g.add_parser("extend", parents=[common],
                     help="move the end of an approved grant (later, or earlier to shorten it)")
    s.add_argument("grant_id")
    s.add_argument("--until", help="new end, RFC 3339 with time zone; earlier than the current "
                   "end shortens the grant (not before now)")
    s.add_argument("--hours", type=float, help="hours added to the current end")
    s.add_argument("--comment")
    s.set_defaults(func=cmd_extend)

    s = g.add_parser("change", parents=[common],
                     help="edit a pending request, or change an approved grant")
    s.add_argument("grant_id")
    request_fields(s, False)
    s.set_defaults(func=cmd_change)

    s = g.add_parser("list", parents=[common], help="list grants")
    s.add_argument("--user")
    s.add_argument("--stack")
    s.add_argument("--state", help="pending, active (approved, inside its window), approved "
                   "(active or starting later), expired, rejected, revoked, withdrawn")
    s.add_argument("--since", help="ending after: RFC 3339 or 12h, 7d")
    s.add_argument("--until", help="starting before: RFC 3339 or 12h, 7d")
    s.add_argument("--limit", type=int)
    s.set_defaults(func=cmd_list)

    s = g.add_parser("show", parents=[common], help="a grant with its history")
    s.add_argument("grant_id")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("login", parents=[common], help="log in to the API (password + code)")
    s.add_argument("--user", help="AD user (default: your login name)")
    s.add_argument("--password-stdin", action="store_true",
                   help="read the password, then the code, from standard input")
    s.set_defaults(func=cmd_login)

    s = sub.add_parser("logout", parents=[common], help="end the API session")
    s.set_defaults(func=cmd_logout)
