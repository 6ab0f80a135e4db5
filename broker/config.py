"""Typed configuration loaded from TOML. A bad file names the file, the key and the problem."""

from __future__ import annotations

import ipaddress
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.domain.models import Trigger
from broker.domain.notify import EVENTS, UnknownEvent, check_events
from broker.errors import ConfigError
from broker.identity.ad_settings import ADSettings
from broker.inventory.aws import AwsInventorySettings
from broker.shipping.settings import ShippingSettings

Port = Annotated[int, Field(ge=0, le=65535)]

# Modern algorithms only. AES-GCM by default on both legs: asyncssh rebuilds its
# chacha20-poly1305 cipher objects per packet, which halves throughput, and a client picks its own
# first choice among what the server offers. Add "chacha20-poly1305@openssh.com" to ``ciphers`` for
# clients without AES-GCM.
DEFAULT_KEX = [
    "mlkem768x25519-sha256",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
]
DEFAULT_CIPHERS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
]
DEFAULT_MACS = ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SSHSettings(_Model):
    listen_host: str = "127.0.0.1"
    listen_port: Port = 2222
    host_key: Path | None = None  # default: STATE_DIR/ssh_host_ed25519_key
    # from connect to authenticated, as OpenSSH's LoginGraceTime (also 120 s): long enough to
    # type the password, open the authenticator app and wait for a fresh code
    login_grace_seconds: float = Field(default=120.0, gt=0, le=600)
    # from connect to the client's first authentication request (key exchange done), as a
    # limit of its own: a connection that stalls before it is closed after this long
    kex_grace_seconds: float = Field(default=10.0, gt=0, le=600)
    # broker processes sharing the port (SO_REUSEPORT); 0 = one per core
    workers: int = Field(default=1, ge=0, le=64)
    kex_algs: list[str] = Field(default_factory=lambda: list(DEFAULT_KEX))
    ciphers: list[str] = Field(default_factory=lambda: list(DEFAULT_CIPHERS))
    macs: list[str] = Field(default_factory=lambda: list(DEFAULT_MACS))
    window_bytes: int = Field(default=2 * 1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024)
    max_packet_bytes: int = Field(default=32768, ge=4096, le=256 * 1024)
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"  # see broker/runtime.py
    # end a shell/exec/sftp session (ProxyJump's inner ones too) after this long with no byte
    # either way, like OpenSSH's ChannelTimeout; 0 = never (tunnels: [forwarding])
    session_idle_timeout_seconds: float = Field(default=0.0, ge=0, le=7 * 86400)
    # behind a TCP load balancer (HAProxy, AWS NLB): each connection from one of
    # trusted_proxies (CIDRs) starts with a PROXY protocol v1/v2 header naming the client, whose
    # address the broker then uses everywhere; a connection from any other peer, or without a
    # valid header within proxy_header_timeout_seconds, is closed before any SSH byte
    proxy_protocol: bool = False
    trusted_proxies: list[str] = Field(default_factory=list)
    proxy_header_timeout_seconds: float = Field(default=5.0, gt=0, le=120)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        return _check_cidrs(v)

    @model_validator(mode="after")
    def _proxies_needed(self) -> SSHSettings:
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError("proxy_protocol = true needs trusted_proxies (the balancers' "
                             "addresses as CIDRs): a PROXY header from anyone else is refused")
        return self


def _check_cidrs(v: list[str]) -> list[str]:
    for n in v:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError:
            raise ValueError(f"not an IP network: {n!r}") from None
    return v


class UpstreamSettings(_Model):
    admin_login: str = "admin"
    read_only_login: str = "readonly"
    cert_ttl_seconds: int = Field(default=120, ge=30, le=3600)
    connect_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    ca_key: Path | None = None  # default: STATE_DIR/ca/user_ca


