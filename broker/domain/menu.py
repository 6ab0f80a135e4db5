"""The interactive target menu (``ssh user@bastion`` with a terminal), without I/O.

``Menu`` is fed the bytes the user types (raw: the client's terminal is in raw mode and the
bastion has no PTY of its own here) and answers with the bytes to draw and, when the user is
done, a ``Pick`` or a ``Quit``. It draws a block of lines below whatever the terminal showed
before (a finished session's last screen stays above it) and redraws that block in place with
relative cursor moves, so every line is cut to the terminal's width (a wrapped line would break
the count) and the block never grows past its height.

Typing narrows the list (a number by its start, a name or id anywhere in it, case-insensitive);
Enter picks the entry numbered so, the one named exactly so, the only match, or the one the
arrow keys highlight. ``q`` on an empty line, Ctrl-C and Ctrl-D quit.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass

ESC = 0x1B
_CLEAR_BELOW = "\x1b[J"
_REVERSE, _BOLD, _PLAIN = "\x1b[7m", "\x1b[1m", "\x1b[0m"
PROMPT = "Target (number or name, q quits): "
QUIT_WORDS = frozenset({"q", "quit", "exit", "logout"})


@dataclass(frozen=True, slots=True)
class Entry:
    """One target the user may reach now, as listed."""

    number: int
    name: str
    id: str
    os: str
    level: str
    until: str  # the grant's end, as shown
    hint: str = ""  # why it cannot be picked here (shown beside it); empty: pickable

    @property
    def pickable(self) -> bool:
        return not self.hint

    def matches(self, text: str) -> bool:
        t = text.casefold()
        return (not t or (t.isdigit() and str(self.number).startswith(t))
                or t in self.name.casefold() or t in self.id.casefold())

    def named(self, text: str) -> bool:
        t = text.casefold()
        return t in (self.name.casefold(), self.id.casefold())


@dataclass(frozen=True, slots=True)
class Pick:
    entry: Entry
    rest: bytes = b""  # what was typed after Enter in the same read: the session's first input


@dataclass(frozen=True, slots=True)
class Quit:
    pass


Result = Pick | Quit | None


def _printable(text: str) -> str:
    """Inventory text as one line on the screen: no control characters reach the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


