"""Plain-text output for the CLI: lines and aligned tables (every listing also has --json)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from broker.domain.sanitize import printable

__all__ = ["out", "printable", "table"]


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        out("(none)")
        return
    cells = [{c: printable(r.get(c, "") or "") for c in columns} for r in rows]
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in columns}
    out("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in cells:
        out("  ".join(r[c].ljust(widths[c]) for c in columns).rstrip())
