"""Withheld input sealed to the break-glass key ([recordings] input = "sealed").

The recording keeps only a marker for input the target did not echo (``broker.domain.echo``).
In sealed mode its bytes also go to ``SESSION_ID.sealed`` beside the recording, encrypted to a
break-glass X25519 public key whose private half the broker never holds: a reviewer with the
recording, ``export``, the console or the S3 copy cannot read them; ``sessions unseal`` with the
private key can, and is audited.

Construction (``cryptography``'s primitives, nothing hand-rolled): per session a fresh ephemeral
X25519 key; ``HKDF-SHA256(X25519(ephemeral, recipient))`` with the ephemeral and recipient public
keys and the session id as info gives one AES-256-GCM key. The file is ``MAGIC``, one JSON header
line (algorithm, session id, ephemeral public key, recipient fingerprint), then records
``<I length><ciphertext>``; record ``n`` uses the 96-bit nonce ``n`` and authenticates the header
line and ``n``, so records cannot be reordered, dropped from the middle or moved to another file.
Plaintext: a type byte (``d`` data, ``e`` the end, written at close), ``<Q`` microseconds since
the recording started, the bytes. A file without its end record was cut (crash, or tampering).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.errors import BrokerError, ConfigError, RecordingError

MAGIC = b"BBSEAL1\n"
SUFFIX = ".sealed"
ALG = "X25519-HKDF-SHA256-AES256GCM"
_INFO = b"bastion-broker sealed input v1\n"
_LEN = struct.Struct("<I")
_HEAD = struct.Struct("<cQ")
MAX_RECORD = 1 << 24  # a longer record is not one the broker wrote


class UnsealError(BrokerError):
    """A sealed file cannot be opened with this key (another key, altered, cut, missing)."""

    @property
    def user_message(self) -> str:  # type: ignore[override]
        return str(self)


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(pub: X25519PublicKey) -> str:
    """SHA-256 of the raw public key: which break-glass key a file is sealed to."""
    return hashlib.sha256(_raw(pub)).hexdigest()


def load_public_key(path: Path) -> X25519PublicKey:
    """The break-glass public key (PEM, ``openssl pkey -pubout``); a bad file is a ConfigError."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the input seal key: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{path}: not a PEM public key") from None
    if not isinstance(key, X25519PublicKey):
        raise ConfigError(f"{path}: the input seal key must be an X25519 public key")
    return key


def load_private_key(path: Path) -> X25519PrivateKey:
    """The break-glass private key (PEM, ``openssl genpkey -algorithm X25519``, unencrypted)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise UnsealError(f"{path}: cannot read the key: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise UnsealError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise UnsealError(f"{path}: not an X25519 private key")
    return key


def _key(shared: bytes, epk: bytes, recipient: bytes, session_id: str) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_INFO + epk + recipient + session_id.encode())
    return AESGCM(hkdf.derive(shared))


def _nonce(n: int) -> bytes:
    return n.to_bytes(12, "big")


def sealed_path(rec_path: Path) -> Path:
    return rec_path.with_suffix(SUFFIX)


class SealedInput:
    """Appends one session's withheld input, encrypted, beside its recording (0600)."""

    def __init__(self, path: Path, session_id: str, recipient: X25519PublicKey) -> None:
        eph = X25519PrivateKey.generate()
        epk, rpk = _raw(eph.public_key()), _raw(recipient)
        self._aead = _key(eph.exchange(recipient), epk, rpk, session_id)
        header = json.dumps({"alg": ALG, "session_id": session_id,
                             "epk": base64.b64encode(epk).decode(),
                             "recipient": fingerprint(recipient)}, sort_keys=True).encode()
        self._aad = hashlib.sha256(header).digest()
        self._n = 0
        self._path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except OSError as exc:
            raise RecordingError(f"cannot create {path}: {exc.strerror}") from exc
        self._write(MAGIC + header + b"\n")

    def _write(self, data: bytes) -> None:
        if self._fd < 0:
            raise RecordingError(f"{self._path} is closed")
        try:
            if os.write(self._fd, data) != len(data):
                raise OSError(28, "short write")
        except OSError as exc:
            raise RecordingError(f"cannot write {self._path}: {exc.strerror}") from exc

    def _record(self, kind: bytes, t_us: int, data: bytes) -> None:
        ct = self._aead.encrypt(_nonce(self._n), _HEAD.pack(kind, t_us) + data,
                                self._aad + self._n.to_bytes(8, "big"))
        self._n += 1
        self._write(_LEN.pack(len(ct)) + ct)

    def add(self, t_us: int, data: bytes) -> None:
        self._record(b"d", t_us, data)

    def close(self) -> None:
        """The end record, then fsync (a file without it was cut). Idempotent."""
        if self._fd < 0:
            return
        try:
            self._record(b"e", 0, b"")
            os.fsync(self._fd)
        except OSError as exc:
            raise RecordingError(f"cannot sync {self._path}: {exc.strerror}") from exc
        finally:
            os.close(self._fd)
            self._fd = -1


