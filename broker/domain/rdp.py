"""RDP connection negotiation, read from the first packet each way (MS-RDPBCGR 2.2.1.1, 2.2.1.2).

A tunnel to an RDP port is audited with what the client announced (the ``mstshash`` cookie, the
RDP user name, and the security protocols it requested) and what the server chose. Pure and
total: any byte string gives a value (a request, a response or ``Malformed``), never an exception,
so a hostile or non-RDP peer cannot crash the relay. Hand-written because the two PDUs are a few
fixed fields and no maintained library parses just them (pyrdp and impacket are whole stacks).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

TPKT_VERSION = 3
TPKT_HEADER = 4
MAX_PACKET = 65535  # the TPKT length field is 16 bits
X224_CR = 0xE0  # Connection Request TPDU code (upper nibble; lower is the credit)
X224_CC = 0xD0  # Connection Confirm
NEG_REQ, NEG_RSP, NEG_FAILURE = 0x01, 0x02, 0x03
MAX_COOKIE = 128  # longer cookies are cut in the audit (the field is free text)

PROTOCOLS = {  # requestedProtocols / selectedProtocol flags
    0x01: "ssl", 0x02: "hybrid", 0x04: "rdstls", 0x08: "hybrid_ex", 0x10: "rdsaad",
}
FAILURES = {
    1: "ssl_required_by_server", 2: "ssl_not_allowed_by_server", 3: "ssl_cert_not_on_server",
    4: "inconsistent_flags", 5: "hybrid_required_by_server",
    6: "ssl_with_user_auth_required_by_server",
}


@dataclass(frozen=True, slots=True)
class Malformed:
    """Bytes that are not the expected RDP PDU; ``reason`` is for the audit log."""

    reason: str


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The first packet is not complete yet."""


@dataclass(frozen=True, slots=True)
class ConnectionRequest:
    """What the client announced: cookie (RDP user name) and requested protocols."""

    cookie: str | None  # the mstshash value, if the client sent one
    routing_token: bool  # a load-balancer token instead of a cookie
    requested: int | None  # None: no RDP_NEG_REQ, i.e. standard RDP security only

    @property
    def requested_names(self) -> list[str]:
        return protocol_names(self.requested)


@dataclass(frozen=True, slots=True)
class ConnectionConfirm:
    """What the server answered: the selected protocol, or a negotiation failure code."""

    selected: int | None  # None: no RDP_NEG_RSP (standard RDP security)
    failure: int | None = None

    @property
    def selected_name(self) -> str:
        if self.failure is not None:
            return "failure:" + FAILURES.get(self.failure, f"0x{self.failure:x}")
        return "+".join(protocol_names(self.selected))


def protocol_names(mask: int | None) -> list[str]:
    """Flag names of a protocol mask; 0 (or no negotiation) is standard RDP security, "rdp"."""
    if not mask:
        return ["rdp"]
    names = [name for bit, name in PROTOCOLS.items() if mask & bit]
    unknown = mask & ~sum(PROTOCOLS)
    if unknown:
        names.append(f"0x{unknown:x}")
    return names


def first_packet(buf: bytes) -> bytes | NeedMore | Malformed:
    """The first TPKT packet of ``buf``, if complete."""
    if len(buf) >= 1 and buf[0] != TPKT_VERSION:
        return Malformed(f"not TPKT (first byte 0x{buf[0]:02x})")
    if len(buf) >= 2 and buf[1] != 0:
        return Malformed("not TPKT (reserved byte set)")
    if len(buf) < TPKT_HEADER:
        return NeedMore()
    length = struct.unpack_from(">H", buf, 2)[0]
    if length < TPKT_HEADER + 7:  # LI, code, dst-ref, src-ref, class
        return Malformed(f"TPKT length {length} too short for an X.224 TPDU")
    if len(buf) < length:
        return NeedMore()
    return buf[:length]


