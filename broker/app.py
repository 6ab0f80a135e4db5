"""Composition root: builds a running broker from adapters and services (the state it opens is
in ``stores``, the adapters a config names come from ``wiring``, reloads are decided in
``reload``), and runs it as one process or several."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh
import structlog

from broker import runtime
from broker.audit.reader import JsonlAuditReader
from broker.config import BrokerConfig
from broker.errors import AuditError, BrokerError, ConfigError
from broker.identity.static import StaticDirectory
from broker.integrity.archive import LocalRecordingArchive
from broker.integrity.keys import VerifyKey
from broker.integrity.manifest import RecordingSealer
from broker.inventory.static import StaticInventory
from broker.notify import channels as notify_channels
from broker.notify.webhook import ClientSessions
from broker.ports import (
    Metrics,
    NullMetrics,
)
from broker.recordings import sealed
from broker.recordings.diskguard import DiskGuard
from broker.recordings.follow import LocalFollow
from broker.recordings.local import LocalRecordingSink, render_cast
from broker.recordings.repair import INTERRUPTED, Repaired, repair_interrupted
from broker.recordings.sealed import SealedInput
from broker.services.access import AccessService
from broker.services.account_check import AccountChecker, AccountEnforcer
from broker.services.auth import Authenticator, TotpSecondFactor
from broker.services.enforcement import GrantEnforcer
from broker.services.fleet import FleetWatch
from broker.services.grants import GrantService
from broker.services.locks import LockGate, LockService
from broker.services.notify import Dispatcher, ExpiringSoon, Notifier
from broker.services.review import ReviewService
from broker.services.roles import grant_policy
from broker.services.sessions import LiveSession, SessionService
from broker.services.text_index import TextIndexService
from broker.services.totp_secrets import load_key
from broker.shipping.service import Shipping
from broker.ssh import patches
from broker.ssh.ca import UserCA
from broker.ssh.jump import host_ca, jump_patterns
from broker.ssh.keys import load_or_create_key, load_or_create_user_ca
from broker.ssh.proxy import REFUSAL_CODES, ProxyListener
from broker.ssh.relay import RelayDeps
from broker.ssh.server import configure_guard, source_guard, start_server

if TYPE_CHECKING:
    from broker.diag.server import DiagServer
    from broker.web.known_hosts import SshTrust
from broker.reload import (
    ConfigSource,
    Reloader,
    Reread,
    compare,
    parent_reread,
    reread,
    with_reload_notices,
)
from broker.stores import Stores, connect_stores, open_stores, signing_key
from broker.wiring import (
    account_policy,
    build_directory,
    build_inventory,
    enforcer_settings,
    totp_policy,
)

log = structlog.get_logger("broker.app")


def _input_sealer(config: BrokerConfig) -> Callable[[str, str], SealedInput] | None:
    """[recordings] input = "sealed": withheld input encrypted to the break-glass key."""
    r = config.recordings
    if r.input != "sealed" or r.input_seal_key is None:
        return None
    return sealed.opener(sealed.load_public_key(r.input_seal_key))


def _disk_guard(config: BrokerConfig) -> DiskGuard:
    r = config.recordings
    return DiskGuard(config.recordings_dir, min_free_percent=r.min_free_percent,
                     min_free_bytes=r.min_free_bytes, critical_free_percent=r.critical_free_percent,
                     critical_free_bytes=r.critical_free_bytes)


def _metrics(config: BrokerConfig) -> Metrics:
    if not config.diag.enabled:
        return NullMetrics()
    from broker.diag.metrics import PrometheusMetrics  # prometheus-client only where it serves

    return PrometheusMetrics()


def _diag_server(b: Broker, disk: DiskGuard) -> DiagServer | None:
    """The ``[diag]`` listener of this process (None when off). With several workers, each
    takes the first free port of ``listen_port`` .. ``listen_port + workers - 1``."""
    from broker.diag.metrics import PrometheusMetrics

    c = b.config
    if not isinstance(b.metrics, PrometheusMetrics):
        return None
    from broker.diag.server import diag_server_for
    from broker.shipping.backlog import read_backlog
    from broker.workers import worker_count

    n, first = worker_count(c), c.diag.listen_port
    ports = [p for p in range(first, first + n) if p <= 65535] if n > 1 and first else None
    spool = c.shipping_spool_dir / "spool.db"
    return diag_server_for(
        c.diag, b.metrics, b.sessions, database=b.stores.database, audit_path=c.audit_path,
        directory=lambda: b._directory, throttle=b.stores.throttle,
        disk=disk.status if c.recordings.enabled else None, draining=lambda: b.draining_since,
        backlog=(lambda: read_backlog(spool, c.recordings_dir, c.audit_path, time.time()))
        if b.shipping.enabled else None, ports=ports,
        refusals=b.proxy_refusals if c.ssh.proxy_protocol else None)


def _review(config: BrokerConfig, s: Stores, key: VerifyKey) -> ReviewService:
    """The sessions API's reading side: the index, grants, recordings (with their manifests,
    checked with this bastion's key) and the local audit log."""
    archive = LocalRecordingArchive(LocalRecordingSink(config.recordings_dir), key,
                                    config.audit_path)
    return ReviewService(s.sessions, s.grants, s.recordings, archive,
                         JsonlAuditReader(config.audit_path), s.audit, s.clock)


