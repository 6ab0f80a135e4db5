"""A real broker ships real sessions (OpenSSH client, sshd target) to S3 and CloudWatch on moto.

The S3/CloudWatch endpoint is a proxy in front of moto, stopped and restarted by the test: the
session made while it is down is kept locally and shipped once it is back, exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from broker.domain import recording as fmt
from tests.aws.conftest import REGION, MotoServer
from tests.conftest import Demo, serve_broker
from tests.s3.proxy import TcpProxy

pytestmark = [pytest.mark.s3, pytest.mark.aws, pytest.mark.e2e]


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Broker:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self.log: list[bytes] = []
        assert proc.stderr is not None
        stderr = proc.stderr
        # keep reading its log: a full pipe would block the broker
        self._reader = threading.Thread(target=lambda: self.log.extend(iter(stderr.readline, b"")),
                                        daemon=True)
        self._reader.start()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    def text(self) -> str:
        return b"".join(self.log).decode(errors="replace")


@pytest.fixture
def setup(demo: Demo, moto: MotoServer, tmp_path: Path) -> Iterator[dict[str, Any]]:
    proxy = TcpProxy(moto.port)
    proxy.start()
    s3 = boto3.client("s3", endpoint_url=moto.url, region_name=REGION)
    bucket = f"e2e-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    group = f"/bastion-e2e/{uuid.uuid4().hex[:12]}"
    # one demo user for all sessions (the pool is shared by the suite): after the first full
    # login, the reauth window lets the same account in from the same address without a code
    cfg = demo.variant_config(tmp_path, limits="penalty_exempt = ['127.0.0.0/8']",
                              totp="reauth_window_seconds = 900")
    aws = (f'region = "{REGION}"\nendpoint_url = "{proxy.url}"\nmax_attempts = 1\n'
           "connect_timeout_seconds = 2\nread_timeout_seconds = 3\n"
           "backoff_initial_seconds = 0.2\nbackoff_max_seconds = 1\n")
    cfg.write_text(
        cfg.read_text() + "[web]\nenabled = false\n"
        f'[recordings]\ndir = "{tmp_path / "rec"}"\n[audit]\npath = "{tmp_path / "audit.jsonl"}"\n'
        f'[shipping]\nspool_dir = "{tmp_path / "spool"}"\n'
        f'[shipping.s3]\nbucket = "{bucket}"\n{aws}settle_seconds = 0.5\n'
        "scan_interval_seconds = 0.2\nkeep_local_days = 0\n"
        f'[shipping.cloudwatch]\nlog_group = "{group}"\nlog_stream = "e2e"\n{aws}'
        "poll_seconds = 0.2\n")
    proc, port = serve_broker(cfg)
    broker = Broker(proc, port)
    try:
        yield {"proxy": proxy, "s3": s3, "bucket": bucket, "group": group, "broker": broker,
               "cfg": cfg,
               "known": demo.known_hosts_for(tmp_path, port), "tmp": tmp_path,
               "logs": boto3.client("logs", endpoint_url=moto.url, region_name=REGION)}
    finally:
        broker.stop()
        proxy.stop()


def _objects(s3: Any, bucket: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in s3.list_object_versions(Bucket=bucket).get("Versions", []):
        out[v["Key"]] = out.get(v["Key"], 0) + 1
    return out


def _job(spool: Path, sid: str) -> tuple[str, int] | None:
    if not spool.exists():
        return None
    with sqlite3.connect(f"file:{spool}?mode=ro", uri=True, timeout=10) as db:
        row = db.execute("SELECT state, attempts FROM uploads WHERE session_id = ?",
                         (sid,)).fetchone()
    return (str(row[0]), int(row[1])) if row else None


def test_sessions_reach_s3_and_cloudwatch_across_an_outage(demo: Demo,
                                                          setup: dict[str, Any]) -> None:
    s3, bucket, proxy, broker = setup["s3"], setup["bucket"], setup["proxy"], setup["broker"]
    tmp: Path = setup["tmp"]
    user = demo.take_user()
    count = [0]

    def session(command: str) -> tuple[bytes, str]:
        env = demo.env(user) if count[0] == 0 else demo.env(user, code="")
        count[0] += 1
        r = subprocess.run([*demo.ssh_args(f"{user}+web01", port=broker.port,
                                           known_hosts=setup["known"]), command],
                           capture_output=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        audit = [json.loads(x) for x in (tmp / "audit.jsonl").read_text().splitlines()]
        sid = [e["session_id"] for e in audit if e["event"] == "session.end"][-1]
        return r.stdout, str(sid)

    def rec_key(sid: str) -> str:
        keys = [k for k in _objects(s3, bucket) if k.endswith(f"/{sid}/{sid}.rec")]
        return keys[0] if keys else ""

    # 1. endpoint up: the finished session is uploaded, verified, then removed locally
    out1, sid1 = session("head -c 200000 /dev/urandom | base64")
    wait_for("the first recording in S3", lambda: bool(rec_key(sid1)))
    wait_for("the local copy removed", lambda: not list((tmp / "rec").glob(f"*/{sid1}.*")))
    rec = fmt.parse(s3.get_object(Bucket=bucket, Key=rec_key(sid1))["Body"].read())
    assert fmt.output_bytes(rec.frames) == out1  # byte-exact: what the client received
    # the signed manifest (written after the end, in the background) went with it
    manifest = json.loads(s3.get_object(
        Bucket=bucket, Key=rec_key(sid1).replace(".rec", ".manifest.json"))["Body"].read())
    assert manifest["manifest"]["session_id"] == sid1

    # 2. endpoint hangs (accepts, never answers): sessions go on; the upload times out
    proxy.stop()
    proxy.start(stall=True)
    out2, sid2 = session("echo shipped-$((6*7)); echo to-stderr >&2")
    assert out2 == b"shipped-42\n"
    spool = tmp / "spool" / "spool.db"
    wait_for("a timed-out upload", lambda: (j := _job(spool, sid2)) is not None and j[1] >= 1)
    assert session("echo still-fine")[0] == b"still-fine\n"
    # ... then refuses connections: the session stays local and is retried
    proxy.stop()
    attempts = _job(spool, sid2)[1]  # type: ignore[index]
    wait_for("failed upload attempts",
             lambda: (j := _job(spool, sid2)) is not None and j[1] >= attempts + 2)
    assert list((tmp / "rec").glob(f"*/{sid2}.rec")), "removed before any upload"
    assert not rec_key(sid2)

    # 3. endpoint back: shipped once, then removed locally
    proxy.start()
    wait_for("the second recording in S3", lambda: bool(rec_key(sid2)))
    sid3 = [e["session_id"] for e in (json.loads(x) for x in
            (tmp / "audit.jsonl").read_text().splitlines()) if e["event"] == "session.end"][-1]
    wait_for("the third recording in S3", lambda: bool(rec_key(sid3)))
    wait_for("the second local copy removed",
             lambda: not list((tmp / "rec").glob(f"*/{sid2}.*")))
    rec2 = fmt.parse(s3.get_object(Bucket=bucket, Key=rec_key(sid2))["Body"].read())
    assert fmt.output_bytes(rec2.frames) == b"shipped-42\n"
    assert fmt.output_bytes(rec2.frames, frozenset({fmt.ERROR})) == b"to-stderr\n"
    assert all(n == 1 for n in _objects(s3, bucket).values()), _objects(s3, bucket)

    # every audit line, shipping events included, reaches CloudWatch in file order
    events = [json.loads(x) for x in (tmp / "audit.jsonl").read_text().splitlines()]
    assert {e["session_id"] for e in events if e["event"] == "recording.uploaded"} == {
        sid1, sid2, sid3}
    lines = (tmp / "audit.jsonl").read_text().splitlines()

    def shipped() -> list[str]:
        try:
            r = setup["logs"].get_log_events(logGroupName=setup["group"], logStreamName="e2e",
                                             startFromHead=True, limit=10000)
        except Exception:  # group not created yet
            return []
        return [e["message"] for e in r["events"]]

    wait_for("the audit lines in CloudWatch", lambda: shipped()[:len(lines)] == lines)

    # SIGTERM while the endpoint hangs: the broker still stops cleanly
    proxy.stop()
    proxy.start(stall=True)
    session("echo last")
    assert broker.stop() == 0
    assert "Traceback" not in broker.text(), broker.text()[-3000:]
    assert os.path.exists(spool)


def test_a_session_cut_by_kill_9_is_repaired_then_shipped(demo: Demo,
                                                          setup: dict[str, Any]) -> None:
    """SIGKILL mid-session: the next start repairs the recording and logs its session.end;
    the shipper then uploads it (and its interrupted-seal manifest) like any other."""
    s3, bucket, broker = setup["s3"], setup["bucket"], setup["broker"]
    tmp: Path = setup["tmp"]
    user = demo.take_user()
    ssh = subprocess.Popen(
        [*demo.ssh_args(f"{user}+web01", port=broker.port, known_hosts=setup["known"]),
         "echo before-the-crash; sleep 120"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env=demo.env(user))
    try:
        assert ssh.stdout is not None
        assert ssh.stdout.readline() == b"before-the-crash\n"
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait(30)
        ssh.wait(60)
    finally:
        if ssh.poll() is None:
            ssh.kill()
            ssh.wait()
    recs = list((tmp / "rec").glob("*/*.rec"))
    assert len(recs) == 1
    sid = recs[0].name.split(".")[0]
    proc, _port = serve_broker(setup["cfg"])
    again = Broker(proc, _port)
    try:
        key = f"/{sid}/{sid}.rec"
        wait_for("the repaired recording in S3",
                 lambda: any(k.endswith(key) for k in _objects(s3, bucket)))
        full = next(k for k in _objects(s3, bucket) if k.endswith(key))
        rec = fmt.parse(s3.get_object(Bucket=bucket, Key=full)["Body"].read())
        assert fmt.output_bytes(rec.frames) == b"before-the-crash\n"
        assert any(k.endswith(f"/{sid}/{sid}.manifest.json") for k in _objects(s3, bucket))
        ends = [json.loads(x) for x in (tmp / "audit.jsonl").read_text().splitlines()]
        assert [e for e in ends if e["event"] == "session.end" and e["session_id"] == sid]
        wait_for("the local copy removed", lambda: not recs[0].exists())
    finally:
        assert again.stop() == 0
    assert "Traceback" not in again.text(), again.text()[-3000:]
