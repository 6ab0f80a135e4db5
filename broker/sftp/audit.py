"""File operations of one SFTP session, as audit events.

Requests (client to target) are remembered by id until their response (target to client)
arrives; the event is emitted then, with the outcome, before the relay forwards the response, so
a client never learns the result of an operation the audit log does not hold. Reads and writes
are counted per open handle; the close event carries the totals and, for a whole-file transfer
(sequential reads from offset 0 up to EOF, or sequential writes from offset 0 that all
succeeded), its size and SHA-256. Per-read/write events would flood the log (32 KiB each), so
they are aggregated.

Memory is bounded: at most ``MAX_PENDING`` outstanding requests and ``MAX_HANDLES`` open files
are tracked (OpenSSH keeps 64 requests in flight); beyond that the oldest are forgotten and the
summary says so.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from asyncssh import Error as AsyncsshError
from asyncssh.constants import (
    FX_EOF,
    FX_OK,
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    FXP_ATTRS,
    FXP_CLOSE,
    FXP_DATA,
    FXP_EXTENDED,
    FXP_EXTENDED_REPLY,
    FXP_FSETSTAT,
    FXP_HANDLE,
    FXP_MKDIR,
    FXP_NAME,
    FXP_OPEN,
    FXP_READ,
    FXP_REMOVE,
    FXP_RENAME,
    FXP_RMDIR,
    FXP_SETSTAT,
    FXP_STATUS,
    FXP_SYMLINK,
    FXP_WRITE,
)
from asyncssh.packet import SSHPacket
from asyncssh.sftp import SFTPAttrs

from broker.sftp.framing import Framer

Emit = Callable[[str, dict[str, Any]], None]

MAX_PENDING = 4096
MAX_HANDLES = 1024

_FLAG_NAMES = ((FXF_READ, "read"), (FXF_WRITE, "write"), (FXF_APPEND, "append"),
               (FXF_CREAT, "create"), (FXF_TRUNC, "truncate"), (FXF_EXCL, "exclusive"))
_STATUS_NAMES = {0: "ok", 1: "eof", 2: "no_such_file", 3: "permission_denied", 4: "failure",
                 5: "bad_message", 6: "no_connection", 7: "connection_lost",
                 8: "op_unsupported"}
# extended requests that change the file system: name -> audit event
_EXTENDED = {b"posix-rename@openssh.com": "sftp.rename", b"hardlink@openssh.com": "sftp.link",
             b"lsetstat@openssh.com": "sftp.setstat"}


def _path(raw: bytes) -> str:
    """A path as text: invalid UTF-8 kept visible (and JSON-safe) as backslash escapes."""
    return raw.decode("utf-8", "backslashreplace")


def flag_names(pflags: int) -> list[str]:
    return [name for bit, name in _FLAG_NAMES if pflags & bit]


def _attrs(pkt: SSHPacket) -> dict[str, Any]:
    a = SFTPAttrs.decode(pkt, 3)
    out: dict[str, Any] = {}
    if a.size is not None:
        out["size"] = a.size
    if a.permissions is not None:
        out["mode"] = f"{a.permissions & 0o7777:04o}"
    if a.uid is not None:
        out["uid"], out["gid"] = a.uid, a.gid
    if a.atime is not None:
        out["atime"], out["mtime"] = a.atime, a.mtime
    return out


class _File:
    """An open file handle and what went through it."""

    __slots__ = ("bytes_read", "bytes_written", "flags", "path", "read_eof", "read_hash",
                 "read_next", "read_seq", "write_failed", "write_hash", "write_next", "write_seq")

    def __init__(self, path: str, flags: int) -> None:
        self.path = path
        self.flags = flags
        self.bytes_read = 0
        self.bytes_written = 0
        self.read_next = 0
        self.read_seq = True
        self.read_eof = False
        self.read_hash = hashlib.sha256()
        self.write_next = 0
        self.write_seq = True
        self.write_failed = False
        self.write_hash = hashlib.sha256()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "bytes_read": self.bytes_read,
                               "bytes_written": self.bytes_written, "transfer": None}
        if self.flags & FXF_WRITE and self.write_seq and not self.write_failed and (
                self.bytes_written or self.flags & FXF_TRUNC):
            out.update(transfer="upload", size=self.write_next,
                       sha256=self.write_hash.hexdigest())
        elif self.read_seq and self.read_eof:
            out.update(transfer="download", size=self.read_next,
                       sha256=self.read_hash.hexdigest())
        return out


class SftpAudit:
    """Feed it both directions of one SFTP channel; it calls ``emit(event, fields)`` per operation.

    Never raises on any input: a packet that does not decode is counted and skipped.
    """

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        # OrderedDict: evicting the oldest stays O(1) (a dict's first key is found by a scan)
        self._pending: OrderedDict[int, tuple[Any, ...]] = OrderedDict()
        self._files: dict[bytes, _File] = {}
        self.requests = Framer(_RequestSink(self), client_side=True)
        self.responses = Framer(_ResponseSink(self), client_side=False)
        self.stats: dict[str, int] = {"opens": 0, "uploads": 0, "downloads": 0,
                                      "bytes_read": 0, "bytes_written": 0, "operations": 0,
                                      "malformed": 0, "untracked": 0}
        self._finished = False

    # -- the relay's two entry points -------------------------------------------------------
    def from_client(self, data: bytes) -> None:
        self.requests.feed(data)

    def from_target(self, data: bytes) -> None:
        self.responses.feed(data)

    def finish(self) -> dict[str, int]:
        """At session end: handles never closed get their close event; returns the totals."""
        if not self._finished:
            self._finished = True
            for f in self._files.values():
                self._close_event(f, "not_closed")
            self._files.clear()
            self._pending.clear()
        return dict(self.stats)

    # -- bookkeeping ------------------------------------------------------------------------
    def _remember(self, req_id: int, req: tuple[Any, ...]) -> None:
        pending = self._pending
        if len(pending) >= MAX_PENDING and req_id not in pending:
            pending.popitem(last=False)
            self.stats["untracked"] += 1
        pending[req_id] = req

    def _event(self, event: str, status: int, msg: str | None = None, **fields: Any) -> None:
        fields["status"] = _STATUS_NAMES.get(status, str(status))
        if status != FX_OK and msg:
            fields["message"] = msg[:200]
        self.stats["operations"] += 1
        self._emit(event, fields)

    def _close_event(self, f: _File, status: str) -> None:
        fields = f.summary()
        fields["status"] = status
        if fields["transfer"] == "upload":
            self.stats["uploads"] += 1
        elif fields["transfer"] == "download":
            self.stats["downloads"] += 1
        self.stats["operations"] += 1
        self._emit("sftp.close", fields)

    def malformed(self, reason: str) -> None:
        self.stats["malformed"] += 1
        if self.stats["malformed"] <= 3:  # a hostile peer cannot flood the audit log
            self._emit("sftp.malformed", {"reason": reason[:200]})

    # -- requests ---------------------------------------------------------------------------
    def request(self, ptype: int, body: bytes) -> None:
        pkt = SSHPacket(body)
        req_id = pkt.get_uint32()
        if ptype == FXP_OPEN:
            path = _path(pkt.get_string())
            self._remember(req_id, (FXP_OPEN, path, pkt.get_uint32()))
        elif ptype == FXP_CLOSE:
            self._remember(req_id, (FXP_CLOSE, pkt.get_string()))
        elif ptype == FXP_READ:
            handle = pkt.get_string()
            if handle in self._files:
                self._remember(req_id, (FXP_READ, handle, pkt.get_uint64()))
        elif ptype in (FXP_REMOVE, FXP_RMDIR):
            self._remember(req_id, (ptype, _path(pkt.get_string())))
        elif ptype in (FXP_MKDIR, FXP_SETSTAT):
            path = _path(pkt.get_string())
            self._remember(req_id, (ptype, path, _attrs(pkt)))
        elif ptype == FXP_FSETSTAT:
            f = self._files.get(pkt.get_string())
            path = f.path if f is not None else "?"
            self._remember(req_id, (FXP_SETSTAT, path, _attrs(pkt)))
        elif ptype in (FXP_RENAME, FXP_SYMLINK):
            # for SYMLINK OpenSSH sends the link's target first (swapped against the draft)
            first = _path(pkt.get_string())
            self._remember(req_id, (ptype, first, _path(pkt.get_string())))
        elif ptype == FXP_EXTENDED:
            event = _EXTENDED.get(pkt.get_string())
            if event == "sftp.setstat":
                path = _path(pkt.get_string())
                self._remember(req_id, (FXP_SETSTAT, path, _attrs(pkt)))
            elif event is not None:
                first = _path(pkt.get_string())
                self._remember(req_id, (event, first, _path(pkt.get_string())))

    def write_start(self, req_id: int, handle: bytes, offset: int, length: int) -> Any:
        """Account a WRITE; returns the hash its data goes into (None: not sequential)."""
        f = self._files.get(handle)
        if f is None:
            return None
        self._remember(req_id, (FXP_WRITE, handle))
        f.bytes_written += length
        self.stats["bytes_written"] += length
        if f.write_seq and offset == f.write_next:
            f.write_next += length
            return f.write_hash
        f.write_seq = False
        return None

    # -- responses --------------------------------------------------------------------------
    def response(self, ptype: int, body: bytes) -> None:
        pkt = SSHPacket(body)
        req = self._pending.pop(pkt.get_uint32(), None)
        if req is None:
            return
        kind = req[0]
        if ptype == FXP_HANDLE and kind == FXP_OPEN:
            self.stats["opens"] += 1
            handle = pkt.get_string()
            self._event("sftp.open", FX_OK, path=req[1], flags=flag_names(req[2]))
            if len(self._files) >= MAX_HANDLES:
                self.stats["untracked"] += 1
                return
            self._files[handle] = _File(req[1], req[2])
        elif ptype == FXP_STATUS:
            code = pkt.get_uint32()
            msg = _path(pkt.get_string()) if pkt else None
            self._status(req, code, msg)
        # NAME, ATTRS, EXTENDED_REPLY, DATA for untracked requests: nothing to audit
        elif ptype not in (FXP_NAME, FXP_ATTRS, FXP_EXTENDED_REPLY, FXP_DATA, FXP_HANDLE):
            self.malformed(f"unexpected response type {ptype}")

    def _status(self, req: tuple[Any, ...], code: int, msg: str | None) -> None:
        kind = req[0]
        if kind == FXP_READ:
            f = self._files.get(req[1])
            if f is not None:
                if code == FX_EOF and req[2] == f.read_next:
                    f.read_eof = True
                elif code != FX_EOF:
                    f.read_seq = False
        elif kind == FXP_WRITE:
            f = self._files.get(req[1])
            if f is not None and code != FX_OK:
                f.write_failed = True
        elif kind == FXP_CLOSE:
            f = self._files.pop(req[1], None)
            if f is not None:
                self._close_event(f, _STATUS_NAMES.get(code, str(code)))
        elif kind == FXP_OPEN:
            self._event("sftp.open", code, msg, path=req[1], flags=flag_names(req[2]))
        elif kind == FXP_REMOVE:
            self._event("sftp.remove", code, msg, path=req[1])
        elif kind == FXP_RMDIR:
            self._event("sftp.rmdir", code, msg, path=req[1])
        elif kind == FXP_MKDIR:
            self._event("sftp.mkdir", code, msg, path=req[1], attrs=req[2])
        elif kind == FXP_SETSTAT:
            self._event("sftp.setstat", code, msg, path=req[1], attrs=req[2])
        elif kind == FXP_RENAME:
            self._event("sftp.rename", code, msg, path=req[1], new_path=req[2])
        elif kind == FXP_SYMLINK:
            self._event("sftp.symlink", code, msg, link_target=req[1], link_path=req[2])
        elif isinstance(kind, str):
            self._event(kind, code, msg, path=req[1], new_path=req[2])

    def data_start(self, req_id: int, length: int) -> Any:
        """Account a DATA response; returns the hash its data goes into (None: not sequential)."""
        req = self._pending.pop(req_id, None)
        if req is None or req[0] != FXP_READ:
            return None
        f = self._files.get(req[1])
        if f is None:
            return None
        f.bytes_read += length
        self.stats["bytes_read"] += length
        if f.read_seq and req[2] == f.read_next and not f.read_eof:
            f.read_next += length
            return f.read_hash
        f.read_seq = False
        return None


class _Sink:
    """One direction: decodes its packets and hashes its bulk data (the directions interleave)."""

    __slots__ = ("_a", "_hash")

    def __init__(self, audit: SftpAudit) -> None:
        self._a = audit
        self._hash: Any = None

    def data(self, chunk: memoryview) -> None:
        if self._hash is not None:
            self._hash.update(chunk)

    def data_end(self) -> None:
        self._hash = None

    def framing_error(self, reason: str) -> None:
        self._a.malformed(reason)

    def framing_lost(self, reason: str) -> None:
        self._a.malformed(f"framing lost: {reason}")


class _RequestSink(_Sink):
    __slots__ = ()

    def packet(self, ptype: int, body: bytes) -> None:
        try:
            self._a.request(ptype, body)
        except (ValueError, AsyncsshError) as exc:  # PacketDecodeError, SFTPBadMessage
            self._a.malformed(f"request type {ptype}: {exc}")

    def data_start(self, ptype: int, req_id: int, handle: bytes, offset: int, length: int) -> None:
        self._hash = self._a.write_start(req_id, handle, offset, length)


class _ResponseSink(_Sink):
    __slots__ = ()

    def packet(self, ptype: int, body: bytes) -> None:
        try:
            self._a.response(ptype, body)
        except (ValueError, AsyncsshError) as exc:
            self._a.malformed(f"response type {ptype}: {exc}")

    def data_start(self, ptype: int, req_id: int, handle: bytes, offset: int, length: int) -> None:
        self._hash = self._a.data_start(req_id, length)
