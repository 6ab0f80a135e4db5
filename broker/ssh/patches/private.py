"""Every private asyncssh name the patches touch, in one table, and the only code that changes them.

Each row is (owner, name, kind, why). ``owner`` is a module (``asyncssh.encryption``) or a class
in one (``asyncssh.connection:SSHConnection``). ``kind`` says how the patches use the name and how
``missing()`` checks that the installed asyncssh still has it:

* ``read``: read or called (a class, function, method or constant): the attribute must exist.
* ``replaced``: replaced by ``install()`` (through ``replace``/``replace_item``, which keep the
  original for ``restore``): the attribute must exist.
* ``wrapped``: replaced on one connection object at a time (not on the class): must exist.
* ``instance``: state asyncssh keeps on each object (read, and for some written, by the data
  path): asyncssh's own code for that class must assign it to ``self`` (or declare it).
* ``param``: a keyword the patches pass to a constructor: the signature must have it.
* ``added``/``added-instance``: ours, set on asyncssh's classes or objects: asyncssh must not
  use the name itself.

A name the patches touch that is not here cannot be replaced (``replace`` refuses it), and
``tests/unit/test_asyncssh_patches.py`` checks every row against the installed asyncssh.
"""

from __future__ import annotations

import dis
import importlib
import inspect
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["read", "replaced", "wrapped", "instance", "param", "added", "added-instance"]

CONN = "asyncssh.connection:SSHConnection"
SERVER_CONN = "asyncssh.connection:SSHServerConnection"
CHAN = "asyncssh.channel:SSHChannel"
GCM = "asyncssh.encryption:GCMEncryption"


@dataclass(frozen=True)
class Private:
    owner: str
    name: str
    kind: Kind
    why: str


def _rows(owner: str, kind: Kind, names: dict[str, str]) -> list[Private]:
    return [Private(owner, name, kind, why) for name, why in names.items()]