class IdentitySettings(_Model):
    backend: Literal["static", "ad"] = "static"
    # static: users and password hashes in a TOML file, one domain (plus NetBIOS aliases)
    users_file: Path = Path("users.toml")
    default_domain: str = "corp.example.com"
    domain_aliases: dict[str, str] = Field(default_factory=dict)  # NetBIOS name -> FQDN
    # ad: Active Directory over LDAPS/StartTLS, one or more trusted domains
    ad: ADSettings | None = None
    # A registered SSH key (bastion-broker key add) may replace the password, never the code.
    public_keys: bool = False
    # accept a user name that SASLprep changes (fullwidth letters, a soft hyphen...) as the name
    # it becomes; off: refused. Audited as sent either way (broker.ssh.usernames)
    normalize_names: bool = False

    @model_validator(mode="after")
    def _backend_settings(self) -> IdentitySettings:
        if self.backend == "ad" and self.ad is None:
            raise ValueError("backend = 'ad' needs an [identity.ad] section")
        return self

    @property
    def effective_default_domain(self) -> str:
        """The FQDN a bare user name belongs to, for either backend."""
        if self.backend == "ad" and self.ad is not None:
            wanted = (self.ad.default_domain or self.ad.domains[0].fqdn).casefold()
            for d in self.ad.domains:
                if wanted in (d.fqdn.casefold(), d.netbios.casefold()):
                    return d.fqdn
            return self.ad.domains[0].fqdn
        return self.default_domain

    @property
    def effective_aliases(self) -> dict[str, str]:
        """NetBIOS name (upper case) -> FQDN, for ``CORP\\alice`` forms."""
        if self.backend == "ad" and self.ad is not None:
            return {d.netbios.upper(): d.fqdn for d in self.ad.domains}
        return {k.upper(): v for k, v in self.domain_aliases.items()}


class TotpSettings(_Model):
    issuer: str = "bastion-broker"
    # Encryption key for secrets at rest: $BASTION_BROKER_TOTP_KEY, the systemd credential
    # "totp-key", this file, or (default) STATE_DIR/totp.key generated on first start.
    key_file: Path | None = None
    # After a correct password, a user without TOTP may enrol by scanning the QR code shown in
    # the login prompt and answering with the first code (audited). Off: an operator enrols.
    self_enroll: bool = False
    # Opt-in: within this many seconds of a full login, the same account from the same address
    # (with the same SSH key, if one was used) is not asked for a code again. 0 = off.
    reauth_window_seconds: int = Field(default=0, ge=0, le=3600)


class LimitsSettings(_Model):
    """Flood and guessing limits (OpenSSH's MaxStartups and PerSourcePenalties, NIST 800-63B)."""

    max_startups: int = Field(default=100, ge=1, le=100_000)
    max_startups_per_source: int = Field(default=10, ge=1, le=10_000)
    max_auth_failures_per_connection: int = Field(default=3, ge=1, le=10)
    account_free_failures: int = Field(default=3, ge=0, le=50)
    account_backoff_max_seconds: float = Field(default=60.0, ge=0, le=3600)
    account_lock_after: int = Field(default=50, ge=1, le=100)  # NIST: at most 100
    source_penalty_after: int = Field(default=10, ge=1, le=1000)
    source_penalty_window_seconds: float = Field(default=60.0, gt=0, le=86400)
    source_penalty_seconds: float = Field(default=30.0, gt=0, le=86400)
    source_penalty_max_seconds: float = Field(default=600.0, gt=0, le=86400)
    penalty_exempt: list[str] = Field(default_factory=list)  # CIDRs never penalised
    # open session channels (shell, exec, sftp) on one connection, as OpenSSH's MaxSessions,
    # and of one user in one broker process; the excess is refused ("administratively prohibited")
    max_sessions_per_connection: int = Field(default=10, ge=1, le=1000)
    max_sessions_per_user: int = Field(default=50, ge=1, le=100_000)
    # an address or registered key that logged in to an account within this many days is a
    # known device of it: only failures from that same address delay or lock it (0: none)
    known_source_days: float = Field(default=30.0, ge=0, le=3650)

    @field_validator("penalty_exempt")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for n in v:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError:
                raise ValueError(f"not an IP network: {n!r}") from None
        return v


class RoleSettings(_Model):
    """Directory groups that carry roles (AD groups can also be marked in [identity.ad])."""

    approver_groups: list[str] = Field(default_factory=list)
    auditor_groups: list[str] = Field(default_factory=list)
    admin_groups: list[str] = Field(default_factory=list)


