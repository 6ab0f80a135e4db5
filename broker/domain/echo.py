"""Which keystrokes the target echoed, so that a secret typed at a no-echo prompt is never recorded.

A terminal shows what is typed because the target echoes it (the tty's line discipline, or a line
editor such as readline). At a password prompt (``sudo``, ``passwd``, ``read -s``, ``getpass``)
echo is off. The session holds each input frame back from the recording (it is relayed at once)
until the output that follows decides: input the target echoed is recorded as it was typed, input
it did not echo becomes a marker that says only how many bytes were typed.

The rule, on the *visible* output V (escape sequences, ``\\r`` and the other C0 controls removed;
``\\n`` kept) and the input split into printable runs, Enter, and other controls (single control
bytes, escape sequences such as arrows and bracketed-paste marks):

- Controls and Enter are recorded as they are (they are never a secret, and a reviewer needs
  them: Ctrl-C, Tab, arrows).
- A printable run R (the printable bytes typed since the last control, across frames) is echoed
  iff V, from where the run's echo can start, begins with R. When an Enter was typed right after R
  before any output came, the Enter's echo must follow as well (``R\\n``): a password typed with
  echo off then Enter is followed by the next prompt, which may start with the same letters.
- V not yet long enough: wait. While nothing was typed after R, the part of R that V already
  matches is decided echoed (typing ahead of the echo); with an Enter or control after it, R is
  decided as a whole.
- Anything else is not echoed: output that differs, type-ahead the target has not answered yet,
  more pending input than ``limit`` bytes, input older than the caller's deadline (``expire``),
  input still pending when the session ends (``close``). When unsure, the bytes are withheld.

Each V byte matches at most one input byte, and never one typed after it arrived. The tracker is
pure and streaming: it does no I/O and holds only the pending input and the output seen since the
oldest of it. Stamps are the caller's (opaque, non-decreasing); a decision keeps its input's stamp.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

LIMIT = 64 * 1024  # pending input bytes beyond which all of it is withheld
CARRY_MAX = 4096  # an unfinished escape sequence longer than this is not carried to the next chunk

_NL = 0x0A


@dataclass(frozen=True, slots=True)
class Piece:
    """A decided part of the input, in order: ``kept`` is recorded as typed, else as a marker."""

    t: int  # the stamp of the input it came from (a marker takes its first byte's)
    data: bytes
    kept: bool


_NONE: tuple[Piece, ...] = ()

_PRINT, _ENTER, _CTRL = 0, 1, 2

# input: printable runs (UTF-8 bytes included), Enter, an escape sequence a key sends (CSI, SS3,
# Alt+key, a lone ESC), or one other control byte
_INPUT = re.compile(
    rb"(?P<p>[^\x00-\x1f\x7f]+)"
    rb"|(?P<n>\r\n?|\n)"
    rb"|(?P<c>\x1b(?:\[[0-?]*[ -/]*[@-~]|O[ -~]|[ -~])?|[\x00-\x1f\x7f])"
)
_KIND = {"p": _PRINT, "n": _ENTER, "c": _CTRL}

# output: what a terminal does not show as text (ECMA-48 sequences: CSI, OSC to BEL or ST,
# DCS/SOS/PM/APC strings to ST, other ESC sequences) and every C0 control but newline
_INVISIBLE = re.compile(
    rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[PX^_][^\x1b]*\x1b\\|[ -/]*[0-~])"
    rb"|[\x00-\x09\x0b-\x1f\x7f]"
)
# an escape sequence cut at the end of a chunk: its rest comes with the next one
_PARTIAL = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*|[PX^_][^\x1b]*|[ -/]*)")


def visible(data: bytes) -> bytes:
    """The text of ``data`` as V has it (one whole chunk; the tracker carries cut sequences)."""
    return _INVISIBLE.sub(b"", data)


def _cut_tail(data: bytes) -> int:
    """Where an unfinished escape sequence at the end of ``data`` starts (``len(data)`` if none)."""
    p = data.rfind(b"\x1b", max(0, len(data) - CARRY_MAX))
    if p >= 0 and _PARTIAL.fullmatch(data, p):
        return p
    return len(data)


class _Tok:
    __slots__ = ("data", "kind", "pos", "t")

    def __init__(self, t: int, data: bytes, kind: int, pos: int) -> None:
        self.t = t
        self.data = data
        self.kind = kind
        self.pos = pos  # V's length when it was typed: its echo cannot start before


class EchoTracker:
    """One terminal session's input, held until the output shows whether the target echoed it.

    ``input`` and ``output`` return the pieces decided by that call, to be recorded in order
    before the output that decided them; ``expire`` and ``close`` withhold what still waits.
    """

    def __init__(self, *, limit: int = LIMIT) -> None:
        self._limit = limit
        self._pending: deque[_Tok] = deque()
        self._bytes = 0  # input bytes pending
        self._v = bytearray()  # visible output from absolute position ``_vbase`` on
        self._vbase = 0
        self._cursor = 0  # absolute: the next run's echo starts here at the earliest
        self._skip_nl = False  # after an Enter: the newlines of its echo come first
        self._carry = b""  # an escape sequence cut at the end of the last chunk
        self._last = b""  # the last output chunk (its cut tail, when input starts pending)

    @property
    def pending(self) -> int:
        """Input bytes not decided yet."""
        return self._bytes

    def input(self, t: int, data: bytes) -> Sequence[Piece]:
        """Input stamped ``t``, relayed now; returns what is decided already (controls typed
        with nothing pending are, at once)."""
        if not data:
            return _NONE
        pend = self._pending
        was_pending = bool(pend)
        if not was_pending:  # V starts here; the output before this input matches nothing
            last = self._last
            self._carry = last[_cut_tail(last):]
            self._vbase = self._cursor = self._vbase + len(self._v)
            self._v.clear()
            self._skip_nl = False
        pos = self._vbase + len(self._v)
        for m in _INPUT.finditer(data):
            pend.append(_Tok(t, m.group(), _KIND[m.lastgroup or "c"], pos))
        self._bytes += len(data)
        if self._bytes > self._limit:
            return self._withhold(len(pend))
        if was_pending:  # V has not changed: the pending run waits as it did (see _decide)
            return _NONE
        return self._decide()

    def output(self, data: bytes) -> Sequence[Piece]:
        """Output (stdout or stderr, as the terminal shows both); returns the input it decided."""
        self._last = data
        if not self._pending:
            return _NONE
        if self._carry:
            data = self._carry + data
        cut = _cut_tail(data)
        self._carry = data[cut:]
        if cut < len(data):
            data = data[:cut]
        vis = _INVISIBLE.sub(b"", data)
        if not vis:
            return _NONE
        self._v += vis
        return self._decide()

    def expire(self, before: int) -> Sequence[Piece]:
        """Withhold pending runs typed before stamp ``before``: no echo came in time."""
        pend = self._pending
        n = 0
        while n < len(pend) and pend[n].t < before:
            n += 1
        if not n:
            return _NONE
        while n < len(pend) and pend[n].kind == _PRINT and pend[n - 1].kind == _PRINT:
            n += 1  # the rest of the run goes with it
        out = list(self._withhold(n))
        out.extend(self._decide())
        return _merge(out)

    def close(self) -> Sequence[Piece]:
        """The session ends: what still waits for its echo is withheld."""
        return self._withhold(len(self._pending))

    # -- internals ---------------------------------------------------------------------------
    def _withhold(self, n: int) -> Sequence[Piece]:
        """Decide the first ``n`` pending tokens without output: runs withheld, controls kept."""
        pend = self._pending
        out: list[Piece] = []
        for _ in range(n):
            tok = pend.popleft()
            self._bytes -= len(tok.data)
            out.append(Piece(tok.t, tok.data, tok.kind != _PRINT))
        self._cursor = self._vbase + len(self._v)  # alignment is lost: only later output counts
        self._skip_nl = False
        self._trim()
        return _merge(out)

    def _decide(self) -> Sequence[Piece]:
        pend, v, vb = self._pending, self._v, self._vbase
        vend = vb + len(v)
        c = self._cursor
        out: list[Piece] = []
        while pend:
            tok = pend[0]
            if tok.kind != _PRINT:
                pend.popleft()
                self._bytes -= len(tok.data)
                out.append(Piece(tok.t, tok.data, True))
                if tok.kind == _ENTER:
                    c = max(c, tok.pos)
                    if c < vend and v[c - vb] == _NL:
                        c += 1
                    self._skip_nl = True
                continue
            run: list[_Tok] = []
            nxt: _Tok | None = None
            for tk in pend:
                if tk.kind != _PRINT:
                    nxt = tk
                    break
                run.append(tk)
            start = max(c, tok.pos)
            if self._skip_nl:
                while start < vend and v[start - vb] == _NL:
                    start += 1
            r = run[0].data if len(run) == 1 else b"".join(tk.data for tk in run)
            avail = vend - start
            k = min(avail, len(r))
            matched = v[start - vb:start - vb + k] == r[:k] and _typed_before(run, start, k)
            if not matched or (k == len(r) and nxt is not None and nxt.kind == _ENTER
                               and avail > k and v[start - vb + k] != _NL):
                out.extend(self._take(len(run), kept=False))  # not echoed
                c = vend  # where its echo would be is unknown now: only later output counts
                self._skip_nl = False
                continue
            if k == len(r):
                if nxt is not None and nxt.kind == _ENTER and avail == k:
                    break  # the Enter's echo decides
                out.extend(self._take(len(run), kept=True))
                c = start + k
                self._skip_nl = False
                continue
            if nxt is not None or k == 0:
                break  # decided as a whole, once V is long enough
            out.extend(self._split(k))  # echoed so far; the rest waits
            c = start + k
            self._skip_nl = False
            break
        self._cursor = c
        self._trim()
        return _merge(out) if out else _NONE

    def _take(self, n: int, *, kept: bool) -> list[Piece]:
        pend = self._pending
        out = []
        for _ in range(n):
            tok = pend.popleft()
            self._bytes -= len(tok.data)
            out.append(Piece(tok.t, tok.data, kept))
        return out

    def _split(self, k: int) -> list[Piece]:
        """The first ``k`` bytes of the pending run, echoed; a token cut in two keeps its rest."""
        pend = self._pending
        out = []
        while k:
            tok = pend[0]
            if len(tok.data) <= k:
                pend.popleft()
                k -= len(tok.data)
                self._bytes -= len(tok.data)
                out.append(Piece(tok.t, tok.data, True))
            else:
                out.append(Piece(tok.t, tok.data[:k], True))
                tok.data = tok.data[k:]
                self._bytes -= k
                k = 0
        return out

    def _trim(self) -> None:
        """Forget output no pending input can match any more."""
        v = self._v
        if not self._pending:
            self._vbase += len(v)
            self._cursor = self._vbase
            v.clear()
            return
        drop = self._cursor - self._vbase
        if drop > 0:
            del v[:drop]
            self._vbase = self._cursor


def _typed_before(run: list[_Tok], start: int, k: int) -> bool:
    """Each matched byte of V arrived after the input byte it matches was typed."""
    off = 0
    for tk in run:
        if off >= k:
            break
        if start + off < tk.pos:
            return False
        off += len(tk.data)
    return True


def _merge(pieces: list[Piece]) -> Sequence[Piece]:
    """Adjacent kept pieces of one input frame (same stamp) join again; adjacent withheld ones
    become one marker stamped with the first."""
    out: list[Piece] = []
    for p in pieces:
        if out:
            q = out[-1]
            if q.kept == p.kept and (not p.kept or q.t == p.t):
                out[-1] = Piece(q.t, q.data + p.data, q.kept)
                continue
        out.append(p)
    return out
