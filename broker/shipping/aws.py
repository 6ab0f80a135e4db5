"""boto3 clients built from configuration alone (endpoint, region, credentials)."""

from __future__ import annotations

import random
from typing import Any

from broker.errors import ConfigError
from broker.shipping.settings import AwsConnection


def make_client(service: str, conn: AwsConnection, *, retries: bool = True) -> Any:
    """A client for ``service``; AWS, MinIO or moto differ only in ``conn``."""
    import boto3
    from botocore.config import Config

    kw: dict[str, Any] = {"region_name": conn.region}
    if conn.profile is not None:
        kw["profile_name"] = conn.profile
    if conn.access_key_id is not None and conn.secret_access_key_file is not None:
        try:
            secret = conn.secret_access_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {conn.secret_access_key_file}: {exc.strerror}") from None
        kw.update(aws_access_key_id=conn.access_key_id, aws_secret_access_key=secret)
    session = boto3.session.Session(**kw)
    cfg = Config(
        connect_timeout=conn.connect_timeout_seconds, read_timeout=conn.read_timeout_seconds,
        retries={"mode": "standard", "max_attempts": conn.max_attempts if retries else 1},
        s3={"addressing_style": "path"} if conn.endpoint_url else None,
    )
    return session.client(service, endpoint_url=conn.endpoint_url, config=cfg)


def backoff(conn: AwsConnection, attempts: int) -> float:
    """Seconds to wait after ``attempts`` consecutive failures: exponential, capped, jittered."""
    base = min(conn.backoff_max_seconds, conn.backoff_initial_seconds * 2 ** min(attempts - 1, 30))
    return float(base * (0.5 + random.random() / 2))  # noqa: S311 - jitter, not a secret
