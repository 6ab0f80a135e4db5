"""Parse the SSH user name into the AD user and the requested target.

``alice+web01`` asks for target ``web01``; ``alice`` alone asks for the menu. ``+`` cannot occur in
an AD sAMAccountName and survives scp, rsync and VS Code host syntax, so it is the separator. A UPN
(``alice@corp.example.com+web01``) and a down-level name (``CORP\\alice+web01``) are accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# sAMAccountName forbids " / \ [ ] : ; | = , + * ? < > and is at most 20 characters; UPN prefixes
# may be longer. We accept a conservative superset and reject control characters outright.
_USER_RE = re.compile(r"^[A-Za-z0-9._$-][A-Za-z0-9._$ -]{0,63}$")
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*$")
_TARGET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}$")


class SelectorError(ValueError):
    """The SSH user name is not of the form ``user[+target]``; the text is for the audit log."""


@dataclass(frozen=True, slots=True)
class Selector:
    """What the client asked for: who (user, optional domain) and where (optional target)."""

    username: str
    domain: str | None
    target: str | None


def parse_selector(raw: str) -> Selector:
    """Split ``user[@domain|DOMAIN\\user][+target]``; raise :class:`SelectorError` when malformed."""
    if not raw or len(raw) > 512 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise SelectorError("empty, too long or control characters in user name")
    user_part, plus, target = raw.partition("+")
    if plus and not target:
        raise SelectorError("empty target after '+'")
    if target and not _TARGET_RE.match(target):
        raise SelectorError("malformed target")
    domain: str | None = None
    if "\\" in user_part:
        domain, _, user_part = user_part.partition("\\")
        if not domain:
            raise SelectorError("empty domain before '\\'")
    elif "@" in user_part:
        user_part, _, domain = user_part.rpartition("@")
    if domain is not None and not _DOMAIN_RE.match(domain):
        raise SelectorError("malformed domain")
    if not _USER_RE.match(user_part) or user_part != user_part.strip():
        raise SelectorError("malformed user")
    return Selector(username=user_part, domain=domain, target=target or None)
