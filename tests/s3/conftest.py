"""moto server for S3 shipping tests; a proxy per test makes the endpoint fail on demand."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest

from tests.aws.conftest import FAKE_ENV, MOTO_SERVER, REGION, MotoServer, assert_loopback, start_moto
from tests.s3.proxy import TcpProxy


@pytest.fixture(scope="session")
def s3_env() -> Iterator[None]:
    """Fake credentials, no shared AWS config, no metadata service: AWS is unreachable."""
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ROLE_ARN",
                  "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                  "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
            mp.delenv(k, raising=False)
        for k, v in FAKE_ENV.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="session")
def moto_s3(s3_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    assert MOTO_SERVER.exists(), f"{MOTO_SERVER} missing: run scripts/bootstrap"
    server = start_moto(tmp_path_factory.mktemp("moto-s3"))
    assert_loopback(server.url)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(moto_s3: MotoServer) -> Iterator[TcpProxy]:
    p = TcpProxy(moto_s3.port)
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def s3(moto_s3: MotoServer) -> Any:
    """A client talking to moto directly (the test's own view, never through the proxy)."""
    return boto3.client("s3", endpoint_url=moto_s3.url, region_name=REGION)


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
