"""What a recorded session showed and what was typed, as plain text for full-text search.

A reviewer searches across sessions for a word and jumps to the moment it appeared, so the text
must be what the terminal showed (escape sequences and control characters gone, a line redrawn
after ``CR`` or backspaces kept as it was left) and each piece must carry the time of its first
byte. ``TextIndexer`` reads a recording's header and frames once, in order, in bounded memory
(one line per stream, one segment per source, a UTF-8 decoder's few bytes), whatever the size.

- Output (``o``/``e`` frames) of shell and exec sessions: a small line model per stream. ``LF``
  (and VT, FF, NEL, IND) ends a line; ``CR``, backspace, tab, cursor left/right/column, erase in
  line, delete/insert/erase characters move or edit within it (a progress bar redrawn with
  ``CR`` leaves its last state); cursor positioning, up/down, erase display and scrolling end it
  (a full-screen program's redraws become separate lines, so words are never glued together).
  SGR and the other CSI sequences, OSC/DCS/APC/PM/SOS strings (titles, clipboard), charset
  designations and other controls are dropped. Lines longer than ``MAX_LINE`` wrap at a space.
- Input (``i`` frames) of sessions with a terminal only: typed lines, committed at Enter, with
  backspace, ``^U``, ``^W`` and ``^C`` applied and key sequences (arrows, bracketed paste marks)
  dropped. It is light on purpose: echoed input is in the output too. Without a terminal, stdin
  is data, not typing, and is not indexed. Frames of any other kind (resize, exit, the marker of
  input a terminal did not echo) are skipped.
- Exec, subsystem (SFTP) and tunnel sessions: the command (or forward) as one ``command``
  segment at t = 0. SFTP and tunnel streams are protocol bytes and are not indexed.

Lines are grouped into segments of at most ``SEGMENT_LINES`` lines or ``SEGMENT_CHARS``
characters; a pause of ``SILENCE_S`` or more on a source starts a new segment (and ends the line
in progress, so a command typed after a long pause at a prompt is timed when it was typed).
Whitespace runs become one space. The text of one session is capped at ``MAX_TEXT`` characters
and the reading at ``MAX_SCAN`` bytes of frames: past either, the rest is not searchable, and a
last segment ``TRUNCATED`` says so (``truncated`` is set).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from broker.domain.recording import ERROR, INPUT, OUTPUT, Frame

SILENCE_S = 2.0  # a pause this long starts a new segment: hits are timed to the second or so
SEGMENT_LINES = 20
SEGMENT_CHARS = 2048
MAX_LINE = 1024  # a longer line wraps (at a space when there is one)
MAX_TEXT = 2 << 20  # characters of text per session; the rest is not indexed
MAX_SCAN = 256 << 20  # bytes of frames read per session (output that is mostly not text)
MAX_COMMAND = 8192
TRUNCATED = "[text index truncated]"
OUTPUT_KINDS = frozenset({"shell", "exec"})  # the sessions whose output is terminal text

_ESC = "\x1b"
# typed input: what the line editing model stops at (C0 controls, DEL, C1 controls)
_SPECIAL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# output: the controls the line model acts on (backspace, tab, line ends, CR, ESC, NEL, CSI and
# the string starters); every other C0/C1 control shows nothing and is removed with SGR
_ACTIVE = r"\x08\x09\x0a\x0b\x0c\x0d\x1b\x85\x90\x98\x9b\x9d\x9e\x9f"
_SILENT = r"\x00-\x07\x0e-\x1a\x1c-\x1f\x7f-\x84\x86-\x8f\x91-\x97\x99\x9a\x9c"
_SGR = r"\x1b\[[0-9;:]*+m"  # colours and attributes: most escape sequences programs print
# a run of text (with SGR and silent controls in it), copied whole; and a run of whole lines of
# it from the start of a line, committed at once (possessive: no backtracking on long runs)
_RUN = re.compile(f"(?:[^{_ACTIVE}]++|{_SGR})++")
_IN_LINE = _ACTIVE.replace(r"\x09", "")  # in whole lines from a line start, a tab is a space
_LINES = re.compile(f"(?:(?:[^{_IN_LINE}]++|{_SGR})*+\\r*+\\n)++")
_DROP = re.compile(f"[{_SILENT}]++|{_SGR}")
_DROP_START = re.compile(f"[{_SILENT}\\x1b]")  # whether there is anything to drop (quicker)
_CSI = re.compile(r"\x1b\[([0-?]*)[ -/]*([@-~])")  # a whole CSI sequence: parameters, final
_STRING_END = re.compile("[\x07\x1b\x9c]")  # BEL, ESC (of ESC \) or ST end an OSC/DCS string
_C1_STRINGS = frozenset("\x90\x98\x9d\x9e\x9f")  # DCS, SOS, OSC, PM, APC
_NEWLINES = frozenset("\n\x0b\x0c\x85")  # LF, VT, FF, NEL
_LINE_ENDING_CSI = frozenset("ABEFHJLMSTdfr")  # moves to another row, or clears/scrolls
_MAX_PARAMS = 32

_TEXT, _ESC_SEEN, _ESC_INTER, _CSI_SEEN, _STRING, _STRING_ESC, _SS3 = range(7)


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of indexed text: seconds from the session start of its first byte, its source
    (``output``, ``input`` or ``command``, as ``broker.ports.TextSegment``) and the text."""

    t: float
    source: str
    text: str


