"""Replays that are safe to watch: drop escape sequences that act on the viewer's terminal.

A recording holds whatever the target printed, including sequences an attacker on the target
can aim at whoever replays it later: OSC 52 writes the viewer's clipboard, OSC 0/1/2 set the
window title (and old terminals report it back as input), DCS/APC/PM/SOS strings reach terminal
extensions, and status queries (DSR ``CSI 6 n``, DA ``CSI c``, window reports ``CSI 21 t``,
DECRQM, ENQ, DECID) make the viewer's terminal *type* an answer into whatever reads its input.

What keeps a replay faithful stays: text, colours and attributes (SGR), cursor movement, erase,
insert/delete, scroll regions, tab stops, cursor style, charset selection and the ordinary
private modes (alternate screen, cursor visibility, bracketed paste). Everything else is removed,
whole, never printed half. ``ViewerSafeFilter`` is incremental: a sequence split across two
chunks of a recording is still recognised.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator

ESC = "\x1b"
BEL = "\x07"
ENQ = "\x05"
C1_CSI = "\x9b"
C1_ST = "\x9c"
C1_STRINGS = frozenset("\x90\x98\x9d\x9e\x9f")  # DCS, SOS, OSC, PM, APC

# CSI final bytes kept when there is no private marker and no intermediate byte
_PLAIN_FINALS = frozenset("@ABCDEFGHIJKLMPSTXZ`abdefghlmrsu")
_PRIVATE_FINALS = frozenset("hlJKr")  # DEC private: modes, selective erase, restore modes
# private modes whose effect outlives the replay or that make the terminal report input
_DENIED_PRIVATE_MODES = frozenset({9, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1015, 1016})
_ALLOWED_PLAIN_MODES = frozenset({4, 20})  # insert mode, new-line mode (not 2: keyboard lock)
_MAX_CSI = 128
# In the text state every character but ESC, ENQ and the C1 controls is printed as it is, and a
# complete CSI sequence with only digits, ";" and ":" as parameters and a final that
# ``_csi_allowed`` then always accepts (colours, cursor movement, erase: most of what terminal
# programs print) is kept whole, at most _MAX_CSI - 2 parameter characters long as ``_step``
# allows: a run of those is copied in one step instead of one character at a time.
_FAST_FINALS = "".join(sorted(_PLAIN_FINALS - set("hlT")))  # h/l: modes; T: old mouse tracking
_SAFE_RUN = re.compile(
    f"(?:[^\\x1b\\x05\\x80-\\x9f]+|\\x1b\\[[0-9;:]{{0,{_MAX_CSI - 2}}}[{_FAST_FINALS}])+")


def _csi_allowed(body: str) -> bool:
    """``body`` is everything after ``ESC [`` up to and including the final byte."""
    final, inner = body[-1], body[:-1]
    private = inner[:1] if inner[:1] in ("?", ">", "<", "=") else ""
    params = inner[len(private):]
    intermediates = "".join(c for c in params if "\x20" <= c <= "\x2f")
    params = params.rstrip("\x20\x21\x22\x23\x24\x25\x26\x27\x28\x29\x2a\x2b\x2c\x2d\x2e\x2f")
    if any(not ("0" <= c <= "9" or c in ";:") for c in params):
        return False
    if intermediates:
        return intermediates == " " and final == "q" and not private  # DECSCUSR cursor shape
    if final in "hl":
        try:
            modes = {int(p) for p in params.split(";") if p}
        except ValueError:
            return False
        if private == "?":
            return not modes & _DENIED_PRIVATE_MODES
        return not private and modes <= _ALLOWED_PLAIN_MODES
    if private:
        return private == "?" and final in _PRIVATE_FINALS
    if final == "T" and ";" in params:  # CSI Ps;..;Ps T starts (old) xterm mouse tracking
        return False
    return final in _PLAIN_FINALS


class ViewerSafeFilter:
    """Feed text chunks in order; get back the same text minus the unsafe sequences."""

    def __init__(self) -> None:
        self._state = "text"  # text | esc | csi | string | string_esc | esc_intermediate
        self._buf = ""  # the sequence being collected (kept only while it may be allowed)
        self._string_ends_on_bel = False

    def feed(self, text: str) -> str:
        """The same as ``_step`` for each character in turn (the tests check it), with runs of
        plain text and always-kept sequences copied whole (``_SAFE_RUN``)."""
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            if self._state == "text":
                run = _SAFE_RUN.match(text, i)
                if run is not None:
                    out.append(run.group())
                    i = run.end()
                    if i == n:
                        break
            self._step(text[i], out)
            i += 1
        return "".join(out)

    def flush(self) -> str:
        """End of stream: an unfinished sequence is dropped (it never reached a terminal whole)."""
        self._state, self._buf = "text", ""
        return ""

    def _step(self, ch: str, out: list[str]) -> None:
        st = self._state
        if st == "text":
            if ch == ESC:
                self._state, self._buf = "esc", ESC
            elif ch == C1_CSI:
                self._state, self._buf = "csi", ESC + "["
            elif ch in C1_STRINGS:
                self._state, self._string_ends_on_bel = "string", ch == "\x9d"
            elif ch == ENQ or "\x80" <= ch <= "\x9f":
                pass  # ENQ makes the terminal send its answerback; other C1 controls dropped
            else:
                out.append(ch)
        elif st == "esc":
            if ch == "[":
                self._state, self._buf = "csi", ESC + "["
            elif ch in "]P_^X":
                self._state, self._buf = "string", ""
                self._string_ends_on_bel = ch == "]"
            elif "\x20" <= ch <= "\x2f":  # ESC ( B and friends: charset designation
                self._state, self._buf = "esc_intermediate", self._buf + ch
            elif ch in "78DEHMc=>NOno|}~":
                out.append(ESC + ch)
                self._state, self._buf = "text", ""
            elif ch == ESC:
                self._buf = ESC  # a lone ESC followed by another: drop the first
            else:  # ESC Z (DECID: identify yourself) and anything unknown
                self._state, self._buf = "text", ""
        elif st == "esc_intermediate":
            if "\x20" <= ch <= "\x2f" and len(self._buf) < 4:
                self._buf += ch
            elif "\x30" <= ch <= "\x7e":
                # only charset designations (ESC ( ) * + - . / with a final); not ESC # / ESC %
                if self._buf[1] in "()*+-./":
                    out.append(self._buf + ch)
                self._state, self._buf = "text", ""
            else:
                self._state, self._buf = "text", ""
                self._step(ch, out)
        elif st == "csi":
            if "\x40" <= ch <= "\x7e":
                body = self._buf[2:] + ch
                if _csi_allowed(body):
                    out.append(self._buf + ch)
                self._state, self._buf = "text", ""
            elif "\x20" <= ch <= "\x3f" and len(self._buf) < _MAX_CSI:
                self._buf += ch
            else:  # malformed or oversized: drop it; an ESC starts a new sequence
                self._state, self._buf = "text", ""
                if ch == ESC:
                    self._step(ch, out)
        elif st == "string":
            if ch == ESC:
                self._state = "string_esc"
            elif ch == C1_ST or (ch == BEL and self._string_ends_on_bel):
                self._state = "text"
        elif st == "string_esc":
            if ch == "\\":
                self._state = "text"
            else:  # xterm: ESC inside a string ends it and starts a new sequence
                self._state, self._buf = "esc", ESC
                self._step(ch, out)


def neutralise(text: str) -> str:
    """One-shot form of :class:`ViewerSafeFilter` for a whole text."""
    f = ViewerSafeFilter()
    return f.feed(text) + f.flush()


def neutralise_all(chunks: Iterable[str]) -> list[str]:
    """Filter consecutive chunks of one stream (sequences may span chunks)."""
    f = ViewerSafeFilter()
    return [f.feed(c) for c in chunks]


def safe_asciicast(lines: Iterable[str]) -> Iterator[str]:
    """asciicast v2 lines (header first) with every output event neutralised.

    Output and stderr share one filter, as they share the terminal; events left empty are
    dropped. Input (``"i"``) events are kept: players do not send them to the terminal.
    """
    it = iter(lines)
    header = next(it, None)
    if header is None:
        return
    yield header
    f = ViewerSafeFilter()
    for line in it:
        event = json.loads(line)
        if isinstance(event, list) and len(event) == 3 and event[1] == "o":
            data = f.feed(str(event[2]))
            if not data:
                continue
            line = json.dumps([event[0], "o", data], ensure_ascii=False)
        yield line


# C0 controls, DEL and C1 controls: what a terminal acts on (ESC starts OSC 52, title, DCS...)
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(value: object) -> str:
    """``value`` as text with control characters escaped (``\\x1b``): what users or clients
    typed (commands, reasons, file names, a malformed request) shown in a listing or a log line
    must not act on the terminal that shows it."""
    return str(value).translate(_CONTROLS)
