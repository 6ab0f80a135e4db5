"""``[identity.ad]`` settings, apart from the LDAP code so that reading a config (every CLI
command does) does not import ldap3."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


@dataclass(frozen=True, slots=True)
class DCAddress:
    """One domain controller: ``ldaps://host:636`` (TLS from the start) or ``ldap://`` + StartTLS."""

    uri: str
    host: str
    port: int
    ldaps: bool


def parse_server_uri(uri: str) -> DCAddress:
    """Parse and check a DC URI; only ldaps:// and ldap:// (which then always uses StartTLS)."""
    try:
        parts = urlsplit(uri.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid server URI '{uri}': {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ldaps", "ldap"):
        raise ValueError(f"server URI '{uri}' must start with ldaps:// or ldap:// (StartTLS)")
    if not parts.hostname:
        raise ValueError(f"server URI '{uri}' has no host")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"server URI '{uri}' must be scheme://host[:port] only")
    ldaps = scheme == "ldaps"
    return DCAddress(uri.strip(), parts.hostname, port or (636 if ldaps else 389), ldaps)


class ADDomain(BaseModel):
    """One trusted AD domain and how to reach it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fqdn: str = Field(min_length=1, max_length=255)
    netbios: str = Field(min_length=1, max_length=15)
    servers: list[str] = Field(min_length=1)
    strategy: Literal["first", "round_robin"] = "first"
    base_dn: str = Field(min_length=1)
    bind_user: str = Field(min_length=1)
    bind_password: SecretStr | None = None
    bind_password_file: Path | None = None
    ca_file: Path
    required_groups: list[str] = Field(min_length=1)
    approver_groups: list[str] = Field(default_factory=list)
    auditor_groups: list[str] = Field(default_factory=list)

    @field_validator("fqdn")
    @classmethod
    def _fqdn(cls, v: str) -> str:
        v = v.strip().rstrip(".")
        if not re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+", v):
            raise ValueError("must be a DNS domain name like corp.example.com")
        return v

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: list[str]) -> list[str]:
        for uri in v:
            parse_server_uri(uri)
        return v

    @model_validator(mode="after")
    def _one_password(self) -> ADDomain:
        if (self.bind_password is None) == (self.bind_password_file is None):
            raise ValueError("set exactly one of bind_password or bind_password_file")
        return self


class ADSettings(BaseModel):
    """``[identity.ad]``: the trusted domains plus limits shared by all of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domains: list[ADDomain] = Field(min_length=1)
    default_domain: str | None = None  # FQDN or NetBIOS name; None: the first domain
    # Per DC: TCP connect, TLS handshake and each LDAP answer. A DC silent this long is skipped.
    connect_timeout_seconds: float = Field(5.0, gt=0, le=120)
    # The whole login (queueing, every DC tried); past it the login fails closed.
    operation_timeout_seconds: float = Field(10.0, gt=0, le=600)
    # Logins talking to the DCs at once (a thread each); the rest wait in arrival order. ldap3
    # is pure Python, so its threads share one interpreter lock: past what hides the DCs'
    # round trips, more of them only slow every login down together. Measured in a login storm
    # (docs/benchmarks.md): login p99 ~1.2 s with 16, ~1.0 s with 8, ~0.95 s with 4, same rate.
    max_concurrency: int = Field(8, ge=1, le=512)
    # How long a failed DC is tried only after the others.
    dc_retry_seconds: float = Field(30.0, ge=0)
    # Idle TLS connections kept per DC and kind (service-account searches; users' password
    # binds), so a login needs no TLS handshake and no service bind. 0: a new connection each time.
    pool_size: int = Field(8, ge=0, le=512)
    # An idle connection older than this is closed instead of reused (DCs drop idle ones: AD's
    # MaxConnIdleTime is 900 s).
    pool_max_idle_seconds: float = Field(120.0, gt=0, le=3600)
    # How long a group's CN and parent groups are reused instead of searched again (the user's
    # own entry and direct groups are always read fresh). 0: search at every login.
    group_cache_seconds: float = Field(60.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _consistent(self) -> ADSettings:
        names: set[str] = set()
        for d in self.domains:
            for n in (d.fqdn.casefold(), d.netbios.casefold()):
                if n in names:
                    raise ValueError(f"domain name '{n}' is configured twice")
                names.add(n)
        if self.default_domain is not None and self.default_domain.casefold() not in names:
            raise ValueError(f"default_domain '{self.default_domain}' is not a configured domain")
        return self