TABLE: tuple[Private, ...] = (
    # -- modules: classes, functions and constants asyncssh does not export --------------------
    *_rows("asyncssh.connection", "read", {
        "SSHConnection": "base class of both connection kinds: its methods are replaced",
    }),
    *_rows("asyncssh.channel", "read", {
        "SSHChannel": "base class of every channel: write and send-buffer flush replaced",
    }),
    *_rows("asyncssh.encryption", "read", {
        "GCMEncryption": "KeyedGCMEncryption subclasses it; AEAD check before dropping IGNORE",
        "ChachaEncryption": "AEAD check before dropping MSG_IGNORE",
    }),
    *_rows("asyncssh.encryption", "replaced", {
        "_enc_params": "cipher registry: its two AES-GCM entries point to KeyedGCMEncryption",
    }),
    *_rows("asyncssh.logging", "read", {
        "SSHLogger": "asyncssh's logger adapter: log() and the packet debug level",
    }),
    *_rows("asyncssh.packet", "read", {
        "SSHPacketLogger": "packet-log hooks (a base class of SSHConnection) replaced",
    }),
    *_rows("asyncssh.saslprep", "read", {
        "saslprep": "RFC 4013 preparation: the fast path hands non-ASCII names to it",
    }),
    *_rows("asyncssh.connection", "replaced", {
        "saslprep": "the name the connection module imported: printable-ASCII fast path",
    }),
    *_rows("asyncssh.auth", "replaced", {
        "saslprep": "the name the auth module imported: printable-ASCII fast path",
    }),
    *_rows("asyncssh.constants", "read", {
        "MSG_IGNORE": "the packet type dropped under AEAD ciphers",
        "MSG_CHANNEL_DATA": "framed and opened by the one-pass data path",
        "MSG_CHANNEL_EXTENDED_DATA": "framed by the one-pass data path (stderr)",
    }),
    *_rows("asyncssh.constants", "read", {
        "MSG_SERVICE_REQUEST": "the packet type whose handler accepts a repeated ssh-userauth",
        "MSG_SERVICE_ACCEPT": "the answer to a repeated ssh-userauth request",
        "MSG_USERAUTH_REQUEST": "the packet type whose raw user name is kept (usernames)",
    }),
    *_rows("asyncssh.packet", "read", {
        "SSHPacket": "a service or userauth request handed on to asyncssh's handler unread",
        "String": "encodes the service name of a SERVICE_ACCEPT",
        "PacketDecodeError": "a userauth request too short to hold a name: asyncssh reports it",
    }),
    *_rows("asyncssh.public_key", "read", {
        "decode_ssh_public_key": "fingerprint of the key a public-key signature was made with",
    }),
    # -- SSHConnection: methods ----------------------------------------------------------------
    *_rows(CONN, "replaced", {
        "send_packet": "drops MSG_IGNORE under AEAD ciphers",
        "_send": "transport write: queued while corked()",
        "data_received": "reads: handshake pump, one-pass data path, TCP_QUICKACK",
    }),
    *_rows(CONN, "read", {
        "_recv_pkthdr": "the receive handler between packets: a read starts on a boundary",
        "_reset_keepalive_timer": "called per read, as asyncssh's data_received does",
        "_recv_data": "asyncssh's parser, handed what the one-pass path does not take",
        "_send_disconnect": "a DisconnectError from a channel, handled as asyncssh's parser does",
        "_force_close": "the same, after the disconnect is sent",
        "internal_error": "any other error from a channel, as asyncssh's parser handles it",
    }),
    *_rows(CONN, "replaced", {
        "_packet_handlers": "dispatch table: MSG_SERVICE_REQUEST accepts a repeated "
                            "ssh-userauth during authentication (paramiko sends one per method); "
                            "MSG_USERAUTH_REQUEST keeps the raw user name before SASLprep",
    }),
    *_rows(CONN, "read", {
        "is_server": "a repeated service request is accepted by servers only",
        "logger": "the connection's logger (debug line for a repeated service request)",
    }),
    *_rows(CONN, "instance", {
        "_auth_in_progress": "authentication under way: a repeated ssh-userauth is accepted",
    }),
    *_rows(CONN, "added", {
        "_send_parts": "ours: sends packet headers and ciphertexts without joining them",
    }),
    # -- SSHConnection: per-connection state ---------------------------------------------------
    *_rows(CONN, "instance", {
        "_transport": "the connection's transport: writes, ACKs, pause/resume, closed check",
        "_loop": "the event loop whose handshake pump a read is queued on",
        "_auth_complete": "authentication done: reads stop queueing, data path may run",
        "_kex_complete": "no key exchange in progress: data path may run",
        "_send_encryption": "the outgoing cipher: AEAD check, KeyedGCMEncryption check",
        "_recv_encryption": "the incoming cipher: KeyedGCMEncryption check",
        "_compressor": "compression off: data path may run",
        "_decompressor": "compression off: data path may run",
        "_rekey_bytes_sent": "bytes sent since the last key exchange (updated by the data path)",
        "_rekey_bytes": "the rekey limit in bytes",
        "_rekey_seconds": "the rekey limit in seconds",
        "_rekey_time": "when the time-based rekey is due",
        "_send_enchdrlen": "bytes of the header counted into the padding (RFC 4253 6)",
        "_send_blocksize": "cipher block size the padding rounds to",
        "_send_seq": "outgoing sequence number (advanced by the data path)",
        "_recv_seq": "incoming sequence number (advanced by the data path)",
        "_channels": "channel number -> channel, for received CHANNEL_DATA",
        "_auth_final": "set on the first channel data, as asyncssh's parser does",
        "_max_recv_pktlen": "largest packet asyncssh accepts",
        "_recv_handler": "asyncssh's receive state (compared with _recv_pkthdr)",
        "_inpbuf": "asyncssh's input buffer: the incomplete packet left for the next read",
    }),
    *_rows(CONN, "added-instance", {
        "_bb_sock": "ours: the socket looked up once for TCP_QUICKACK",
        "_bb_raw_username": "ours: the user name bytes of the last USERAUTH_REQUEST",
        "_bb_queued": "ours: handshake bytes queued in the pump",
        "_bb_first": "ours: the connection's age in the pump",
        "_bb_paused": "ours: reading paused by the pump",
        "_bb_total": "ours: pre-authentication bytes seen",
    }),
    # -- SSHServerConnection --------------------------------------------------------------------
    *_rows(SERVER_CONN, "param", {
        "wait": "the ProxyJump inner server is built as asyncssh.run_server builds it",
    }),
    *_rows(SERVER_CONN, "wrapped", {
        "validate_public_key": "(username, key_data, msg, signature): a key login that proved "
                               "possession continues with the code only",
    }),
    *_rows("asyncssh.connection:SSHServerConnectionOptions", "read", {
        "construct": "options built off the event loop, as asyncssh.run_server does",
    }),
    *_rows("asyncssh.connection:SSHServerConnectionOptions", "instance", {
        "waiter": "the future the inner server's handshake completes, as in run_server",
    }),
    # -- SSHChannel -----------------------------------------------------------------------------
    *_rows(CHAN, "replaced", {
        "write": "sends straight from the caller's bytes while the window allows",
        "_flush_send_buf": "sends buffered data through the one-pass path",
    }),
    *_rows(CHAN, "read", {
        "_pause_resume_writing": "flow control after a direct write, as asyncssh's write does",
        "_accept_data": "hands received data to the channel's session",
    }),
    *_rows(CHAN, "instance", {
        "_conn": "the channel's connection",
        "_send_chan": "the peer's channel number",
        "_send_window": "the peer's window (reduced by the data path)",
        "_send_pktsize": "the peer's maximum packet size",
        "_send_buf": "data waiting for window (list of (bytearray, datatype))",
        "_send_buf_len": "bytes in _send_buf",
        "_encoding": "text channels take asyncssh's path",
        "_send_state": "only open channels take the data path",
        "_write_datatypes": "extended data types the channel may send",
        "_recv_state": "only open channels are delivered data directly",
        "_recv_window": "our window: data beyond it goes to asyncssh (which refuses it)",
    }),
    # -- logging and ciphers --------------------------------------------------------------------
    *_rows("asyncssh.logging:SSHLogger", "read", {
        "_debug_level": "packet logging is on at level 3: then the patched paths step aside",
    }),
    *_rows("asyncssh.logging:SSHLogger", "replaced", {
        "log": "checks the level before formatting its arguments",
    }),
    *_rows("asyncssh.packet:SSHPacketLogger", "replaced", {
        "log_sent_packet": "returns at once unless packet debug logging is on",
        "log_received_packet": "returns at once unless packet debug logging is on",
    }),
    *_rows("asyncssh.packet:SSHPacketLogger", "read", {
        "_log_packet": "asyncssh's packet logging, called when it is on",
    }),
    *_rows(GCM, "read", {
        "new": "the constructor asyncssh calls, overridden by KeyedGCMEncryption",
        "encrypt_packet": "overridden with the same signature",
        "decrypt_packet": "overridden with the same signature",
    }),
)


