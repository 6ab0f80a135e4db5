"""Plain-text output for the CLI: lines and aligned tables (every listing also has --json)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        out("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, "") or "")) for r in rows)) for c in columns}
    out("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        out("  ".join(str(r.get(c, "") or "").ljust(widths[c]) for c in columns).rstrip())