class GrantSettings(_Model):
    default_hours: float = Field(default=8.0, gt=0, le=24 * 30)
    max_hours_admin: float = Field(default=12.0, gt=0, le=24 * 30)
    max_hours_read_only: float = Field(default=24.0, gt=0, le=24 * 30)
    two_approvers_for_admin: bool = False
    # read-only requests are approved at once for members of these groups or with these triggers
    auto_approve_read_only_groups: list[str] = Field(default_factory=list)
    auto_approve_read_only_triggers: list[Trigger] = Field(default_factory=list)
    # a request nobody approved or rejected within this many hours (from when it last became
    # pending) expires: approving it is refused and the requester asks again
    pending_expire_hours: float = Field(default=24.0, gt=0, le=24 * 30)
    # live sessions: how often grants are re-checked, and how long before expiry users are warned
    enforce_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    warn_before_seconds: float = Field(default=300.0, ge=0, le=3600)


class WebSettings(_Model):
    """The HTTPS/HTTP API and UI (grant workflow, sessions). Behind TLS in production: put a
    reverse proxy in front, or give cert_file/key_file."""

    enabled: bool = True
    listen_host: str = "127.0.0.1"
    listen_port: Port = 8443
    cert_file: Path | None = None
    key_file: Path | None = None
    public_url: str | None = None  # as users reach it (for links and CLI defaults)
    session_minutes: int = Field(default=480, ge=5, le=24 * 60)
    # cookie signing key; default STATE_DIR/web.key (every bastion of a fleet needs the same)
    signing_key_file: Path | None = None
    secure_cookies: bool = True  # False only for the loopback demo over plain HTTP
    # listener limits: a request's header must arrive within header_timeout_seconds of its first
    # byte (or of connecting), its body within body_timeout_seconds of the header; an idle
    # keep-alive connection closes after keepalive_timeout_seconds; connections at once, overall
    # and per source address (at the overall cap the stalest one waiting for a header goes)
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    keepalive_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    max_connections: int = Field(default=512, ge=1, le=100_000)
    max_connections_per_source: int = Field(default=32, ge=1, le=100_000)
    # API sessions, tokens and live SSH sessions re-ask the directory (account enabled, groups,
    # roles) after this many seconds at most, per process (0: at every use)
    recheck_seconds: int = Field(default=60, ge=0, le=3600)
    # the security console's asciinema player (asciinema-player.min.js and .css); default: the
    # source tree's web/node_modules/asciinema-player/dist/bundle when scripts/bootstrap put it
    # there. Without it the console works and says replay is unavailable
    player_dir: Path | None = None
    # reverse proxies (CIDRs) whose X-Forwarded-For is believed: from one of them the client is
    # the right-most X-Forwarded-For entry that is not itself a trusted proxy (empty: ignored)
    trusted_proxies: list[str] = Field(default_factory=list)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        return _check_cidrs(v)


class DiagSettings(_Model):
    """Health and metrics for monitoring: ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus).
    Plain HTTP without authentication: keep it on loopback or a management network.

    With ``[ssh] workers`` > 1 every worker serves its own metrics, on the first free port of
    ``listen_port`` .. ``listen_port + workers - 1``: scrape them all (see broker/diag)."""

    enabled: bool = False
    listen_host: str = "127.0.0.1"
    listen_port: Port = 9482
    # each readiness check (store, audit file, recordings disk, directory) fails after this long
    check_timeout_seconds: float = Field(default=2.0, gt=0, le=30)


class InventorySettings(_Model):
    backend: Literal["static", "aws"] = "static"
    file: Path = Path("inventory.toml")  # static
    aws: AwsInventorySettings | None = None  # aws: CloudFormation stacks -> EC2 instances

    @model_validator(mode="after")
    def _backend_settings(self) -> InventorySettings:
        if self.backend == "aws" and self.aws is None:
            raise ValueError("backend = 'aws' needs an [inventory.aws] section")
        return self


class StoreSettings(_Model):
    """SQLite for one bastion; PostgreSQL for a fleet sharing grants, codes and sessions."""

    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: Path | None = None  # sqlite; default: STATE_DIR/broker.db
    # postgres: postgresql://broker:PASSWORD@db:5432/broker?sslmode=verify-full, or from a file
    dsn: str | None = Field(default=None, repr=False)
    dsn_file: Path | None = None
    pool_min: int = Field(default=1, ge=1, le=100)
    pool_max: int = Field(default=10, ge=1, le=500)

    @model_validator(mode="after")
    def _backend_settings(self) -> StoreSettings:
        if self.backend == "postgres" and not (self.dsn or self.dsn_file):
            raise ValueError("backend = 'postgres' needs dsn or dsn_file")
        return self


