"""``[shipping]``: copies off the bastion (recordings to S3, audit events to CloudWatch Logs).

Only configuration decides between AWS, MinIO/Ceph and an emulator such as moto: ``endpoint_url``,
``region`` and the credentials (the standard boto3 chain, a ``profile``, or an access key id with
its secret in a file). Kept free of boto3 imports: every CLI command reads the config.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker.aws_names import check_endpoint, check_region

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_LOG_NAME_RE = re.compile(r"^[A-Za-z0-9_\-/.#]{1,512}$")
_MB = 1024 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AwsConnection(_Model):
    """Where and as whom to connect; shared shape of the S3 and CloudWatch sections."""

    region: str = "us-east-1"
    endpoint_url: str | None = None  # MinIO, Ceph, moto; None for AWS itself
    profile: str | None = None  # a named profile of the shared AWS config files
    access_key_id: str | None = None  # with secret_access_key_file; else the boto3 chain
    secret_access_key_file: Path | None = None
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    read_timeout_seconds: float = Field(default=60.0, gt=0, le=900)
    max_attempts: int = Field(default=3, ge=1, le=10)  # botocore "standard" retries per call
    # the shipper's own retries, after botocore's: exponential with jitter, never given up
    backoff_initial_seconds: float = Field(default=2.0, gt=0, le=600)
    backoff_max_seconds: float = Field(default=300.0, gt=0, le=86400)

    _region = field_validator("region")(check_region)
    _endpoint = field_validator("endpoint_url")(check_endpoint)

    @model_validator(mode="after")
    def _credentials(self) -> AwsConnection:
        if (self.access_key_id is None) != (self.secret_access_key_file is None):
            raise ValueError("access_key_id and secret_access_key_file go together")
        if self.access_key_id is not None and self.profile is not None:
            raise ValueError("give either profile or access_key_id, not both")
        return self


class S3ShippingSettings(AwsConnection):
    """Finished recordings (every file of the session) uploaded to ``s3://bucket/prefix``."""

    bucket: str
    prefix: str = "recordings/"  # keys: PREFIX + DAY/SESSION_ID/FILE
    sse: Literal["none", "AES256", "aws:kms"] = "none"
    kms_key_id: str | None = None  # with sse = "aws:kms"; None: the account's default key
    object_lock_mode: Literal["GOVERNANCE", "COMPLIANCE"] | None = None
    object_lock_days: int = Field(default=0, ge=0, le=36500)
    multipart_threshold_mb: int = Field(default=64, ge=5, le=5 * 1024)
    multipart_chunk_mb: int = Field(default=16, ge=5, le=5 * 1024)
    # parts in flight per file; above 1 boto3 uploads from threads of its own, which the
    # interpreter waits for at exit: a stalled endpoint can then delay a shutdown by up to
    # read_timeout_seconds x max_attempts. With 1 the upload runs in the daemon shipping thread.
    max_concurrency: int = Field(default=1, ge=1, le=32)
    # a session's files are shipped once its session.end is in the audit log and no file of it
    # has changed for this long (the .cast and the manifest are written after the end)
    settle_seconds: float = Field(default=10.0, ge=0, le=3600)
    scan_interval_seconds: float = Field(default=2.0, gt=0, le=3600)
    # local copies: removed only after a verified upload, and then only after keep_local_days
    delete_local_after_upload: bool = True
    keep_local_days: float = Field(default=7.0, ge=0, le=36500)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not _BUCKET_RE.match(v):
            raise ValueError(f"not an S3 bucket name: {v!r}")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError("must be a relative key prefix such as 'recordings/'")
        return v

    @model_validator(mode="after")
    def _lock(self) -> S3ShippingSettings:
        if (self.object_lock_mode is None) != (self.object_lock_days == 0):
            raise ValueError("object_lock_mode and object_lock_days (> 0) go together")
        if self.kms_key_id is not None and self.sse != "aws:kms":
            raise ValueError("kms_key_id needs sse = 'aws:kms'")
        return self

    @property
    def multipart_threshold(self) -> int:
        return self.multipart_threshold_mb * _MB

    @property
    def multipart_chunk(self) -> int:
        return self.multipart_chunk_mb * _MB


class CloudWatchShippingSettings(AwsConnection):
    """Every audit line, as written, sent to one CloudWatch Logs stream in order."""

    log_group: str = "/bastion-broker/audit"
    log_stream: str | None = None  # default: this host's name
    create_log_group: bool = True  # create the group and stream when missing
    batch_max_events: int = Field(default=1000, ge=1, le=10_000)
    poll_seconds: float = Field(default=1.0, gt=0, le=300)

    @field_validator("log_group", "log_stream")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (not _LOG_NAME_RE.match(v) or ":" in v):
            raise ValueError(f"not a CloudWatch Logs name: {v!r}")
        return v


class ShippingSettings(_Model):
    spool_dir: Path | None = None  # default: STATE_DIR/shipping (queue, offsets, locks)
    s3: S3ShippingSettings | None = None  # absent: recordings stay local
    cloudwatch: CloudWatchShippingSettings | None = None  # absent: audit stays local

    def resolved(self, base: Path) -> ShippingSettings:
        """Relative paths made relative to the config file's directory ``base``."""

        def res(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else (base / p).resolve()

        update: dict[str, object] = {"spool_dir": res(self.spool_dir)}
        for name in ("s3", "cloudwatch"):
            sub: AwsConnection | None = getattr(self, name)
            if sub is not None:
                update[name] = sub.model_copy(
                    update={"secret_access_key_file": res(sub.secret_access_key_file)})
        return self.model_copy(update=update)
