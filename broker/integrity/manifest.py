"""Signed manifests: what a finished recording must contain, signed with the bastion's key.

``SESSION_ID.manifest.json`` sits beside ``SESSION_ID.rec``::

    {"manifest": {"format": "bastion-broker-manifest/1", "session_id": ..., "user": ...,
                  "target": ..., "grant_id": ..., "started_at": ..., "ended_at": ...,
                  "files": [{"name": "SESSION_ID.rec", "size": N, "sha256": HEX,
                             "block_size": B, "blocks": [HEX32, ...]}], ...},
     "signature": {"alg": "ed25519", "key_id": HEX16, "value": BASE64}}

The signature covers ``SIGNING_CONTEXT + canonical(manifest)`` (sorted keys, no spaces, UTF-8).
Block hashes (truncated SHA-256 per block, at most ``MAX_BLOCKS`` blocks) let ``verify`` say
*where* a file was changed, not only that it was; the whole-file SHA-256 is what proves it.
Sealing also appends ``recording.sealed`` (with the manifest's SHA-256) to the hash-chained
audit log, which ties the recording to the audit trail: replacing both a recording and its
manifest, or deleting them, shows up there.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from broker.errors import BrokerError
from broker.integrity.keys import SigningKey
from broker.ports import AuditSink
from broker.recordings.local import describe, drop_cached

if TYPE_CHECKING:
    from broker.services.sessions import LiveSession

log = structlog.get_logger("broker.integrity")

# format 2 lists every file beside the recording a reviewer may open (the ``.cast`` too);
# format 1 (older manifests, still verified) listed the ``.rec`` only
FORMAT = "bastion-broker-manifest/2"
FORMAT_V1 = "bastion-broker-manifest/1"
FORMATS = (FORMAT_V1, FORMAT)
# the files written beside SESSION_ID.rec that a manifest covers (the sessions code writes no
# others: SFTP transfers are in the recording and the audit log): the asciicast, and the input
# withheld from the recording, sealed to the break-glass key ([recordings] input = "sealed")
COMPANIONS = (".cast", ".sealed")
SIGNING_CONTEXT = b"bastion-broker recording manifest v1\n"
MIN_BLOCK = 4096
MAX_BLOCKS = 1024
_HEADER_FIELDS = ("user", "target", "target_name", "login", "grant_id", "level", "kind",
                  "command", "peer", "started_at")


def canonical(obj: Any) -> bytes:
    """The one byte encoding that is signed and verified."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def block_size_for(size: int) -> int:
    """Smallest power-of-two block (>= MIN_BLOCK) that keeps the block list <= MAX_BLOCKS."""
    bs = MIN_BLOCK
    while -(-size // bs) > MAX_BLOCKS:
        bs *= 2
    return bs


def block_hash(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class FileDigest:
    name: str
    size: int
    sha256: str
    block_size: int
    blocks: list[str]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256,
                "block_size": self.block_size, "blocks": self.blocks}


def digest_file(path: Path, block_size: int | None = None) -> FileDigest:
    """SHA-256 of the whole file and of each block, in one pass.

    Into one reused buffer, and each block read is dropped from the page cache again: sealing
    and verifying read a recording once, so they should neither allocate per block nor fill
    the cache with a file nobody reads next (see ``broker.recordings.local``)."""
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        bs = block_size or block_size_for(os.fstat(fd).st_size)
        view = memoryview(bytearray(bs))
        whole = hashlib.sha256()
        blocks: list[str] = []
        size = dropped = 0
        while n := _read_block(f, view):
            chunk = view[:n]
            whole.update(chunk)
            blocks.append(block_hash(chunk))
            size += n
            if size - dropped >= _DROP_EVERY:
                drop_cached(fd, size)
                dropped = size
            if n < bs:
                break
        drop_cached(fd, 0)
    return FileDigest(path.name, size, whole.hexdigest(), bs, blocks)


_DROP_EVERY = 8 << 20


def _read_block(f: io.FileIO, view: memoryview) -> int:
    """Fill ``view`` from ``f``; fewer bytes only at the end of the file."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def manifest_path(rec_path: Path) -> Path:
    return rec_path.with_name(rec_path.name.split(".", 1)[0] + ".manifest.json")


def companions(rec_path: Path) -> tuple[Path, ...]:
    """The files beside a recording that its manifest lists with it, those that exist."""
    return tuple(p for p in (rec_path.with_suffix(ext) for ext in COMPANIONS) if p.exists())


def sign_manifest(body: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    sig = key.sign(SIGNING_CONTEXT + canonical(body))
    return {"manifest": body, "signature": {"alg": "ed25519", "key_id": key.key_id,
                                            "value": base64.b64encode(sig).decode()}}


def seal_recording(rec_path: Path, fields: dict[str, Any], key: SigningKey,
                   extra_files: tuple[Path, ...] = ()) -> tuple[Path, str]:
    """Hash the (closed) recording files, write the signed manifest atomically beside them.

    Returns the manifest's path and the SHA-256 of its bytes (for the audit log). Also usable by
    crash repair for an interrupted recording (``fields["interrupted"] = True``).
    """
    files = [digest_file(p).as_json() for p in (rec_path, *extra_files)]
    body = {"format": FORMAT, **fields, "files": files}
    data = json.dumps(sign_manifest(body, key), indent=1, ensure_ascii=False).encode() + b"\n"
    out = manifest_path(rec_path)
    tmp = out.with_name(out.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out, hashlib.sha256(data).hexdigest()


def session_fields(live: LiveSession, ended_at: datetime, exit_status: str | None
                   ) -> dict[str, Any]:
    req = live.request
    return {
        "session_id": live.id, "user": str(req.principal), "target": req.instance.id,
        "target_name": req.instance.name, "login": req.login, "grant_id": req.grant.id,
        "level": str(req.grant.level), "kind": req.kind, "command": req.command,
        "peer": req.peer, "started_at": live.started_at.isoformat(),
        "ended_at": ended_at.isoformat(), "exit_status": exit_status,
        "bytes_in": live.bytes_in, "bytes_out": live.bytes_out, "interrupted": False,
    }


class RecordingSealer:
    """``SessionService``'s ``on_recorded`` hook: seal, then note the seal in the audit chain.

    Hashing a large recording takes seconds (about 1.7 s per GiB here), so a finished session's
    seal runs in the background: the client gets its exit status without waiting for it, and
    ``drain`` (at shutdown) waits for the seals still running. A seal that fails does not undo
    the session (it is over): it is logged and audited, and ``verify`` reports it unsealed.
    """

    def __init__(self, key: SigningKey, audit: AuditSink) -> None:
        self._key = key
        self._audit = audit
        self._pending: set[asyncio.Task[None]] = set()

    async def __call__(self, live: LiveSession, ended_at: datetime,
                       exit_status: str | None) -> None:
        task = asyncio.create_task(self._seal(
            live.id, Path(live.writer.location),
            lambda: session_fields(live, ended_at, exit_status)))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Wait for the seals still running (broker shutdown)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def seal_interrupted(self, session_id: str, rec: Path, ended_at: datetime,
                               exit_status: str) -> None:
        """Seal a recording that crash repair closed: what its header knows, marked interrupted."""

        def fields() -> dict[str, Any]:
            meta = describe(rec)
            return {**{k: meta.get(k) for k in _HEADER_FIELDS}, "session_id": session_id,
                    "ended_at": ended_at.isoformat(), "exit_status": exit_status,
                    "interrupted": True}

        await self._seal(session_id, rec, fields)

    async def _seal(self, sid: str, rec: Path, fields: Callable[[], dict[str, Any]]) -> None:
        # the .cast of a terminal session is rendered before its seal (the session service and
        # crash repair both render first), so the manifest covers it too
        try:
            path, digest = await asyncio.to_thread(
                lambda: seal_recording(rec, fields(), self._key, companions(rec)))
        except (OSError, ValueError, BrokerError) as exc:
            log.error("recording.seal_failed", session_id=sid, error=str(exc))
            try:
                self._audit.emit("recording.seal_failed", session_id=sid, error=str(exc))
            except BrokerError as aexc:
                log.error("audit.write_failed", session_id=sid, error=str(aexc))
            return
        try:
            self._audit.emit("recording.sealed", session_id=sid, manifest=path.name,
                             manifest_sha256=digest, key_id=self._key.key_id)
        except BrokerError as exc:
            log.error("audit.write_failed", session_id=sid, error=str(exc))
