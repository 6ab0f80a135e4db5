"""Active Directory's rules, as pure functions (unit-tested without a DC): user name and password
checks before any bind, AD's bind error codes, account state from its attributes, DN and group
matching. ``broker.identity.ldap`` applies them against the domain controllers."""

from __future__ import annotations

import re
from typing import Any

IN_CHAIN = "1.2.840.113556.1.4.1941"  # LDAP_MATCHING_RULE_IN_CHAIN: nested group membership
ROLE_PREFIX = "role:"
MAX_USERNAME = 256
UF_ACCOUNTDISABLE = 0x2
UF_LOCKOUT = 0x10  # in msDS-User-Account-Control-Computed (AD computes it from lockoutTime)
UF_PASSWORD_EXPIRED = 0x800000  # in msDS-User-Account-Control-Computed (from the password policy)
_FILETIME_NEVER = (0, 0x7FFFFFFFFFFFFFFF)
_FILETIME_EPOCH = 116444736000000000  # 1970-01-01 in 100 ns steps since 1601-01-01
STATE_ATTRS = ("userAccountControl", "accountExpires", "lockoutTime", "pwdLastSet",
                "msDS-User-Account-Control-Computed")

# AD's "data" code in a result-49 bind message -> reason for the audit log.
AD_BIND_CODES: dict[str, str] = {
    "52e": "bad password",
    "525": "no such user",
    "530": "logon time restriction",
    "531": "workstation restriction",
    "532": "password expired",
    "533": "account disabled",
    "701": "account expired",
    "773": "must change password",
    "775": "account locked out",
}
_DATA_RE = re.compile(r"\bdata\s+([0-9a-fA-F]{3,8})\b")
# Characters AD forbids in sAMAccountName, plus the backslash that separates DOMAIN\user.
_BAD_NAME_CHARS = frozenset('"/\\[]:;|=,+*?<>\x00')

# ---------------------------------------------------------------------------------------------
# Pure helpers (unit-tested without a DC)


def parse_ad_bind_error(message: str | None) -> str:
    """The reason behind AD's result-49 message (``... AcceptSecurityContext error, data 52e, ...``).

    All AD bind failures share result 49; only the "data" code tells a locked account from a typo.
    """
    m = _DATA_RE.search(message or "")
    if not m:
        return "invalid credentials"
    code = m.group(1).lower().lstrip("0") or "0"
    return AD_BIND_CODES.get(code, f"invalid credentials (AD code {code})")


def username_problem(username: str) -> str | None:
    """Why ``username`` cannot be a sAMAccountName (or UPN prefix); None if it can be looked up."""
    if not username or not username.strip():
        return "empty user name"
    if len(username) > MAX_USERNAME:
        return "user name too long"
    if any(c in _BAD_NAME_CHARS or ord(c) < 32 or c == "\x7f" for c in username):
        return "invalid character in user name"
    if username != username.strip():
        return "invalid user name (surrounding spaces)"
    return None


def password_problem(password: str) -> str | None:
    """Why ``password`` must never reach a bind: an empty one is an anonymous bind (RFC 4513)."""
    if not password or not password.strip():
        return "empty password"
    if "\x00" in password:
        return "invalid password (NUL)"
    return None


def split_login(name: str) -> tuple[str, str | None]:
    """``CORP\\alice`` -> (alice, CORP); ``alice@corp.example.test`` -> (alice, corp.example.test).

    For callers that did not split the SSH user name already (``domain`` None).
    """
    if "\\" in name:
        dom, _, user = name.partition("\\")
        return user, dom
    if "@" in name:
        user, _, dom = name.rpartition("@")
        return user, dom
    return name, None


def normalize_dn(dn: str) -> str:
    """Casefolded DN without spaces around separators, for comparing configured and AD group DNs."""
    parts = [p.strip() for p in re.split(r"(?<!\\),", dn)]
    out = []
    for p in parts:
        k, _, v = p.partition("=")
        out.append(f"{k.strip()}={v.strip()}")
    return ",".join(out).casefold()


def group_matches(configured: list[str], group_dns: set[str], group_cns: set[str]) -> bool:
    """Whether any configured group (a DN, or a bare CN) is among the user's groups."""
    for g in configured:
        if "=" in g:
            if normalize_dn(g) in group_dns:
                return True
        elif g.casefold() in group_cns:
            return True
    return False


def _int(value: Any) -> int | None:
    v = first_value(value)
    try:
        return int(v) if v != "" else None
    except ValueError:
        return None


def account_state_problem(attrs: dict[str, Any], now: float) -> str | None:
    """Why the account in ``attrs`` (from a search, see STATE_ATTRS) may not log in without a
    password check; None if it may. ``now`` is epoch seconds. Fails closed: an unreadable
    userAccountControl is a refusal. An expired password, or one that must be changed, refuses
    a registered-key login too, as AD refuses that password's bind (OpenSSH with PAM would demand
    the change first); the user changes it in the domain, then logs in again."""
    uac = _int(attrs.get("userAccountControl"))
    if uac is None:
        return "account state unreadable"
    if uac & UF_ACCOUNTDISABLE:
        return "account disabled"
    expires = _int(attrs.get("accountExpires"))
    if expires is not None and expires not in _FILETIME_NEVER and \
            (expires - _FILETIME_EPOCH) / 10_000_000 <= now:
        return "account expired"
    computed = _int(attrs.get("msDS-User-Account-Control-Computed"))
    if computed is not None:
        if computed & UF_LOCKOUT:
            return "account locked out"
    elif _int(attrs.get("lockoutTime")):
        # No computed flag (not AD?): a lockout time that was never reset counts, even if its
        # duration may have passed; the next successful password login resets it.
        return "account locked out"
    if _int(attrs.get("pwdLastSet")) == 0:  # "must change password at next logon" (773)
        return "must change password"
    if computed is not None and computed & UF_PASSWORD_EXPIRED:  # AD's bind says 532
        return "password expired"
    return None


def all_values(value: Any) -> list[Any]:
    """An ldap3 attribute value as a list (absent: empty)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def first_value(value: Any) -> str:
    """ldap3 without schema info returns every attribute as a list."""
    if isinstance(value, list | tuple):
        value = value[0] if value else ""
    return str(value or "")
