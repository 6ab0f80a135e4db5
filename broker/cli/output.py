"""Plain-text output for the CLI: lines and aligned tables (every listing also has --json)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


# C0 controls, DEL and C1 controls: what a terminal acts on (ESC starts OSC 52, title, DCS...)
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(value: object) -> str:
    """``value`` as text with control characters escaped (``\\x1b``): listings show what users
    typed (commands, reasons, file names), and must not act on the operator's terminal."""
    return str(value).translate(_CONTROLS)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        out("(none)")
        return
    cells = [{c: printable(r.get(c, "") or "") for c in columns} for r in rows]
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in columns}
    out("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in cells:
        out("  ".join(r[c].ljust(widths[c]) for c in columns).rstrip())
