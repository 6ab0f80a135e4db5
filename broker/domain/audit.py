"""Hash-chained audit lines: each JSON line carries the SHA-256 of the line before it.

Removing, reordering or editing a line breaks the chain at that point, which ``verify_chain``
reports by line number. Signed checkpoints come on top of this later; the chain is the base.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

GENESIS = "0" * 64


def line_hash(line: bytes) -> str:
    """SHA-256 of one audit line, without its trailing newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def encode_event(
    seq: int, prev: str, event: str, now: datetime, fields: dict[str, Any]
) -> bytes:
    """One audit line (with newline). ``seq``, ``ts``, ``event`` and ``prev`` cannot be overridden."""
    body: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    body.update(seq=seq, ts=now.isoformat(timespec="microseconds"), event=event, prev=prev)
    return json.dumps(body, separators=(",", ":"), sort_keys=True, default=str).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class ChainProblem:
    line_no: int
    problem: str


def verify_chain(lines: Iterable[bytes]) -> list[ChainProblem]:
    """Check every line's ``prev`` against the hash of the line before and that ``seq`` counts up."""
    problems: list[ChainProblem] = []
    prev = GENESIS
    expected_seq: int | None = None
    for n, raw in enumerate(lines, start=1):
        if not raw.endswith(b"\n"):
            problems.append(ChainProblem(n, "incomplete last line"))
        try:
            obj = json.loads(raw)
        except ValueError:
            problems.append(ChainProblem(n, "not JSON"))
            prev = line_hash(raw)
            continue
        if obj.get("prev") != prev:
            problems.append(ChainProblem(n, "hash chain broken (line edited, removed or moved)"))
        seq = obj.get("seq")
        if expected_seq is not None and seq != expected_seq:
            problems.append(ChainProblem(n, f"sequence {seq} where {expected_seq} was expected"))
        expected_seq = seq + 1 if isinstance(seq, int) else None
        prev = line_hash(raw)
    return problems
