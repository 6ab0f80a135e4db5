"""SealedInput / sealed.read on a temporary directory: only the break-glass key opens the file,
and an altered, reordered, moved or cut file is told apart from a whole one."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from broker.errors import ConfigError
from broker.recordings import sealed


def _write(path: Path, sid: str, key: X25519PrivateKey, items: list[tuple[int, bytes]],
           close: bool = True) -> None:
    s = sealed.SealedInput(path, sid, key.public_key())
    for t, data in items:
        s.add(t, data)
    if close:
        s.close()


def _read(path: Path, key: X25519PrivateKey) -> tuple[list[tuple[int, bytes]], bool]:
    info = sealed.SealedFile("", "")
    items = [(u.t_us, u.data) for u in sealed.read(path, key, info)]
    return items, info.complete


ITEMS = [(10, b"hunter2"), (20, b"\x00\xffbinary"), (30, b"")]


def test_round_trip_with_the_right_key_only(tmp_path: Path) -> None:
    key, other = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    path = tmp_path / "s.sealed"
    _write(path, "sid-1", key, ITEMS)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    blob = path.read_bytes()
    assert b"hunter2" not in blob and b"binary" not in blob
    assert _read(path, key) == (ITEMS, True)
    with pytest.raises(sealed.UnsealError, match="sealed to another key"):
        _read(path, other)


def test_each_session_gets_its_own_key_stream(tmp_path: Path) -> None:
    key = X25519PrivateKey.generate()
    a, b = tmp_path / "a.sealed", tmp_path / "b.sealed"
    _write(a, "sid-1", key, [(1, b"same secret")])
    _write(b, "sid-1", key, [(1, b"same secret")])
    assert a.read_bytes() != b.read_bytes()  # fresh ephemeral key per file


def _records(blob: bytes) -> tuple[bytes, list[bytes]]:
    nl = blob.index(b"\n", len(sealed.MAGIC)) + 1
    head, pos, recs = blob[:nl], nl, []
    while pos < len(blob):
        (n,) = struct.unpack_from("<I", blob, pos)
        recs.append(blob[pos:pos + 4 + n])
        pos += 4 + n
    return head, recs


def test_altered_reordered_or_dropped_records_are_refused(tmp_path: Path) -> None:
    key = X25519PrivateKey.generate()
    path = tmp_path / "s.sealed"
    _write(path, "sid-1", key, ITEMS)
    head, recs = _records(path.read_bytes())
    flipped = bytearray(recs[0])
    flipped[10] ^= 1
    for bad in ([bytes(flipped), *recs[1:]], [recs[1], recs[0], *recs[2:]],
                [recs[0], *recs[2:]]):
        path.write_bytes(head + b"".join(bad))
        with pytest.raises(sealed.UnsealError, match="altered or moved"):
            _read(path, key)


def test_a_record_moved_from_another_file_is_refused(tmp_path: Path) -> None:
    key = X25519PrivateKey.generate()
    a, b = tmp_path / "a.sealed", tmp_path / "b.sealed"
    _write(a, "sid-a", key, [(1, b"one")])
    _write(b, "sid-b", key, [(1, b"two")])
    head_a, recs_a = _records(a.read_bytes())
    _, recs_b = _records(b.read_bytes())
    a.write_bytes(head_a + recs_b[0] + recs_a[1])
    with pytest.raises(sealed.UnsealError, match="altered or moved"):
        _read(a, key)


def test_a_cut_file_yields_what_it_has_and_says_so(tmp_path: Path) -> None:
    key = X25519PrivateKey.generate()
    path = tmp_path / "s.sealed"
    _write(path, "sid-1", key, ITEMS[:2], close=False)  # a crash: no end record
    assert _read(path, key) == (ITEMS[:2], False)
    path.write_bytes(path.read_bytes()[:-3])  # and cut mid-record
    assert _read(path, key) == (ITEMS[:1], False)


def test_missing_file_and_bad_keys_are_clear_errors(tmp_path: Path) -> None:
    key = X25519PrivateKey.generate()
    with pytest.raises(sealed.UnsealError, match="no sealed input"):
        _read(tmp_path / "none.sealed", key)
    pem = tmp_path / "bad.pem"
    pem.write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        sealed.load_public_key(pem)
    with pytest.raises(sealed.UnsealError, match="not an unencrypted PEM private key"):
        sealed.load_private_key(pem)
    pub = tmp_path / "pub.pem"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    assert sealed.fingerprint(sealed.load_public_key(pub)) == sealed.fingerprint(key.public_key())