# -- checks ------------------------------------------------------------------------------------

def resolve(owner: str) -> Any:
    """The module or class an owner string names (ImportError / AttributeError if gone)."""
    module, _, qualname = owner.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _functions(cls: type) -> Iterator[types.FunctionType]:
    for value in vars(cls).values():
        for f in (value, getattr(value, "__func__", None), getattr(value, "fget", None),
                  getattr(value, "fset", None)):
            if isinstance(f, types.FunctionType) and f.__module__.startswith("asyncssh"):
                yield f


_assigned: dict[type, frozenset[str]] = {}


def assigned(cls: type) -> frozenset[str]:
    """Attribute names asyncssh's own code for ``cls`` (and its asyncssh bases) assigns to
    ``self`` or declares: the per-object state an instance of it carries."""
    if cls in _assigned:
        return _assigned[cls]
    names: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("asyncssh"):
            continue
        names.update(vars(klass).get("__annotations__", {}))
        for f in _functions(klass):
            for code in _codes(f.__code__):
                previous: dis.Instruction | None = None
                for ins in dis.get_instructions(code):
                    if (ins.opname == "STORE_ATTR" and previous is not None
                            and previous.opname.startswith("LOAD_FAST")
                            and (previous.argval == "self" or (
                                isinstance(previous.argval, tuple)
                                and previous.argval[-1] == "self"))):
                        names.add(ins.argval)
                    previous = ins
    _assigned[cls] = frozenset(names)
    return _assigned[cls]


