"""``RecordingArchive`` on local disk: a recording's size, its signed manifest and ``verify``'s
verdict on it, for the sessions API (``broker.services.review``).

The verdict is ``verify_session``'s, the same as ``bastion-broker verify SESSION_ID``; only the
audit log is read differently: instead of loading the whole log, one pass in blocks keeps the
lines that name the session (with their line numbers, which ``verify`` cites), so a reviewer's
request costs a scan of the log, never its size in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from broker.audit.files import Snapshot
from broker.errors import NotFoundError, UsageError
from broker.integrity.keys import VerifyKey
from broker.integrity.verify import verify_session
from broker.ports import IntegrityCheck
from broker.recordings.local import LocalRecordingSink

_CHUNK = 1 << 20


class _SessionLines(list[bytes]):
    """The audit log as ``verify_session`` reads it (numbered lines, in order), holding only the
    lines that name the session: every other line reads as empty, which names no session."""

    def __init__(self, kept: dict[int, bytes], count: int) -> None:
        super().__init__()
        self._kept = kept
        self._count = count

    def __iter__(self) -> Iterator[bytes]:
        for n in range(self._count):
            yield self._kept.get(n, b"")

    def __len__(self) -> int:
        return self._count


def session_lines(path: Path, session_id: str) -> _SessionLines | None:
    """The audit lines naming ``session_id``, by line number across the log's files (rotated
    ones first); None without an audit log."""
    needle = session_id.encode()
    kept: dict[int, bytes] = {}
    count = 0
    with Snapshot(path) as snap:
        if snap.current is None and not snap.rotated:
            return None
        for _, f in snap.open_each():
            rest = b""
            while chunk := f.read(_CHUNK):
                data = rest + chunk
                cut = data.rfind(b"\n") + 1
                body, rest = data[:cut], data[cut:]
                if needle in body:
                    for line in body.splitlines(keepends=True):
                        if needle in line:
                            kept[count] = line
                        count += 1
                else:
                    count += body.count(b"\n")
                if len(rest) > _CHUNK:  # no newline in a whole chunk: not a line the broker wrote
                    count += 1
                    rest = b""
            if rest:
                if needle in rest:
                    kept[count] = rest
                count += 1
    return _SessionLines(kept, count)


class LocalRecordingArchive:
    def __init__(self, sink: LocalRecordingSink, key: VerifyKey, audit_path: Path) -> None:
        self._sink = sink
        self._key = key
        self._audit_path = audit_path

    def _rec(self, location: str) -> Path | None:
        try:
            return self._sink.path_of(location)
        except NotFoundError:
            return None

    def size(self, location: str) -> int | None:
        p = self._rec(location) if location else None
        try:
            return p.stat().st_size if p is not None else None
        except OSError:
            return None

    def manifest(self, session_id: str, location: str) -> bytes | None:
        p = self._rec(location) if location else None
        if p is None:
            return None
        try:
            return p.with_name(f"{session_id}.manifest.json").read_bytes()
        except OSError:
            return None

    def verify(self, session_id: str, location: str, *, live: bool) -> IntegrityCheck:
        lines = session_lines(self._audit_path, session_id)
        try:
            report = verify_session(self._sink.root, session_id, self._key, lines)
        except (NotFoundError, UsageError) as exc:
            return IntegrityCheck("failed", (("recording_missing", str(exc)),))
        errors = tuple((f.code, f.message) for f in report.findings if f.severity == "error")
        warnings = tuple((f.code, f.message) for f in report.findings
                         if f.severity != "error")
        sealed = lines is not None and any(b'"recording.sealed"' in raw
                                           for raw in lines._kept.values())
        if [c for c, _ in errors] == ["manifest_missing"] and (live or not sealed):
            # still running, or its seal not written yet (or failed): nothing to check yet
            return IntegrityCheck("unsealed", (), errors + warnings)
        return IntegrityCheck("verified" if report.ok else "failed", errors, warnings)