def _tpdu(pkt: bytes, code: int, what: str) -> bytes | Malformed:
    """The X.224 variable part of a complete TPKT packet carrying TPDU ``code``."""
    if len(pkt) < TPKT_HEADER + 7:
        return Malformed(f"{what}: packet too short")
    li = pkt[TPKT_HEADER]
    if li < 6 or TPKT_HEADER + 1 + li != len(pkt):
        return Malformed(f"{what}: X.224 length indicator {li} does not match the packet")
    if pkt[TPKT_HEADER + 1] & 0xF0 != code:
        return Malformed(f"{what}: X.224 TPDU code 0x{pkt[TPKT_HEADER + 1]:02x}")
    return pkt[TPKT_HEADER + 7:]


def _printable(raw: bytes) -> str:
    text = raw[:MAX_COOKIE].decode("latin-1")
    return "".join(c if c.isprintable() else "?" for c in text)


def parse_request(pkt: bytes) -> ConnectionRequest | Malformed:
    """Parse the client's X.224 Connection Request (cookie or routing token, then RDP_NEG_REQ)."""
    rest = _tpdu(pkt, X224_CR, "connection request")
    if isinstance(rest, Malformed):
        return rest
    cookie: str | None = None
    token = False
    if rest.startswith(b"Cookie: "):
        end = rest.find(b"\r\n")
        if end < 0:
            return Malformed("connection request: cookie without CR LF")
        line = rest[len(b"Cookie: "):end]
        if line.startswith(b"mstshash="):
            cookie = _printable(line[len(b"mstshash="):])
        else:
            token = True
        rest = rest[end + 2:]
    requested: int | None = None
    if rest:
        if len(rest) < 8 or rest[0] != NEG_REQ:
            return Malformed("connection request: trailing bytes are not an RDP_NEG_REQ")
        if struct.unpack_from("<H", rest, 2)[0] != 8:
            return Malformed("connection request: RDP_NEG_REQ length is not 8")
        requested = struct.unpack_from("<I", rest, 4)[0]
        # RDP_NEG_CORRELATION_INFO (36 bytes) may follow; it is not audited
    return ConnectionRequest(cookie, token, requested)


def parse_confirm(pkt: bytes) -> ConnectionConfirm | Malformed:
    """Parse the server's X.224 Connection Confirm (RDP_NEG_RSP or RDP_NEG_FAILURE)."""
    rest = _tpdu(pkt, X224_CC, "connection confirm")
    if isinstance(rest, Malformed):
        return rest
    if not rest:
        return ConnectionConfirm(None)
    if len(rest) < 8 or rest[0] not in (NEG_RSP, NEG_FAILURE):
        return Malformed("connection confirm: trailing bytes are not RDP_NEG_RSP/FAILURE")
    if struct.unpack_from("<H", rest, 2)[0] != 8:
        return Malformed("connection confirm: negotiation length is not 8")
    value = struct.unpack_from("<I", rest, 4)[0]
    if rest[0] == NEG_FAILURE:
        return ConnectionConfirm(None, failure=value)
    return ConnectionConfirm(value)


def connection_request(cookie: str | None, requested: int | None) -> bytes:
    """Build a Connection Request (tests, and probes of an RDP port)."""
    body = b""
    if cookie is not None:
        body += b"Cookie: mstshash=" + cookie.encode() + b"\r\n"
    if requested is not None:
        body += struct.pack("<BBHI", NEG_REQ, 0, 8, requested)
    tpdu = bytes([6 + len(body), X224_CR, 0, 0, 0, 0, 0]) + body
    return struct.pack(">BBH", TPKT_VERSION, 0, TPKT_HEADER + len(tpdu)) + tpdu


def connection_confirm(selected: int | None, *, failure: int | None = None) -> bytes:
    """Build a Connection Confirm (tests)."""
    body = b""
    if failure is not None:
        body = struct.pack("<BBHI", NEG_FAILURE, 0, 8, failure)
    elif selected is not None:
        body = struct.pack("<BBHI", NEG_RSP, 0, 8, selected)
    tpdu = bytes([6 + len(body), X224_CC, 0, 0, 0, 0, 0]) + body
    return struct.pack(">BBH", TPKT_VERSION, 0, TPKT_HEADER + len(tpdu)) + tpdu
