"""``verify SESSION_ID`` logic: every way a sealed recording can be damaged, named precisely."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.domain import recording as fmt
from broker.errors import NotFoundError, UsageError
from broker.integrity.keys import load_or_create_signing_key
from broker.integrity.manifest import (
    RecordingSealer,
    manifest_path,
    seal_recording,
    sign_manifest,
)
from broker.integrity.verify import Report, verify_session
from broker.recordings.local import LocalRecordingSink, render_cast

SID = "0a1b2c3d-4e5f-4a5b-8c9d-0e1f2a3b4c5d"


class Sealed:
    def __init__(self, tmp: Path, payload: bytes) -> None:
        self.root = tmp / "recordings"
        self.key = load_or_create_signing_key(tmp / "key")
        self.other_key = load_or_create_signing_key(tmp / "other_key")
        w = LocalRecordingSink(self.root).open(SID, {"session_id": SID, "user": "alice@corp"})
        w.write(fmt.OUTPUT, b"$ ls\r\n")
        w.write(fmt.OUTPUT, payload)
        w.write(fmt.EXIT, b"0")
        w.close()
        self.rec = Path(w.location)
        self.man, digest = seal_recording(self.rec, {"session_id": SID, "user": "alice@corp"},
                                          self.key)
        self.audit = [json.dumps({"seq": 0, "event": "recording.sealed", "session_id": SID,
                                  "manifest_sha256": digest}).encode() + b"\n"]

    def verify(self, audit: bool = True) -> Report:
        return verify_session(self.root, SID, self.key.public, self.audit if audit else None)


@pytest.fixture
def sealed(tmp_path: Path) -> Sealed:
    return Sealed(tmp_path, b"x" * 20000)  # 5 blocks of 4 KiB


def codes(report: Report) -> list[str]:
    return [f.code for f in report.findings]


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_intact_recording_is_ok(sealed: Sealed) -> None:
    r = sealed.verify()
    assert r.ok and r.findings == []
    assert r.checked["files"] == [sealed.rec.name]
    assert r.checked["bytes"] == sealed.rec.stat().st_size
    assert r.checked["user"] == "alice@corp"


def test_flipped_byte_is_located_in_its_block_and_frame(sealed: Sealed) -> None:
    flip(sealed.rec, 9000)  # block 2 (8192-12287), inside the big output frame
    r = sealed.verify()
    assert not r.ok and codes(r) == ["file_modified"]
    f = r.findings[0]
    assert f.where["ranges"] == [[8192, 12287]]
    assert "bytes 8192-12287" in f.message
    assert "data of frame 1 (output" in f.message


def test_flipped_byte_in_the_header_and_last_partial_block(sealed: Sealed) -> None:
    size = sealed.rec.stat().st_size
    flip(sealed.rec, 10)
    flip(sealed.rec, size - 1)  # the exit frame, in the last (partial) block
    [f] = sealed.verify().findings
    assert f.code == "file_modified"
    last = (size - 1) // 4096
    assert f.where["ranges"] == [[0, 4095], [last * 4096, size - 1]]
    assert "recording header" in f.message


def test_truncated_file(sealed: Sealed) -> None:
    size = sealed.rec.stat().st_size
    sealed.rec.write_bytes(sealed.rec.read_bytes()[:10000])
    r = sealed.verify()
    assert codes(r) == ["file_truncated"]
    assert r.findings[0].where == {"file": sealed.rec.name, "size": 10000, "expected": size}
    assert f"{size - 10000} bytes missing from the end" in r.findings[0].message


def test_truncated_and_modified_before_the_cut(sealed: Sealed) -> None:
    flip(sealed.rec, 5000)
    sealed.rec.write_bytes(sealed.rec.read_bytes()[:10000])
    assert codes(sealed.verify()) == ["file_modified", "file_truncated"]


def test_appended_bytes(sealed: Sealed) -> None:
    with open(sealed.rec, "ab") as f:
        f.write(b"more")
    r = sealed.verify()
    assert codes(r) == ["file_extended"]
    assert "4 bytes more" in r.findings[0].message


def test_removed_recording_file(sealed: Sealed) -> None:
    sealed.rec.unlink()
    assert codes(sealed.verify()) == ["file_missing"]


def test_removed_manifest_with_and_without_the_audit_seal(sealed: Sealed) -> None:
    sealed.man.unlink()
    r = sealed.verify()
    assert codes(r) == ["manifest_missing"] and "line 1" in r.findings[0].message
    r = sealed.verify(audit=False)
    assert codes(r) == ["manifest_missing"] and "still running" in r.findings[0].message


def test_removed_recording_and_manifest(sealed: Sealed) -> None:
    sealed.man.unlink()
    sealed.rec.unlink()
    assert codes(sealed.verify()) == ["recording_missing"]
    with pytest.raises(NotFoundError, match="no recording of session"):
        sealed.verify(audit=False)


def edit_manifest(sealed: Sealed, change: object) -> None:
    doc = json.loads(sealed.man.read_bytes())
    change(doc)  # type: ignore[operator]
    sealed.man.write_text(json.dumps(doc))


def test_edited_manifest_breaks_its_signature(sealed: Sealed) -> None:
    edit_manifest(sealed, lambda d: d["manifest"].update(user="mallory@corp"))
    r = sealed.verify(audit=False)
    assert codes(r) == ["manifest_bad_signature"]
    # and the audit log's seal no longer matches either
    assert codes(sealed.verify()) == ["manifest_bad_signature", "manifest_replaced"]


def test_file_hash_rewritten_in_manifest_is_caught_by_the_signature(sealed: Sealed) -> None:
    flip(sealed.rec, 9000)
    from broker.integrity.manifest import digest_file

    edit_manifest(sealed, lambda d: d["manifest"]["files"][0].update(
        digest_file(sealed.rec).as_json()))
    assert codes(sealed.verify(audit=False)) == ["manifest_bad_signature"]


def test_missing_signature(sealed: Sealed) -> None:
    edit_manifest(sealed, lambda d: d.pop("signature"))
    assert codes(sealed.verify(audit=False)) == ["manifest_unsigned"]


def test_signature_by_another_key(sealed: Sealed) -> None:
    seal_recording(sealed.rec, {"session_id": SID, "user": "alice@corp"}, sealed.other_key)
    r = sealed.verify(audit=False)
    assert codes(r) == ["manifest_wrong_key"]
    assert sealed.other_key.key_id in r.findings[0].message


def test_signature_by_another_key_under_our_key_id(sealed: Sealed) -> None:
    doc = json.loads(sealed.man.read_bytes())
    doc["signature"]["value"] = base64.b64encode(sealed.other_key.sign(b"x")).decode()
    sealed.man.write_text(json.dumps(doc))
    assert codes(sealed.verify(audit=False)) == ["manifest_bad_signature"]


def test_resealed_with_the_real_key_is_caught_by_the_audit_chain(sealed: Sealed) -> None:
    """Someone with the key re-seals a doctored recording: the audit's seal does not match."""
    sealed.rec.write_bytes(sealed.rec.read_bytes()[:5000])
    seal_recording(sealed.rec, {"session_id": SID, "user": "alice@corp"}, sealed.key)
    assert codes(sealed.verify()) == ["manifest_replaced"]