class Menu:
    """State: the entries, the text typed so far, the highlighted match, the block on screen."""

    def __init__(self, entries: Sequence[Entry], *, title: str, width: int = 80,
                 height: int = 24) -> None:
        self.title = title
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.text = ""
        self.selected: int | None = None  # index into ``matches()``, moved by the arrow keys
        self.message = ""
        self.width, self.height = 80, 24
        self.size(width, height)
        self._drawn = 0  # lines of the block above the prompt line (the cursor is on it)
        self._esc = b""  # an escape sequence read in part
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    # -- what is shown -----------------------------------------------------------------------
    def matches(self) -> list[Entry]:
        return [e for e in self.entries if e.matches(self.text.strip())]

    def lines(self) -> list[str]:
        """The block: title, column heads, the matching rows, a message, the prompt."""
        found = self.matches()
        names = [_printable(e.name) for e in self.entries]
        ids = [_printable(e.id) for e in self.entries]
        wn = max([4, *map(len, names)])
        wi = max([2, *map(len, ids)])
        wl = max([5, *(len(e.level) for e in self.entries)])
        wnum = len(str(len(self.entries))) + 1

        def row(num: str, name: str, iid: str, os: str, level: str, until: str,
                hint: str) -> str:
            text = f"  {num:>{wnum}}  {name:<{wn}}  {iid:<{wi}}  {os:<8} {level:<{wl}}  {until}"
            return f"{text}  {hint}" if hint else text

        out = [_BOLD + self._cut(_printable(self.title)) + _PLAIN]
        if not self.entries:
            out.append("  (none: request access with 'bastion-broker grant request')")
        else:
            out.append(self._cut(row("#", "name", "id", "os", "level", "grant ends", "")))
        room = self.height - 3 - (1 if self.message else 0)  # title, heads, prompt, message
        shown = found if len(found) <= room else found[:max(room - 1, 1)]
        for i, e in enumerate(shown):
            line = self._cut(row(str(e.number), _printable(e.name), _printable(e.id),
                                 _printable(e.os), e.level, e.until,
                                 _printable(e.hint)))
            out.append(_REVERSE + line + _PLAIN if i == self.selected else line)
        if len(shown) < len(found):
            out.append(self._cut(f"  ... and {len(found) - len(shown)} more: type to narrow"))
        if self.entries and not found:
            out.append(self._cut(f"  (no target matches '{_printable(self.text)}')"))
        if self.message:
            out.append(self._cut(_printable(self.message)))
        prompt = PROMPT + self.text
        out.append(prompt[-(self.width - 1):])
        return out

    def _cut(self, line: str) -> str:
        return line[:self.width - 1]

    def show(self) -> bytes:
        """The block drawn afresh below the cursor (at the start, and back from a session)."""
        self._drawn = 0
        return ("\r" + _CLEAR_BELOW + self._block()).encode()

    def _redraw(self) -> bytes:
        up = f"\x1b[{self._drawn}A" if self._drawn else ""
        return ("\r" + up + _CLEAR_BELOW + self._block()).encode()

    def _block(self) -> str:
        lines = self.lines()
        self._drawn = len(lines) - 1
        return "\r\n".join(lines)

    def use_entries(self, entries: Sequence[Entry], message: str = "") -> None:
        """A fresh list (grants change while a session runs); the typed text is cleared."""
        self.entries = tuple(entries)
        self.text, self.selected, self.message = "", None, message

    def size(self, width: int, height: int) -> None:
        """The terminal's size, for the next time the block is drawn."""
        self.width, self.height = max(width, 20), max(height, 5)

    def resize(self, width: int, height: int) -> bytes:
        """A new terminal size while the block is shown: the screen is cleared (lines drawn for
        the old width may have wrapped) and the block drawn at its top."""
        self.size(width, height)
        self._drawn = 0
        return ("\x1b[H\x1b[2J" + self._block()).encode()

    # -- what is typed -----------------------------------------------------------------------
    def feed(self, data: bytes) -> tuple[bytes, Result]:
        """Keystrokes in, screen bytes out; a result once the user picked or quit (what follows
        the Enter of a pick is handed on in ``Pick.rest``, and the block is left as it is)."""
        changed = False
        i = 0
        while i < len(data):
            b = data[i]
            i += 1
            if self._esc:
                changed |= self._escape(b)
                continue
            if b == ESC:
                self._esc = b"\x1b"
                continue
            if b in (0x03, 0x04):  # Ctrl-C, Ctrl-D
                return self._finish(), Quit()
            if b in (0x0D, 0x0A):
                if b == 0x0D and data[i:i + 1] == b"\n":
                    i += 1
                result = self._enter(data[i:])
                if result is not None:
                    return self._finish(), result
                changed = True
            elif b in (0x7F, 0x08):
                if self.text:
                    self.text = self.text[:-1]
                    self._typed()
                    changed = True
            elif b == 0x15:  # Ctrl-U: clear the line
                self.text = ""
                self._typed()
                changed = True
            elif b < 0x20:
                continue  # other control keys do nothing here
            elif b == ord("q") and not self.text:
                return self._finish(), Quit()
            else:
                piece = self._utf8.decode(bytes([b]))
                piece = "".join(c for c in piece if c.isprintable())
                if piece and len(self.text) < 200:
                    self.text += piece
                    self._typed()
                    changed = True
        if self._esc == b"\x1b":  # a lone Escape key (a sequence comes in one read)
            self._esc = b""
            changed |= self._clear()
        return (self._redraw() if changed else b""), None

    def _finish(self) -> bytes:
        """The block's last state, and the cursor below it (what follows starts on a new line);
        the typed text is cleared for the next time the menu is shown."""
        out = self._redraw() + b"\r\n"
        self.text, self.selected, self.message = "", None, ""
        self._esc = b""
        self._drawn = 0
        return out

    def _typed(self) -> None:
        self.selected = None
        self.message = ""

    def _clear(self) -> bool:
        if not self.text and self.selected is None and not self.message:
            return False
        self.text, self.selected, self.message = "", None, ""
        return True

    def _escape(self, b: int) -> bool:
        """One more byte of an escape sequence; True when it changed what is shown."""
        seq = self._esc + bytes([b])
        if len(seq) == 2:
            if b in (ord("["), ord("O")):
                self._esc = seq
                return False
            self._esc = b""  # Escape then a key: clear, and the key is dropped (Alt+key)
            return self._clear()
        if seq[1:2] == b"[" and 0x20 <= b <= 0x3F and len(seq) < 16:
            self._esc = seq  # parameters of a CSI sequence
            return False
        self._esc = b""
        final = chr(b)
        if final in "AB" and len(seq) == 3:
            return self._move(-1 if final == "A" else 1)
        return False  # other keys (function keys, Home, ...) do nothing here

    def _move(self, step: int) -> bool:
        found = self.matches()
        if not found:
            return False
        if self.selected is None:
            self.selected = 0 if step > 0 else len(found) - 1
        else:
            self.selected = (self.selected + step) % len(found)
        self.message = ""
        return True

    def _enter(self, rest: bytes) -> Result:
        text = self.text.strip()
        found = self.matches()
        choice: Entry | None = None
        if self.selected is not None and self.selected < len(found):
            choice = found[self.selected]
        elif text.isdigit() and any(e.number == int(text) for e in self.entries):
            choice = next(e for e in self.entries if e.number == int(text))
        elif text and any(e.named(text) for e in self.entries):
            choice = next(e for e in self.entries if e.named(text))
        elif len(found) == 1 and text:
            choice = found[0]
        if choice is None:
            if text.casefold() in QUIT_WORDS:
                return Quit()
            if not text:
                self.message = "Type a number or part of a name, then Enter."
            elif not found:
                self.message = ""  # the list says no target matches
            else:
                self.message = (f"{len(found)} targets match '{text}': type more, or choose "
                                "with the arrow keys.")
            return None
        if not choice.pickable:
            self.text, self.selected = "", None
            self.message = f"{choice.name}: {choice.hint}"
            return None
        return Pick(choice, rest)
