"""The menu model (``broker.domain.menu``) fed keystrokes in memory; what it draws is played on a
small terminal model, so the tests read the screen a user would see (redraws in place included)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from broker.domain.menu import PROMPT, Entry, Menu, Pick, Quit
from broker.domain.models import Grant, GrantState, Instance, Level
from broker.ssh.menu import entries

_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


class Screen:
    """Enough of a VT100 for the menu: text with wrap, CR, LF, cursor up, home, erase below,
    erase all; SGR is dropped (``attrs`` keeps the reverse-video rows)."""

    def __init__(self, width: int = 80, height: int = 24) -> None:
        self.width, self.height = width, height
        self.rows: list[str] = [""]
        self.y = self.x = 0
        self.reverse: set[int] = set()
        self._rev = False

    def feed(self, raw: bytes) -> None:
        data = raw.decode()
        i = 0
        while i < len(data):
            m = _CSI.match(data, i)
            if m:
                self._csi(m.group(1), m.group(2))
                i = m.end()
                continue
            ch = data[i]
            i += 1
            if ch == "\r":
                self.x = 0
            elif ch == "\n":
                self.y += 1
                while len(self.rows) <= self.y:
                    self.rows.append("")
            else:
                assert ch >= " ", f"unexpected control {ch!r}"
                if self.x >= self.width:  # wrap
                    self.x, self.y = 0, self.y + 1
                    while len(self.rows) <= self.y:
                        self.rows.append("")
                row = self.rows[self.y].ljust(self.x)
                self.rows[self.y] = row[:self.x] + ch + row[self.x + 1:]
                if self._rev:
                    self.reverse.add(self.y)
                self.x += 1

    def _csi(self, params: str, final: str) -> None:
        n = int(params) if params.isdigit() else 1
        if final == "A":
            self.y = max(self.y - n, 0)
        elif final == "J":
            if params == "2":
                self.rows, self.reverse = [""] * len(self.rows), set()
            else:
                self.rows[self.y] = self.rows[self.y][:self.x]
                del self.rows[self.y + 1:]
                self.reverse = {r for r in self.reverse if r < self.y}
        elif final == "H":
            self.y = self.x = 0
        elif final == "m":
            self._rev = params == "7" or (self._rev and params not in ("0", ""))

    def text(self) -> list[str]:
        return [r.rstrip() for r in self.rows]


def _entries(*names: str, windows: str = "") -> list[Entry]:
    out = [Entry(n, name, f"i-0{name}", "linux", "read-only", "2030-01-01 00:00 UTC")
           for n, name in enumerate(names, 1)]
    if windows:
        out.append(Entry(len(out) + 1, windows, f"i-0{windows}", "windows", "admin",
                         "2030-01-01 00:00 UTC", hint="Windows, RDP only: ssh -N -L ..."))
    return out


def _open(*names: str, width: int = 80, height: int = 24, windows: str = ""
          ) -> tuple[Menu, Screen]:
    menu = Menu(_entries(*names, windows=windows), title="targets alice may reach now",
                width=width, height=height)
    screen = Screen(width, height)
    screen.feed(b"last line of a session\r\n")
    screen.feed(menu.show())
    return menu, screen


def _type(menu: Menu, screen: Screen, data: bytes) -> Pick | Quit | None:
    out, result = menu.feed(data)
    screen.feed(out)
    return result


def _listed(screen: Screen) -> list[str]:
    return [r.split()[1] for r in screen.text() if re.match(r"^\s+\d+\s", r)]


def test_the_block_lists_every_entry_below_what_was_on_screen() -> None:
    _menu, screen = _open("web01", "web02", "db01")
    text = screen.text()
    assert text[0] == "last line of a session"
    assert text[1] == "targets alice may reach now"
    assert text[2].split() == ["#", "name", "id", "os", "level", "grant", "ends"]
    assert _listed(screen) == ["web01", "web02", "db01"]
    assert text[-1] == PROMPT.rstrip()
    assert (screen.y, screen.x) == (len(text) - 1, len(PROMPT))


def test_typing_narrows_the_list_in_place_and_backspace_widens_it() -> None:
    menu, screen = _open("web01", "web02", "db01")
    assert _type(menu, screen, b"we") is None
    assert _listed(screen) == ["web01", "web02"]
    assert screen.text()[0] == "last line of a session"  # redrawn in place, nothing scrolled
    assert screen.text()[-1] == PROMPT + "we"
    _type(menu, screen, b"b02")
    assert _listed(screen) == ["web02"]
    _type(menu, screen, b"\x7f\x7f")
    assert _listed(screen) == ["web01", "web02"]
    _type(menu, screen, b"\x15")  # Ctrl-U clears the line
    assert _listed(screen) == ["web01", "web02", "db01"]
    assert screen.text()[-1] == PROMPT.rstrip()
    assert len(screen.text()) == 7  # the same block, never a second copy below


def test_matching_is_case_insensitive_on_name_id_and_number_start() -> None:
    menu, screen = _open(*[f"h{n:02d}" for n in range(1, 13)])
    _type(menu, screen, b"1")  # numbers 1, 10, 11, 12 and names with a 1
    assert _listed(screen) == ["h01", "h10", "h11", "h12"]
    _type(menu, screen, b"\x15I-0H1")
    assert _listed(screen) == ["h10", "h11", "h12"]
    _type(menu, screen, b"\x15zz")
    assert _listed(screen) == []
    assert "(no target matches 'zz')" in screen.text()[-2]


@pytest.mark.parametrize(("typed", "name"), [
    (b"2\r", "web02"),  # by number
    (b"db\r", "db01"),  # the only match
    (b"WEB01\r", "web01"),  # named exactly (web01 is also in web010)
    (b"\x1b[B\x1b[B\r", "web02"),  # arrows
    (b"\x1bOB\x1bOB\x1bOB\x1bOA\r", "web02"),  # arrows in application mode
    (b"\x1b[A\r", "db01"),  # up from nothing: the last
    (b"web\x1b[B\r", "web01"),  # arrows among the matches
    (b"3\r\n", "web010"),  # CR LF is one Enter
])
def test_enter_picks(typed: bytes, name: str) -> None:
    menu, screen = _open("web01", "web02", "web010", "db01")
    result = _type(menu, screen, typed)
    assert isinstance(result, Pick) and result.entry.name == name and result.rest == b""
    # the cursor is left on a fresh line below the block, and the next show starts afresh
    assert screen.x == 0 and screen.text()[-1] == ""
    assert menu.text == "" and menu.selected is None


def test_what_follows_enter_is_handed_on_to_the_session() -> None:
    menu, screen = _open("web01", "web02")
    result = _type(menu, screen, b"1\rls -l\r")
    assert isinstance(result, Pick) and result.rest == b"ls -l\r"


def test_enter_without_one_choice_says_why_and_stays() -> None:
    menu, screen = _open("web01", "web02", "db01")
    assert _type(menu, screen, b"\r") is None
    assert "Type a number or part of a name" in screen.text()[-2]
    assert _type(menu, screen, b"web\r") is None
    assert "2 targets match 'web'" in screen.text()[-2]
    assert _type(menu, screen, b"x") is None  # typing clears the message
    assert "match" in screen.text()[-2]  # "(no target matches 'webx')"
    assert _type(menu, screen, b"\r") is None
    assert _type(menu, screen, b"\x15 9\r") is None  # no entry 9
    assert _listed(screen) == []


@pytest.mark.parametrize("key", [b"q", b"\x03", b"\x04", b"exit\r", b"logout\r"])
def test_quit(key: bytes) -> None:
    menu, screen = _open("web01")
    assert isinstance(_type(menu, screen, key), Quit)
    assert screen.x == 0


def test_q_is_a_letter_once_something_is_typed() -> None:
    menu, screen = _open("sql01", "web01")
    assert _type(menu, screen, b"sq") is None
    assert _listed(screen) == ["sql01"]
    assert isinstance(_type(menu, screen, b"\x15q"), Quit)
    menu, screen = _open("qa01", "web01")
    result = _type(menu, screen, b"a01\r")  # the q-name by another part of it
    assert isinstance(result, Pick) and result.entry.name == "qa01"


def test_a_windows_host_is_listed_with_its_hint_and_not_picked() -> None:
    menu, screen = _open("web01", windows="win01", width=120)
    assert "Windows, RDP only" in screen.text()[-2]
    assert _type(menu, screen, b"2\r") is None
    assert screen.text()[-2] == "win01: Windows, RDP only: ssh -N -L ..."
    assert _type(menu, screen, b"win\r") is None  # the only match, still not pickable
    result = _type(menu, screen, b"1\r")
    assert isinstance(result, Pick) and result.entry.name == "web01"


def test_escape_sequences_split_across_reads_and_lone_escape() -> None:
    menu, screen = _open("web01", "web02")
    _type(menu, screen, b"\x1b[")
    _type(menu, screen, b"B")
    assert 3 in screen.reverse  # title, heads, then web01 highlighted
    _type(menu, screen, b"\x1b[1;5C\x1b[15~")  # Ctrl-Right, F5: nothing
    assert menu.selected == 0 and menu.text == ""
    _type(menu, screen, b"we\x1b")  # a lone Escape clears
    assert menu.text == "" and menu.selected is None and not screen.reverse
    _type(menu, screen, b"\x07\t\x1a")  # other control keys do nothing
    assert menu.text == ""


def test_utf8_names_and_text_split_across_reads() -> None:
    menu, screen = _open("caf\u00e9", "web01")
    _type(menu, screen, "\u00e9".encode()[:1])
    assert menu.text == ""
    _type(menu, screen, "\u00e9".encode()[1:])
    assert menu.text == "\u00e9" and _listed(screen) == ["caf\u00e9"]


def test_control_characters_from_the_inventory_never_reach_the_terminal() -> None:
    evil = [Entry(1, "web\x1b]52;c;Zm9v\x07", "i-1\r\n", "linux", "admin", "x")]
    menu = Menu(evil, title="t\x1b[2J", width=80, height=24)
    out = menu.show()
    assert b"\x1b]" not in out and b"\x07" not in out and b"t\x1b[2J" not in out
    assert b"web?]52;c;Zm9v?" in out


def test_long_lines_are_cut_and_a_long_list_fits_the_screen() -> None:
    names = [f"host-with-a-rather-long-name-{n:03d}" for n in range(1, 41)]
    menu, screen = _open(*names, width=40, height=10)
    assert all(len(r) < 40 for r in screen.text())
    block = screen.text()[1:]
    assert len(block) <= 10
    assert "... and" in block[-2] and "more: type to narrow" in block[-2]
    _type(menu, screen, b"03")  # 003 and 030..039: eleven, six rows of room
    assert len(_listed(screen)) == 6 and "... and 5 more" in screen.text()[-2]
    _type(menu, screen, b"\x15" + b"x" * 300)
    assert len(menu.text) == 200 and len(screen.text()[-1]) < 40  # the prompt keeps its tail


def test_resize_redraws_at_the_top_and_the_block_uses_the_new_width() -> None:
    menu, screen = _open("web01", "web02", width=80)
    narrow = Screen(30, 24)
    narrow.rows, narrow.y, narrow.x = list(screen.rows), screen.y, screen.x
    narrow.feed(menu.resize(30, 24))
    assert narrow.text()[0].startswith("targets alice")
    assert all(len(r) < 30 for r in narrow.text())
    assert _listed(narrow) == ["web01", "web02"]


def test_a_fresh_list_after_a_session_carries_a_message() -> None:
    menu, screen = _open("web01", "web02")
    result = _type(menu, screen, b"1\r")
    assert isinstance(result, Pick)
    screen.feed(b"the session's output\r\n")
    menu.use_entries(_entries("web02"), "Back from web01 (exit status 0).")
    screen.feed(menu.show())
    text = screen.text()
    assert "the session's output" in text
    assert text[-2] == "Back from web01 (exit status 0)."
    assert _listed(screen)[-1] == "web02"
    assert _type(menu, screen, b"w") is None
    assert screen.text()[-2] != "Back from web01 (exit status 0)."  # typing clears it


def test_no_entries() -> None:
    menu, screen = _open()
    assert "(none: request access" in screen.text()[-2]
    assert _type(menu, screen, b"1\r") is None


def test_entries_from_grants_are_numbered_by_name_with_the_rdp_hint() -> None:
    end = datetime(2030, 5, 6, 7, 8, tzinfo=UTC)
    grant = Grant(id="g1", username="alice", domain="corp", stack_ids=("s",), vpc_id="v",
                  level=Level.READ_ONLY, state=GrantState.APPROVED,
                  starts_at=end - timedelta(hours=1), expires_at=end)
    rows = [(Instance("i-2", "web02", "s", "v", "10.0.0.2"), grant),
            (Instance("i-9", "win01", "s", "v", "10.0.0.9", port=3389, os="windows"), grant),
            (Instance("i-1", "web01", "s", "v", "10.0.0.1"), grant)]
    got = entries(rows, "alice")
    assert [(e.number, e.name, e.pickable) for e in got] == [
        (1, "web01", True), (2, "web02", True), (3, "win01", False)]
    assert got[0].until == "2030-05-06 07:08 UTC" and got[0].level == str(Level.READ_ONLY)
    assert "ssh -N -L 13389:win01:3389 alice@" in got[2].hint