def test_not_json_manifest(sealed: Sealed) -> None:
    sealed.man.write_bytes(sealed.man.read_bytes()[:50])
    assert codes(sealed.verify(audit=False)) == ["manifest_damaged"]


def test_bad_session_ids_are_usage_errors(sealed: Sealed) -> None:
    for bad in ("../x", "*", "", "A" * 3):
        with pytest.raises(UsageError):
            verify_session(sealed.root, bad, sealed.key.public, None)


def test_manifest_path_is_beside_the_recording(sealed: Sealed) -> None:
    assert manifest_path(sealed.rec).parent == sealed.rec.parent


def test_a_unique_prefix_of_the_session_id_is_enough(sealed: Sealed, tmp_path: Path) -> None:
    r = verify_session(sealed.root, SID[:8], sealed.key.public, sealed.audit)
    assert r.ok and r.subject == f"session {SID}"
    other = "0a1b2c3d-ffff-4a5b-8c9d-0e1f2a3b4c5d"
    w = LocalRecordingSink(sealed.root).open(other, {"session_id": other})
    w.close()
    with pytest.raises(UsageError, match="matches 2 sessions"):
        verify_session(sealed.root, SID[:8], sealed.key.public, None)
    assert verify_session(sealed.root, SID, sealed.key.public, sealed.audit).ok


def test_hostile_file_names_in_a_manifest_are_refused(sealed: Sealed) -> None:
    edit_manifest(sealed, lambda d: d["manifest"]["files"].append(
        {"name": "../../etc/\x1b]52;c;eA==\x07passwd", "size": 1, "sha256": "0"}))
    r = sealed.verify(audit=False)
    assert codes(r) == ["manifest_bad_signature", "manifest_damaged"]
    assert "\\x1b" in r.findings[1].message and "\x1b" not in r.findings[1].message