def _problem(row: Private) -> str | None:
    name = row.name
    try:
        owner = resolve(row.owner)
    except (ImportError, AttributeError):
        return f"{row.owner} is gone (for .{name})"
    if row.kind in ("read", "replaced", "wrapped"):
        return None if hasattr(owner, name) else f"{row.owner}.{name} is gone"
    if row.kind == "instance":
        return None if name in assigned(owner) else f"{row.owner} no longer sets .{name}"
    if row.kind == "param":
        try:
            params = inspect.signature(owner).parameters
        except (TypeError, ValueError):
            return f"{row.owner} has no signature"
        return None if name in params else f"{row.owner}() takes no {name}="
    if row.kind == "added":
        ours = (id(owner), name) in _saved
        return None if ours or not hasattr(owner, name) else f"asyncssh now has {row.owner}.{name}"
    return None if name not in assigned(owner) else f"asyncssh now sets {row.owner}.{name}"


def missing() -> list[str]:
    """What the installed asyncssh lacks (or now uses itself) of the table: empty if all is
    there. Never raises."""
    return [p for p in map(_problem, TABLE) if p is not None]


# -- changing them, and putting them back ------------------------------------------------------

_MISSING = object()
# (id(owner), name) -> (owner, name, the owner's own value before, or _MISSING)
_saved: dict[tuple[int, str], tuple[Any, str, Any]] = {}
# (id(mapping), key) -> (mapping, key, value before)
_saved_items: dict[tuple[int, object], tuple[dict[Any, Any], object, Any]] = {}


def _listed(owner: Any, name: str, kinds: tuple[Kind, ...]) -> None:
    label = owner.__name__ if isinstance(owner, types.ModuleType) else (
        f"{owner.__module__}:{owner.__qualname__}")
    if not any(r.owner == label and r.name == name and r.kind in kinds for r in TABLE):
        raise LookupError(f"{label}.{name} is not in broker.ssh.patches.private.TABLE")


def replace(owner: Any, name: str, value: object) -> None:
    """``owner.name = value`` for a ``replaced`` or ``added`` row, keeping the original."""
    _listed(owner, name, ("replaced", "added"))
    _saved.setdefault((id(owner), name), (owner, name, vars(owner).get(name, _MISSING)))
    setattr(owner, name, value)


def replace_item(owner: Any, name: str, key: object, value: object) -> None:
    """``owner.name[key] = value`` for a ``replaced`` mapping row, keeping the original."""
    _listed(owner, name, ("replaced",))
    mapping: dict[Any, Any] = getattr(owner, name)
    _saved_items.setdefault((id(mapping), key), (mapping, key, mapping[key]))
    mapping[key] = value


def restore() -> None:
    """Put back everything ``replace`` and ``replace_item`` changed."""
    for owner, name, value in _saved.values():
        if value is _MISSING:
            if name in vars(owner):
                delattr(owner, name)
        else:
            setattr(owner, name, value)
    for mapping, key, value in _saved_items.values():
        mapping[key] = value
    _saved.clear()
    _saved_items.clear()


def snapshot() -> dict[tuple[str, str], object]:
    """The current values of every ``replaced`` and ``added`` row (mappings copied): equal
    snapshots mean the patches changed nothing in between."""
    out: dict[tuple[str, str], object] = {}
    for row in TABLE:
        if row.kind in ("replaced", "added"):
            value = vars(resolve(row.owner)).get(row.name, _MISSING)
            out[(row.owner, row.name)] = dict(value) if isinstance(value, dict) else value
    return out
