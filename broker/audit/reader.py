"""The audit log read back for reviewers (``GET /api/audit``, the dashboard, a session's files).

The log is one append-only file that may hold years of events, so it is never loaded: it is
read backwards in blocks from the end (newest first, as a reviewer reads it), a page cursor and
an ``until`` bound are found by bisection (lines are appended in ``seq`` and time order), and a
``since`` bound stops the walk once events are older than it. Memory stays at a block, one line
(lines over ``MAX_LINE`` are passed over: the broker never writes one) and the page being built.
Bytes are tested for the filters' values before a line is parsed, so a selective search parses
little.
Damaged lines are passed over: ``verify --audit`` is what reports them.
A rotated log is read the same way file by file, the current one first; a rotated file whose
name shows it starts at or after the page cursor (its first ``seq``) or after ``until`` is not
opened.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from broker.audit.files import Snapshot
from broker.ports import AuditQuery

BLOCK = 1 << 16
MAX_LINE = 1 << 20
# events from several processes are appended under a lock with their own clock reading, so
# ``ts`` may step back a little between neighbours: the walk stops this far past ``since``
SINCE_SLACK = timedelta(minutes=5)


def _backwards(f: IO[bytes], end: int) -> Iterator[bytes]:
    """The complete lines ending at or before ``end`` (a line start), last first."""
    pos, tail, skipping = end, b"", False
    while pos > 0:
        start = max(0, pos - BLOCK)
        f.seek(start)
        block = f.read(pos - start)
        pos = start
        parts = block.split(b"\n")
        if skipping:
            if len(parts) == 1:
                continue  # still inside the over-long line
            parts[-1], skipping = b"", False  # its start: dropped
        else:
            parts[-1] += tail
        tail = parts[0]
        for line in reversed(parts[1:]):
            if line and len(line) <= MAX_LINE:
                yield line
        if len(tail) > MAX_LINE:
            tail, skipping = b"", True
    if tail and not skipping:
        yield tail


def _test_after(f: IO[bytes], offset: int, beyond: Callable[[bytes], bool | None]
                ) -> tuple[bool | None, int]:
    """``beyond`` of the first line starting after ``offset`` (at it, for 0) that it can
    judge, and where the line holding ``offset`` ends."""
    f.seek(offset)
    if offset:
        f.readline(MAX_LINE)
    boundary = f.tell()
    for _ in range(8):
        line = f.readline(MAX_LINE)
        if not line:
            return None, boundary
        verdict = beyond(line)
        if verdict is not None:
            return verdict, boundary
    return None, boundary


def _end_before(f: IO[bytes], size: int, beyond: Callable[[bytes], bool | None]) -> int:
    """A line boundary such that every line after it is ``beyond`` the page (its ``seq`` at or
    above the cursor, or its time past ``until``): bisection, as lines are appended in order,
    so a page deep in the log starts reading where it begins."""
    lo, hi = 0, size
    while hi - lo > BLOCK:
        mid = (lo + hi) // 2
        verdict, _ = _test_after(f, mid, beyond)
        if verdict is None or verdict:
            hi = mid
        else:
            lo = mid
    if hi >= size:
        return size
    _, boundary = _test_after(f, hi, beyond)
    return boundary


def _seq_at_least(seq: int) -> Callable[[bytes], bool | None]:
    def beyond(line: bytes) -> bool | None:
        try:
            found = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            return None
        return found >= seq if isinstance(found, int) else None

    return beyond


def _later_than(t: datetime) -> Callable[[bytes], bool | None]:
    def beyond(line: bytes) -> bool | None:
        found = _line_ts(line)
        return found >= t if found is not None else None

    return beyond


def _user_matches(value: object, user: str) -> bool:
    if not isinstance(value, str):
        return False
    v, u = value.casefold(), user.casefold()
    return v == u if "@" in u else v.split("@", 1)[0] == u


class _Filter:
    """``AuditQuery`` as a byte test (cheap, may pass lines that do not match) and an object
    test (exact)."""

    def __init__(self, q: AuditQuery) -> None:
        self.q = q
        self.needles: list[bytes] = []
        if q.session_id is not None:
            self.needles.append(json.dumps(q.session_id).encode())
        self.family = q.event[:-1] if q.event and q.event.endswith(".*") else None
        if q.event:
            # events are written with sorted keys and no spaces (``encode_event``)
            whole = json.dumps(self.family if self.family is not None else q.event).encode()
            self.needles.append(b'"event":' + (whole[:-1] if self.family is not None else whole))
        self.user_needle = (q.user.casefold().encode()
                            if q.user is not None and q.user.isascii() else None)
        self.since_stop = q.since - SINCE_SLACK if q.since is not None else None

    def maybe(self, line: bytes) -> bool:
        if not all(n in line for n in self.needles):
            return False
        return self.user_needle is None or self.user_needle in line.lower()

    def match(self, ev: dict[str, Any], ts: datetime | None) -> bool:
        q = self.q
        if q.session_id is not None and ev.get("session_id") != q.session_id:
            return False
        name = str(ev.get("event", ""))
        if self.family is not None and not name.startswith(self.family):
            return False
        if q.event is not None and self.family is None and name != q.event:
            return False
        if q.user is not None and not (_user_matches(ev.get("user"), q.user)
                                       or _user_matches(ev.get("actor"), q.user)):
            return False
        if q.since is not None and (ts is None or ts < q.since):
            return False
        return not (q.until is not None and (ts is None or ts >= q.until))


def _ts(value: object) -> datetime | None:
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _line_ts(line: bytes) -> datetime | None:
    """The ``ts`` of a line without parsing the rest of it (the ``since`` bound's test)."""
    i = line.find(b'"ts":"')
    if i < 0:
        return None
    j = line.find(b'"', i + 6)
    return _ts(line[i + 6:j].decode("ascii", "replace")) if j > 0 else None


def _walk_file(f: IO[bytes], q: AuditQuery, flt: _Filter) -> Iterator[dict[str, Any] | None]:
    """Matching events of one file, newest first; a final None when the ``since`` bound was
    passed (older files need not be read)."""
    end = f.seek(0, 2)
    if q.before_seq is not None:
        end = _end_before(f, end, _seq_at_least(q.before_seq))
    if q.until is not None:
        end = _end_before(f, end, _later_than(q.until + SINCE_SLACK))
    for line in _backwards(f, end):
        if flt.since_stop is not None:
            t = _line_ts(line)
            if t is not None and t < flt.since_stop:
                yield None
                return
        if not flt.maybe(line):
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if not isinstance(ev, dict):
            continue
        ts = _ts(ev.get("ts"))
        seq = ev.get("seq")
        if q.before_seq is not None and (not isinstance(seq, int) or seq >= q.before_seq):
            continue
        if flt.match(ev, ts):
            yield ev


def _walk(path: Path, q: AuditQuery) -> Iterator[dict[str, Any]]:
    """Matching events, newest first, read in bounded memory, across the log's files."""
    flt = _Filter(q)
    with Snapshot(path) as snap:
        files: list[IO[bytes] | Path] = [f.path for f in snap.rotated
                                         if not _after_page(f.first_seq, f.started, q)]
        if snap.current is not None:
            files.append(snap.current)
        for item in reversed(files):
            try:
                f = open(item, "rb") if isinstance(item, Path) else item  # noqa: SIM115
            except FileNotFoundError:
                continue
            try:
                for ev in _walk_file(f, q, flt):
                    if ev is None:
                        return
                    yield ev
            finally:
                if isinstance(item, Path):
                    f.close()


def _after_page(first_seq: int | None, started: datetime | None, q: AuditQuery) -> bool:
    """A rotated file that holds nothing for the page: it starts at or after the cursor, or
    after ``until`` (with the slack the clocks of several writers need)."""
    if first_seq is not None and q.before_seq is not None and first_seq >= q.before_seq:
        return True
    return started is not None and q.until is not None and started >= q.until + SINCE_SLACK


class JsonlAuditReader:
    """``AuditReader`` over the local JSONL audit log (``broker.audit.jsonl``), in threads of
    its own (a long search never holds up the broker's other thread work)."""

    def __init__(self, path: Path, threads: int = 2) -> None:
        self._path = path
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="audit-read")

    def _search(self, q: AuditQuery) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if q.limit <= 0:
            return out
        for ev in _walk(self._path, q):
            out.append(ev)
            if len(out) >= q.limit:
                break
        return out

    def _count(self, q: AuditQuery) -> int:
        return sum(1 for _ in _walk(self._path, q))

    async def search(self, q: AuditQuery) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._search, q)

    async def count(self, q: AuditQuery) -> int:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._count, replace(q, before_seq=None))
