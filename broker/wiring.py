"""Configuration -> the adapters and policies a broker runs with. Shared by the broker at start,
its configuration reload and ``config check``, so all three read a file the same way."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from broker.config import BrokerConfig
from broker.identity.static import StaticDirectory
from broker.inventory.static import StaticInventory
from broker.ports import Directory, Inventory
from broker.services.auth import AccountPolicy, TotpPolicy


def build_directory(config: BrokerConfig) -> Directory:
    ident = config.identity
    if ident.backend == "ad" and ident.ad is not None:
        from broker.identity.ldap import ADDirectory

        return ADDirectory(ident.ad)
    return StaticDirectory.from_file(ident.users_file, ident.default_domain,
                                     ident.domain_aliases)


def build_inventory(config: BrokerConfig) -> Inventory:
    if config.inventory.backend == "aws" and config.inventory.aws is not None:
        from broker.inventory.aws import AwsInventory

        return AwsInventory(config.inventory.aws)
    return StaticInventory.from_file(config.inventory.file)


def account_policy(config: BrokerConfig) -> AccountPolicy:
    limits = config.limits
    return AccountPolicy(limits.account_free_failures, limits.account_backoff_max_seconds,
                         limits.account_lock_after, limits.known_source_days)


def totp_policy(config: BrokerConfig) -> TotpPolicy:
    return TotpPolicy(config.totp.self_enroll, config.totp.reauth_window_seconds,
                      config.totp.issuer)


def enforcer_settings(config: BrokerConfig) -> dict[str, Any]:
    return {"interval": config.grants.enforce_interval_seconds,
            "warn_before": timedelta(seconds=config.grants.warn_before_seconds),
            "idle_timeout": config.ssh.session_idle_timeout_seconds}
