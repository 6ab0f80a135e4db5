"""The on-disk recording format and its rendering to asciicast v2.

The hot path appends raw bytes with a 13-byte frame header (time, kind, length): no JSON, no text
decoding, byte-exact even for binary output. asciicast v2 (what asciinema plays) is derived from it
off the hot path; UTF-8 split across frames is decoded with one incremental decoder per stream.

File layout: ``MAGIC``, one JSON header line, then frames ``<QcI`` (microseconds since start,
kind, payload length) followed by the payload.
"""

from __future__ import annotations

import codecs
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

MAGIC = b"BBREC1\n"
FRAME = struct.Struct("<QcI")

OUTPUT = b"o"  # target stdout -> client
ERROR = b"e"  # target stderr -> client
INPUT = b"i"  # client -> target
RESIZE = b"r"  # payload b"COLSxROWS"
EXIT = b"x"  # payload: exit status digits, or b"signal:NAME"
# input the target did not echo (a password at a no-echo prompt), withheld from the recording:
# payload the number of bytes typed, as ASCII digits (``broker.domain.echo``)
NOT_ECHOED = b"n"
KINDS = frozenset({OUTPUT, ERROR, INPUT, RESIZE, EXIT, NOT_ECHOED})


def not_echoed_text(payload: bytes) -> str:
    """How a withheld input frame reads in a replay: its length, never its bytes."""
    return f"[input not echoed: {payload.decode('ascii', 'replace')} bytes]"


class RecordingFormatError(ValueError):
    """The file is not a recording (bad magic or header)."""


