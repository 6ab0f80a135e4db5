"""Signed checkpoints in the audit chain: an ``audit.checkpoint`` line signs the chain head.

The hash chain alone shows an edited, removed or moved line, but whoever can write the file can
also rewrite every hash after the change. A checkpoint carries an Ed25519 signature over its own
line (minus the ``sig`` field), and that line's ``prev`` is the hash of the line before, which
chains to every line before it: nothing up to a checkpoint can be rewritten without the key.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from broker.domain.audit import encode_event

CHECKPOINT = "audit.checkpoint"
# written by a process that finds the log shorter than it left it (lines cut off the end)
CUT = "audit.cut"
CONTEXT = b"bastion-broker audit checkpoint v1\n"


def checkpoint_line(seq: int, prev: str, now: datetime, key_id: str,
                    sign: Callable[[bytes], bytes]) -> bytes:
    """The checkpoint line (with newline) at ``seq``, signed by ``sign(bytes) -> bytes``."""
    fields: dict[str, Any] = {"covers_seq": seq - 1, "key_id": key_id}
    unsigned = encode_event(seq, prev, CHECKPOINT, now, fields)
    sig = sign(CONTEXT + unsigned.rstrip(b"\n"))
    fields["sig"] = base64.b64encode(sig).decode()
    return encode_event(seq, prev, CHECKPOINT, now, fields)


def signed_bytes(obj: dict[str, Any]) -> bytes:
    """What a parsed checkpoint's signature must cover (its line without ``sig``)."""
    body = {k: v for k, v in obj.items() if k != "sig"}
    return CONTEXT + json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def signature_of(obj: dict[str, Any]) -> bytes | None:
    """The decoded signature, or None if the field is missing or not base64."""
    sig = obj.get("sig")
    if not isinstance(sig, str):
        return None
    try:
        return base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        return None
