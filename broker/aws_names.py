"""Checks of AWS connection settings shared by every section that talks to AWS (the EC2
inventory, S3 and CloudWatch shipping), so a bad region or endpoint reads the same everywhere."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")


def check_region(v: str) -> str:
    if not _REGION_RE.match(v):
        raise ValueError(f"not an AWS region name: {v!r}")
    return v


def check_endpoint(v: str | None) -> str | None:
    """An http(s) URL without credentials in it (credentials belong in their own settings)."""
    if v is None:
        return v
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL")
    if parts.username or parts.password:
        raise ValueError("must not contain credentials")
    return v
