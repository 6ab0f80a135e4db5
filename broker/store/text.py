"""Session text search, the part both stores share: what a search text means, and snippets.

Tokens are runs of letters and digits, lowercased; everything else separates them. That is what
SQLite's FTS5 ``unicode61`` tokenizer does, so both backends agree: SQLite tokenizes itself,
PostgreSQL gets the tokens from here (as a ``tsvector`` literal, without its own parser, whose
path/host/version token types and locale-dependent letters would differ). Terminal text is not
prose: no stemming and no stop words, so ``ls``, ``rm`` or ``-f`` stay searchable.

Why not longer tokens (``unicode61`` with ``tokenchars '-_./'``) or trigrams: a path or host name
splits into its parts, and each word of the search is a phrase of its parts, so
``/var/log/syslog`` finds that path (the phrase ``var log syslog``) while ``syslog`` still finds
it too; with ``/`` and ``.`` as token characters ``syslog`` would not. Trigrams find substrings,
but no word under three characters (``ls``, ``cd``, ``vi``), they index three times as much, and
PostgreSQL has no built-in equivalent with the same results.

A search text is words separated by white space, never query syntax: quotes, ``*``, ``NEAR(``,
``OR``, ``-x`` are just characters, turned into tokens like the indexed text. All words must
match in one segment (segment-level AND: one index probe per search, and a hit is a place where
everything searched for is shown together). A word without letters or digits matches nothing
on its own and is dropped; a text of only such words finds nothing.
"""

from __future__ import annotations

import re

from broker.ports import SESSION_STATUSES, SessionQuery

MAX_HITS = 20  # hits per search result
SNIPPET_CHARS = 120
_BEFORE = 40  # of the snippet, characters before the match

_TOKEN = re.compile(r"[^\W_]+")
# CSI and OSC escape sequences, then any other control character: a snippet is plain text
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
# PostgreSQL's limits: a lexeme under 2 KiB, positions 1..16383, 256 positions per lexeme,
# and a tsvector under 1 MiB (what is beyond them is not searchable in PostgreSQL)
_PG_MAX_LEXEME_BYTES = 2046
_PG_MAX_POS = 16383
_PG_POSITIONS = 255
_PG_MAX_LEXEME_TOTAL = 512 * 1024

_ENDED_WELL = "('0', 'closed')"  # exit 0, or closed by the client
# SessionQuery.status as a condition on ``sessions`` (the same SQL on both backends)
STATUS_SQL = {
    "live": "ended_at IS NULL",
    "ok": f"ended_at IS NOT NULL AND exit_status IN {_ENDED_WELL}",
    "failed": f"ended_at IS NOT NULL AND (exit_status IS NULL OR exit_status NOT IN {_ENDED_WELL})",
}


def check_query(q: SessionQuery) -> None:
    """A status outside ``SESSION_STATUSES`` is the caller's mistake, not an empty result."""
    if q.status is not None and q.status not in SESSION_STATUSES:
        raise ValueError(f"unknown session status {q.status!r} (one of "
                         f"{', '.join(SESSION_STATUSES)})")


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Lowercase ASCII letters only: what SQLite's ``lower()`` and ``lower(x COLLATE "C")``
    in PostgreSQL do, so case-insensitive filters match the same rows on both."""
    return text.translate(_ASCII_LOWER)


def tokens(text: str) -> list[str]:
    return [m.group().lower() for m in _TOKEN.finditer(text)]


def query_words(text: str | None) -> list[list[str]] | None:
    """The words of a search text as token lists; None when there is nothing to search for (no
    text filter), an empty list when the text has only punctuation (no result)."""
    if text is None or not text.strip():
        return None
    words = [tokens(w) for w in text.split()]
    return [w for w in words if w]


def fts5_match(words: list[list[str]]) -> str:
    """An FTS5 MATCH expression: each word a quoted phrase of its tokens, all ANDed. Tokens
    hold letters and digits only, so nothing in them can be read as FTS5 syntax."""
    return " AND ".join('"' + " ".join(w) + '"' for w in words)


def _pg_quote(lexeme: str) -> str:
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


def _pg_ok(lexeme: str) -> bool:
    return len(lexeme.encode()) <= _PG_MAX_LEXEME_BYTES


def pg_tsquery(words: list[list[str]]) -> str:
    """A ``tsquery`` literal: each word a phrase (``<->``) of its quoted tokens, all ANDed."""
    return " & ".join(
        "(" + " <-> ".join(_pg_quote(t) for t in w if _pg_ok(t)) + ")"
        for w in words if any(_pg_ok(t) for t in w))


def pg_tsvector(text: str) -> str:
    """A ``tsvector`` literal of ``text``'s tokens with their positions (for phrases)."""
    positions: dict[str, list[int]] = {}
    size = 0
    for n, tok in enumerate(tokens(text), start=1):
        seen = positions.get(tok)
        if seen is None:
            if not _pg_ok(tok) or size + len(tok) > _PG_MAX_LEXEME_TOTAL:
                continue
            size += len(tok)
            positions[tok] = seen = []
        if len(seen) < _PG_POSITIONS:
            seen.append(min(n, _PG_MAX_POS))
    return " ".join(f"{_pg_quote(t)}:{','.join(map(str, p))}" for t, p in positions.items())


def plain(text: str) -> str:
    """Terminal text as one line of plain text: escape sequences removed, control characters
    and runs of white space as one space."""
    return " ".join(_CONTROLS.sub(" ", _ESCAPES.sub("", text)).split())


def snippet(body: str, words: list[list[str]]) -> str:
    """About ``SNIPPET_CHARS`` characters of ``body`` around the first place a word matches,
    with ``…`` where it was cut."""
    text = plain(body)
    found = [(m.start(), m.group().lower()) for m in _TOKEN.finditer(text)]
    toks = [t for _, t in found]
    at = 0
    for i in range(len(toks)):
        if any(toks[i:i + len(w)] == w for w in words):
            at = found[i][0]
            break
    start = max(0, min(at - _BEFORE, len(text) - SNIPPET_CHARS))
    end = start + SNIPPET_CHARS
    return ("…" if start > 0 else "") + text[start:end] + ("…" if end < len(text) else "")
