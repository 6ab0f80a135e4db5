"""Finished recordings to S3: idempotent keys, checked before and verified after every upload.

A session is queued when its ``session.end`` reaches the audit log (read by tailing the file with
a persisted offset, so nothing is missed across restarts). Its files (``.rec``, ``.cast``, a
manifest, whatever the session left beside them) are shipped once none has changed for
``settle_seconds``. Keys are deterministic (``PREFIX/DAY/SESSION_ID/FILE``): before uploading, a
HEAD tells whether the same bytes are already there (an upload interrupted after S3 stored it), so
a retry never writes a second copy. After uploading, the object is read back and its SHA-256
compared with the local file's (emulators and some S3 implementations do not verify the checksums
a client sends). Local copies are removed only after every file was verified, and only once the
retention period has passed, after checking once more that they did not change meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from broker.errors import BrokerError
from broker.recordings.local import describe
from broker.shipping.aws import backoff, make_client
from broker.shipping.settings import S3ShippingSettings
from broker.shipping.spool import AuditTail, ShippedObject, Spool, UploadJob

log = structlog.get_logger("broker.shipping.s3")

Emit = Callable[..., None]
_SESSION_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz-")
_CHUNK = 1 << 20
# longest wait for a session's manifest and asciicast (written after its end) before shipping
# without them (a seal that failed never comes; the audit log then says recording.seal_failed)
LATE_FILES_WAIT_SECONDS = 600.0
OPEN_MARKERS = ".open"  # DIR/.open/SESSION_ID: a recording whose session has not ended


class VerifyError(Exception):
    """The object in S3 is not the local file."""


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def session_files(root: Path, session_id: str) -> tuple[list[tuple[Path, str]], bool]:
    """The files of a session as (path, name relative to the recordings directory), and whether
    it is still being written (a ``*.tmp`` beside it, or its ``.open`` marker still there)."""
    found: list[tuple[Path, str]] = []
    busy = (root / OPEN_MARKERS / session_id).exists()
    days = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] \
        if root.is_dir() else []
    for day in sorted(days):
        candidates = list(day.glob(f"{session_id}.*"))
        sub = day / session_id
        if sub.is_dir():
            candidates.extend(p for p in sub.rglob("*") if p.is_file())
        for p in sorted(candidates):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.name.endswith(".tmp"):
                busy = True
                continue
            found.append((p, p.relative_to(root).as_posix()))
    return found, busy


class S3Shipper:
    """Runs in the shipping thread only; every call is blocking."""

    def __init__(self, settings: S3ShippingSettings, spool: Spool, recordings_dir: Path,
                 audit_path: Path, emit: Emit, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._spool = spool
        self._root = recordings_dir
        self._tail = AuditTail(audit_path, spool, "s3")
        self._emit = emit
        self._clock = clock
        self._client: Any = None
        self._transfer: Any = None
        self._failures = 0
        self._pause_until = 0.0

    def _s3(self) -> Any:
        if self._client is None:
            from boto3.s3.transfer import TransferConfig

            self._client = make_client("s3", self.settings)
            s = self.settings
            self._transfer = TransferConfig(
                multipart_threshold=s.multipart_threshold, multipart_chunksize=s.multipart_chunk,
                max_concurrency=s.max_concurrency, use_threads=s.max_concurrency > 1)
        return self._client

    # -- queueing --------------------------------------------------------------------------
    def scan_audit(self) -> int:
        """Queue the sessions whose end was logged since the last scan; returns how many."""
        queued = 0
        while True:
            lines, inode, offset = self._tail.read(5000)
            if not lines:
                return queued
            now = self._clock()
            for raw in lines:
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue  # a damaged line: `verify --audit` reports it, shipping goes on
                if not isinstance(ev, dict) or ev.get("event") != "session.end":
                    continue
                sid = ev.get("session_id")
                if isinstance(sid, str) and sid and set(sid) <= _SESSION_ID_CHARS:
                    queued += self._spool.enqueue(sid, now, now + self.settings.settle_seconds)
            self._tail.commit(inode, offset)

    # -- uploading -------------------------------------------------------------------------
    def step(self) -> bool:
        """Ship what is due; True if anything was attempted."""
        now = self._clock()
        if now < self._pause_until:
            return False
        worked = False
        for job in self._spool.due(now):
            worked = True
            try:
                self._ship(job)
                self._failures = 0
            except Exception as exc:  # the shipper never dies; the spool keeps the session
                self._failures += 1
                wait = backoff(self.settings, max(job.attempts + 1, self._failures))
                until = self._clock() + wait
                self._spool.failed(job.session_id, until, f"{type(exc).__name__}: {exc}")
                self._pause_until = self._clock() + backoff(self.settings, self._failures)
                log.warning("s3.upload_failed", session_id=job.session_id, error=str(exc),
                            attempt=job.attempts + 1, retry_in_s=round(wait, 2))
                return True
        return worked

    def _ship(self, job: UploadJob) -> None:
        sid = job.session_id
        s = self.settings
        files, busy = session_files(self._root, sid)
        now = self._clock()
        newest = max((p.stat().st_mtime for p, _ in files), default=0.0)
        if busy or newest > now - s.settle_seconds:
            self._spool.postpone(sid, now + max(s.settle_seconds, 0.5))
            return
        if self._late_file_missing(files) and now - job.queued_at < LATE_FILES_WAIT_SECONDS:
            # the signed manifest and a terminal session's asciicast are written after the
            # session's end, in the background: ship them together with the recording
            self._spool.postpone(sid, now + max(s.settle_seconds, 1.0))
            return
        if not files:
            # unrecorded session (benchmark switch) or files removed by hand: nothing to ship
            self._spool.set_state(sid, "empty", now)
            log.warning("s3.no_files", session_id=sid)
            return
        done = self._spool.objects(sid)
        shipped: list[dict[str, Any]] = []
        for path, name in files:
            digest, size = sha256_file(path)
            prev = done.get(name)
            if prev is not None and prev.sha256 == digest and prev.size == size:
                shipped.append(_describe(prev))
                continue
            obj = self._upload(path, s.prefix + name_key(name, sid), digest, size)
            self._spool.record_object(sid, ShippedObject(name, obj.key, size, digest,
                                                         obj.version_id), self._clock())
            shipped.append(_describe(ShippedObject(name, obj.key, size, digest, obj.version_id)))
        self._spool.set_state(sid, "uploaded", self._clock())
        self._emit("recording.uploaded", session_id=sid, bucket=s.bucket, objects=shipped)
        log.info("s3.uploaded", session_id=sid, objects=len(shipped))

    @staticmethod
    def _late_file_missing(files: list[tuple[Path, str]]) -> bool:
        """A recording without its ``.manifest.json`` yet, or a terminal recording (``term`` in
        its header) without its ``.cast`` yet."""
        names = {p.name for p, _ in files}
        for p, _ in files:
            if p.suffix != ".rec":
                continue
            if f"{p.name.split('.', 1)[0]}.manifest.json" not in names:
                return True
            if p.with_suffix(".cast").name not in names:
                try:
                    return bool(describe(p).get("term"))
                except (OSError, ValueError, BrokerError):
                    return False  # unreadable header: ship what there is
        return False

    def _upload(self, path: Path, key: str, digest: str, size: int) -> ShippedObject:
        s3 = self._s3()
        s = self.settings
        head = self._head(key)
        if not (head is not None and head.get("ContentLength") == size
                and head.get("Metadata", {}).get("sha256") == digest):
            extra: dict[str, Any] = {"Metadata": {"sha256": digest}, "ChecksumAlgorithm": "SHA256"}
            if s.sse != "none":
                extra["ServerSideEncryption"] = s.sse
                if s.kms_key_id:
                    extra["SSEKMSKeyId"] = s.kms_key_id
            if s.object_lock_mode is not None:
                extra["ObjectLockMode"] = s.object_lock_mode
                extra["ObjectLockRetainUntilDate"] = (
                    datetime.now(UTC) + timedelta(days=s.object_lock_days))
            s3.upload_file(str(path), s.bucket, key, ExtraArgs=extra, Config=self._transfer)
        version = self._verify(key, digest, size)
        return ShippedObject(path.name, key, size, digest, version)

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            head: dict[str, Any] = self._s3().head_object(Bucket=self.settings.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return head

    def _verify(self, key: str, digest: str, size: int) -> str | None:
        """Read the object back and compare its SHA-256; returns its version id."""
        obj = self._s3().get_object(Bucket=self.settings.bucket, Key=key)
        h = hashlib.sha256()
        got = 0
        body = obj["Body"]
        try:
            for chunk in body.iter_chunks(_CHUNK):
                h.update(chunk)
                got += len(chunk)
        finally:
            body.close()
        if got != size or h.hexdigest() != digest:
            raise VerifyError(f"s3://{self.settings.bucket}/{key} holds {got} bytes with SHA-256 "
                              f"{h.hexdigest()}, the local file {size} bytes with {digest}")
        version = obj.get("VersionId")
        return str(version) if version and version != "null" else None

    # -- retention -------------------------------------------------------------------------
    def retention(self) -> int:
        """Remove local copies whose verified upload is older than ``keep_local_days``."""
        s = self.settings
        if not s.delete_local_after_upload:
            return 0
        removed = 0
        cutoff = self._clock() - s.keep_local_days * 86400
        for job in self._spool.uploaded_before(cutoff):
            sid = job.session_id
            files, busy = session_files(self._root, sid)
            done = self._spool.objects(sid)
            changed = busy or any(
                name not in done or (done[name].sha256, done[name].size) != sha256_file(p)
                for p, name in files)
            if changed:
                # a file appeared or changed after the upload (a late manifest): ship it first
                self._spool.set_state(sid, "pending", self._clock())
                log.info("s3.changed_after_upload", session_id=sid)
                continue
            for p, _ in files:
                p.unlink(missing_ok=True)
            for day in {p.parent for p, _ in files}:
                sub = day / sid
                if sub.is_dir():
                    shutil.rmtree(sub, ignore_errors=True)
            self._spool.set_state(sid, "removed", self._clock())
            self._emit("recording.local_removed", session_id=sid,
                       files=[name for _, name in files])
            removed += 1
        return removed


def name_key(name: str, session_id: str) -> str:
    """``DAY/SESSION_ID.rec`` -> ``DAY/SESSION_ID/SESSION_ID.rec``; files already in a
    per-session directory keep their path."""
    day, _, rest = name.partition("/")
    if rest.startswith(session_id + "/"):
        return name
    return f"{day}/{session_id}/{rest}"


def _describe(o: ShippedObject) -> dict[str, Any]:
    d: dict[str, Any] = {"key": o.key, "size": o.size, "sha256": o.sha256}
    if o.version_id:
        d["version_id"] = o.version_id
    return d
