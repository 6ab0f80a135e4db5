"""The PROXY protocol parser on the specification's examples and on what must be refused."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from broker.config import load_config
from broker.domain.proxyproto import (
    V2_MAX,
    V2_SIGNATURE,
    Header,
    NeedMore,
    ProxyError,
    forwarded_client,
    networks,
    parse,
)
from broker.errors import ConfigError

SSH = b"SSH-2.0-OpenSSH_9.2\r\n"


def v2(command: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, fam, len(body)) + body


def v2_inet(src: str, sport: int, dst: str, dport: int, tlvs: bytes = b"") -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(1, 0x11, body + tlvs)


def test_v1_tcp4_from_the_spec() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert parse(line + SSH) == Header(len(line), 1, local=False,
                                       source=("192.168.0.1", 56324), dest=("192.168.0.11", 443))


def test_v1_tcp6_and_mapped_ipv4() -> None:
    line = b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 22\r\n"
    got = parse(line)
    assert isinstance(got, Header) and got.source == ("2001:db8::1", 1234)
    mapped = parse(b"PROXY TCP6 ::ffff:10.0.0.7 ::ffff:10.0.0.1 1 22\r\n")
    assert isinstance(mapped, Header) and mapped.source == ("10.0.0.7", 1)


def test_v1_unknown_is_local_and_rest_of_line_ignored() -> None:
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        assert parse(line + SSH) == Header(len(line), 1, local=True)


def test_v1_every_prefix_needs_more() -> None:
    line = b"PROXY TCP4 10.1.2.3 10.1.2.4 40000 22\r\n"
    for n in range(len(line)):
        assert parse(line[:n]) == NeedMore(), n
    assert isinstance(parse(line), Header)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\n",  # LF alone
    b"PROXY TCP5 10.0.0.1 10.0.0.2 1 2\r\n",
    b"PROXY TCP4 10.0.0.1 10.0.0.2 1\r\n",
    b"PROXY TCP4 10.0.0.1  10.0.0.2 1 2\r\n",  # two spaces
    b"PROXY TCP4 2001:db8::1 10.0.0.2 1 2\r\n",  # family mismatch
    b"PROXY TCP4 10.0.0.1 10.0.0.2 65536 2\r\n",
    b"PROXY TCP4 10.0.0.1 10.0.0.2 01 2\r\n",
    b"PROXY TCP4 10.0.0.999 10.0.0.2 1 2\r\n",
    b"PROXY TCP4 10.0.0.1 10.0.0.2 1 \xff\r\n",
    b"PROXX TCP4 10.0.0.1 10.0.0.2 1 2\r\n",
    b"proxy TCP4 10.0.0.1 10.0.0.2 1 2\r\n",
])
def test_v1_malformed(line: bytes) -> None:
    assert isinstance(parse(line), ProxyError)


def test_v1_oversized_line_refused() -> None:
    assert isinstance(parse(b"PROXY TCP4 " + b"1" * 200), ProxyError)
    assert parse(b"PROXY TCP4 " + b"1" * 90) == NeedMore()


def test_not_a_header_at_all() -> None:
    assert isinstance(parse(SSH), ProxyError)
    assert isinstance(parse(b"GET / HTTP/1.1\r\n"), ProxyError)
    assert parse(b"") == NeedMore()


def test_v2_ipv4_with_tlvs_skipped() -> None:
    tlvs = bytes([0x01]) + struct.pack("!H", 2) + b"h2" + bytes([0x04]) + struct.pack("!H", 0)
    hdr = v2_inet("127.0.0.7", 50000, "127.0.0.1", 2222, tlvs)
    assert parse(hdr + SSH) == Header(len(hdr), 2, local=False,
                                      source=("127.0.0.7", 50000), dest=("127.0.0.1", 2222))


def test_v2_ipv6() -> None:
    src, dst = socket.inet_pton(socket.AF_INET6, "2001:db8::7"), socket.inet_pton(
        socket.AF_INET6, "2001:db8::1")
    hdr = v2(1, 0x21, src + dst + struct.pack("!HH", 4000, 22))
    got = parse(hdr)
    assert isinstance(got, Header) and got.source == ("2001:db8::7", 4000)
    assert got.dest == ("2001:db8::1", 22) and got.length == 16 + 36


def test_v2_local_health_check_and_unspec() -> None:
    assert parse(v2(0, 0x00, b"")) == Header(16, 2, local=True)
    assert parse(v2(0, 0x11, b"\0" * 12)) == Header(28, 2, local=True)  # LOCAL, body ignored
    assert parse(v2(1, 0x00, b"")) == Header(16, 2, local=True)  # PROXY, UNSPEC
    assert parse(v2(1, 0x31, b"\0" * 216)) == Header(232, 2, local=True)  # AF_UNIX


def test_v2_truncated_needs_more_at_every_length() -> None:
    hdr = v2_inet("10.0.0.7", 1, "10.0.0.1", 22, b"\x05\x00\x03abc")
    for n in range(len(hdr)):
        assert parse(hdr[:n]) == NeedMore(), n


@pytest.mark.parametrize("data", [
    b"\r\n\r\n\x00\r\nQUIT\x0a" [:11] + b"X" + bytes(4),  # bad signature
    V2_SIGNATURE + bytes([0x11, 0x11, 0, 12]) + bytes(12),  # version 1 in a v2 header
    V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12),  # command 2
    V2_SIGNATURE + bytes([0x21, 0x11, 0, 4]) + bytes(4),  # IPv4 block too short
    V2_SIGNATURE + bytes([0x21, 0x21, 0, 12]) + bytes(12),  # IPv6 block too short
    V2_SIGNATURE + bytes([0x21, 0x41, 0, 0]),  # unknown family
])
def test_v2_malformed(data: bytes) -> None:
    assert isinstance(parse(data), ProxyError)


def test_v2_oversized_refused_before_it_is_read() -> None:
    hdr = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX)
    assert isinstance(parse(hdr), ProxyError)  # refused from the fixed part alone
    ok = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX - 16)
    assert parse(ok) == NeedMore()


def test_proxy_protocol_without_trusted_proxies_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "broker.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[ssh]\nproxy_protocol = true\n')
    with pytest.raises(ConfigError, match="needs trusted_proxies"):
        load_config(cfg)
    cfg.write_text(f'state_dir = "{tmp_path}"\n[ssh]\nproxy_protocol = true\n'
                   'trusted_proxies = ["10.0.0.0/33"]\n')
    with pytest.raises(ConfigError, match="not an IP network"):
        load_config(cfg)
    cfg.write_text(f'state_dir = "{tmp_path}"\n[web]\ntrusted_proxies = ["bad"]\n')
    with pytest.raises(ConfigError, match="not an IP network"):
        load_config(cfg)


NETS = networks(("127.0.0.5/32", "10.0.0.0/8", "2001:db8:f::/48"))


def test_forwarded_for_only_from_a_trusted_peer() -> None:
    assert forwarded_client("192.0.2.1", ["203.0.113.9"], NETS) == "192.0.2.1"
    assert forwarded_client("127.0.0.5", ["203.0.113.9"], ()) == "127.0.0.5"
    assert forwarded_client("127.0.0.5", [], NETS) == "127.0.0.5"


def test_forwarded_for_right_most_untrusted_entry() -> None:
    assert forwarded_client("127.0.0.5", ["6.6.6.6, 203.0.113.9"], NETS) == "203.0.113.9"
    assert forwarded_client("127.0.0.5", ["6.6.6.6", "203.0.113.9, 10.1.1.1"],
                            NETS) == "203.0.113.9"  # two header lines, one list
    assert forwarded_client("127.0.0.5", ["2001:db8::7, 2001:db8:f::1"], NETS) == "2001:db8::7"
    assert forwarded_client("127.0.0.5", ["::ffff:198.51.100.7"], NETS) == "198.51.100.7"
    # every entry trusted: the left-most; junk stops the walk at the last trusted hop
    assert forwarded_client("127.0.0.5", ["10.2.2.2, 10.1.1.1"], NETS) == "10.2.2.2"
    assert forwarded_client("127.0.0.5", ["6.6.6.6, unknown, 10.1.1.1"], NETS) == "10.1.1.1"
    assert forwarded_client("127.0.0.5", ["not-an-ip"], NETS) == "127.0.0.5"
