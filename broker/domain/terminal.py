"""Terminal sizes a client may ask for, clamped to what a terminal can be.

A ``pty-req`` or ``window-change`` carries four 32-bit numbers (columns, rows, pixel width,
pixel height). Stored as they come, 100000x100000 becomes the recording's size and can hang a
player that allocates a screen that large, and the target is asked for it too. The broker clamps
them (the recording and the upstream get the clamped size) and audits what was sent.
"""

from __future__ import annotations

MAX_CELLS = 4096  # columns or rows
MAX_PIXELS = 65535  # pixel width or height

TermSize = tuple[int, int, int, int]


def _clamp(value: int, high: int) -> int:
    # 0 means "not given" (RFC 4254 section 6.2): kept; anything else within 1..high
    return 0 if value <= 0 else min(value, high)


def clamp_term_size(size: TermSize) -> TermSize:
    """``(cols, rows, pixel width, pixel height)`` within what a terminal can be."""
    cols, rows, pw, ph = size
    return (_clamp(cols, MAX_CELLS), _clamp(rows, MAX_CELLS), _clamp(pw, MAX_PIXELS),
            _clamp(ph, MAX_PIXELS))
