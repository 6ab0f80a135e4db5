"""S3Shipper against moto over HTTP: upload, multipart, SSE-KMS, Object Lock, outages, retention."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.domain.audit import GENESIS, encode_event
from broker.shipping.s3 import S3Shipper
from broker.shipping.settings import S3ShippingSettings
from broker.shipping.spool import Spool
from tests.aws.conftest import REGION
from tests.s3.proxy import TcpProxy

pytestmark = pytest.mark.s3

DAY = "2026-11-27"
MB = 1024 * 1024


class World:
    """A recordings directory, an audit file and a spool, as a broker's state dir holds them."""

    def __init__(self, root: Path) -> None:
        self.recordings = root / "recordings"
        self.audit = root / "audit.jsonl"
        self.spool = Spool(root / "shipping" / "spool.db")
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._seq = 0
        self.audit.touch()

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def session(self, sid: str, files: dict[str, bytes], *, end: bool = True,
                manifest: bool = True) -> dict[str, Path]:
        """A finished session's files; with ``manifest`` also its signed manifest (stand-in)."""
        if manifest:
            files = {**files, ".manifest.json": b'{"manifest": {}, "signature": {}}\n'}
        day = self.recordings / DAY
        day.mkdir(parents=True, exist_ok=True)
        paths = {}
        for suffix, data in files.items():
            p = day / f"{sid}{suffix}"
            p.write_bytes(data)
            old = time.time() - 60  # settled
            os.utime(p, (old, old))
            paths[suffix] = p
        if end:
            self.end(sid)
        return paths

    def end(self, sid: str) -> None:
        line = encode_event(self._seq, GENESIS, "session.end", datetime.now(UTC),
                            {"session_id": sid})
        self._seq += 1
        with open(self.audit, "ab") as f:
            f.write(line)

    def shipper(self, endpoint: str, bucket: str, **kw: Any) -> S3Shipper:
        kw.setdefault("settle_seconds", 0)
        kw.setdefault("keep_local_days", 0)
        kw.setdefault("backoff_initial_seconds", 0.05)
        kw.setdefault("backoff_max_seconds", 0.2)
        kw.setdefault("connect_timeout_seconds", 2)
        kw.setdefault("read_timeout_seconds", 10)
        kw.setdefault("max_attempts", 1)
        settings = S3ShippingSettings(region=REGION, endpoint_url=endpoint, bucket=bucket, **kw)
        return S3Shipper(settings, self.spool, self.recordings, self.audit, self.emit)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def run_until(shipper: S3Shipper, done: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "shipping did not finish in time"
        shipper.scan_audit()
        if not shipper.step():
            time.sleep(0.05)
        shipper.retention()


def versions(s3: Any, bucket: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in page.get("Versions", []):
            out[v["Key"]] = out.get(v["Key"], 0) + 1
    return out


def body(s3: Any, bucket: str, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_finished_session_uploaded_verified_then_removed(world: World, proxy: TcpProxy, s3: Any,
                                                        new_bucket: Callable[..., str]) -> None:
    bucket = new_bucket()
    sid = "0a1b2c3d-0000-4000-8000-000000000001"
    rec, cast = os.urandom(300_000), b'{"version": 2}\n[0.1, "o", "hi"]\n'
    paths = world.session(sid, {".rec": rec, ".cast": cast})
    live = world.session("0a1b2c3d-0000-4000-8000-00000000000f", {".rec": b"live"}, end=False)
    sh = world.shipper(proxy.url, bucket)
    assert sh.scan_audit() == 1
    run_until(sh, lambda: not paths[".rec"].exists())

    prefix = f"recordings/{DAY}/{sid}/"
    assert body(s3, bucket, prefix + f"{sid}.rec") == rec
    assert body(s3, bucket, prefix + f"{sid}.cast") == cast
    head = s3.head_object(Bucket=bucket, Key=prefix + f"{sid}.rec")
    assert head["Metadata"]["sha256"] == hashlib.sha256(rec).hexdigest()
    assert not paths[".cast"].exists()
    assert live[".rec"].exists(), "a session without session.end must stay local"
    assert versions(s3, bucket) == {prefix + f"{sid}.rec": 1, prefix + f"{sid}.cast": 1,
                                    prefix + f"{sid}.manifest.json": 1}

    names = [e for e, _ in world.events]
    assert names == ["recording.uploaded", "recording.local_removed"]
    shipped = {o["key"]: o for o in world.events[0][1]["objects"]}
    assert shipped[prefix + f"{sid}.rec"]["sha256"] == hashlib.sha256(rec).hexdigest()
    job = world.spool.job(sid)
    assert job is not None and job.state == "removed"

    # the offset is persisted: a new shipper on the same spool queues nothing again
    again = world.shipper(proxy.url, bucket)
    assert again.scan_audit() == 0
    assert not again.step()


def test_large_file_goes_multipart(world: World, proxy: TcpProxy, s3: Any,
                                   new_bucket: Callable[..., str]) -> None:
    bucket = new_bucket()
    sid = "0a1b2c3d-0000-4000-8000-000000000002"
    data = os.urandom(12 * MB)
    paths = world.session(sid, {".rec": data})
    sh = world.shipper(proxy.url, bucket, multipart_threshold_mb=5, multipart_chunk_mb=5)
    run_until(sh, lambda: not paths[".rec"].exists())
    key = f"recordings/{DAY}/{sid}/{sid}.rec"
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # three parts
    assert head["ContentLength"] == len(data)
    assert hashlib.sha256(body(s3, bucket, key)).digest() == hashlib.sha256(data).digest()


def test_sse_kms_and_object_lock_are_applied(world: World, proxy: TcpProxy, s3: Any, moto: Any,
                                             new_bucket: Callable[..., str]) -> None:
    import boto3

    kms = boto3.client("kms", endpoint_url=moto.url, region_name=REGION)
    key_id = kms.create_key(Description="recordings")["KeyMetadata"]["KeyId"]
    bucket = new_bucket(object_lock=True)
    sid = "0a1b2c3d-0000-4000-8000-000000000003"
    paths = world.session(sid, {".rec": b"locked and encrypted"})
    sh = world.shipper(proxy.url, bucket, sse="aws:kms", kms_key_id=key_id,
                       object_lock_mode="GOVERNANCE", object_lock_days=30)
    before = datetime.now(UTC)
    run_until(sh, lambda: not paths[".rec"].exists())
    head = s3.head_object(Bucket=bucket, Key=f"recordings/{DAY}/{sid}/{sid}.rec")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert key_id in head["SSEKMSKeyId"]
    assert head["ObjectLockMode"] == "GOVERNANCE"
    until = head["ObjectLockRetainUntilDate"]
    assert before + timedelta(days=29) < until < before + timedelta(days=31)


def test_s3_down_keeps_everything_then_resumes_without_duplicates(
        world: World, proxy: TcpProxy, s3: Any, new_bucket: Callable[..., str]) -> None:
    bucket = new_bucket()
    proxy.stop()  # the endpoint refuses connections
    sessions = {f"0a1b2c3d-0000-4000-8000-0000000001{i:02d}": os.urandom(50_000 + i)
                for i in range(5)}
    paths = {sid: world.session(sid, {".rec": data})[".rec"] for sid, data in sessions.items()}
    sh = world.shipper(proxy.url, bucket)
    assert sh.scan_audit() == 5
    deadline = time.monotonic() + 60
    while not all(j.attempts >= 2 for j in world.spool.jobs()):
        assert time.monotonic() < deadline
        if not sh.step():
            time.sleep(0.05)
        sh.retention()
    jobs = world.spool.jobs()
    assert all(j.state == "pending" and j.last_error for j in jobs)
    assert all(p.exists() for p in paths.values()), "nothing may be removed before a verified upload"
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0

    proxy.start()  # back: the same shipper resumes on its own
    run_until(sh, lambda: not any(p.exists() for p in paths.values()))
    got = versions(s3, bucket)
    assert got == {f"recordings/{DAY}/{sid}/{sid}{suffix}": 1
                   for sid in sessions for suffix in (".rec", ".manifest.json")}
    for sid, data in sessions.items():
        assert body(s3, bucket, f"recordings/{DAY}/{sid}/{sid}.rec") == data


def test_connection_cut_mid_multipart_then_resumed(world: World, proxy: TcpProxy, s3: Any,
                                                   new_bucket: Callable[..., str]) -> None:
    bucket = new_bucket()
    sid = "0a1b2c3d-0000-4000-8000-000000000004"
    data = os.urandom(15 * MB)
    path = world.session(sid, {".rec": data})[".rec"]
    sh = world.shipper(proxy.url, bucket, multipart_threshold_mb=5, multipart_chunk_mb=5,
                       max_concurrency=1)
    sh.scan_audit()
    proxy.cut_after(7 * MB)  # in the middle of the second part
    sh.step()
    job = world.spool.job(sid)
    assert job is not None and job.state == "pending" and job.attempts == 1, job
    assert path.exists()
    key = f"recordings/{DAY}/{sid}/{sid}.rec"
    assert key not in versions(s3, bucket)  # (its manifest, shipped first, may be there)
    proxy.start()
    run_until(sh, lambda: not path.exists())
    assert versions(s3, bucket) == {key: 1, key.replace(".rec", ".manifest.json"): 1}
    assert hashlib.sha256(body(s3, bucket, key)).digest() == hashlib.sha256(data).digest()


def test_upload_stored_before_a_crash_is_not_uploaded_twice(
        world: World, proxy: TcpProxy, s3: Any, new_bucket: Callable[..., str]) -> None:
    """S3 stored the object but the broker died before the spool recorded it: the HEAD check
    before re-uploading finds the same bytes, so no second version is written."""
    bucket = new_bucket()
    sid = "0a1b2c3d-0000-4000-8000-000000000005"
    path = world.session(sid, {".rec": b"once only" * 1000})[".rec"]
    sh = world.shipper(proxy.url, bucket, delete_local_after_upload=False)
    run_until(sh, lambda: (j := world.spool.job(sid)) is not None and j.state == "uploaded")
    # the crash: the spool lost what it learnt after the upload
    db = world.spool._db
    db.execute("DELETE FROM objects WHERE session_id = ?", (sid,))
    db.execute("UPDATE uploads SET state = 'pending', uploaded_at = NULL WHERE session_id = ?",
               (sid,))
    run_until(sh, lambda: (j := world.spool.job(sid)) is not None and j.state == "uploaded")
    assert versions(s3, bucket) == {f"recordings/{DAY}/{sid}/{sid}.rec": 1,
                                    f"recordings/{DAY}/{sid}/{sid}.manifest.json": 1}
    assert path.exists()  # delete_local_after_upload = false keeps it
    assert [e for e, _ in world.events] == ["recording.uploaded", "recording.uploaded"]


def test_local_copy_kept_for_the_retention_period(world: World, proxy: TcpProxy, s3: Any,
                                                  new_bucket: Callable[..., str]) -> None:
    bucket = new_bucket()
    sid = "0a1b2c3d-0000-4000-8000-000000000006"
    path = world.session(sid, {".rec": b"keep me a day"})[".rec"]
    now = [time.time()]
    sh = world.shipper(proxy.url, bucket, keep_local_days=1)
    sh._clock = lambda: now[0]
    run_until(sh, lambda: (j := world.spool.job(sid)) is not None and j.state == "uploaded")
    assert sh.retention() == 0 and path.exists()
    now[0] += 86400 + 1
    assert sh.retention() == 1 and not path.exists()


def test_files_still_written_wait_and_late_files_are_shipped_before_removal(
        world: World, proxy: TcpProxy, s3: Any, new_bucket: Callable[..., str]) -> None:
    bucket = new_bucket()
    sid = "0a1b2c3d-0000-4000-8000-000000000007"
    paths = world.session(sid, {".rec": b"frames", ".cast.tmp": b"half a cast"})
    sh = world.shipper(proxy.url, bucket, delete_local_after_upload=True)
    sh.scan_audit()
    for _ in range(3):
        sh.step()
    job = world.spool.job(sid)
    assert job is not None and job.state == "pending" and job.attempts == 0
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0

    paths[".cast.tmp"].unlink()
    world.spool.postpone(sid, 0)
    sh.step()
    assert world.spool.job(sid).state == "uploaded"  # type: ignore[union-attr]
    # a file that appears after the upload is shipped before anything is removed
    late = paths[".rec"].with_suffix(".late.json")
    late.write_text(json.dumps({"sha256": "x"}))
    assert sh.retention() == 0 and paths[".rec"].exists()
    run_until(sh, lambda: not late.exists())
    assert set(versions(s3, bucket)) == {f"recordings/{DAY}/{sid}/{sid}{x}"
                                         for x in (".rec", ".manifest.json", ".late.json")}


def test_recording_waits_for_its_manifest(world: World, proxy: TcpProxy, s3: Any,
                                          new_bucket: Callable[..., str]) -> None:
    """The signed manifest is written in the background after session.end: wait for it."""
    bucket = new_bucket()
    sid = "0a1b2c3d-0000-4000-8000-00000000000b"
    paths = world.session(sid, {".rec": b"frames"}, manifest=False)
    sh = world.shipper(proxy.url, bucket)
    sh.scan_audit()
    sh.step()
    job = world.spool.job(sid)
    assert job is not None and job.state == "pending" and job.attempts == 0
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    manifest = paths[".rec"].with_suffix(".manifest.json")
    manifest.write_bytes(b"{}")
    os.utime(manifest, (time.time() - 60, time.time() - 60))
    world.spool.postpone(sid, 0)
    run_until(sh, lambda: not paths[".rec"].exists())
    assert set(versions(s3, bucket)) == {f"recordings/{DAY}/{sid}/{sid}{x}"
                                         for x in (".rec", ".manifest.json")}
    # after 10 minutes without one (the seal failed), the recording goes alone
    sid2 = "0a1b2c3d-0000-4000-8000-00000000000c"
    rec2 = world.session(sid2, {".rec": b"unsealed"}, manifest=False)[".rec"]
    sh.scan_audit()
    now = [time.time()]
    sh._clock = lambda: now[0]
    sh.step()
    assert rec2.exists()
    now[0] += 601
    world.spool.postpone(sid2, 0)
    run_until(sh, lambda: not rec2.exists())


def test_a_session_without_files_is_not_retried_forever(world: World, proxy: TcpProxy,
                                                        new_bucket: Callable[..., str]) -> None:
    world.end("0a1b2c3d-0000-4000-8000-000000000008")
    sh = world.shipper(proxy.url, new_bucket())
    sh.scan_audit()
    sh.step()
    job = world.spool.job("0a1b2c3d-0000-4000-8000-000000000008")
    assert job is not None and job.state == "empty"


CRASHING_SHIPPER = """
import sys, time
from pathlib import Path
from broker.shipping.s3 import S3Shipper
from broker.shipping.settings import S3ShippingSettings
from broker.shipping.spool import Spool
root, url, bucket = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
settings = S3ShippingSettings(region=sys.argv[4], endpoint_url=url, bucket=bucket,
                              settle_seconds=0, keep_local_days=0, max_attempts=1,
                              read_timeout_seconds=300, multipart_threshold_mb=5,
                              multipart_chunk_mb=5)
sh = S3Shipper(settings, Spool(root / "shipping" / "spool.db"), root / "recordings",
               root / "audit.jsonl", lambda *a, **k: None)
while True:
    sh.scan_audit()
    if not sh.step():
        time.sleep(0.05)
    sh.retention()
"""


@pytest.mark.parametrize("size", [200_000, 11 * MB], ids=["single-put", "multipart"])
def test_kill_9_after_s3_stored_the_object_then_restart(
        world: World, proxy: TcpProxy, s3: Any, new_bucket: Callable[..., str],
        tmp_path: Path, size: int) -> None:
    """The shipper process dies (SIGKILL) after S3 stored the object but before it heard so:
    the next shipper finds the same bytes by HEAD, writes no second version, verifies, removes."""
    import subprocess
    import sys

    bucket = new_bucket()
    sid = "0a1b2c3d-0000-4000-8000-000000000009"
    data = os.urandom(size)
    path = world.session(sid, {".rec": data})[".rec"]
    key = f"recordings/{DAY}/{sid}/{sid}.rec"
    manifest_key = key.replace(".rec", ".manifest.json")  # shipped first (sorted by name)
    if size < 5 * MB:  # hold the answer to the first PUT (the manifest's)
        proxy.hold_if = lambda line: line.startswith(b"PUT ") and b"uploadId=" not in line
        held = manifest_key
    else:  # the manifest goes through; hold the answer to CompleteMultipartUpload
        proxy.hold_if = lambda line: line.startswith(b"POST ") and b"uploadId=" in line
        held = key
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SHIPPER, str(tmp_path), proxy.url,
                             bucket, REGION], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while versions(s3, bucket).get(held, 0) == 0:  # moto has it; the answer is held back
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the upload never reached moto"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    job = world.spool.job(sid)
    assert job is not None and job.state == "pending"
    assert held not in {o.key for o in world.spool.objects(sid).values()}
    assert path.exists()
    proxy.stop()
    proxy.hold_if = None
    proxy.start()
    sh = world.shipper(proxy.url, bucket, multipart_threshold_mb=5, multipart_chunk_mb=5)
    run_until(sh, lambda: not path.exists())
    assert versions(s3, bucket) == {key: 1, manifest_key: 1}
    assert body(s3, bucket, key) == data


def test_terminal_session_waits_for_its_asciicast(world: World, proxy: TcpProxy, s3: Any,
                                                  new_bucket: Callable[..., str]) -> None:
    from broker.domain import recording as fmt

    bucket = new_bucket()
    sid = "0a1b2c3d-0000-4000-8000-00000000000a"
    rec = fmt.encode_header({"session_id": sid, "term": "xterm-256color"}) + b"frames"
    paths = world.session(sid, {".rec": rec})  # with its manifest, without its asciicast
    sh = world.shipper(proxy.url, bucket)
    sh.scan_audit()
    sh.step()
    job = world.spool.job(sid)
    assert job is not None and job.state == "pending" and job.attempts == 0
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    cast = paths[".rec"].with_suffix(".cast")
    cast.write_text('{"version": 2}\n')
    old = time.time() - 60
    os.utime(cast, (old, old))
    world.spool.postpone(sid, 0)
    run_until(sh, lambda: not paths[".rec"].exists())
    assert set(versions(s3, bucket)) == {f"recordings/{DAY}/{sid}/{sid}{x}"
                                         for x in (".rec", ".cast", ".manifest.json")}