def _account_interval(config: BrokerConfig) -> float:
    """How often live SSH sessions' accounts are checked: each user is looked up at most once
    per ``[web] recheck_seconds`` (the cache); the pass itself runs every grant-check interval,
    so a disabled account's sessions end within recheck_seconds plus that interval."""
    return float(config.grants.enforce_interval_seconds)


class Broker:
    """A running broker: stores, services and the SSH listener."""

    def __init__(self, config: BrokerConfig, stores: Stores | None = None, *,
                 source: ConfigSource | None = None) -> None:
        if not config.recordings.enabled and not config.recordings.allow_unrecorded:
            raise ConfigError(
                "recordings.enabled = false requires recordings.allow_unrecorded = true "
                "(benchmarks only: sessions would not be recorded)"
            )
        self.config = config
        self.source = source  # the config file a reload reads (SIGHUP); None: no reloads
        self.stores = stores or open_stores(config, "broker")
        s = self.stores
        # monitoring ([diag]): what the services count, or nothing when it is off
        self.metrics = _metrics(config)
        s.database.observe(self.metrics)
        directory = build_directory(config)
        self._directory = directory
        inventory = build_inventory(config)
        # locks (user, target, stack) refuse logins and sessions on every bastion of the store
        gate = LockGate(s.locks, s.clock)
        self.access = AccessService(inventory, s.grants, s.clock, metrics=self.metrics,
                                    locks=gate)
        key = signing_key(config)
        self.sealer = RecordingSealer(key, s.audit)  # signed manifests
        # what each session showed and typed, for text search (built after its end, in a thread)
        self.text_index = TextIndexService(s.recordings, s.sessions, s.audit)
        disk_guard = _disk_guard(config)  # new sessions; readiness and metrics too
        # notifications ([notify]): queued with the action, sent by every broker's dispatcher
        self.notify_http = ClientSessions()
        n = config.notify
        self.dispatcher = Dispatcher(s.notify, notify_channels.senders(n, self.notify_http),
                                     s.audit, s.clock, max_attempts=n.max_attempts,
                                     timeout=n.timeout_seconds,
                                     keep=timedelta(days=n.keep_days))
        self.notifier = Notifier(s.notify, s.audit, s.clock, notify_channels.subscriptions(n),
                                 wake=self.dispatcher.wake)
        self.expiring = ExpiringSoon(s.grants, self.notifier, s.clock,
                                     timedelta(minutes=n.expiring_soon_minutes))
        self.sessions = SessionService(
            s.recordings, s.sessions, s.audit, s.clock,
            recording_enabled=config.recordings.enabled,
            on_recorded=self._recorded,
            guard=disk_guard, disk_policy=config.recordings.disk_policy,
            sync_interval=config.recordings.sync_interval_seconds,
            disk_check_interval=config.recordings.disk_check_interval_seconds,
            release_scope=patches.corked, metrics=self.metrics, render_cast=render_cast,
            seal_input=_input_sealer(config), notifier=self.notifier,
            node_name=config.node_name,
        )
        self.authenticator = Authenticator(
            directory, TotpSecondFactor(s.totp, s.clock), s.audit, s.throttle, s.clock,
            account_policy(config), totp_store=s.totp, totp_policy=totp_policy(config),
            reauth=s.reauth, metrics=self.metrics, locks=gate,
        )
        self.guard = source_guard(config.limits)  # MaxStartups and penalties, per process
        self.ca = UserCA(load_or_create_user_ca(config.ca_key_path))
        self.host_key = load_or_create_key(config.host_key_path, "bastion-broker host key")
        host_ca(config)  # created now, so `ca known-hosts` can print it before the first jump
        # requests are checked against the inventory in use (a reload may swap it)
        self.grants = GrantService(s.grants, s.audit, s.clock, grant_policy(config.grants),
                                   inventory=lambda: self.access.inventory,
                                   notifier=self.notifier)
        self.deps = RelayDeps(config, self.access, self.sessions, self.ca, s.audit, s.clock)
        self._acceptor: asyncssh.SSHAcceptor | ProxyListener | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self.repaired: list[Repaired] = []  # recordings repaired at start (crash recovery)
        from broker.web.server import web_server_for  # aiohttp only where a server runs

        # live accounts: API callers and SSH sessions re-ask the directory ([web] recheck)
        self.accounts = AccountChecker(directory, s.clock,
                                       recheck_seconds=config.web.recheck_seconds)
        self.web = web_server_for(config, self.grants, self.authenticator, s.audit, s.clock,
                                  s.tokens, self.accounts, _review(config, s, key.public),
                                  ssh_trust=self._ssh_trust)
        self.web_url: str | None = None  # the API's base URL once started
        self.enforcer = GrantEnforcer(self.sessions, s.grants, s.audit, s.clock,
                                      **enforcer_settings(config), locks=s.locks)
        self.locks = LockService(s.locks, s.audit, s.clock,  # kill and lock through the API
                                 notifier=self.notifier)
        self.fleet = FleetWatch(s.fleet, s.audit, s.clock, config.node_name,
                                heartbeat=lambda: self.config.fleet.heartbeat_seconds,
                                lost_after=lambda: self.config.fleet.lost_after_seconds)
        if self.web is not None:
            self.web.use_locks(self.locks)
            self.web.use_notify(self.dispatcher)
            self.web.use_fleet(self.fleet)
            self.web.use_live(LocalFollow(LocalRecordingSink(config.recordings_dir)))
        self.account_enforcer = AccountEnforcer(self.sessions, self.accounts, s.audit,
                                                interval=_account_interval(config))

        # copies off the bastion (S3, CloudWatch Logs), in threads of their own
        self.shipping = Shipping(config.shipping, config.shipping_spool_dir,
                                 config.recordings_dir, config.audit_path, s.audit)
        self.draining_since: datetime | None = None  # drain (SIGQUIT): /readyz fails from then
        self._stop_reason = "bastion shutting down"  # what sessions ended at stop are told
        self.diag = _diag_server(self, disk_guard)  # /healthz, /readyz, /metrics ([diag])
        self.diag_url: str | None = None  # its base URL once started
        self.reload = BrokerReload(self)  # SIGHUP: the config file again, applied live

    def proxy_refusals(self) -> dict[str, int]:
        """The PROXY protocol listener's refusals by code, every code present (for /metrics)."""
        counts = self._acceptor.refusals if isinstance(self._acceptor, ProxyListener) else {}
        return {code: counts.get(code, 0) for code in REFUSAL_CODES}

    async def _ssh_trust(self) -> SshTrust:
        """What ``GET /api/ssh/known_hosts`` publishes (it caches it): the keys as loaded at
        start, the names of the inventory as it is now (a reload may change it)."""
        from broker.web.known_hosts import SshTrust

        instances = await self.access.inventory.instances()
        port = self._acceptor.get_port() if self._acceptor else self.config.ssh.listen_port
        return SshTrust(host_key=self.host_key.export_public_key().decode().strip(),
                        host_ca=host_ca(self.config).export_public_key().decode().strip(),
                        patterns=tuple(jump_patterns(instances)), ssh_port=int(port))

    async def start(self, *, reuse_port: bool = False) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        ssh = self.config.ssh
        # recordings a killed broker left open: cut, closed, session.end (before new sessions)
        self.repaired = await repair_interrupted(self.config.recordings_dir, self.stores.sessions,
                                                 self.stores.audit, self.stores.clock)
        for r in self.repaired:  # a crash-repaired recording gets its signed manifest too
            if r.path is not None:
                await self.sealer.seal_interrupted(r.session_id, r.path, self.stores.clock.now(),
                                                   INTERRUPTED)
                self.text_index.submit(r.session_id, str(r.path))  # and its text indexed
        self.text_index.start()
        patches.install()
        self._acceptor = await start_server(
            self.deps, self.authenticator, self.stores.keys, self.host_key, ssh.listen_host,
            ssh.listen_port, reuse_port=reuse_port, guard=self.guard,
        )
        port = int(self._acceptor.get_port())
        if self.web is not None:
            self.web_url = await self.web.start_or_warn()
        if self.diag is not None:
            self.diag_url = await self.diag.start()
        self.enforcer.start()
        self.account_enforcer.start()
        self.grants.start()  # undecided requests expire ([grants] pending_expire_hours)
        self.dispatcher.start()  # notifications: this broker sends what the outbox holds
        self.expiring.start()
        self.locks.start()  # a lock that reaches its end is audited once (lock.expired)
        self.fleet.start()  # heartbeats; closes what a bastion that went silent left open
        self._checkpoints = asyncio.create_task(self._sign_audit_periodically())
        self.sessions.start_maintenance()
        self.shipping.start()
        self.stores.audit.emit("broker.start", listen=f"{ssh.listen_host}:{port}")
        log.info("broker.listening", host=ssh.listen_host, port=port)
        return port

    async def _recorded(self, live: LiveSession, ended_at: datetime,
                        exit_status: str | None) -> None:
        """A session's recording is closed: seal it, then queue its text for search."""
        await self.sealer(live, ended_at, exit_status)
        self.text_index.submit(live.id, live.writer.location)

    async def _sign_audit_periodically(self) -> None:
        """Sign audit events that have waited a while (quiet times), not only every N events."""
        while True:
            await asyncio.sleep(5)
            try:
                self.stores.audit.checkpoint_if_due()
            except BrokerError as exc:
                log.error("audit.checkpoint_failed", error=str(exc))

    async def drain(self) -> bool:
        """Take this bastion out of service without cutting anyone off (SIGQUIT): ``/readyz``
        fails at once so the balancer stops sending; the listener still accepts for
        ``drain_accept_seconds`` (what it sent before its next health check), then closes; live
        sessions go on. Returns True once no session or login is left, False at the deadline
        (``drain_seconds``): ``stop`` then ends the rest as SIGTERM would, naming the drain."""
        c, loop = self.config.shutdown, asyncio.get_running_loop()
        t0 = loop.time()
        self.draining_since = self.stores.clock.now()
        self.stores.audit.emit("broker.drain", pid=os.getpid(), live_sessions=self.sessions.busy,
                               accept_s=c.drain_accept_seconds, deadline_s=c.drain_seconds)
        log.warning("broker.drain", live_sessions=self.sessions.busy,
                    accept_s=c.drain_accept_seconds, deadline_s=c.drain_seconds)
        await asyncio.sleep(c.drain_accept_seconds)
        if self._acceptor is not None:
            self._acceptor.close()  # new connections are refused; open ones go on
        log.info("broker.drain_closed", live_sessions=self.sessions.busy)
        # logins accepted in the window (at most the login grace) may still open sessions
        while self.sessions.busy or self.guard.unauthenticated:
            if loop.time() - t0 >= c.drain_seconds:
                self._stop_reason = "bastion shutting down: drain deadline passed"
                self.stores.audit.emit("broker.drain_deadline", pid=os.getpid(),
                                       live_sessions=self.sessions.busy)
                log.warning("broker.drain_deadline", live_sessions=self.sessions.busy)
                return False
            await asyncio.sleep(0.2)
        self.stores.audit.emit("broker.drained", pid=os.getpid(),
                               seconds=round(loop.time() - t0, 3))
        log.info("broker.drained", seconds=round(loop.time() - t0, 3))
        return True

    async def stop(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            self._checkpoints = None
        if self.web is not None:
            await self.web.stop()
        if self.diag is not None:  # from now on, probes fail: no new sessions are sent here
            await self.diag.stop()
        await self.enforcer.stop()
        await self.grants.stop()
        await self.expiring.stop()
        await self.dispatcher.stop()
        await self.notify_http.close()
        await self.locks.stop()
        await self.fleet.stop()
        await self.account_enforcer.stop()
        if self._acceptor is not None:
            self._acceptor.close()
        # SIGTERM: users told, sessions drained or ended, recordings closed, within the grace
        await self.sessions.shutdown(self.config.shutdown.grace_seconds, self._stop_reason)
        await self.sessions.stop_maintenance()
        if self._acceptor is not None:
            await self._acceptor.wait_closed()
            self._acceptor = None
        await self.sessions.drain()
        await self.sealer.drain()  # manifests of the sessions that just ended
        await self.text_index.stop()  # their text, for a while; what is left: sessions reindex
        self.stores.audit.emit("broker.stop", live_sessions=len(self.sessions.live))
        await self.shipping.stop()
        close = getattr(self._directory, "close", None)
        if close is not None:
            close()
        await self.stores.close()


class BrokerReload:
    """``Broker.reload``: read the config file again, apply what can change live."""

    def __init__(self, broker: Broker) -> None:
        self._b = broker

    async def __call__(self) -> bool:
        b = self._b
        source = b.source
        if source is None:
            log.warning("config.reload_unavailable", reason="the broker was started without a "
                        "config file")
            return False
        try:
            r = await asyncio.to_thread(reread, source, b.config)
            details = await self._content_changes(r)
            changed = [*r.live, *details]
            # audited before it applies: no change stands without its audit line
            b.stores.audit.emit("config.reloaded", config=str(source.path), pid=os.getpid(),
                                changed=changed, needs_restart=list(r.restart),
                                **{k.rpartition(".")[2]: v for k, v in details.items()})
        except BrokerError as exc:
            self._failed(source, exc.user_message)
            return False
        self._apply(r)
        source.applied = r.applied
        log.info("config.reloaded", config=str(source.path), changed=changed)
        if r.restart:
            log.warning("config.reload_needs_restart", config=str(source.path),
                        keys=list(r.restart))
        return True

    def _failed(self, source: ConfigSource, reason: str) -> None:
        log.error("config.reload_failed", config=str(source.path), error=reason)
        try:
            self._b.stores.audit.emit("config.reload_failed", config=str(source.path),
                                      pid=os.getpid(), reason=reason)
        except AuditError as exc:
            log.error("audit.write_failed", event="config.reload_failed", error=str(exc))

    async def _content_changes(self, r: Reread) -> dict[str, dict[str, list[str]]]:
        """What changed inside the inventory and users files (instance ids, user names)."""
        b = self._b
        details: dict[str, dict[str, list[str]]] = {}
        old_inv = b.access.inventory
        if isinstance(r.inventory, StaticInventory) and isinstance(old_inv, StaticInventory):
            diff = compare({i.id: i for i in await old_inv.instances()},
                            {i.id: i for i in await r.inventory.instances()})
            if diff:
                details["inventory.instances"] = diff
        old_dir = b._directory
        if isinstance(r.directory, StaticDirectory) and isinstance(old_dir, StaticDirectory):
            diff = compare({u.name: u for u in old_dir.users_file.users},
                            {u.name: u for u in r.directory.users_file.users})
            if diff:
                details["identity.users"] = diff
        return details

    def _apply(self, r: Reread) -> None:
        """Swap the new immutable settings in. Synchronous: a login, session or request sees
        either all of the old configuration or all of the new."""
        b, c = self._b, r.running
        if r.inventory is not None:
            b.access.use_inventory(r.inventory)
        if r.directory is not None:
            b.authenticator.use_directory(r.directory)
            b.accounts.use_directory(r.directory)
            b._directory = r.directory
        b.authenticator.configure(account_policy(c), totp_policy(c))
        configure_guard(b.guard, c.limits)
        b.grants.policy = grant_policy(c.grants)
        b.enforcer.configure(**enforcer_settings(c))
        b.accounts.configure(recheck_seconds=c.web.recheck_seconds)
        b.account_enforcer.configure(interval=_account_interval(c))
        if b.web is not None:
            b.web.reconfigure(c.roles, tuple(c.grants.auto_approve_read_only_groups))
        b.deps.config = c
        b.config = c


async def serve(config: BrokerConfig, on_ready: Callable[[int], None] | None = None, *,
                reuse_port: bool = False, notify: bool = True,
                source: ConfigSource | None = None, worker: int | None = None) -> None:
    """Run one broker process until SIGINT/SIGTERM, or until a drain (SIGQUIT) is over; SIGHUP
    reloads ``source`` (see ``broker.workers`` for several processes; ``worker`` is this one's
    index among them)."""
    import signal

    stop = asyncio.Event()
    drain = asyncio.Event()  # held until the broker is up, as a reload is
    reloader = Reloader()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGQUIT, drain.set)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)  # held until the broker is up
    problem = runtime.raise_open_files_limit()  # sessions hold 3 descriptors each
    if problem:
        log.warning("broker.open_files_limit_unchanged", error=problem)
    broker = Broker(config, await connect_stores(config, "broker"), source=source)
    port = await broker.start(reuse_port=reuse_port)
    reloader.start(with_reload_notices(broker.reload) if notify else broker.reload)
    if on_ready:
        on_ready(port)
    if notify:
        runtime.sd_notify("READY=1")
    await _until_stopped(broker, stop, drain, notify)
    if notify:
        runtime.sd_notify("STOPPING=1")
    await reloader.stop()
    await broker.stop()
    if worker is None:
        log.info("broker.stopped", pid=os.getpid())
    else:  # the parent logs broker.stopped once every worker has
        log.info("worker.stopped", worker=worker, pid=os.getpid())