INPUT_MODES = ("redact", "sealed")


class RecordingSettings(_Model):
    dir: Path | None = None  # default: STATE_DIR/recordings
    enabled: bool = True  # benchmark-only switch; the broker refuses to start with False unless
    allow_unrecorded: bool = False  # this is also set, and says so in every session.start event
    # durability: fsync every live recording at least this often (and at session end)
    sync_interval_seconds: float = Field(default=1.0, gt=0, le=1.0)
    # disk guard on the recordings directory: below "min free" no new session starts; below
    # "critical" live sessions end (strict) or go on unrecorded with an audit event (best-effort).
    # A threshold is the larger of its percent of the file system and its byte count.
    min_free_percent: float = Field(default=2.0, ge=0, le=100)
    min_free_bytes: int = Field(default=0, ge=0)
    critical_free_percent: float = Field(default=1.0, ge=0, le=100)
    critical_free_bytes: int = Field(default=0, ge=0)
    disk_policy: Literal["strict", "best-effort"] = "strict"
    disk_check_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    # input the target did not echo (a password at a no-echo prompt; all stdin without a pty):
    # "redact" records a marker with its length only; "sealed" also keeps the bytes encrypted
    # to the break-glass public key ``input_seal_key`` (X25519 PEM) in SESSION_ID.sealed, opened
    # only by ``sessions unseal`` (audited). Raw input is never kept in the clear.
    input: str = "redact"
    input_seal_key: Path | None = None

    @field_validator("input")
    @classmethod
    def _input_mode(cls, v: str) -> str:
        if v not in INPUT_MODES:
            raise ValueError(f'must be "redact" or "sealed", not {v!r} (input a target did not '
                             "echo is never kept in the clear; \"sealed\" keeps it for "
                             "break-glass only)")
        return v

    @model_validator(mode="after")
    def _thresholds(self) -> RecordingSettings:
        if (self.critical_free_percent > self.min_free_percent
                or self.critical_free_bytes > self.min_free_bytes > 0):
            raise ValueError("the critical free-space threshold must not exceed min_free")
        if self.input == "sealed" and self.input_seal_key is None:
            raise ValueError('input = "sealed" needs input_seal_key (the break-glass public '
                             "key, X25519 PEM)")
        return self


class ShutdownSettings(_Model):
    # SIGTERM: users are told, sessions get this long to end, then are ended; the broker exits
    grace_seconds: float = Field(default=30.0, ge=0, le=3600)
    # drain (SIGQUIT, `bastion-broker drain`): /readyz fails at once; the SSH listener still
    # accepts for drain_accept_seconds (what a balancer sends before its health check notices),
    # then closes; live sessions go on until they end, or until drain_seconds after the drain
    # began, when the SIGTERM path above ends the rest; the broker exits once none is left
    drain_accept_seconds: float = Field(default=5.0, ge=0, le=600)
    drain_seconds: float = Field(default=3600.0, gt=0, le=7 * 86400)

    @model_validator(mode="after")
    def _drain_window(self) -> ShutdownSettings:
        if self.drain_accept_seconds > self.drain_seconds:
            raise ValueError(f"drain_accept_seconds ({self.drain_accept_seconds:g}) must not "
                             f"exceed drain_seconds ({self.drain_seconds:g}): the listener "
                             "must close before the drain's deadline")
        return self


class FleetSettings(_Model):
    # every bastion records that it is alive this often in the shared store...
    heartbeat_seconds: float = Field(default=10.0, gt=0, le=300)
    # ...and closes as lost the sessions still open on one not seen for this long
    lost_after_seconds: float = Field(default=120.0, gt=0, le=7 * 86400)

    @model_validator(mode="after")
    def _three_beats(self) -> FleetSettings:
        if self.lost_after_seconds < 3 * self.heartbeat_seconds:
            raise ValueError(f"lost_after_seconds ({self.lost_after_seconds:g}) must be at least "
                             f"3 heartbeats ({3 * self.heartbeat_seconds:g}): one late beat "
                             "must not close a live bastion's sessions")
        return self


