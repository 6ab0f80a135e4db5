"""moto server for S3 shipping tests; a proxy per test makes the endpoint fail on demand."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import boto3
import pytest

from tests.aws.conftest import REGION, MotoServer


@pytest.fixture
def s3(moto: MotoServer) -> Any:
    """A client talking to moto directly (the test's own view, never through the proxy)."""
    return boto3.client("s3", endpoint_url=moto.url, region_name=REGION)


@pytest.fixture
def new_bucket(s3: Any) -> Callable[..., str]:
    def make(*, versioned: bool = True, object_lock: bool = False) -> str:
        name = f"rec-{uuid.uuid4().hex[:20]}"
        kw: dict[str, Any] = {"Bucket": name,
                              "CreateBucketConfiguration": {"LocationConstraint": REGION}}
        if object_lock:
            kw["ObjectLockEnabledForBucket"] = True
        s3.create_bucket(**kw)
        if versioned and not object_lock:
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    return make