def opener(recipient: X25519PublicKey) -> Callable[[str, str], SealedInput]:
    """For the session service: ``(session id, recording location) -> SealedInput``."""

    def open_sealed(session_id: str, location: str) -> SealedInput:
        return SealedInput(sealed_path(Path(location)), session_id, recipient)

    return open_sealed


@dataclass(frozen=True, slots=True)
class Unsealed:
    t_us: int
    data: bytes


@dataclass
class SealedFile:
    """What ``read`` found: the session, the key it is sealed to, and whether it is whole."""

    session_id: str
    recipient: str
    complete: bool = False


def read(path: Path, key: X25519PrivateKey, info: SealedFile | None = None) -> Iterator[Unsealed]:
    """The withheld input in order. Raises ``UnsealError`` for another key's file, or one
    altered; a file cut short (no end record: a crash, or records removed from its end) yields
    what it has and leaves ``info.complete`` False."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise UnsealError(f"{path.name}: no sealed input for this session (none withheld, or "
                             'the broker ran with [recordings] input = "redact")') from None
    except OSError as exc:
        raise UnsealError(f"cannot read {path}: {exc.strerror}") from None
    nl = blob.find(b"\n", len(MAGIC))
    if not blob.startswith(MAGIC) or nl < 0:
        raise UnsealError(f"{path.name} is not a sealed input file")
    header_line = blob[len(MAGIC):nl]
    try:
        header = json.loads(header_line)
        epk = base64.b64decode(header["epk"], validate=True)
        sid, recipient = str(header["session_id"]), str(header["recipient"])
    except (ValueError, KeyError, TypeError):
        raise UnsealError(f"{path.name}: its header is damaged") from None
    if header.get("alg") != ALG:
        raise UnsealError(f"{path.name}: unknown algorithm {header.get('alg')!r}")
    if info is not None:
        info.session_id, info.recipient = sid, recipient
    pub = key.public_key()
    if fingerprint(pub) != recipient:
        raise UnsealError(f"{path.name} is sealed to another key (fingerprint {recipient})")
    try:
        aead = _key(key.exchange(X25519PublicKey.from_public_bytes(epk)), epk, _raw(pub), sid)
    except ValueError:
        raise UnsealError(f"{path.name}: its header is damaged") from None
    aad = hashlib.sha256(header_line).digest()
    pos, n = nl + 1, 0
    while pos < len(blob):
        if pos + _LEN.size > len(blob):
            return  # cut inside a record (a crash mid-write): what came before stands
        (size,) = _LEN.unpack_from(blob, pos)
        end = pos + _LEN.size + size
        if size > MAX_RECORD:
            raise UnsealError(f"{path.name}: record {n} is damaged")
        if end > len(blob):
            return
        try:
            plain = aead.decrypt(_nonce(n), blob[pos + _LEN.size:end], aad + n.to_bytes(8, "big"))
        except InvalidTag:
            raise UnsealError(f"{path.name}: record {n} was altered or moved") from None
        kind, t_us = _HEAD.unpack_from(plain)
        if kind == b"e":
            if info is not None:
                info.complete = end == len(blob)
            if end != len(blob):
                raise UnsealError(f"{path.name}: bytes after its end record")
            return
        yield Unsealed(t_us, plain[_HEAD.size:])
        pos, n = end, n + 1
