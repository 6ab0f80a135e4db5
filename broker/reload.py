"""Configuration reload (SIGHUP): what changed in the files, what may change live, and one
reload at a time. ``broker.app.BrokerReload`` applies the result to a running broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel

from broker import runtime
from broker.config import BrokerConfig, load_config
from broker.ports import Directory, Inventory
from broker.wiring import build_directory, build_inventory

log = structlog.get_logger("broker.reload")


# What a reload changes at once, per section (None: every key of it). It applies to the logins,
# sessions, tunnels and API requests that start afterwards; what already runs keeps going as it
# started. Every other key keeps its running value until a restart (config.reload_needs_restart).
LIVE_KEYS: dict[str, frozenset[str] | None] = {
    "limits": None,
    "forwarding": None,
    "grants": None,
    "roles": None,
    "inventory": None,
    "identity": frozenset({"users_file", "default_domain", "domain_aliases", "public_keys"}),
    "upstream": frozenset({"admin_login", "read_only_login", "cert_ttl_seconds",
                           "connect_timeout_seconds"}),
    "totp": frozenset({"self_enroll", "reauth_window_seconds", "issuer"}),
    "ssh": frozenset({"window_bytes", "max_packet_bytes", "session_idle_timeout_seconds"}),
    "shutdown": None,
    "fleet": None,
}


def config_changes(old: BrokerConfig, new: BrokerConfig) -> list[str]:
    """The keys whose values differ, as ``section.key`` (a top-level key by its own name).
    Names only: a caller may log them, never the values (a DSN may hold a password)."""
    changed: list[str] = []
    for name in BrokerConfig.model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if a == b:
            continue
        if isinstance(a, BaseModel) and type(a) is type(b):
            changed += [f"{name}.{key}" for key in type(a).model_fields
                        if getattr(a, key) != getattr(b, key)]
        else:
            changed.append(name)
    return changed


def reloads_live(key: str) -> bool:
    """Whether a reload applies ``key`` (``section.key``) at once."""
    section, _, name = key.partition(".")
    if section not in LIVE_KEYS or not name:
        return False
    names = LIVE_KEYS[section]
    return names is None or name in names


def with_values(config: BrokerConfig, source: BrokerConfig, keys: Iterable[str]) -> BrokerConfig:
    """``config`` with the values ``source`` has for ``keys`` (``section.key``)."""
    updates: dict[str, dict[str, Any]] = {}
    for key in keys:
        section, _, name = key.partition(".")
        updates.setdefault(section, {})[name] = getattr(getattr(source, section), name)
    return config.model_copy(update={
        section: getattr(config, section).model_copy(update=values)
        for section, values in updates.items()})


@dataclass
class ConfigSource:
    """The file a broker was started from, as last applied: the keys a reload changes hold the
    file's values of the last good reload, every other key the value the broker started with
    (so a key that needs a restart is named again at every reload until there is one)."""

    path: Path
    applied: BrokerConfig


@dataclass(frozen=True)
class Reread:
    """A config file read again and validated, with the files it names, and what it changes."""

    applied: BrokerConfig  # the next ``ConfigSource.applied``
    running: BrokerConfig  # what the broker runs with from now
    live: tuple[str, ...]  # keys changed now
    restart: tuple[str, ...]  # keys changed in the file that keep their value until a restart
    inventory: Inventory | None  # the inventory to use from now (None: keep the one in use)
    directory: Directory | None  # the static directory to use from now (None: keep it)


def reread(source: ConfigSource, running: BrokerConfig) -> Reread:
    """Read and validate the config file again, and the inventory and users files it names.
    Raises ``ConfigError`` (file, key and problem) if any of them is invalid. Blocking: a
    running broker calls it in a thread."""
    new = load_config(source.path)
    changed = config_changes(source.applied, new)
    live = tuple(k for k in changed if reloads_live(k))
    restart = tuple(k for k in changed if not reloads_live(k))
    running = with_values(running, new, live)
    inventory = None  # a static inventory file is read again even if its name is the same
    if running.inventory.backend == "static" or any(k.startswith("inventory.") for k in live):
        inventory = build_inventory(running)
    directory = build_directory(running) if running.identity.backend == "static" else None
    return Reread(with_values(source.applied, new, live), running, live, restart, inventory,
                  directory)


def compare(old: Mapping[str, object], new: Mapping[str, object]) -> dict[str, list[str]]:
    diff = {"added": sorted(new.keys() - old.keys()), "removed": sorted(old.keys() - new.keys()),
            "changed": sorted(k for k in old.keys() & new.keys() if old[k] != new[k])}
    return {k: v for k, v in diff.items() if v}


class Reloader:
    """SIGHUP -> reload, one at a time. A signal during a reload asks for exactly one more (the
    file may have changed after it was read); any number of signals then coalesce into it."""

    def __init__(self) -> None:
        self._reload: Callable[[], Awaitable[object]] | None = None
        self._wanted = False
        self._task: asyncio.Task[None] | None = None
        self.runs = 0  # reloads started

    def request(self) -> None:
        self._wanted = True
        if self._reload is not None and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(self._reload))

    def start(self, reload: Callable[[], Awaitable[object]]) -> None:
        """Serve requests from now (one that came while the broker started runs at once)."""
        self._reload = reload
        if self._wanted:
            self.request()

    async def _run(self, reload: Callable[[], Awaitable[object]]) -> None:
        while self._wanted:
            self._wanted = False
            self.runs += 1
            try:
                await reload()
            except Exception as exc:  # a bug: logged, and the next SIGHUP still reloads
                log.error("config.reload_failed", error=repr(exc), exc_info=True)

    async def stop(self) -> None:
        self._reload = None
        if self._task is not None:
            self._task.cancel()  # a reload cut short applies nothing
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def with_reload_notices(reload: Callable[[], Awaitable[object]]
                         ) -> Callable[[], Awaitable[object]]:
    """Tell systemd a reload is under way (RELOADING=1) and when it is over (READY=1)."""

    async def notified() -> object:
        runtime.sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            return await reload()
        finally:
            runtime.sd_notify("READY=1")

    return notified


def parent_reread(source: ConfigSource) -> Callable[[BrokerConfig], BrokerConfig]:
    """The workers parent's reload: its own copy of the configuration, for a worker it starts
    later. Each running worker reloads itself (and logs and audits the outcome); the parent
    says nothing and raises ``ConfigError`` for an invalid file."""

    def parent_reread(running: BrokerConfig) -> BrokerConfig:
        r = reread(source, running)
        source.applied = r.applied
        return r.running

    return parent_reread