class ForwardingSettings(_Model):
    """Port forwarding (ssh -L/-D, RDP tunnels): only to granted instances, on these ports."""

    enabled: bool = True
    # ports a tunnel may reach, per instance OS; a stack listed in stack_ports uses its own list
    ports: dict[Literal["linux", "windows"], list[Port]] = Field(
        default_factory=lambda: {"linux": [22], "windows": [3389]})  # type: ignore[arg-type]
    stack_ports: dict[str, list[Port]] = Field(default_factory=dict)
    rdp_ports: list[Port] = Field(default_factory=lambda: [3389])  # audited as RDP
    # bytes on an RDP port that are not an RDP negotiation: recorded, then cut or relayed
    non_rdp: Literal["cut", "relay"] = "cut"
    negotiation_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    idle_timeout_seconds: float = Field(default=900.0, ge=0, le=86400)  # 0 = none
    connect_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # instance ids/names whose SSH port may be reached as a raw, unrecorded channel (ssh -J)
    raw_ssh_targets: list[str] = Field(default_factory=list)
    # inside a recorded ProxyJump connection: ssh -L/-D/-W to the target's own loopback (VS Code
    # Remote-SSH reaches its server that way), opened from the target; never to other hosts
    target_loopback: bool = True


_CHANNEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def _events(v: list[str]) -> list[str]:
    try:
        return check_events(v)
    except UnknownEvent as exc:
        raise ValueError(str(exc)) from None


class WebhookChannel(_Model):
    """A signed webhook ([[notify.webhooks]]): every event it takes, POSTed as JSON."""

    name: str = Field(pattern=_CHANNEL_NAME)
    url: str = Field(repr=False)  # a Slack or Teams URL is itself a secret: never logged
    # the HMAC key of X-Bastion-Signature (the file's text, stripped); none: unsigned
    secret_file: Path | None = None
    format: Literal["json", "slack", "teams"] = "json"
    events: list[str] = Field(default_factory=lambda: list(EVENTS))

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return v

    _check_events = field_validator("events")(_events)


class EmailChannel(_Model):
    """E-mail over SMTP ([[notify.email]]) to a list of addresses."""

    name: str = Field(pattern=_CHANNEL_NAME)
    to: list[str] = Field(min_length=1)
    events: list[str] = Field(default_factory=lambda: list(EVENTS))
    smtp_host: str
    smtp_port: Port = 587
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password_file: Path | None = None
    from_addr: str
    ca_file: Path | None = None  # the SMTP server's CA (default: the system's)

    _check_events = field_validator("events")(_events)


class NotifySettings(_Model):
    """Notifications ([notify]): signed webhooks and e-mail, sent from an outbox in the store."""

    expiring_soon_minutes: float = Field(default=30.0, gt=0, le=7 * 24 * 60)
    max_attempts: int = Field(default=8, ge=1, le=50)  # then the delivery is failed
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)  # per attempt
    keep_days: float = Field(default=30.0, gt=0, le=3650)  # sent/failed rows in the log
    webhooks: list[WebhookChannel] = Field(default_factory=list)
    email: list[EmailChannel] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> NotifySettings:
        seen: set[str] = set()
        channels: list[WebhookChannel | EmailChannel] = [*self.webhooks, *self.email]
        for c in channels:
            if c.name in seen:
                raise ValueError(f"two channels are named {c.name!r} (names must be unique)")
            seen.add(c.name)
        return self

    def resolved(self, base: Path) -> NotifySettings:
        return self.model_copy(update={
            "webhooks": [w.model_copy(update={"secret_file": _resolve(base, w.secret_file)})
                         for w in self.webhooks],
            "email": [e.model_copy(update={"password_file": _resolve(base, e.password_file),
                                           "ca_file": _resolve(base, e.ca_file)})
                      for e in self.email]})


class AuditSettings(_Model):
    path: Path | None = None  # default: STATE_DIR/audit/audit.jsonl
    # rotation: the current file is closed and renamed audit-YYYYMMDDTHHMMSSZ-SEQ.jsonl once it
    # reaches rotate_bytes (0: never by size) or, with rotate_daily, on the first event of a new
    # UTC day; the hash chain continues in the next file
    rotate_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    rotate_daily: bool = False