def encode_header(meta: dict[str, Any]) -> bytes:
    """The bytes that start a recording: magic plus one JSON line of session metadata."""
    return MAGIC + json.dumps(meta, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def frame_header(t_us: int, kind: bytes, length: int) -> bytes:
    """The 13-byte header written before each payload."""
    return FRAME.pack(t_us, kind, length)


@dataclass(frozen=True, slots=True)
class Frame:
    t_us: int
    kind: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class ParsedRecording:
    meta: dict[str, Any]
    frames: list[Frame]
    truncated: bool  # trailing bytes that do not form a complete frame (crash mid-write)
    valid_length: int  # offset just after the last complete frame


MAX_HEADER = 1 << 20  # a header line longer than this is not one the broker wrote


class Source(Protocol):
    """Where ``FrameReader`` reads from: an open binary file, or bytes in memory (``parse``)."""

    def read(self, n: int, /) -> bytes: ...

    def readline(self, limit: int, /) -> bytes: ...


class FrameReader:
    """A recording read from a file one frame at a time: memory stays bounded by one frame, so a
    multi-GiB session can be rendered or repaired without holding it (``parse`` holds it all).

    ``frames`` is one pass; after it, ``valid_length`` is the offset just after the last complete
    frame and ``truncated`` says whether anything followed it (a crash mid-write).
    """

    def __init__(self, f: Source, size: int) -> None:
        if f.read(len(MAGIC)) != MAGIC:
            raise RecordingFormatError("not a bastion-broker recording (bad magic)")
        line = f.readline(MAX_HEADER)
        if not line.endswith(b"\n"):
            raise RecordingFormatError("recording header is incomplete")
        try:
            self.meta: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            raise RecordingFormatError(f"recording header is not JSON: {exc}") from None
        self._f = f
        self._size = size
        self.valid_length = len(MAGIC) + len(line)
        self.truncated = False

    @property
    def frames(self) -> Iterator[Frame]:
        f, pos = self._f, self.valid_length
        while True:
            head = f.read(FRAME.size)
            if len(head) < FRAME.size:
                self.truncated = bool(head) or pos < self._size
                return
            t_us, kind, length = FRAME.unpack(head)
            end = pos + FRAME.size + length
            if kind not in KINDS or end > self._size:  # never allocate a corrupt length
                self.truncated = True
                return
            data = f.read(length)
            if len(data) != length:
                self.truncated = True
                return
            pos = self.valid_length = end
            yield Frame(t_us, kind, data)


class _Blob:
    """The two reads ``FrameReader`` makes, over bytes in memory (the domain does no I/O)."""

    def __init__(self, blob: bytes) -> None:
        self._blob, self._pos = blob, 0

    def read(self, n: int) -> bytes:
        start, self._pos = self._pos, min(self._pos + n, len(self._blob))
        return self._blob[start:self._pos]

    def readline(self, limit: int) -> bytes:
        nl = self._blob.find(b"\n", self._pos, self._pos + limit)
        return self.read(nl + 1 - self._pos if nl >= 0 else limit)


def parse(blob: bytes) -> ParsedRecording:
    """Decode a whole recording; an incomplete last frame is reported, not raised."""
    reader = FrameReader(_Blob(blob), len(blob))
    frames = list(reader.frames)
    return ParsedRecording(reader.meta, frames, truncated=reader.truncated,
                           valid_length=reader.valid_length)


class Recording(Protocol):
    """What ``to_asciicast`` needs: a ``ParsedRecording`` or a ``FrameReader``."""

    @property
    def meta(self) -> dict[str, Any]: ...

    @property
    def frames(self) -> Iterable[Frame]: ...


def output_bytes(frames: Iterable[Frame], kinds: frozenset[bytes] = frozenset({OUTPUT})) -> bytes:
    """Concatenated payload of the given kinds: what the client received on those streams."""
    return b"".join(f.data for f in frames if f.kind in kinds)


def exit_status(frames: Iterable[Frame]) -> str | None:
    """The recorded exit (status digits or ``signal:NAME``), if the session recorded one."""
    result = None
    for f in frames:
        if f.kind == EXIT:
            result = f.data.decode("ascii", "replace")
    return result


def to_asciicast(rec: Recording) -> Iterator[str]:
    """Yield asciicast v2 lines (header first) for a recording (parsed, or read frame by frame).

    Output and error streams both become ``"o"`` events as a terminal shows them; the exit status
    is an ``"x"`` event at the end, as asciicast v3 defines it (asciinema 2 ignores unknown codes).
    Input withheld because the target did not echo it is an ``"i"`` event that says how many bytes
    were typed.
    """
    meta = rec.meta
    header: dict[str, Any] = {
        "version": 2,
        "width": int(meta.get("width") or 80),
        "height": int(meta.get("height") or 24),
        "timestamp": int(meta.get("started_at_epoch", 0)),
        "title": f"{meta.get('user', '?')} -> {meta.get('target', '?')}",
        "env": {"TERM": meta.get("term") or "", "SHELL": ""},
        "bastion": {
            k: meta.get(k)
            for k in ("session_id", "user", "target", "grant_id", "level", "login", "command")
        },
    }
    yield json.dumps(header, ensure_ascii=False)
    decoders = {
        k: codecs.getincrementaldecoder("utf-8")(errors="replace") for k in (OUTPUT, ERROR, INPUT)
    }
    last_t = 0.0
    for f in rec.frames:
        t = round(f.t_us / 1_000_000, 6)
        last_t = t
        if f.kind in decoders:
            text = decoders[f.kind].decode(f.data)
            if text:
                code = "i" if f.kind == INPUT else "o"
                yield json.dumps([t, code, text], ensure_ascii=False)
        elif f.kind == RESIZE:
            yield json.dumps([t, "r", f.data.decode("ascii", "replace")])
        elif f.kind == EXIT:
            yield json.dumps([t, "x", f.data.decode("ascii", "replace")])
        elif f.kind == NOT_ECHOED:
            yield json.dumps([t, "i", not_echoed_text(f.data)])
    for kind, dec in decoders.items():
        tail = dec.decode(b"", final=True)
        if tail:
            yield json.dumps([last_t, "i" if kind == INPUT else "o", tail], ensure_ascii=False)