def test_cli_output_escapes_control_characters() -> None:
    from broker.cli.output import printable

    assert printable("key '\x1b]0;x\x07' ok é\x9b") == "key '\\x1b]0;x\\x07' ok é\\x9b"


def test_local_copy_removed_after_upload_is_not_tampering(sealed: Sealed) -> None:
    sealed.man.unlink()
    sealed.rec.unlink()
    sealed.audit.append(json.dumps({"seq": 1, "event": "recording.local_removed",
                                    "session_id": SID}).encode() + b"\n")
    r = sealed.verify()
    assert r.ok and [(f.severity, f.code) for f in r.findings] == [
        ("warning", "removed_after_upload")]
    assert "audit line 2" in r.findings[0].message


class SealedTerminal(Sealed):
    """A terminal session: its .cast rendered, then sealed by the sealer (as the broker does)."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "recordings"
        self.key = load_or_create_signing_key(tmp / "key")
        meta = {"session_id": SID, "user": "alice@corp", "term": "xterm", "width": 80,
                "height": 24, "started_at": "2025-03-01T12:00:00+00:00"}
        w = LocalRecordingSink(self.root).open(SID, meta)
        w.write(fmt.OUTPUT, b"$ id\r\nuid=1000(alice)\r\n")
        w.write(fmt.EXIT, b"0")
        w.close()
        self.rec = Path(w.location)
        self.cast = render_cast(self.rec)
        events: list[dict[str, object]] = []

        class Audit:
            def emit(self, event: str, **fields: object) -> None:
                events.append({"seq": 0, "event": event, **fields})

        asyncio.run(RecordingSealer(self.key, Audit()).seal_interrupted(
            SID, self.rec, datetime.now(UTC), "interrupted"))
        self.man = manifest_path(self.rec)
        self.audit = [json.dumps(e).encode() + b"\n" for e in events]


@pytest.fixture
def terminal(tmp_path: Path) -> SealedTerminal:
    return SealedTerminal(tmp_path)


def test_the_cast_is_in_the_manifest_and_its_edits_are_named(terminal: SealedTerminal) -> None:
    body = json.loads(terminal.man.read_bytes())["manifest"]
    assert body["format"] == "bastion-broker-manifest/2"
    assert [f["name"] for f in body["files"]] == [terminal.rec.name, terminal.cast.name]
    assert terminal.verify().findings == []
    original = terminal.cast.read_bytes()
    terminal.cast.write_bytes(original.replace(b"uid=1000(alice)", b"uid=1000(alicf)"))
    r = terminal.verify()
    assert not r.ok and codes(r) == ["file_modified"]
    assert r.findings[0].where["file"] == terminal.cast.name
    terminal.cast.unlink()
    r = terminal.verify()
    assert codes(r) == ["file_missing"] and terminal.cast.name in r.findings[0].message
    terminal.cast.write_bytes(original)
    assert terminal.verify().ok


def test_a_cast_the_manifest_does_not_list_is_reported(sealed: Sealed) -> None:
    body = json.loads(sealed.man.read_bytes())["manifest"]
    assert body["format"] == "bastion-broker-manifest/2"
    cast = sealed.rec.with_suffix(".cast")
    cast.write_text('{"version": 2}\n[0.1, "o", "planted"]\n')  # written after the seal
    r = sealed.verify()
    assert not r.ok and codes(r) == ["file_not_sealed"]


def test_format_1_manifests_still_verify_and_their_cast_is_a_warning(sealed: Sealed) -> None:
    doc = json.loads(sealed.man.read_bytes())
    body = {**doc["manifest"], "format": "bastion-broker-manifest/1"}
    data = json.dumps(sign_manifest(body, sealed.key)).encode()
    sealed.man.write_bytes(data)
    sealed.audit = [json.dumps({"seq": 0, "event": "recording.sealed", "session_id": SID,
                                "manifest_sha256": hashlib.sha256(data).hexdigest()}).encode()
                    + b"\n"]
    assert sealed.verify().findings == []
    sealed.rec.with_suffix(".cast").write_text("{}\n")
    r = sealed.verify()
    assert r.ok and codes(r) == ["file_not_sealed"]
    assert r.findings[0].severity == "warning"
