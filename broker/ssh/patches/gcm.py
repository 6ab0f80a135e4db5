"""AES-GCM for SSH (RFC 5647) keyed once per key, not once per packet."""

from __future__ import annotations

from asyncssh.encryption import GCMEncryption
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class KeyedGCMEncryption(GCMEncryption):
    """AES-GCM for SSH (RFC 5647) with one AESGCM object per key, not one per packet.

    asyncssh builds a new ``AESGCM(key)`` (key schedule included) for every packet and copies the
    ciphertext and tag into one buffer twice; this keeps the object for the key's lifetime and
    copies once. Same nonce rule: 4 fixed bytes, then a 64-bit invocation counter, +1 per packet.
    """

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._aead = AESGCM(key)
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:], "big")

    @classmethod
    def new(cls, cipher_name: str, key: bytes, iv: bytes, mac_alg: bytes = b"",
            mac_key: bytes = b"", etm: bool = False) -> KeyedGCMEncryption:
        return cls(key, iv)

    def _nonce(self) -> bytes:
        nonce = self._fixed + self._counter.to_bytes(8, "big")
        self._counter = (self._counter + 1) & 0xFFFFFFFFFFFFFFFF
        return nonce

    def encrypt_packet(self, seq: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
        # The tag stays attached: asyncssh only sends ``packet + mac``, and ``x + b""`` is ``x``
        # itself, so the 32 KiB packet is copied once here instead of three times.
        return header + self.seal(packet, header), b""

    def seal(self, plain: bytes | bytearray, header: bytes) -> bytes:
        """Ciphertext and tag of the next packet (``datapath`` sends the header separately)."""
        return self._aead.encrypt(self._nonce(), plain, header)

    def open(self, header: bytes | memoryview, body: bytes | memoryview) -> bytes | None:
        """Plaintext of the next packet from its header and ciphertext + tag, or None if the tag
        does not verify (the nonce is used up either way)."""
        try:
            return self._aead.decrypt(self._nonce(), body, header)
        except InvalidTag:
            return None

    def rewind(self) -> None:
        """Undo the last nonce step: the packet just opened is handed back to asyncssh, which
        opens it again."""
        self._counter = (self._counter - 1) & 0xFFFFFFFFFFFFFFFF

    def decrypt_packet(self, seq: int, first: bytes, rest: bytes, header_len: int,
                       mac: bytes) -> bytes | None:
        return self.open(first[:header_len], b"".join((first[header_len:], rest, mac)))
