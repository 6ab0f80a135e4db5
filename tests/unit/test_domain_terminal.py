"""Terminal sizes from pty-req and window-change are clamped to what a terminal can be."""

from __future__ import annotations

from broker.domain.terminal import MAX_CELLS, MAX_PIXELS, clamp_term_size


def test_ordinary_sizes_pass_unchanged() -> None:
    assert clamp_term_size((80, 24, 0, 0)) == (80, 24, 0, 0)
    assert clamp_term_size((1, 1, 640, 480)) == (1, 1, 640, 480)
    assert clamp_term_size((MAX_CELLS, MAX_CELLS, MAX_PIXELS, MAX_PIXELS)) == (
        4096, 4096, 65535, 65535)


def test_huge_sizes_are_clamped() -> None:
    assert clamp_term_size((100000, 100000, 0, 0)) == (4096, 4096, 0, 0)
    assert clamp_term_size((2**32 - 1, 5, 2**32 - 1, 10**9)) == (4096, 5, 65535, 65535)


def test_zero_means_not_given_and_stays() -> None:
    assert clamp_term_size((0, 0, 0, 0)) == (0, 0, 0, 0)
    assert clamp_term_size((-3, 24, -1, 0)) == (0, 24, 0, 0)