def _clean(text: str) -> str:
    return " ".join(text.split())


def _number(params: str, default: int) -> int:
    first = params.split(";", 1)[0].split(":", 1)[0]
    return min(int(first), MAX_LINE) if first.isdigit() else default


class _Screen:
    """One output stream as a terminal line: text, cursor column, time of its first byte."""

    def __init__(self) -> None:
        self.out: list[tuple[float, str]] = []  # committed lines, drained by the indexer
        self.line = ""
        self.cur = 0
        self.t: float | None = None
        self._state = _TEXT
        self._params = ""

    def feed(self, text: str, t: float) -> None:
        i, n = 0, len(text)
        while i < n:
            st = self._state
            if st == _TEXT:
                if not self.line:
                    block = _LINES.match(text, i)
                    if block is not None:
                        self._lines(block.group(), t)
                        i = block.end()
                        if i == n:
                            return
                        continue
                run = _RUN.match(text, i)
                if run is not None:
                    i = run.end()
                    piece = run.group()
                    if not piece.isprintable():
                        piece = _DROP.sub("", piece)
                    if piece:
                        self._put(piece, t)
                    if i == n:
                        return
                ch = text[i]
                if ch == _ESC:
                    c = _CSI.match(text, i)
                    if c is not None:
                        self._csi(c.group(1), c.group(2))
                        i = c.end()
                        continue
                    self._state = _ESC_SEEN
                elif ch == "\r" and text.startswith("\n", i + 1):  # CR LF, the usual line end
                    self.newline()
                    i += 1
                else:
                    self._control(ch, t)
                i += 1
            elif st == _STRING:
                m = _STRING_END.search(text, i)
                if m is None:
                    return  # the string goes on in the next chunk: nothing of it is kept
                self._state = _STRING_ESC if m.group() == _ESC else _TEXT
                i = m.end()
            else:
                if self._step(text[i], t):
                    i += 1

    def _lines(self, block: str, t: float) -> None:
        """Whole lines from the start of a line, all in this chunk: committed at once."""
        if _DROP_START.search(block):
            block = _DROP.sub("", block)
        lines = block.replace("\r", "").split("\n")
        lines.pop()  # after the last line end
        if max(map(len, lines)) > MAX_LINE:
            for line in lines:
                self._put(line, t)
                self.newline()
            return
        self.out.extend([(t, c) for c in [" ".join(x.split()) for x in lines] if c])
        self.cur, self.t = 0, None

    def _control(self, ch: str, t: float) -> None:
        if ch == "\r":
            self.cur = 0
        elif ch in _NEWLINES:
            self.newline()
        elif ch == "\b":
            self.cur = max(0, self.cur - 1)
        elif ch == "\t":
            stop = min((self.cur // 8 + 1) * 8, MAX_LINE)
            if stop > len(self.line):
                self._put(" " * (stop - len(self.line)), t)
            self.cur = stop
        elif ch == "\x9b":
            self._state, self._params = _CSI_SEEN, ""
        elif ch in _C1_STRINGS:
            self._state = _STRING
        # BEL, NUL, SO/SI, ENQ, DEL and the other C0/C1 controls show nothing

    def _step(self, ch: str, t: float) -> bool:
        """One character of an escape sequence split across chunks (or not a CSI); False when
        ``ch`` ended the sequence without belonging to it and is to be read again as text."""
        st = self._state
        if st == _ESC_SEEN:
            if ch == "[":
                self._state, self._params = _CSI_SEEN, ""
            elif ch in "]P_^X":
                self._state = _STRING
            elif "\x20" <= ch <= "\x2f":
                self._state = _ESC_INTER  # ESC ( B and friends: charset designation
            elif ch == _ESC:
                pass
            else:
                self._state = _TEXT
                if ch in "EDc":  # NEL, IND, full reset: the line ends
                    self.newline()
                elif ch < " ":
                    return False
        elif st == _ESC_INTER:
            if not "\x20" <= ch <= "\x2f":
                self._state = _TEXT
                return "\x30" <= ch <= "\x7e"
        elif st == _CSI_SEEN:
            if "\x40" <= ch <= "\x7e":
                self._state = _TEXT
                self._csi(self._params, ch)
            elif "\x30" <= ch <= "\x3f":
                if len(self._params) < _MAX_PARAMS:
                    self._params += ch
            elif not "\x20" <= ch <= "\x2f":  # malformed: drop it, read ``ch`` as text
                self._state = _TEXT
                return False
        elif st == _STRING_ESC:
            self._state = _ESC_SEEN
            if ch == "\\":
                self._state = _TEXT
            else:
                return False  # xterm: ESC inside a string ends it and starts a sequence
        return True

    def _csi(self, params: str, final: str) -> None:
        if params[:1] in ("?", ">", "<", "="):
            return  # private modes, queries: nothing on the line changes
        if final in _LINE_ENDING_CSI:
            self.newline()
            return
        line, cur = self.line, self.cur
        if final == "K":
            mode = _number(params, 0)
            if mode == 0:
                self.line = line[:cur]
            elif mode == 1:
                self.line = " " * min(cur + 1, len(line)) + line[cur + 1:]
            elif mode == 2:
                self.line = ""
        elif final == "C":
            self.cur = min(cur + max(_number(params, 1), 1), MAX_LINE)
        elif final == "D":
            self.cur = max(0, cur - max(_number(params, 1), 1))
        elif final in "G`":
            self.cur = max(_number(params, 1), 1) - 1
        elif final == "P":
            self.line = line[:cur] + line[cur + max(_number(params, 1), 1):]
        elif final == "@" and cur < len(line):
            self.line = (line[:cur] + " " * max(_number(params, 1), 1) + line[cur:])[:MAX_LINE]
        elif final == "X" and cur < len(line):
            k = max(_number(params, 1), 1)
            self.line = line[:cur] + " " * min(k, len(line) - cur) + line[cur + k:]
        # SGR (colours), modes, tab stops...: text unchanged

    def _put(self, run: str, t: float) -> None:
        if self.t is None:
            self.t = t
        line, cur = self.line, self.cur
        size = len(line)
        if cur == size:
            line += run
        elif cur > size:
            line += " " * (cur - size) + run
        else:
            line = line[:cur] + run + line[cur + len(run):]
        cur += len(run)
        if len(line) > MAX_LINE:  # wrap, at a space if there is one
            pos, start = 0, self.t
            while len(line) - pos > MAX_LINE:
                cut = line.rfind(" ", pos + 1, pos + MAX_LINE)
                if cut <= pos:
                    cut = pos + MAX_LINE
                self._commit(line[pos:cut], start)
                pos = cut
            line, cur, self.t = line[pos:], max(0, cur - pos), t
        self.line, self.cur = line, cur

    def _commit(self, text: str, t: float) -> None:
        text = _clean(text)
        if text:
            self.out.append((t, text))

    def newline(self) -> None:
        """The line ends: keep it if it shows anything."""
        if self.line and self.t is not None:
            self._commit(self.line, self.t)
        self.line, self.cur, self.t = "", 0, None

    def pause(self) -> None:
        """A long pause: end the line in progress but leave the cursor where it is (what comes
        next, such as a command typed at a prompt, is timed when it came)."""
        if self.line and self.t is not None:
            self._commit(self.line, self.t)
        self.line, self.t = "", None


class _Typed:
    """Typed input as lines: Enter commits, the usual line editing keys apply."""

    def __init__(self) -> None:
        self.out: list[tuple[float, str]] = []
        self.line = ""
        self.t: float | None = None
        self._state = _TEXT

    def feed(self, text: str, t: float) -> None:
        i, n = 0, len(text)
        while i < n:
            if self._state == _TEXT:
                m = _SPECIAL.search(text, i)
                j = n if m is None else m.start()
                if j > i:
                    if self.t is None:
                        self.t = t
                    self.line += text[i:j]
                    if len(self.line) > MAX_LINE:
                        self.enter()
                if m is None:
                    return
                self._control(text[j], t)
                i = j + 1
                continue
            ch = text[i]
            i += 1
            if self._state == _ESC_SEEN:
                self._state = {"[": _CSI_SEEN, "O": _SS3}.get(ch, _TEXT)  # else Alt+key
            elif self._state == _SS3 or (self._state == _CSI_SEEN and "\x40" <= ch <= "\x7e"):
                self._state = _TEXT  # a key (arrow, function, bracketed paste mark): dropped
            elif self._state == _CSI_SEEN and not "\x20" <= ch <= "\x3f":
                self._state = _TEXT
                i -= 1

    def _control(self, ch: str, t: float) -> None:
        if ch in "\r\n":
            self.enter()
        elif ch in "\x7f\b":
            self.line = self.line[:-1]
        elif ch == "\x15":  # ^U: kill the line
            self.line = ""
        elif ch == "\x17":  # ^W: erase the word before the cursor
            kept = self.line.rstrip()
            self.line = kept[:kept.rfind(" ") + 1]
        elif ch == "\x03":  # ^C: the line is abandoned
            self.line, self.t = "", None
        elif ch == "\t":
            self.line += " "
        elif ch == _ESC:
            self._state = _ESC_SEEN
        elif ch == "\x9b":
            self._state = _CSI_SEEN

    def enter(self) -> None:
        text = _clean(self.line)
        if text and self.t is not None:
            self.out.append((self.t, text))
        self.line, self.t = "", None


class _Grouper:
    """Lines of one source into segments (by count, size and pauses)."""

    def __init__(self, source: str, ready: list[Segment]) -> None:
        self.source = source
        self._ready = ready
        self._lines: list[str] = []
        self._chars = 0
        self._t = 0.0

    def add(self, t: float, line: str) -> None:
        if self._lines and (len(self._lines) >= SEGMENT_LINES
                            or self._chars + len(line) > SEGMENT_CHARS):
            self.close()
        if not self._lines:
            self._t = t
        self._lines.append(line)
        self._chars += len(line) + 1

    def extend(self, lines: list[tuple[float, str]]) -> None:
        """``add`` for each line (the same rules, in one loop: the hot path of long output)."""
        buf, chars = self._lines, self._chars
        for t, line in lines:
            if buf and (len(buf) >= SEGMENT_LINES or chars + len(line) > SEGMENT_CHARS):
                self._ready.append(Segment(self._t, self.source, "\n".join(buf)))
                buf, chars = [], 0
            if not buf:
                self._t = t
            buf.append(line)
            chars += len(line) + 1
        self._lines, self._chars = buf, chars

    def close(self) -> None:
        if self._lines:
            self._ready.append(Segment(self._t, self.source, "\n".join(self._lines)))
            self._lines, self._chars = [], 0


class TextIndexer:
    """One recording's text segments: ``segments(frames)`` yields them as the frames are read
    (one pass; stop reading when it returns). ``truncated`` tells whether a cap was reached."""

    def __init__(self, meta: Mapping[str, Any], *, max_text: int = MAX_TEXT,
                 max_scan: int = MAX_SCAN) -> None:
        kind = str(meta.get("kind") or "shell")
        self._output = kind in OUTPUT_KINDS
        self._typed = self._output and bool(meta.get("term"))
        command = meta.get("command")
        self._command = _clean(str(command))[:MAX_COMMAND] if command and kind != "shell" else ""
        self._max_text, self._max_scan = max_text, max_scan
        self.truncated = False
        self.chars = 0  # characters of text indexed
        self.scanned = 0  # payload bytes of the frames read
        self._ready: list[Segment] = []
        self._out = _Grouper("output", self._ready)
        self._in = _Grouper("input", self._ready)
        self._screens = {OUTPUT: _Screen(), ERROR: _Screen()}
        self._keys = _Typed()
        self._decoders = {k: codecs.getincrementaldecoder("utf-8")(errors="replace")
                          for k in (OUTPUT, ERROR, INPUT)}
        self._last = {"output": -SILENCE_S, "input": -SILENCE_S}

    def segments(self, frames: Iterable[Frame]) -> Iterator[Segment]:
        if self._command:
            self.chars += len(self._command)
            yield Segment(0.0, "command", self._command)
        if not self._output:
            return
        t = 0.0
        for f in frames:
            t = f.t_us / 1_000_000
            if f.kind in self._screens:
                self._text(f.kind, f.data, t)
            elif f.kind == INPUT and self._typed:
                self._input(f.data, t)
            else:
                continue  # resize, exit, input not echoed, anything newer: no text
            self.scanned += len(f.data)
            yield from self._drain(t)
            if self.truncated:
                return
            if self.scanned >= self._max_scan:
                yield from self._truncate(t)
                return
        for kind, screen in self._screens.items():
            tail = self._decoders[kind].decode(b"", final=True)
            if tail:
                screen.feed(_printable(tail), t)
            screen.newline()
        self._keys.feed(_printable(self._decoders[INPUT].decode(b"", final=True)), t)
        self._keys.enter()
        yield from self._drain(t)
        if not self.truncated:
            self._out.close()
            self._in.close()
            yield from self._flush()

    def _text(self, kind: bytes, data: bytes, t: float) -> None:
        if t - self._last["output"] >= SILENCE_S:
            for screen in self._screens.values():
                screen.pause()
            self._move(self._screens[OUTPUT].out, self._out)
            self._move(self._screens[ERROR].out, self._out)
            self._out.close()
        self._last["output"] = t
        text = self._decoders[kind].decode(data)
        if (text.count("\ufffd") + text.count("\x00")) * 8 > len(text):
            return  # binary (cat of an executable, a compressed file): no words to find
        self._screens[kind].feed(_printable(text), t)

    def _input(self, data: bytes, t: float) -> None:
        if t - self._last["input"] >= SILENCE_S:
            self._in.close()
        self._last["input"] = t
        self._keys.feed(_printable(self._decoders[INPUT].decode(data)), t)

    def _drain(self, t: float) -> Iterator[Segment]:
        self._move(self._screens[OUTPUT].out, self._out)
        self._move(self._screens[ERROR].out, self._out)
        self._move(self._keys.out, self._in)
        yield from (self._truncate(t) if self.truncated else self._flush())

    def _move(self, lines: list[tuple[float, str]], group: _Grouper) -> None:
        if not lines:
            return
        size = sum([len(line) for _t, line in lines])
        if self.chars + size <= self._max_text:
            self.chars += size
            group.extend(lines)
            lines.clear()
            return
        for lt, line in lines:
            if self.truncated:
                break
            if self.chars + len(line) > self._max_text:
                self.truncated = True
                break
            self.chars += len(line)
            group.add(lt, line)
        lines.clear()

    def _flush(self) -> Iterator[Segment]:
        ready = self._ready
        while ready:
            yield ready.pop(0)

    def _truncate(self, t: float) -> Iterator[Segment]:
        self.truncated = True
        self._out.close()
        self._in.close()
        yield from self._flush()
        yield Segment(t, "output", TRUNCATED)


def _printable(text: str) -> str:
    # bytes that are not UTF-8 (binary output) become spaces: they separate words, show nothing
    return text.replace("\ufffd", " ") if "\ufffd" in text else text


def text_segments(meta: Mapping[str, Any], frames: Iterable[Frame], *,
                  max_text: int = MAX_TEXT) -> list[Segment]:
    """All segments of a recording at once (tests, small recordings)."""
    return list(TextIndexer(meta, max_text=max_text).segments(frames))
