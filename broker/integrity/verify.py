"""``verify``: check a sealed recording or the audit chain, and say exactly what is wrong.

Each problem is a :class:`Finding` with a stable ``code`` (for scripts and tests), a sentence for
people, and where it is (file, line, byte range). ``error`` findings make the check fail;
``warning`` findings are states that are normal at times (a running broker's audit tail that is
not signed yet) and are reported without failing.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.audit.checkpoint import CHECKPOINT, CUT, signature_of, signed_bytes
from broker.audit.files import Snapshot
from broker.domain import recording as fmt
from broker.domain.audit import GENESIS, line_hash
from broker.domain.audit_files import ROTATED
from broker.errors import NotFoundError, UsageError
from broker.integrity.keys import VerifyKey
from broker.integrity.manifest import (
    COMPANIONS,
    FORMAT_V1,
    FORMATS,
    SIGNING_CONTEXT,
    canonical,
    digest_file,
)

_SESSION_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz-")
_MAX_RANGES = 5
_SAFE_NAME = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]{0,200}")
# an unsigned audit tail older than this is an error: the broker signs within ~30 s (its timer
# runs every 5 s) and at every clean stop, so only a cut or a killed writer leaves one this old
TAIL_GRACE = 60.0


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str  # "error" | "warning"
    code: str
    message: str
    where: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "code": self.code, "message": self.message,
                **({"where": self.where} if self.where else {})}


@dataclass
class Report:
    subject: str
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def error(self, code: str, message: str, **where: Any) -> None:
        self.findings.append(Finding("error", code, message, where))

    def warning(self, code: str, message: str, **where: Any) -> None:
        self.findings.append(Finding("warning", code, message, where))

    def as_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "ok": self.ok, "checked": self.checked,
                "findings": [f.as_json() for f in self.findings]}


# -- audit log -----------------------------------------------------------------------------------
def _ranges(nums: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n in sorted(nums):
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"


def _starts(files: list[tuple[str, int]] | None) -> list[int]:
    """The first (global, 1-based) line number of each file."""
    out, n = [], 1
    for _, count in files or []:
        out.append(n)
        n += count
    return out


def _places(files: list[tuple[str, int]] | None
            ) -> tuple[Callable[[int], str], Callable[[int], dict[str, Any]]]:
    """How a line is named in messages and in ``where``: ``line N`` for one file, ``line N of
    FILE`` across rotated files."""
    if not files or len(files) < 2:
        return (lambda n: f"line {n}"), (lambda n: {"line": n})
    starts = _starts(files)

    def find(n: int) -> tuple[str, int]:
        k = max(0, bisect.bisect_right(starts, n) - 1)
        return files[k][0], n - starts[k] + 1

    def loc(n: int) -> str:
        name, line = find(n)
        return f"line {line} of {name}"

    def at(n: int) -> dict[str, Any]:
        name, line = find(n)
        return {"file": name, "line": line}

    return loc, at


def _file_gaps(parsed: list[dict[str, Any] | None], files: list[tuple[str, int]],
               starts: list[int]) -> dict[int, str]:
    """Line number -> the file missing before it: a file's first line, ``audit.rotated``,
    names the file before it, and that is not the file before it here."""
    gaps: dict[int, str] = {}
    for k, start in enumerate(starts):
        if start > len(parsed) or files[k][1] == 0:
            continue
        obj = parsed[start - 1]
        if obj is None or obj.get("event") != ROTATED:
            continue
        named = str(obj.get("previous"))
        if k == 0 or named != files[k - 1][0]:
            gaps[start] = named
    return gaps


def verify_audit_lines(lines: list[bytes], key: VerifyKey, report: Report,
                       now: datetime | None = None,
                       files: list[tuple[str, int]] | None = None) -> None:
    """Check the chain, the sequence numbers and every checkpoint signature of an audit log
    (``now``: for the age of an unsigned tail; default the current time). ``files``: (name,
    line count) of each file ``lines`` were read from, in order, for a rotated log: the chain
    runs on across files, places are named by file and line, and a file whose successor's
    ``audit.rotated`` names another predecessor is reported missing."""
    loc, at = _places(files)
    starts = _starts(files)
    parsed: list[dict[str, Any] | None] = []
    for raw in lines:
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        parsed.append(obj if isinstance(obj, dict) and isinstance(obj.get("seq"), int) else None)
    all_seqs = {o["seq"] for o in parsed if o is not None}
    gaps = _file_gaps(parsed, files or [], starts)

    prev_hash = GENESIS
    prev_seq: int | None = None
    damaged = 0  # damaged lines since the last good one (they are taken to hold those seqs)
    seen: set[int] = set()
    max_seq = -1
    checkpoints = 0
    signed_through = 0  # line number of the last valid checkpoint
    for n, (raw, obj) in enumerate(zip(lines, parsed, strict=True), start=1):
        torn = not raw.endswith(b"\n")
        if obj is None:
            if torn:
                report.error("audit_truncated", f"{loc(n)} is incomplete: the log was cut "
                             "(truncated file or a write cut off by a crash)", **at(n))
            else:
                report.error("audit_line_damaged", f"{loc(n)} is not a valid audit event "
                             "(edited or damaged)", **at(n))
            prev_hash = line_hash(raw)
            damaged += 1
            continue
        if torn:
            report.error("audit_truncated", f"{loc(n)} (the last) has no newline: the log "
                         "was truncated", **at(n))
        seq: int = obj["seq"]
        continuous = False
        if prev_seq is None:  # the first good line: seq 0, after any damaged lines
            if seq > damaged:
                missing = [s for s in range(damaged, seq) if s not in all_seqs]
                if missing and n in gaps:
                    report.error("audit_file_missing",
                                 f"{gaps.pop(n)} is missing: the log starts at {loc(n)}, which "
                                 "names it as the file before (seq "
                                 f"{_span(missing[0], missing[-1])} gone: earlier files removed)",
                                 **at(n), seq=[missing[0], missing[-1]])
                elif missing:
                    report.error("audit_line_removed",
                                 f"seq {_span(missing[0], missing[-1])} missing before {loc(n)} "
                                 "(lines removed from the start)", **at(n),
                                 seq=[missing[0], missing[-1]])
            continuous = seq == damaged
        elif seq == prev_seq + 1 + damaged:
            continuous = True
        elif seq > prev_seq + 1 + damaged:
            missing = [s for s in range(prev_seq + 1 + damaged, seq) if s not in all_seqs]
            if missing and n in gaps:
                report.error("audit_file_missing",
                             f"{gaps.pop(n)} is missing (removed from between {loc(n - 1)} and "
                             f"{loc(n)}, which names it as the file before): seq "
                             f"{_span(missing[0], missing[-1])} gone", **at(n),
                             seq=[missing[0], missing[-1]])
                missing = []
            for a, b in _ranges(missing):
                report.error("audit_line_removed",
                             f"seq {_span(a, b)} missing between {loc(n - 1)} and {loc(n)} "
                             f"({b - a + 1} line{'s' if b > a else ''} removed)",
                             **at(n), seq=[a, b])
        if prev_seq is not None and seq <= max_seq:
            if seq in seen:
                report.error("audit_line_duplicated", f"{loc(n)} repeats seq {seq} "
                             "(line duplicated)", **at(n), seq=seq)
            else:
                report.error("audit_line_moved", f"{loc(n)} (seq {seq}) is out of order: it "
                             f"comes after seq {max_seq} (lines reordered)", **at(n), seq=seq)
        if obj.get("prev") != prev_hash and continuous and not damaged:
            if n == 1:
                report.error("audit_line_modified", f"{loc(1)} does not start the chain "
                             "(edited)", **at(1))
            else:
                report.error("audit_line_modified",
                             f"{loc(n - 1)} (seq {prev_seq}) was modified: {loc(n)} records "
                             "a different hash for it", **at(n - 1), seq=prev_seq)
        if obj.get("event") == CHECKPOINT:
            checkpoints += 1
            sig = signature_of(obj)
            kid = obj.get("key_id")
            if sig is None:
                report.error("checkpoint_unsigned", f"checkpoint at {loc(n)} has no valid "
                             "signature field", **at(n))
            elif kid != key.key_id:
                report.error("checkpoint_wrong_key", f"checkpoint at {loc(n)} names key "
                             f"{kid!r}, not this bastion's key {key.key_id}", **at(n))
            elif not key.verify(sig, signed_bytes(obj)):
                report.error("checkpoint_bad_signature",
                             f"checkpoint at {loc(n)}: signature does not verify (the "
                             "checkpoint was edited, or the chain before it rewritten)", **at(n))
            else:
                signed_through = n
        prev_hash, prev_seq, damaged = line_hash(raw), seq, 0
        seen.add(seq)
        max_seq = max(max_seq, seq)

    for n, name in gaps.items():
        report.error("audit_file_missing", f"{loc(n)} names {name} as the file before it, which "
                     "is not the file before it here (files removed or renamed)", **at(n))
    report.checked.update(lines=len(lines), checkpoints=checkpoints,
                          signed_through_line=signed_through, key_id=key.key_id)
    if lines and signed_through == 0:
        report.error("no_valid_checkpoint", "no line of the log is covered by a valid signed "
                     "checkpoint")
    elif signed_through < len(lines):
        _unsigned_tail(report, lines[signed_through:], parsed[signed_through:],
                       signed_through + 1, now, loc)
    for n, obj in enumerate(parsed, start=1):
        if obj is not None and obj.get("event") == CUT:
            report.error("audit_tail_cut", f"{loc(n)}: the broker found the log cut while it "
                         f"ran: seq {obj.get('expected_seq')} was next, the file ended at seq "
                         f"{obj.get('found_seq')} ("
                         + ("the file was replaced" if obj.get("replaced") else
                            f"{obj.get('lost_bytes')} bytes gone") + ")", **at(n))


def _unsigned_tail(report: Report, tail: list[bytes], parsed: list[dict[str, Any] | None],
                   first: int, now: datetime | None,
                   loc: Callable[[int], str] = lambda n: f"line {n}") -> None:
    """Lines after the last valid checkpoint: a warning while young (the broker signs them
    within ~30 s and at shutdown), an error once the oldest is older than ``TAIL_GRACE``
    seconds: no running broker left them, so the log was cut after them or the writer died."""
    stamps = []
    for obj in parsed:
        try:
            stamps.append(datetime.fromisoformat(str(obj["ts"])) if obj else None)
        except (KeyError, ValueError):
            stamps.append(None)
    known = [t for t in stamps if t is not None and t.tzinfo is not None]
    age = (now or datetime.now(UTC)) - min(known) if known else None
    events = sum(obj is not None for obj in parsed)
    last = first + len(tail) - 1
    span = f"lines {_span(first, last)}" if loc(first) == f"line {first}" else \
        f"{loc(first)}" + (f" to {loc(last)}" if last > first else "")
    where = {"lines": [first, first + len(tail) - 1], "events": events,
             "age_seconds": None if age is None else round(age.total_seconds(), 1)}
    what = (f"{events} event{'s' if events != 1 else ''} ({span}) after the last signed "
            "checkpoint")
    if age is not None and age.total_seconds() < TAIL_GRACE:
        report.warning("unsigned_tail", f"{what}, the oldest {age.total_seconds():.0f} s old: "
                       "not signed yet (normal while the broker runs; it signs them within "
                       "~30 s and at shutdown)", **where)
    else:
        old = "of unknown age" if age is None else f"the oldest {age.total_seconds():.0f} s old"
        report.error("unsigned_tail_stale", f"{what}, {old}: a running broker signs events "
                     f"within ~30 s and a clean stop signs them all, so the signed log was "
                     "cut after them (lines removed from the end, or its last checkpoints) "
                     "or the writer was killed", **where)


def read_files(path: Path) -> list[tuple[str, list[bytes]]]:
    """(name, lines) of every file of the log, rotated ones first (``broker.audit.files``)."""
    try:
        with Snapshot(path) as snap:
            if snap.current is None and not snap.rotated:
                raise NotFoundError(f"no audit log at {path}")
            return [(name, fh.read().splitlines(keepends=True))
                    for name, fh in snap.open_each()]
    except OSError as exc:
        raise NotFoundError(f"cannot read the audit log {path}: {exc.strerror}") from None


def read_lines(path: Path) -> list[bytes]:
    """Every line of the log, across its files, in order."""
    return [line for _, lines in read_files(path) for line in lines]


def verify_audit(path: Path, key: VerifyKey, now: datetime | None = None) -> Report:
    files = read_files(path)
    report = Report(subject=f"audit log {path}"
                    + (f" ({len(files)} files)" if len(files) > 1 else ""))
    verify_audit_lines([line for _, lines in files for line in lines], key, report, now,
                       [(name, len(lines)) for name, lines in files])
    if len(files) > 1:
        report.checked["files"] = [name for name, _ in files]
    return report


# -- recordings ----------------------------------------------------------------------------------
def _frame_at(rec: bytes, offset: int) -> str:
    """Which part of a recording a byte offset falls in, for people."""
    nl = rec.find(b"\n", len(fmt.MAGIC))
    if offset < len(fmt.MAGIC) or nl < 0 or offset <= nl:
        return "the recording header (session metadata)"
    pos, i = nl + 1, 0
    while pos + fmt.FRAME.size <= len(rec):
        t_us, kind, length = fmt.FRAME.unpack_from(rec, pos)
        end = pos + fmt.FRAME.size + length
        if offset < end or kind not in fmt.KINDS:
            names = {fmt.OUTPUT: "output", fmt.ERROR: "stderr", fmt.INPUT: "input",
                     fmt.RESIZE: "resize", fmt.EXIT: "exit", fmt.NOT_ECHOED: "withheld input"}
            part = "header of" if offset < pos + fmt.FRAME.size else "data of"
            return f"the {part} frame {i} ({names.get(kind, '?')} at {t_us / 1e6:.3f} s)"
        pos, i = end, i + 1
    return "the bytes after the last frame"


def _check_file(report: Report, path: Path, entry: dict[str, Any]) -> None:
    name = path.name
    try:
        want_size = int(entry["size"])
        want_sha = str(entry["sha256"])
        bs = int(entry.get("block_size") or 0) or None
        want_blocks = [str(b) for b in entry.get("blocks", [])]
    except (KeyError, TypeError, ValueError):
        report.error("manifest_damaged", f"the manifest entry for {name} is incomplete")
        return
    try:
        got = digest_file(path, bs)
    except FileNotFoundError:
        report.error("file_missing", f"{name} is missing (removed after sealing)", file=name)
        return
    except OSError as exc:
        report.error("file_unreadable", f"{name} cannot be read: {exc.strerror}", file=name)
        return
    if got.size == want_size and got.sha256 == want_sha:
        return
    # compare whole blocks present in both (a cut last block is the truncation itself)
    full = min(got.size, want_size) // got.block_size
    changed = [i for i in range(min(full, len(want_blocks), len(got.blocks)))
               if got.blocks[i] != want_blocks[i]]
    if got.size == want_size and len(want_blocks) == len(got.blocks) and \
            got.blocks[-1:] != want_blocks[-1:] and (len(got.blocks) - 1) not in changed:
        changed.append(len(got.blocks) - 1)
    if changed:
        ranges = _ranges(changed)
        text = ", ".join(
            f"bytes {a * got.block_size}-{min((b + 1) * got.block_size, got.size) - 1}"
            for a, b in ranges[:_MAX_RANGES])
        more = f" and {len(ranges) - _MAX_RANGES} more ranges" if len(ranges) > _MAX_RANGES else ""
        where = ""
        if path.suffix == ".rec":
            where = f"; first change in {_frame_at(path.read_bytes(), changed[0] * got.block_size)}"
        report.error("file_modified", f"{name} was modified after sealing: content differs in "
                     f"{text}{more}{where}", file=name,
                     ranges=[[a * got.block_size, min((b + 1) * got.block_size, got.size) - 1]
                             for a, b in ranges])
    if got.size < want_size:
        report.error("file_truncated", f"{name} is truncated: {got.size} bytes, the manifest "
                     f"says {want_size} ({want_size - got.size} bytes missing from the end)",
                     file=name, size=got.size, expected=want_size)
    elif got.size > want_size:
        report.error("file_extended", f"{name} has {got.size - want_size} bytes more than the "
                     f"manifest says ({got.size} instead of {want_size}): data appended after "
                     "sealing", file=name, size=got.size, expected=want_size)
    elif not changed:
        report.error("file_modified", f"{name} was modified after sealing (SHA-256 differs)",
                     file=name)


def _in_audit(audit_lines: list[bytes], sid: str, event: str
              ) -> list[tuple[int, dict[str, Any]]]:
    """(line number, event) for each ``event`` about session ``sid``."""
    needle, ev = sid.encode(), event.encode()
    out = []
    for n, raw in enumerate(audit_lines, start=1):
        if needle in raw and ev in raw:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if obj.get("event") == event and obj.get("session_id") == sid:
                out.append((n, obj))
    return out


def find_recording(recordings_dir: Path, sid: str) -> tuple[str, Path | None, Path | None]:
    """The session's full id, recording and manifest under ``DIR/YYYY-MM-DD/`` (either file may
    be missing); a unique prefix of the id is enough, as for ``play``."""
    if not sid or not set(sid) <= _SESSION_ID_CHARS or len(sid) > 64:
        raise UsageError("a session id is lowercase letters, digits and dashes")
    found = [*recordings_dir.glob(f"*/{sid}*.rec"), *recordings_dir.glob(f"*/{sid}*.manifest.json")]
    ids = {p.name.split(".", 1)[0] for p in found}
    if len(ids) > 1 and sid not in ids:
        raise UsageError(f"session id prefix {sid} matches {len(ids)} sessions; give more of it")
    full = sid if sid in ids or not ids else ids.pop()
    recs = sorted(p for p in found if p.name == f"{full}.rec")
    mans = sorted(p for p in found if p.name == f"{full}.manifest.json")
    return full, (recs[0] if recs else None), (mans[0] if mans else None)


def verify_session(recordings_dir: Path, sid: str, key: VerifyKey,
                   audit_lines: list[bytes] | None) -> Report:
    """Check one session's manifest signature and every file it lists."""
    sid, rec, man = find_recording(recordings_dir, sid)
    report = Report(subject=f"session {sid}")
    sealed = _in_audit(audit_lines, sid, "recording.sealed") if audit_lines is not None else []
    if man is None:
        shipped = (_in_audit(audit_lines, sid, "recording.local_removed")
                   if audit_lines is not None and rec is None else [])
        if shipped:
            report.warning("removed_after_upload", "the local copy was removed after a verified "
                           f"upload (audit line {shipped[-1][0]}): verify the copy kept off the "
                           "bastion (S3)")
            return report
        if rec is None and not sealed:
            raise NotFoundError(f"no recording of session {sid} in {recordings_dir}")
        if rec is None:
            report.error("recording_missing", "the recording and its manifest were removed "
                         f"(the audit log records their seal at line {sealed[0][0]})")
        elif sealed:
            report.error("manifest_missing", "the manifest was removed (the audit log records "
                         f"the seal at line {sealed[0][0]})")
        else:
            report.error("manifest_missing", "no manifest: the session is still running, its "
                         "seal failed, or the manifest was removed")
        return report
    raw = man.read_bytes()
    report.checked["manifest"] = man.name
    try:
        doc = json.loads(raw)
        body = doc["manifest"]
        files = body["files"]
        if not isinstance(body, dict) or not isinstance(files, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        report.error("manifest_damaged", f"{man.name} is not a readable manifest (edited or "
                     "damaged)", file=man.name)
        return report
    _check_signature(report, doc.get("signature"), body, key)
    if body.get("format") not in FORMATS:
        report.error("manifest_damaged", f"unknown manifest format {body.get('format')!r}")
    if body.get("session_id") != sid:
        report.error("manifest_wrong_session", f"the manifest is for session "
                     f"{body.get('session_id')!r}, not {sid}")
    if audit_lines is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if not sealed:
            report.warning("not_in_audit", "the audit log has no recording.sealed event for "
                           "this session")
        elif all(obj.get("manifest_sha256") != digest for _, obj in sealed):
            report.error("manifest_replaced", "the manifest is not the one whose seal the audit "
                         f"log records at line {sealed[-1][0]} (SHA-256 differs)")
    for entry in files:
        name = str(entry.get("name", "")) if isinstance(entry, dict) else ""
        if not _SAFE_NAME.fullmatch(name):
            report.error("manifest_damaged", f"the manifest lists a bad file name {name!r}")
            continue
        _check_file(report, man.parent / name, entry)
    _check_unlisted(report, man, sid, files, body.get("format") == FORMAT_V1)
    report.checked.update(
        files=[e.get("name") for e in files if isinstance(e, dict)],
        bytes=sum(int(e.get("size", 0)) for e in files if isinstance(e, dict)),
        **{k: body.get(k) for k in ("user", "target", "grant_id", "started_at", "ended_at",
                                    "exit_status", "interrupted")})
    return report


def _check_unlisted(report: Report, man: Path, sid: str, files: list[Any], v1: bool) -> None:
    """A file beside the recording that a reviewer may open (``SID.cast``) but that the
    manifest does not list: planted or replaced after sealing. Format 1 manifests listed the
    ``.rec`` only: their ``.cast`` is reported as a warning (regenerate it with ``export``)."""
    listed = {str(e.get("name")) for e in files if isinstance(e, dict)}
    for ext in COMPANIONS:
        name = sid + ext
        if name in listed or not (man.parent / name).exists():
            continue
        if v1:
            report.warning("file_not_sealed", f"{name} is not covered by this format 1 manifest "
                           "(it lists the .rec only): regenerate it from the recording with "
                           "`export` rather than trust it", file=name)
        else:
            report.error("file_not_sealed", f"{name} is not listed in the signed manifest: it "
                         "was written after sealing (planted or replaced); regenerate it with "
                         "`export`", file=name)


def _check_signature(report: Report, sig: Any, body: dict[str, Any], key: VerifyKey) -> None:
    report.checked["key_id"] = key.key_id
    if not isinstance(sig, dict) or not isinstance(sig.get("value"), str):
        report.error("manifest_unsigned", "the manifest carries no signature")
        return
    try:
        value = base64.b64decode(sig["value"], validate=True)
    except (binascii.Error, ValueError):
        report.error("manifest_bad_signature", "the manifest signature is not base64")
        return
    if sig.get("key_id") != key.key_id:
        report.error("manifest_wrong_key", f"the manifest names signing key {sig.get('key_id')!r}"
                     f", not this bastion's key {key.key_id}")
    elif not key.verify(value, SIGNING_CONTEXT + canonical(body)):
        report.error("manifest_bad_signature", "the manifest signature does not verify: the "
                     "manifest was edited after signing, or signed by another key")
