"""The files of a rotated audit log on disk, oldest first, for its readers.

The rotated files sit beside the current one (``broker.domain.audit_files`` names and orders
them); the current file comes last. Readers that need every event (``verify``, a session's
files, the console's search) read them in this order, which is the chain's order.

The current file is opened before the directory is listed: a rotation in between then shows
the opened file under its rotated name as well (it is taken once, as the current file), and
the file that replaced it is simply newer than the snapshot. Listing first could miss the
events of the file rotated in between.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from broker.domain.audit_files import ordered


@dataclass(frozen=True, slots=True)
class AuditFile:
    path: Path
    first_seq: int | None = None  # from a rotated file's name; None for the current file
    started: datetime | None = None


class Snapshot:
    """The current file, open, and the rotated files before it (oldest first)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.current: IO[bytes] | None = open(path, "rb")  # noqa: SIM115 - see close
        except FileNotFoundError:
            self.current = None
        try:
            names = os.listdir(path.parent)
        except FileNotFoundError:
            names = []
        self.rotated = [AuditFile(path.parent / r.name, r.first_seq, r.started)
                        for r in ordered(path.name, names)]
        if self.current is not None and self.rotated:
            try:
                if os.stat(self.rotated[-1].path).st_ino == os.fstat(self.current.fileno()).st_ino:
                    self.rotated.pop()  # a rotation cut short, or one just now: the same file
            except FileNotFoundError:
                pass

    def close(self) -> None:
        if self.current is not None:
            self.current.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> list[str]:
        return [f.path.name for f in self.rotated] + ([self.path.name] if self.current else [])

    def open_each(self) -> Iterator[tuple[str, IO[bytes]]]:
        """(name, file at its start) of each file in order; rotated files opened one at a time
        (one that vanished meanwhile is passed over: ``verify`` names a missing file)."""
        for f in self.rotated:
            try:
                fh = open(f.path, "rb")  # noqa: SIM115 - closed by the with below
            except FileNotFoundError:
                continue
            with fh:
                yield f.path.name, fh
        if self.current is not None:
            self.current.seek(0)
            yield self.path.name, self.current


def iter_lines(path: Path) -> Iterator[bytes]:
    """Every line of every file of the log, in order (with newlines)."""
    with Snapshot(path) as snap:
        for _, fh in snap.open_each():
            yield from fh


def read_all(path: Path) -> bytes | None:
    """The whole log, every file in order (for readers that load it anyway); None if the log
    has no file at all."""
    with Snapshot(path) as snap:
        if snap.current is None and not snap.rotated:
            return None
        return b"".join(fh.read() for _, fh in snap.open_each())
