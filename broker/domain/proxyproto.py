"""The PROXY protocol (HAProxy's, v1 text and v2 binary), parsed without I/O.

A load balancer in TCP mode (HAProxy, an AWS NLB) puts one header before the client's bytes to
say whom it relays; without it every client has the balancer's address. ``parse`` looks at the
bytes received so far and says: the header is not complete yet (``NeedMore``: every byte seen so
far belongs to it, so the caller may consume them all), it is complete (``Header``: its length,
to consume exactly that and leave the client's own bytes), or it is not a valid header
(``ProxyError``). Only ever applied to connections from trusted balancers.

Specification: https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # bytes, CRLF included (spec 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/protocol, length
V2_MAX = 4096  # bytes: TLVs beyond this are refused (a balancer sends a few dozen)
MAX_HEADER = V2_MAX

Address = tuple[str, int]


@dataclass(frozen=True)
class NeedMore:
    """Incomplete: all bytes seen so far are header bytes."""


@dataclass(frozen=True)
class Header:
    """A complete header of ``length`` bytes. ``local``: the balancer speaks for itself (a
    health check, v2 LOCAL) or does not know the client (v1 UNKNOWN, v2 UNSPEC/UNIX): use the
    connection's own address. Otherwise ``source`` is the client, ``dest`` the address it
    connected to."""

    length: int
    version: int
    local: bool
    source: Address | None = None
    dest: Address | None = None


@dataclass(frozen=True)
class ProxyError:
    reason: str


Result = NeedMore | Header | ProxyError


def parse(data: bytes) -> Result:
    """The header at the start of ``data`` (the bytes received so far)."""
    if not data:
        return NeedMore()
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    return ProxyError("no PROXY protocol header")


def _parse_v1(data: bytes) -> Result:
    head = data[:len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        return ProxyError("bad PROXY v1 signature")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            return ProxyError("PROXY v1 line too long or not ended by CRLF")
        return NeedMore()
    line = data[:end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return ProxyError("PROXY v1 line is not ASCII")
    fields = text.split(" ")
    length = end + 2
    if len(fields) >= 2 and fields[1] == "UNKNOWN":  # the rest of the line is ignored
        return Header(length, 1, local=True)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        return ProxyError("malformed PROXY v1 line")
    family = 4 if fields[1] == "TCP4" else 6
    try:
        src = _v1_addr(fields[2], fields[4], family)
        dst = _v1_addr(fields[3], fields[5], family)
    except ValueError as exc:
        return ProxyError(f"malformed PROXY v1 address: {exc}")
    return Header(length, 1, local=False, source=src, dest=dst)


def _v1_addr(host: str, port: str, family: int) -> Address:
    ip = ipaddress.ip_address(host)
    if ip.version != family:
        raise ValueError(f"{host} is not IPv{family}")
    if not port.isdigit() or (len(port) > 1 and port[0] == "0") or int(port) > 65535:
        raise ValueError(f"bad port {port!r}")
    return _plain(ip), int(port)


def _plain(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An IPv4-mapped IPv6 address (a dual-stack balancer) as the IPv4 one it is, so a client
    has one address for per-source limits whichever way it came."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _parse_v2(data: bytes) -> Result:
    sig = data[:len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(sig):
        return ProxyError("bad PROXY v2 signature")
    if len(data) < V2_FIXED:
        return NeedMore()
    ver_cmd, fam, length = struct.unpack_from("!BBH", data, 12)
    if ver_cmd >> 4 != 2:
        return ProxyError(f"unsupported PROXY version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        return ProxyError(f"unknown PROXY v2 command {command}")
    total = V2_FIXED + length
    if total > V2_MAX:
        return ProxyError(f"PROXY v2 header of {total} bytes is over {V2_MAX}")
    if len(data) < total:
        return NeedMore()
    if command == 0:  # LOCAL: the balancer's own connection (health check); body ignored
        return Header(total, 2, local=True)
    family, proto = fam >> 4, fam & 0x0F
    body = data[V2_FIXED:total]
    if family == 1 and proto in (1, 2):  # AF_INET, STREAM/DGRAM
        if length < 12:
            return ProxyError("PROXY v2 IPv4 address block too short")
        s: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(body[0:4])
        d: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(body[4:8])
        sp, dp = struct.unpack_from("!HH", body, 8)
    elif family == 2 and proto in (1, 2):  # AF_INET6
        if length < 36:
            return ProxyError("PROXY v2 IPv6 address block too short")
        s, d = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sp, dp = struct.unpack_from("!HH", body, 32)
    elif family in (0, 3) or proto == 0:  # UNSPEC, UNIX: no usable address
        return Header(total, 2, local=True)
    else:
        return ProxyError(f"unknown PROXY v2 family/protocol 0x{fam:02x}")
    # TLVs (after the addresses) carry nothing the broker uses and are skipped
    return Header(total, 2, local=False, source=(_plain(s), sp), dest=(_plain(d), dp))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=16)
def networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    """``[ssh]``/``[web] trusted_proxies`` (validated CIDRs), parsed once per setting."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_trusted(host: str, nets: Sequence[Network]) -> bool:
    ip = _address(host)
    return ip is not None and any(ip in n for n in nets)


def forwarded_client(peer: str, forwarded_for: Sequence[str],
                     nets: Sequence[Network]) -> str:
    """The client's address for a request from ``peer`` with these X-Forwarded-For values.

    Only a trusted proxy's header is believed, and only as far as trusted proxies wrote it:
    walking from the right, the first entry that is not a trusted proxy is the client (what a
    client put in the header itself lies to the left of it). An entry that is not an address
    stops the walk at the last trusted hop; if every entry is trusted, the left-most is it."""
    if not nets or not is_trusted(peer, nets):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    client = peer
    for hop in reversed(hops):
        ip = _address(hop)
        if ip is None:
            return client
        client = _plain(ip)
        if not any(ip in n for n in nets):
            return client
    return client
