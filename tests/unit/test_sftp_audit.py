"""SFTP audit events from both directions of a channel: right sizes and SHA-256, statuses,
bounded state, and no exception on any input."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from asyncssh.constants import (
    FX_EOF,
    FX_FAILURE,
    FX_NO_SUCH_FILE,
    FX_OK,
    FXF_CREAT,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    FXP_CLOSE,
    FXP_DATA,
    FXP_EXTENDED,
    FXP_FSETSTAT,
    FXP_HANDLE,
    FXP_INIT,
    FXP_MKDIR,
    FXP_OPEN,
    FXP_READ,
    FXP_REMOVE,
    FXP_RENAME,
    FXP_RMDIR,
    FXP_SETSTAT,
    FXP_STATUS,
    FXP_SYMLINK,
    FXP_VERSION,
    FXP_WRITE,
)
from asyncssh.packet import String, UInt32, UInt64

from broker.sftp import audit as sftp_audit
from broker.sftp.audit import SftpAudit
from tests.unit.test_sftp_framing import pkt

NO_ATTRS = UInt32(0)
MODE_600 = UInt32(0x4) + UInt32(0o100600)


def status(req_id: int, code: int, msg: bytes = b"") -> bytes:
    return pkt(FXP_STATUS, UInt32(req_id), UInt32(code), String(msg), String(b"en"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Session:
    """Drives an SftpAudit like the relay: client bytes, then target bytes, in chunks."""

    def __init__(self, chunk: int = 1000) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.audit = SftpAudit(lambda e, f: self.events.append((e, f)))
        self.chunk = chunk
        self.client(pkt(FXP_INIT, UInt32(3)))
        self.target(pkt(FXP_VERSION, UInt32(3)))

    def client(self, data: bytes) -> None:
        for i in range(0, len(data), self.chunk):
            self.audit.from_client(data[i:i + self.chunk])

    def target(self, data: bytes) -> None:
        for i in range(0, len(data), self.chunk):
            self.audit.from_target(data[i:i + self.chunk])

    def open(self, req_id: int, path: bytes, flags: int, handle: bytes) -> None:
        self.client(pkt(FXP_OPEN, UInt32(req_id), String(path), UInt32(flags), NO_ATTRS))
        self.target(pkt(FXP_HANDLE, UInt32(req_id), String(handle)))

    def names(self) -> list[str]:
        return [e for e, _ in self.events]

    def last(self, event: str) -> dict[str, Any]:
        return [f for e, f in self.events if e == event][-1]


def upload(s: Session, data: bytes, handle: bytes = b"\0\0\0\1", block: int = 32768) -> None:
    s.open(10, b"/home/u/up.bin", FXF_WRITE | FXF_CREAT | FXF_TRUNC, handle)
    offsets = list(range(0, len(data), block))
    # pipelined like OpenSSH: all writes go out before their statuses come back
    s.client(b"".join(pkt(FXP_WRITE, UInt32(100 + i), String(handle), UInt64(off),
                          String(data[off:off + block])) for i, off in enumerate(offsets)))
    s.target(b"".join(status(100 + i, FX_OK) for i in range(len(offsets))))


def download(s: Session, data: bytes, handle: bytes = b"\0\0\0\2", block: int = 32768) -> None:
    s.open(20, b"/home/u/down.bin", FXF_READ, handle)
    offsets = list(range(0, len(data) + 2 * block, block))  # reads ahead past EOF
    s.client(b"".join(pkt(FXP_READ, UInt32(200 + i), String(handle), UInt64(off), UInt32(block))
                      for i, off in enumerate(offsets)))
    replies = []
    for i, off in enumerate(offsets):
        part = data[off:off + block]
        replies.append(pkt(FXP_DATA, UInt32(200 + i), String(part)) if part
                       else status(200 + i, FX_EOF))
    s.target(b"".join(replies))
    if len(data) % block:
        # like OpenSSH after a short read: ask for the rest, which proves EOF at the end
        s.client(pkt(FXP_READ, UInt32(299), String(handle), UInt64(len(data)), UInt32(block)))
        s.target(status(299, FX_EOF))


def close(s: Session, req_id: int, handle: bytes, code: int = FX_OK) -> None:
    s.client(pkt(FXP_CLOSE, UInt32(req_id), String(handle)))
    s.target(status(req_id, code))


def test_upload_close_has_size_and_sha256() -> None:
    data = random.Random(1).randbytes(100_000)  # noqa: S311 - reproducible test data
    s = Session(chunk=777)
    upload(s, data)
    close(s, 11, b"\0\0\0\1")
    assert s.names() == ["sftp.open", "sftp.close"]
    assert s.last("sftp.open") == {"path": "/home/u/up.bin", "status": "ok",
                                   "flags": ["write", "create", "truncate"]}
    c = s.last("sftp.close")
    assert c == {"path": "/home/u/up.bin", "bytes_read": 0, "bytes_written": 100_000,
                 "transfer": "upload", "size": 100_000, "sha256": sha(data), "status": "ok"}


def test_download_to_eof_has_size_and_sha256() -> None:
    data = random.Random(2).randbytes(70_001)  # noqa: S311 - reproducible test data
    s = Session(chunk=4096)
    download(s, data)
    close(s, 21, b"\0\0\0\2")
    c = s.last("sftp.close")
    assert c["transfer"] == "download"
    assert c["size"] == c["bytes_read"] == 70_001
    assert c["sha256"] == sha(data)


def test_empty_file_both_ways() -> None:
    s = Session()
    upload(s, b"")
    close(s, 11, b"\0\0\0\1")
    download(s, b"")
    close(s, 21, b"\0\0\0\2")
    up, down = [f for e, f in s.events if e == "sftp.close"]
    assert (up["transfer"], up["size"], up["sha256"]) == ("upload", 0, sha(b""))
    assert (down["transfer"], down["size"], down["sha256"]) == ("download", 0, sha(b""))


def test_eof_beyond_a_short_read_does_not_prove_the_whole_file() -> None:
    s = Session()
    s.open(1, b"/f", FXF_READ, b"h")
    s.client(pkt(FXP_READ, UInt32(2), String(b"h"), UInt64(0), UInt32(10))
             + pkt(FXP_READ, UInt32(3), String(b"h"), UInt64(10), UInt32(10)))
    s.target(pkt(FXP_DATA, UInt32(2), String(b"01234")) + status(3, FX_EOF))
    close(s, 4, b"h")
    assert s.last("sftp.close")["transfer"] is None


def test_partial_or_out_of_order_transfers_have_counts_but_no_sha256() -> None:
    s = Session()
    h = b"h1"
    s.open(1, b"/f", FXF_READ, h)
    s.client(pkt(FXP_READ, UInt32(2), String(h), UInt64(0), UInt32(10)))
    s.target(pkt(FXP_DATA, UInt32(2), String(b"0123456789")))
    close(s, 3, h)  # no EOF seen: not the whole file
    c = s.last("sftp.close")
    assert c["transfer"] is None
    assert c["bytes_read"] == 10
    assert "sha256" not in c

    s.open(4, b"/g", FXF_WRITE, h)
    s.client(pkt(FXP_WRITE, UInt32(5), String(h), UInt64(100), String(b"abc")))  # not from 0
    s.target(status(5, FX_OK))
    close(s, 6, h)
    c = s.last("sftp.close")
    assert (c["transfer"], c["bytes_written"]) == (None, 3)

    s.open(7, b"/k", FXF_WRITE | FXF_TRUNC, h)
    s.client(pkt(FXP_WRITE, UInt32(8), String(h), UInt64(0), String(b"abc")))
    s.target(status(8, FX_FAILURE, b"disk full"))  # a failed write: not a whole upload
    close(s, 9, h)
    assert s.last("sftp.close")["transfer"] is None


def test_file_operations_carry_path_and_status() -> None:
    s = Session()
    s.client(pkt(FXP_MKDIR, UInt32(1), String(b"/d"), MODE_600))
    s.client(pkt(FXP_RENAME, UInt32(2), String(b"/a"), String(b"/b")))
    s.client(pkt(FXP_REMOVE, UInt32(3), String(b"/b")))
    s.client(pkt(FXP_RMDIR, UInt32(4), String(b"/d")))
    s.client(pkt(FXP_SETSTAT, UInt32(5), String(b"/c"), MODE_600))
    s.client(pkt(FXP_EXTENDED, UInt32(6), String(b"posix-rename@openssh.com"), String(b"/x"),
                 String(b"/y")))
    s.client(pkt(FXP_SYMLINK, UInt32(7), String(b"/target"), String(b"/link")))
    s.client(pkt(FXP_EXTENDED, UInt32(8), String(b"statvfs@openssh.com"), String(b"/")))
    s.target(status(1, FX_OK) + status(2, FX_NO_SUCH_FILE, b"No such file") + status(3, FX_OK)
             + status(4, FX_OK) + status(5, FX_OK) + status(6, FX_OK) + status(7, FX_OK)
             + status(8, FX_OK))
    assert s.events == [
        ("sftp.mkdir", {"path": "/d", "attrs": {"mode": "0600"}, "status": "ok"}),
        ("sftp.rename", {"path": "/a", "new_path": "/b", "status": "no_such_file",
                         "message": "No such file"}),
        ("sftp.remove", {"path": "/b", "status": "ok"}),
        ("sftp.rmdir", {"path": "/d", "status": "ok"}),
        ("sftp.setstat", {"path": "/c", "attrs": {"mode": "0600"}, "status": "ok"}),
        ("sftp.rename", {"path": "/x", "new_path": "/y", "status": "ok"}),
        ("sftp.symlink", {"link_target": "/target", "link_path": "/link", "status": "ok"}),
    ]


def test_fsetstat_names_the_open_file_and_failed_open_is_audited() -> None:
    s = Session()
    s.open(1, b"/f", FXF_WRITE, b"h")
    s.client(pkt(FXP_FSETSTAT, UInt32(2), String(b"h"), UInt32(0x8) + UInt32(5) + UInt32(6)))
    s.target(status(2, FX_OK))
    assert s.last("sftp.setstat") == {"path": "/f", "attrs": {"atime": 5, "mtime": 6},
                                      "status": "ok"}
    s.client(pkt(FXP_OPEN, UInt32(3), String(b"/secret"), UInt32(FXF_READ), NO_ATTRS))
    s.target(status(3, 3, b"Permission denied"))
    assert s.last("sftp.open") == {"path": "/secret", "flags": ["read"],
                                   "status": "permission_denied", "message": "Permission denied"}


def test_finish_closes_open_handles_and_returns_totals() -> None:
    s = Session()
    data = b"z" * 5000
    upload(s, data)
    stats = s.audit.finish()
    c = s.last("sftp.close")
    assert (c["status"], c["transfer"], c["sha256"]) == ("not_closed", "upload", sha(data))
    assert stats["uploads"] == 1
    assert stats["bytes_written"] == 5000
    assert stats["opens"] == 1
    assert s.audit.finish() == stats  # idempotent, no second close event
    assert s.names().count("sftp.close") == 1


def test_non_utf8_paths_stay_visible_and_json_safe() -> None:
    s = Session()
    s.client(pkt(FXP_REMOVE, UInt32(1), String(b"/tmp/\xff\xfe.txt")))
    s.target(status(1, FX_OK))
    path = s.last("sftp.remove")["path"]
    assert path == "/tmp/\\xff\\xfe.txt"
    json.dumps(s.events)


def test_pending_requests_and_handles_are_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(sftp_audit, "MAX_PENDING", 10)
    monkeypatch.setattr(sftp_audit, "MAX_HANDLES", 3)
    s = Session()
    s.client(b"".join(pkt(FXP_REMOVE, UInt32(i), String(b"/f%d" % i)) for i in range(50)))
    assert len(s.audit._pending) == 10
    assert s.audit.stats["untracked"] == 40
    for i in range(6):
        s.open(100 + i, b"/o", FXF_READ, b"h%d" % i)
    assert len(s.audit._files) == 3
    assert s.audit.stats["opens"] == 6


def test_malformed_packets_are_counted_and_reported_at_most_three_times() -> None:
    s = Session()
    for i in range(10):
        s.client(pkt(FXP_OPEN, UInt32(i), UInt32(1000)))  # string length beyond the packet
    s.client(pkt(FXP_MKDIR, UInt32(50), String(b"/d"), UInt32(0x40000000)))  # unknown attr flag
    assert s.audit.stats["malformed"] == 11
    assert s.names() == ["sftp.malformed"] * 3
    s.client(pkt(FXP_REMOVE, UInt32(60), String(b"/ok")))  # and parsing goes on
    s.target(status(60, FX_OK))
    assert s.last("sftp.remove")["path"] == "/ok"


def test_responses_to_unknown_ids_and_garbage_are_harmless() -> None:
    s = Session()
    s.target(status(999, FX_OK) + pkt(FXP_DATA, UInt32(5), String(b"x")) + pkt(77, UInt32(1)))
    assert s.names() == []


def test_random_and_mutated_sessions_never_raise() -> None:
    rng = random.Random(5)  # noqa: S311 - reproducible test data
    valid_client: list[bytes] = []
    valid_target: list[bytes] = []

    class Tap(Session):
        def client(self, data: bytes) -> None:
            valid_client.append(data)

        def target(self, data: bytes) -> None:
            valid_target.append(data)

    t = Tap()
    upload(t, rng.randbytes(3000), block=1000)
    close(t, 11, b"\0\0\0\1")
    download(t, rng.randbytes(3000), block=1000)
    for _ in range(300):
        s = Session(chunk=rng.randint(1, 600))
        for c, r in zip(valid_client, valid_target, strict=False):
            c2, r2 = bytearray(c), bytearray(r)
            for buf in (c2, r2):
                if buf and rng.random() < 0.5:
                    buf[rng.randrange(len(buf))] = rng.randrange(256)
            s.client(bytes(c2))
            s.target(bytes(r2))
        s.client(rng.randbytes(rng.randint(0, 200)))
        s.target(rng.randbytes(rng.randint(0, 200)))
        s.audit.finish()
        assert s.audit.requests.buffered <= s.audit.requests.max_packet + 4
        json.dumps(s.events)