async def _until_stopped(broker: Broker, stop: asyncio.Event, drain: asyncio.Event,
                         notify: bool) -> None:
    """Until SIGTERM/SIGINT, or until a drain is over (its sessions ended, or its deadline)."""
    stopped = asyncio.ensure_future(stop.wait())
    draining = asyncio.ensure_future(drain.wait())
    tasks: list[asyncio.Future[Any]] = [stopped, draining]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if stopped.done():
            return
        if notify:
            runtime.sd_notify("STATUS=draining")
        drained = asyncio.ensure_future(broker.drain())
        tasks.append(drained)
        await asyncio.wait([stopped, drained], return_when=asyncio.FIRST_COMPLETED)
        if drained.done() and drained.exception() is not None:  # e.g. the audit is full
            log.error("broker.drain_failed", error=str(drained.exception()))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run(config: BrokerConfig, on_ready: Callable[[int], None] | None = None, *,
        config_path: Path | None = None) -> int:
    """The broker with ``[ssh] workers`` processes (one per core with 0). With ``config_path``
    (the file ``config`` was loaded from), SIGHUP reloads it; with several workers the parent
    passes SIGHUP on to each of them."""
    from broker.workers import run_workers, worker_count

    source = ConfigSource(config_path, config) if config_path is not None else None
    if worker_count(config) == 1:
        runtime.run_loop(serve(config, on_ready, source=source), config.ssh.event_loop)
        return 0

    def serve_worker(worker_config: BrokerConfig, index: int,
                     ready: Callable[[int], None]) -> None:
        runtime.run_loop(serve(worker_config, ready, reuse_port=True, notify=False,
                               source=source, worker=index), worker_config.ssh.event_loop)

    return run_workers(config, serve_worker, lambda: prepare_state(config), on_ready,
                       reread=None if source is None else parent_reread(source))


def prepare_state(config: BrokerConfig) -> None:
    """Create keys and migrate the embedded store once, before workers race to do it."""

    load_or_create_key(config.host_key_path, "bastion-broker host key")
    load_or_create_user_ca(config.ca_key_path)
    host_ca(config)
    signing_key(config)
    load_key(config.totp.key_file, config.totp_key_default_path)
    if config.store.backend == "sqlite":
        asyncio.run(open_stores(config, "broker").close())