class BrokerConfig(_Model):
    state_dir: Path
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # this bastion's name in a fleet: stored with its sessions so that the others can say where
    # a live session runs ("watch it on bastion-b"); the host name unless set
    node_name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=64,
                           pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    ssh: SSHSettings = SSHSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    identity: IdentitySettings = IdentitySettings()
    totp: TotpSettings = TotpSettings()
    limits: LimitsSettings = LimitsSettings()
    roles: RoleSettings = RoleSettings()
    web: WebSettings = WebSettings()
    diag: DiagSettings = DiagSettings()  # health and metrics, off by default
    grants: GrantSettings = GrantSettings()
    inventory: InventorySettings = InventorySettings()
    store: StoreSettings = StoreSettings()
    recordings: RecordingSettings = RecordingSettings()
    audit: AuditSettings = AuditSettings()
    shipping: ShippingSettings = ShippingSettings()  # copies to S3 / CloudWatch Logs
    forwarding: ForwardingSettings = ForwardingSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    fleet: FleetSettings = FleetSettings()  # heartbeats; sessions of a silent bastion
    notify: NotifySettings = NotifySettings()  # webhooks and e-mail

    # Resolved paths: everything defaults to a place under state_dir.
    @property
    def host_key_path(self) -> Path:
        return self.ssh.host_key or self.state_dir / "ssh_host_ed25519_key"

    @property
    def ca_key_path(self) -> Path:
        return self.upstream.ca_key or self.state_dir / "ca" / "user_ca"

    @property
    def db_path(self) -> Path:
        return self.store.path or self.state_dir / "broker.db"

    @property
    def recordings_dir(self) -> Path:
        return self.recordings.dir or self.state_dir / "recordings"

    @property
    def totp_key_default_path(self) -> Path:
        return self.state_dir / "totp.key"

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.state_dir / "audit" / "audit.jsonl"

    @property
    def shipping_spool_dir(self) -> Path:
        return self.shipping.spool_dir or self.state_dir / "shipping"


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    return p if p.is_absolute() else (base / p).resolve()


def _resolve_ad(base: Path, ad: ADSettings | None) -> ADSettings | None:
    if ad is None:
        return None
    domains = [
        d.model_copy(update={"ca_file": _resolve(base, d.ca_file),
                             "bind_password_file": _resolve(base, d.bind_password_file)})
        for d in ad.domains
    ]
    return ad.model_copy(update={"domains": domains})


def _error_text(path: Path, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"{path}: key '{key}': {err['msg']}")
    return "\n".join(parts)


def load_config(path: Path) -> BrokerConfig:
    """Read and validate ``path``; relative paths inside it are relative to its directory."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        cfg = BrokerConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_error_text(path, exc)) from None
    base = path.resolve().parent
    state_dir = cfg.state_dir if cfg.state_dir.is_absolute() else (base / cfg.state_dir).resolve()
    return cfg.model_copy(
        update={
            "state_dir": state_dir,
            "ssh": cfg.ssh.model_copy(update={"host_key": _resolve(base, cfg.ssh.host_key)}),
            "upstream": cfg.upstream.model_copy(
                update={"ca_key": _resolve(base, cfg.upstream.ca_key)}
            ),
            "identity": cfg.identity.model_copy(
                update={"users_file": _resolve(base, cfg.identity.users_file),
                        "ad": _resolve_ad(base, cfg.identity.ad)}
            ),
            "inventory": cfg.inventory.model_copy(
                update={"file": _resolve(base, cfg.inventory.file)}
            ),
            "store": cfg.store.model_copy(update={"path": _resolve(base, cfg.store.path),
                                                  "dsn_file": _resolve(base, cfg.store.dsn_file)}),
            "recordings": cfg.recordings.model_copy(
                update={"dir": _resolve(base, cfg.recordings.dir),
                        "input_seal_key": _resolve(base, cfg.recordings.input_seal_key)}
            ),
            "audit": cfg.audit.model_copy(update={"path": _resolve(base, cfg.audit.path)}),
            "shipping": cfg.shipping.resolved(base),
            "totp": cfg.totp.model_copy(update={"key_file": _resolve(base, cfg.totp.key_file)}),
            "notify": cfg.notify.resolved(base),
            "web": cfg.web.model_copy(update={"cert_file": _resolve(base, cfg.web.cert_file),
                                              "key_file": _resolve(base, cfg.web.key_file),
                                              "signing_key_file": _resolve(
                                                  base, cfg.web.signing_key_file),
                                              "player_dir": _resolve(base, cfg.web.player_dir)}),
        }
    )
