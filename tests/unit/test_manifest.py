"""The signing key, file digests and signed manifests (sealing a finished recording)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.domain import recording as fmt
from broker.domain.models import Grant, GrantState, Instance, Level, Principal, Trigger
from broker.errors import ConfigError
from broker.integrity.keys import (
    default_key_path,
    load_or_create_signing_key,
    load_verify_key,
    public_path,
)
from broker.integrity.manifest import (
    FORMAT,
    MAX_BLOCKS,
    MIN_BLOCK,
    SIGNING_CONTEXT,
    RecordingSealer,
    block_size_for,
    canonical,
    digest_file,
    manifest_path,
    seal_recording,
)
from broker.recordings.local import LocalRecordingSink
from broker.services.sessions import LiveSession, SessionRequest

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
SID = "0a1b2c3d-4e5f-4a5b-8c9d-0e1f2a3b4c5d"


def test_key_is_created_once_mode_600_with_public_half(tmp_path: Path) -> None:
    path = default_key_path(tmp_path / "state")
    k1 = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in path.read_bytes()
    k2 = load_or_create_signing_key(path)
    assert k1.key_id == k2.key_id and len(k1.key_id) == 16
    pub = load_verify_key(public_path(path))
    assert pub.key_id == k1.key_id
    sig = k1.sign(b"data")
    assert pub.verify(sig, b"data")
    assert not pub.verify(sig, b"datA")
    assert k1.key_id in repr(k1) and "PRIVATE" not in repr(k1)


def test_bad_key_files_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "k"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="cannot read the signing key"):
        load_or_create_signing_key(bad)
    with pytest.raises(ConfigError, match="no public signing key"):
        load_verify_key(tmp_path / "missing.pub")
    with pytest.raises(ConfigError, match="cannot read the public signing key"):
        load_verify_key(bad)


def test_block_size_keeps_the_block_list_small() -> None:
    assert block_size_for(0) == MIN_BLOCK
    assert block_size_for(MIN_BLOCK * MAX_BLOCKS) == MIN_BLOCK
    assert block_size_for(MIN_BLOCK * MAX_BLOCKS + 1) == 2 * MIN_BLOCK
    assert block_size_for(1 << 30) == (1 << 30) // MAX_BLOCKS


def test_digest_file_whole_and_blocks(tmp_path: Path) -> None:
    p = tmp_path / "f.rec"
    data = bytes(range(256)) * 40  # 10240 bytes: 2 full blocks and a partial one
    p.write_bytes(data)
    d = digest_file(p)
    assert (d.size, d.block_size, len(d.blocks)) == (10240, 4096, 3)
    assert d.sha256 == hashlib.sha256(data).hexdigest()
    assert d.blocks[2] == hashlib.sha256(data[8192:]).hexdigest()[:32]
    (tmp_path / "empty").write_bytes(b"")
    e = digest_file(tmp_path / "empty")
    assert (e.size, e.blocks) == (0, [])


def test_digest_file_exact_blocks_and_a_large_file_leaves_the_page_cache(tmp_path: Path) -> None:
    """Block boundaries do not depend on how reads split; a digested file's pages are dropped
    from the cache (it is read once), as util-linux ``fincore`` shows."""
    p = tmp_path / "f.rec"
    data = os.urandom(3 * 4096)
    p.write_bytes(data)
    d = digest_file(p)
    assert (d.size, len(d.blocks)) == (3 * 4096, 3)
    assert d.blocks == [hashlib.sha256(data[i:i + 4096]).hexdigest()[:32] for i in (0, 4096, 8192)]
    big = tmp_path / "big.rec"
    with big.open("wb") as f:
        for _ in range(16):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    whole = digest_file(big)
    assert whole.size == 16 << 20 and len(whole.blocks) == 1024
    assert whole.sha256 == hashlib.sha256(big.read_bytes()).hexdigest()
    p2 = tmp_path / "big2.rec"
    big.rename(p2)
    digest_file(p2)
    res = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(p2)],
                         check=True, capture_output=True, text=True).stdout
    assert int(res.split()[0]) <= 64 << 10


def make_recording(root: Path, sid: str = SID, payload: bytes = b"hello\r\n") -> Path:
    w = LocalRecordingSink(root).open(sid, {"session_id": sid, "user": "alice@corp"})
    w.write(fmt.OUTPUT, payload)
    w.write(fmt.EXIT, b"0")
    w.close()
    return Path(w.location)


def test_seal_writes_a_signed_manifest(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "key")
    rec = make_recording(tmp_path / "recordings")
    path, digest = seal_recording(rec, {"session_id": SID, "user": "alice@corp"}, key)
    assert path == manifest_path(rec) == rec.with_name(f"{SID}.manifest.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert digest == hashlib.sha256(raw).hexdigest()
    doc = json.loads(raw)
    body = doc["manifest"]
    assert body["format"] == FORMAT and body["session_id"] == SID
    [f] = body["files"]
    assert f["name"] == rec.name and f["size"] == rec.stat().st_size
    assert f["sha256"] == digest_file(rec).sha256
    sig = doc["signature"]
    assert sig["alg"] == "ed25519" and sig["key_id"] == key.key_id
    assert key.public.verify(base64.b64decode(sig["value"]), SIGNING_CONTEXT + canonical(body))
    assert not list(rec.parent.glob("*.tmp"))


class Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def live_session(rec_writer: Any) -> LiveSession:
    g = Grant("g-1", "alice", "corp.example.com", ("stack-a",), "vpc-0a", Level.READ_ONLY,
              GrantState.APPROVED, T0, T0 + timedelta(hours=1), Trigger.INCIDENT)
    inst = Instance("i-1", "web01", "stack-a", "vpc-0a", "10.0.0.1")
    req = SessionRequest(Principal("corp.example.com", "alice"), inst, g, "ro", "exec", "uptime",
                         None, 80, 24, "127.0.0.1:5555")
    live = LiveSession(SID, req, rec_writer, T0)
    live.bytes_out, live.bytes_in = 7, 0
    return live


async def seal_and_drain(sealer: RecordingSealer, live: LiveSession, end: datetime,
                         status: str | None) -> None:
    await sealer(live, end, status)  # returns at once: the seal runs in the background
    await sealer.drain()


def test_sealer_seals_and_records_the_seal_in_the_audit(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "key")
    w = LocalRecordingSink(tmp_path / "recordings").open(SID, {"session_id": SID})
    w.write(fmt.OUTPUT, b"up 3 days")
    w.close()
    audit = Audit()
    asyncio.run(seal_and_drain(RecordingSealer(key, audit), live_session(w),
                               T0 + timedelta(seconds=5), "0"))
    man = manifest_path(Path(w.location))
    body = json.loads(man.read_bytes())["manifest"]
    assert body["user"] == "alice@corp.example.com" and body["target"] == "i-1"
    assert body["grant_id"] == "g-1" and body["level"] == "read-only"
    assert body["started_at"] == T0.isoformat()
    assert body["ended_at"] == (T0 + timedelta(seconds=5)).isoformat()
    assert body["exit_status"] == "0" and body["command"] == "uptime"
    assert body["interrupted"] is False
    [(event, fields)] = audit.events
    assert event == "recording.sealed"
    assert fields["session_id"] == SID and fields["key_id"] == key.key_id
    assert fields["manifest_sha256"] == hashlib.sha256(man.read_bytes()).hexdigest()


def test_sealer_failure_is_audited_not_raised(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "key")
    w = LocalRecordingSink(tmp_path / "recordings").open(SID, {"session_id": SID})
    w.close()
    Path(w.location).unlink()  # nothing to hash
    audit = Audit()
    asyncio.run(seal_and_drain(RecordingSealer(key, audit), live_session(w), T0, None))
    [(event, fields)] = audit.events
    assert event == "recording.seal_failed" and fields["session_id"] == SID


def test_seal_interrupted_takes_its_fields_from_the_recording_header(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "key")
    meta = {"session_id": SID, "user": "alice@corp", "target": "i-1", "grant_id": "g-1",
            "started_at": T0.isoformat(), "width": 80}
    w = LocalRecordingSink(tmp_path / "recordings").open(SID, meta)
    w.write(fmt.OUTPUT, b"partial")
    w.close()
    audit = Audit()
    end = T0 + timedelta(minutes=1)
    asyncio.run(RecordingSealer(key, audit).seal_interrupted(SID, Path(w.location), end,
                                                             "interrupted"))
    body = json.loads(manifest_path(Path(w.location)).read_bytes())["manifest"]
    assert body["interrupted"] is True and body["exit_status"] == "interrupted"
    assert (body["user"], body["target"], body["grant_id"]) == ("alice@corp", "i-1", "g-1")
    assert body["started_at"] == T0.isoformat() and body["ended_at"] == end.isoformat()
    assert "width" not in body
    assert [e for e, _ in audit.events] == ["recording.sealed"]
