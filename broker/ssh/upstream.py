"""Connections from the broker to targets, with the target's host key verified.

Trust comes only from the inventory (host keys or a host CA for that instance); no known_hosts
file on the bastion, no trust on first use. A mismatch fails the session.
"""

from __future__ import annotations

import asyncio

import asyncssh

from broker.config import UpstreamSettings
from broker.domain.models import Instance
from broker.errors import UpstreamError

UPSTREAM_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                    "chacha20-poly1305@openssh.com"]


def _trust(instance: Instance) -> tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey], list[
        asyncssh.SSHKey]]:
    keys = [asyncssh.import_public_key(k) for k in instance.host_keys]
    cas = [asyncssh.import_public_key(k) for k in instance.host_ca_keys]
    return keys, cas, []


async def connect(
    instance: Instance,
    login: str,
    key: asyncssh.SSHKey,
    cert: asyncssh.SSHCertificate,
    settings: UpstreamSettings,
) -> asyncssh.SSHClientConnection:
    """Open an authenticated connection to ``instance`` as ``login``; UpstreamError on failure."""
    if not instance.host_keys and not instance.host_ca_keys:
        raise UpstreamError(f"no host key or host CA configured for {instance.id}")
    try:
        return await asyncio.wait_for(
            asyncssh.connect(
                instance.address,
                instance.port,
                username=login,
                client_keys=[(key, cert)],
                known_hosts=_trust(instance),
                agent_path=None,
                config=None,
                preferred_auth=["publickey"],
                encryption_algs=UPSTREAM_CIPHERS,
                compression_algs=None,
                x509_trusted_certs=None,
                keepalive_interval=30,
            ),
            timeout=settings.connect_timeout_seconds,
        )
    except TimeoutError:
        raise UpstreamError(f"timeout connecting to {instance.id}") from None
    except (OSError, asyncssh.Error) as exc:
        raise UpstreamError(f"cannot connect to {instance.id}: {exc}") from exc
