"""The Protocols that services depend on; adapters implement them, ``app.py`` wires them.

Every backend of one Protocol must pass the same contract tests, so SQLite, PostgreSQL, static
files, Active Directory or AWS can replace one another without touching the services.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, Protocol, runtime_checkable

from broker.domain.locks import KillRequest, Lock
from broker.domain.models import Grant, Instance, Principal
from broker.domain.notify import Attempt, Delivery, Outcome
from broker.domain.workflow import HistoryEntry


class Clock(Protocol):
    def now(self) -> datetime:
        """Current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, never going back (durations: the idle timeout).

        Called on the relay's hot path (every chunk stamps a session's activity): keep it as
        cheap as ``time.monotonic``."""
        ...


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """Result of a first-factor check: a principal, or a precise reason for the audit log only."""

    principal: Principal | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.principal is not None


class Directory(Protocol):
    """Corporate identity: checks a password and says who the user is (static file or AD)."""

    async def authenticate(self, username: str, domain: str | None, password: str) -> AuthOutcome:
        """Verify ``password``; must take about the same time for unknown users and bad passwords."""
        ...

    async def lookup(self, username: str, domain: str | None) -> AuthOutcome:
        """Who the user is without a password (used after a registered SSH key was proven):
        the account must exist, be enabled and belong to the required groups."""
        ...

    def canonical_domain(self, domain: str | None) -> str | None:
        """The FQDN for ``domain`` (NetBIOS name, FQDN or None for the default), None if untrusted."""
        ...


class SecondFactor(Protocol):
    async def verify(self, principal: Principal, code: str) -> AuthOutcome:
        """Check a one-time code; a code is accepted at most once per user."""
        ...


class TotpStore(Protocol):
    async def get_secret(self, user_key: str) -> str | None: ...

    async def set_secret(self, user_key: str, secret: str) -> None:
        """Store a new secret and forget the last used step (enrolment or reset)."""
        ...

    async def last_step(self, user_key: str) -> int | None: ...

    async def advance_step(self, user_key: str, step: int) -> bool:
        """Compare-and-set: record ``step`` only if greater than the stored one; True if it was."""
        ...


@dataclass(frozen=True, slots=True)
class ThrottleState:
    """Consecutive failures of one account (as typed: unknown names are throttled alike)."""

    account: str
    failures: int
    next_allowed: float  # epoch seconds
    locked: bool


@dataclass(frozen=True, slots=True)
class SourceThrottleState:
    """Consecutive failures of one account from one source address, and when the account last
    logged in successfully from that address (None: never, or forgotten)."""

    account: str
    source: str  # IP address
    failures: int
    next_allowed: float  # epoch seconds
    locked: bool
    last_success: float | None = None


@dataclass(frozen=True, slots=True)
class ThrottleView:
    """What a login needs to know before its credentials are checked, in one read."""

    account: ThrottleState
    source: SourceThrottleState
    key_last_success: float | None  # the registered key's last successful login, if one is used


class ThrottleStore(Protocol):
    async def state(self, account: str) -> ThrottleState: ...

    async def view(self, account: str, source: str, key_fp: str | None) -> ThrottleView: ...

    async def source_failed(self, account: str, source: str, now: float, free: int,
                            max_backoff: float, lock_after: int) -> SourceThrottleState:
        """Count one more failure of the (account, source) pair atomically; locks the pair
        (only) at ``lock_after`` consecutive failures."""
        ...

    async def login_succeeded(self, account: str, source: str, key_fp: str | None, now: float,
                              forget_before: float) -> None:
        """Reset the pair's counter and the account's (those not locked); remember the source
        (and the key) as known devices of the account at ``now``; forget the account's devices
        last used before ``forget_before``."""
        ...

    async def source_listing(self) -> list[SourceThrottleState]:
        """(account, source) pairs with failures on record, locked first."""
        ...

    async def failed(self, account: str, now: float, free: int, max_backoff: float,
                     lock_after: int) -> ThrottleState:
        """Count one more failure atomically; locks at ``lock_after`` consecutive failures."""
        ...

    async def succeeded(self, account: str) -> None:
        """Reset the counter of an account that is not locked."""
        ...

    async def unlock(self, account: str) -> bool:
        """Clear the failures and locks of the account and of all its (account, source) pairs;
        False if there were none."""
        ...

    async def listing(self) -> list[ThrottleState]: ...

    async def summary(self, now: float) -> ThrottleSummary:
        """How many accounts are locked, and how many (not locked) wait out a back-off at
        ``now`` (epoch seconds): one aggregate query, cheap enough for every metrics scrape."""
        ...


@dataclass(frozen=True, slots=True)
class ThrottleSummary:
    locked: int
    throttled: int


# an OpenSSH public key line -> (normalised line, SHA256 fingerprint); raises StoreError if it is
# not a key. Given to the key stores by the app (the SSH adapter owns key parsing).
ParsePublicKey = Callable[[str], tuple[str, str]]


class KeyStore(Protocol):
    """SSH public keys registered for accounts; a key may replace the password, never the code."""

    async def add(self, account: str, public_key: str, comment: str) -> str:
        """Register a key; returns its SHA256 fingerprint."""
        ...

    async def has(self, account: str, fingerprint: str) -> bool: ...

    async def remove(self, account: str, fingerprint: str) -> bool: ...

    async def listing(self, account: str | None = None) -> list[tuple[str, str, str]]:
        """(account, fingerprint, comment) rows."""
        ...


@dataclass(frozen=True, slots=True)
class ApiTokenRecord:
    """A stored API token: only the SHA-256 of the secret is kept, never the secret."""

    id: str
    owner: str  # user@domain, casefolded
    name: str
    scopes: tuple[str, ...]
    roles: tuple[str, ...]  # the owner's roles when the token was made: its ceiling
    groups: tuple[str, ...]
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class WebSessionRecord:
    """A web (cookie) session as the store keeps it, so operators can list and end it."""

    sid: str
    owner: str  # user@domain, casefolded
    peer: str
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None = None


class TokenStore(Protocol):
    """API tokens and web sessions, in the store every bastion shares."""

    async def add(self, rec: ApiTokenRecord, token_hash: str) -> None: ...

    async def by_hash(self, token_hash: str) -> ApiTokenRecord | None: ...

    async def listing(self, owner: str | None = None) -> list[ApiTokenRecord]:
        """The tokens of ``owner`` (None: everyone's), oldest first."""
        ...

    async def revoke(self, token_id: str, owner: str | None, now: datetime) -> bool:
        """Revoke an active token of ``owner`` (None: anyone's, for operators)."""
        ...

    async def start_session(self, rec: WebSessionRecord) -> None:
        """Record a new web session (a cookie without a record is refused)."""
        ...

    async def session_active(self, sid: str, now: datetime) -> bool:
        """Recorded, not ended and not expired at ``now``."""
        ...

    async def sessions(self, owner: str | None = None, *, now: datetime
                       ) -> list[WebSessionRecord]:
        """Web sessions of ``owner`` (None: everyone's) not ended nor expired at ``now``."""
        ...

    async def revoke_session(self, sid: str, now: datetime) -> bool:
        """End a live session (operators); False if there is none by that id."""
        ...

    async def end_session(self, sid: str, expires: float) -> None: ...

    async def session_ended(self, sid: str) -> bool: ...


class ReauthStore(Protocol):
    async def remember(self, account: str, ip: str, key_fp: str, until: float) -> None: ...

    async def valid(self, account: str, ip: str, key_fp: str, now: float) -> bool: ...


class Inventory(Protocol):
    async def resolve(self, name: str) -> Instance | None:
        """Find an instance by id or name (case-insensitive)."""
        ...

    async def instances(self) -> Sequence[Instance]: ...


class GrantStore(Protocol):
    async def add(self, grant: Grant) -> None: ...

    async def get(self, grant_id: str) -> Grant | None: ...

    async def get_many(self, grant_ids: list[str]) -> dict[str, Grant]: ...

    async def for_user(self, username: str, domain: str) -> list[Grant]:
        """Grants naming this AD user in this domain, any state."""
        ...

    async def replace(self, grant: Grant) -> None:
        """Overwrite a stored grant (operator shortcut; the workflow uses ``update``)."""
        ...

    async def create(self, grant: Grant, entry: HistoryEntry) -> None:
        """A new grant and its first history entry, atomically."""
        ...

    async def update(self, grant: Grant, entry: HistoryEntry) -> Grant:
        """Compare-and-set on ``grant.version``; raises ConflictError if someone else won."""
        ...

    async def history(self, grant_id: str) -> list[HistoryEntry]: ...

    async def search(self, *, username: str | None = None, stack: str | None = None,
                     states: list[str] | None = None, since: datetime | None = None,
                     until: datetime | None = None, expires_before: datetime | None = None,
                     limit: int = 500) -> list[Grant]:
        """Newest first: ``since`` keeps grants that end at or after it, ``until`` those that
        start at or before it, ``expires_before`` those that end before it."""
        ...

    async def list(self, *, username: str | None = None) -> list[Grant]:
        """All grants (of one user), oldest first. Last: its name shadows ``list`` below it."""
        ...


# -- the fleet: which bastions are alive, and the sessions of one that went silent -------------
@dataclass(frozen=True, slots=True)
class Bastion:
    name: str  # its ``node_name``
    started_at: datetime  # when the process that beat last started
    seen_at: datetime  # its last heartbeat
    live_sessions: int = 0  # session rows still open on it


class FleetStore(Protocol):
    """Heartbeats of the bastions sharing the store, and the open session rows of silent ones:
    a bastion that dies and never comes back (a replaced instance) cannot close its own."""

    async def beat(self, name: str, now: datetime, started_at: datetime) -> None:
        """``name`` is alive at ``now``, in a process started at ``started_at``."""
        ...

    async def bastions(self) -> builtins.list[Bastion]:
        """Every bastion that ever beat, by name, with its open session rows counted."""
        ...

    async def stranded(self, silent_since: datetime, exclude: str,
                       limit: int) -> builtins.list[tuple[SessionRecord, datetime]]:
        """Open sessions of bastions (not ``exclude``) last seen before ``silent_since``, each
        with that last heartbeat; oldest first, at most ``limit``."""
        ...

    async def close_stranded(self, session_id: str, bastion: str, ended_at: datetime,
                             exit_status: str) -> bool:
        """Close the row if it is still open and still ``bastion``'s: True for exactly one of
        several bastions trying at once (that one audits it)."""
        ...

    async def reopen_stranded(self, session_id: str, exit_status: str) -> None:
        """Undo ``close_stranded`` (its audit line failed): open again if still so closed."""
        ...


# -- locks and kill requests: incident brakes shared by every bastion on the store --------------
class LockStore(Protocol):
    """Locks (user, target, stack) and requests to end one live session, in the store every
    bastion shares: each bastion's enforcement loop reads them for the sessions it holds."""

    async def add(self, lock: Lock) -> None: ...

    async def active(self, now: datetime) -> builtins.list[Lock]:
        """Locks not removed and not past their end at ``now``, oldest first."""
        ...

    async def listing(self, *, include_inactive: bool, now: datetime) -> builtins.list[Lock]:
        """Active locks, or every lock ever made (``include_inactive``), oldest first."""
        ...

    async def remove(self, lock_id: str, by: str, now: datetime) -> Lock | None:
        """Remove an active lock; returns it as removed, None if there is no active lock by
        that id (unknown, already removed or expired)."""
        ...

    async def note_expired(self, now: datetime, limit: int) -> builtins.list[Lock]:
        """Mark up to ``limit`` locks that reached their end by ``now`` (not removed) as noted,
        and return them: each is returned once, to one caller, however many bastions ask."""
        ...

    async def unnote_expired(self, lock_ids: Sequence[str]) -> None:
        """Undo ``note_expired`` for these locks (their audit line could not be written), so
        that a later call returns them again."""
        ...

    async def request_kill(self, req: KillRequest) -> None: ...

    async def pending_kills(self, session_ids: Sequence[str]) -> builtins.list[KillRequest]:
        """Kill requests not yet carried out for these sessions, oldest first."""
        ...

    async def kill_done(self, request_id: str, now: datetime) -> bool:
        """Mark a request carried out; False if it already was."""
        ...


# -- notifications: the outbox every broker of the store sends from -------------------------------
class NotificationStore(Protocol):
    """The notification outbox: one row per event and channel, sent by whichever broker process
    claims it first (a lease: a broker that dies mid-send leaves it to another after it ends)."""

    async def enqueue(self, rows: Sequence[Delivery]) -> int:
        """Insert the rows; one whose ``dedupe_key`` is stored already is skipped. Returns how
        many were inserted."""
        ...

    async def claim(self, now: datetime, owner: str, lease_until: datetime,
                    channels: Sequence[str], limit: int,
                    per_channel: int) -> builtins.list[Delivery]:
        """Up to ``limit`` pending rows of these channels (at most ``per_channel`` of each) that
        are due at ``now`` and not leased to anyone, oldest due first, leased to ``owner`` and
        with the attempt counted. Two callers never get the same row while its lease runs."""
        ...

    async def finish(self, delivery_id: str, owner: str, outcome: Outcome,
                     now: datetime) -> bool:
        """Store an attempt's outcome and end the lease; False if ``owner`` no longer holds
        it (it ran out and another claimed the row)."""
        ...

    async def finish_many(self, owner: str, outcomes: Sequence[tuple[str, Outcome]],
                          now: datetime) -> set[str]:
        """``finish`` for several rows in one write; returns the ids stored."""
        ...

    async def listing(self, *, status: str | None = None,
                      limit: int = 100) -> builtins.list[Delivery]:
        """The delivery log, newest first."""
        ...

    async def prune(self, before: datetime, limit: int) -> int:
        """Delete up to ``limit`` sent or failed rows last changed before ``before`` (pending
        ones never); returns how many."""
        ...


class NotificationSender(Protocol):
    """One channel (a webhook, an e-mail list): sends a delivery once and says how it went.
    Never raises for the receiver's faults: a refused, failed or unreachable send is an
    ``Attempt`` with its error (the dispatcher bounds the time it may take)."""

    async def send(self, delivery: Delivery) -> Attempt: ...


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One row of the session index, as ``sessions list`` shows it."""

    id: str
    user: str
    target: str  # instance id
    login: str
    grant_id: str
    level: str
    kind: str  # shell | exec | subsystem (sftp) | tunnel | jump
    command: str | None
    peer: str
    started_at: datetime
    ended_at: datetime | None
    exit_status: str | None
    bytes_in: int
    bytes_out: int
    recording: str
    target_name: str = ""  # the instance's name at session start (searchable like the id)
    stack: str = ""  # the instance's stack at session start
    parent_id: str | None = None  # the jump connection (kind "jump") that carried this session
    bastion: str = ""  # ``node_name`` of the broker that relayed it ("" before schema 12/9)


# what ``SessionQuery.status`` accepts: running, ended well (exit 0, closed by client), the rest
SESSION_STATUSES = ("live", "ok", "failed")


@dataclass(frozen=True, slots=True)
class SessionQuery:
    """A search of the session index; every filter given must hold (AND), None means any.

    Rows come newest first, ordered by ``(started_at, id)`` descending; ``after`` is the keyset
    cursor (the ``(started_at, id)`` of the last row of the previous page), so a page costs the
    same at any depth and a session started meanwhile never shifts the pages being read.
    """

    user: str | None = None  # "alice" matches alice@any-domain; "alice@corp.example.com" exactly
    target: str | None = None  # instance id or name, exact (case-insensitive)
    stack: str | None = None
    grant_id: str | None = None
    ticket: str | None = None  # the grant's ticket, exact
    trigger: str | None = None  # the grant's trigger, exact
    kind: str | None = None
    status: str | None = None  # one of SESSION_STATUSES
    since: datetime | None = None  # sessions that overlap [since, until): still live or ended
    until: datetime | None = None  # after ``since``, and started before ``until``
    text: str | None = None  # full-text search over the indexed text (words, all must match)
    parent_id: str | None = None  # sessions carried by this jump connection
    top_level: bool = False  # only sessions with no parent (the list a reviewer starts from)
    after: tuple[datetime, str] | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True)
class TextSegment:
    """A piece of what a session showed or was typed, indexed for text search.

    ``t`` is seconds from the session start of the segment's first byte, so a hit can open the
    recording at that moment."""

    t: float
    source: str  # "output" (what the terminal showed), "input" (echoed input), "command" (exec)
    text: str


@dataclass(frozen=True, slots=True)
class TextHit:
    t: float
    source: str
    snippet: str  # the matching segment's text around the match, plain text (never markup)


@dataclass(frozen=True, slots=True)
class SessionMatch:
    """One search result: the session, and for a text search its first hits (by time)."""

    record: SessionRecord
    hits: tuple[TextHit, ...] = ()


class SessionIndex(Protocol):
    async def started(self, rec: SessionRecord) -> None: ...

    async def ended(
        self, session_id: str, ended_at: datetime, exit_status: str | None,
        bytes_in: int, bytes_out: int,
    ) -> None: ...

    async def get(self, session_id: str) -> SessionRecord | None:
        """By full id (a unique prefix of 6+ characters still works, for older callers; what
        people type goes through ``by_prefix``, which can report an ambiguous prefix)."""
        ...

    async def by_prefix(self, prefix: str, limit: int = 10) -> list[SessionRecord]:
        """Sessions whose id starts with ``prefix`` (case-insensitive), at most ``limit``:
        one row is the session, several are the candidates of an ambiguous prefix."""
        ...

    async def list(self, *, user: str | None = None, limit: int = 100) -> list[SessionRecord]: ...

    async def search(self, q: SessionQuery) -> builtins.list[SessionMatch]:
        """At most ``q.limit`` matches, newest first (see ``SessionQuery``); with ``q.text``,
        each match carries up to 20 hits, earliest first."""
        ...

    async def index_text(self, session_id: str, segments: Sequence[TextSegment]) -> None:
        """Replace the session's indexed text (called once, when its recording is sealed)."""
        ...

    async def text_hits(self, session_id: str, text: str, limit: int = 200
                        ) -> builtins.list[TextHit]:
        """Where in one session ``text`` matches, earliest first (markers in the player)."""
        ...

    async def per_day(self, since: datetime) -> builtins.list[tuple[str, int]]:
        """(UTC date ``YYYY-MM-DD``, sessions started that day) from ``since``, oldest first."""
        ...

    async def live_count(self) -> int:
        """Sessions not ended (on every bastion sharing the store)."""
        ...


class RecordingWriter(Protocol):
    """Appends one session's streams; each call reaches the OS before the bytes reach the client."""

    def write(self, kind: bytes, data: bytes) -> None: ...

    def close(self) -> None: ...

    @property
    def location(self) -> str: ...


@runtime_checkable
class FrameWriter(RecordingWriter, Protocol):
    """A recording on local disk, as the session service's group commit and durability loop use
    it: frames encoded once, appended in batches, flushed to disk off the event loop, and a
    live marker released once the end is in the index (crash repair skips it then)."""

    def frame(self, kind: bytes, data: bytes, t_us: int | None = None) -> list[bytes]:
        """One encoded frame, stamped now or at ``t_us`` (from ``now_us``; never before the
        last frame's stamp)."""
        ...

    def now_us(self) -> int: ...

    def write_frames(self, parts: list[bytes]) -> None: ...

    @property
    def dirty(self) -> bool: ...

    def sync(self) -> None: ...

    def release(self) -> None: ...


class DiskLevel(enum.Enum):
    OK = "ok"
    LOW = "low"  # no new sessions
    CRITICAL = "critical"  # live sessions end (strict) or go on unrecorded (best-effort)


@dataclass(frozen=True, slots=True)
class DiskStatus:
    level: DiskLevel
    free_bytes: int
    total_bytes: int


class DiskSpace(Protocol):
    """Free space where recordings go (``broker.recordings.diskguard``)."""

    def status(self) -> DiskStatus: ...


class RecordingSink(Protocol):
    def open(self, session_id: str, meta: dict[str, Any]) -> RecordingWriter:
        """Create the recording; raise RecordingError if it cannot be created (fail closed)."""
        ...

    def open_read(self, location: str) -> BinaryIO:
        """The recording as a binary file to read frame by frame (the caller closes it)."""
        ...


class AuditSink(Protocol):
    def emit(self, event: str, **fields: Any) -> None:
        """Append one event durably; raise AuditError if it cannot be written (fail closed)."""
        ...


class Metrics(Protocol):
    """What the services report for monitoring (``broker/diag``; ``NullMetrics`` when it is off).

    Each call is made once per login, access decision, session, or store or directory call, never
    per relayed chunk: live sessions and their byte counters are read when metrics are scraped.
    Reasons and statuses are passed as the audit log has them; the adapter maps them to a
    bounded set of label values.
    """

    def login(self, ok: bool, reason: str) -> None:
        """A login ended (SSH or API): the method if ``ok`` (``password+totp``...), else the
        audit reason of the failure."""
        ...

    def login_seconds(self, outcome: str, seconds: float) -> None:
        """How long a login took to answer: ``success``, ``failure`` or ``enrolment``."""
        ...

    def account_locked(self) -> None:
        """An account reached its lock threshold."""
        ...

    def access_decision(self, decision: str) -> None:
        """A grant check: ``allow``, ``deny`` (no live grant) or ``unknown_target``."""
        ...

    def session_ended(self, kind: str, exit_status: str | None) -> None:
        """A recorded session ended with this status (as in its ``session.end`` event)."""
        ...

    def directory_call(self, op: str, seconds: float) -> None:
        """One ``Directory.authenticate`` or ``lookup`` took ``seconds``."""
        ...

    def store_call(self, seconds: float) -> None:
        """One store call (queueing for the database included) took ``seconds``."""
        ...


class NullMetrics:
    """``Metrics`` when the diagnostics listener is off: every report is dropped."""

    def login(self, ok: bool, reason: str) -> None:
        return None

    def login_seconds(self, outcome: str, seconds: float) -> None:
        return None

    def account_locked(self) -> None:
        return None

    def access_decision(self, decision: str) -> None:
        return None

    def session_ended(self, kind: str, exit_status: str | None) -> None:
        return None

    def directory_call(self, op: str, seconds: float) -> None:
        return None

    def store_call(self, seconds: float) -> None:
        return None


class Database(Protocol):
    """The connection or pool behind every store of one backend (readiness and latency)."""

    async def ping(self) -> None:
        """One cheap round trip; raises StoreError if the store cannot answer."""
        ...

    def observe(self, metrics: Metrics) -> None:
        """Report the duration of every store call to ``metrics`` from now on."""
        ...


# -- session review: the audit log and recordings as a reviewer reads them (the sessions API) --
@dataclass(frozen=True, slots=True)
class AuditQuery:
    """A search of the audit log; every filter given must hold, None means any.

    Events come newest first (log order, backwards); ``before_seq`` is the keyset cursor (the
    ``seq`` of the last event of the previous page)."""

    session_id: str | None = None
    user: str | None = None  # "alice" matches user or actor alice@any-domain; "alice@d" exactly
    event: str | None = None  # an event name, or a family as "sftp.*"
    since: datetime | None = None
    until: datetime | None = None
    before_seq: int | None = None
    limit: int = 50


class AuditReader(Protocol):
    """The local audit log read back, in bounded memory whatever its size."""

    async def search(self, q: AuditQuery) -> list[dict[str, Any]]:
        """At most ``q.limit`` events as logged, newest first."""
        ...

    async def count(self, q: AuditQuery) -> int:
        """How many events match (``q.limit`` and ``q.before_seq`` ignored)."""
        ...


# what ``IntegrityCheck.status`` says: the seal holds, it does not, no seal (yet), no recording
INTEGRITY_STATUSES = ("verified", "failed", "unsealed", "not recorded")


@dataclass(frozen=True, slots=True)
class IntegrityCheck:
    status: str  # one of INTEGRITY_STATUSES
    errors: tuple[tuple[str, str], ...] = ()  # (code, message), as ``verify`` reports them
    warnings: tuple[tuple[str, str], ...] = ()


class RecordingArchive(Protocol):
    """What a reviewer reads beside a recording: its size, its signed manifest and whether the
    seal still holds. Blocking file work: callers run it in a thread."""

    def size(self, location: str) -> int | None:
        """The recording's size in bytes; None when the file is not on this bastion."""
        ...

    def manifest(self, session_id: str, location: str) -> bytes | None:
        """The signed manifest file as stored; None when there is none."""
        ...

    def verify(self, session_id: str, location: str, *, live: bool) -> IntegrityCheck:
        """Check the manifest's signature, every file it lists and its seal in the audit log."""
        ...
