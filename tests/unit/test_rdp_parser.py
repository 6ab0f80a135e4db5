"""The RDP negotiation parser: real client/server PDUs, every malformation, and random bytes."""

from __future__ import annotations

import random

import pytest

from broker.domain import rdp

# A Connection Request as mstsc/xfreerdp send it: cookie, then RDP_NEG_REQ (SSL|HYBRID)
MSTSC_CR = bytes.fromhex(
    "0300002b26e00000000000" + b"Cookie: mstshash=alice\r\n".hex() + "0100080003000000")
# A Connection Confirm selecting HYBRID (NLA), with the negotiation-flags byte set
SERVER_CC = bytes.fromhex("030000130ed000001234000201080002000000")


def test_real_client_request() -> None:
    pkt = rdp.first_packet(MSTSC_CR + b"trailing")
    assert pkt == MSTSC_CR
    req = rdp.parse_request(MSTSC_CR)
    assert req == rdp.ConnectionRequest("alice", False, 0x03)
    assert req.requested_names == ["ssl", "hybrid"]


def test_real_server_confirm() -> None:
    conf = rdp.parse_confirm(SERVER_CC)
    assert conf == rdp.ConnectionConfirm(0x02)
    assert conf.selected_name == "hybrid"


@pytest.mark.parametrize(("cookie", "requested"), [
    ("bob", 0x0B), (None, 0x01), ("x", None), (None, None), ("DOMAIN\\user", 0x08)])
def test_builders_round_trip(cookie: str | None, requested: int | None) -> None:
    pkt = rdp.connection_request(cookie, requested)
    assert rdp.first_packet(pkt) == pkt
    assert rdp.parse_request(pkt) == rdp.ConnectionRequest(cookie, False, requested)


def test_routing_token_is_not_a_user_name() -> None:
    tpdu_body = b"Cookie: msts=3640205228.15629.0000\r\n"
    tpdu = bytes([6 + len(tpdu_body), 0xE0, 0, 0, 0, 0, 0]) + tpdu_body
    pkt = bytes([3, 0, 0, 4 + len(tpdu)]) + tpdu
    assert rdp.parse_request(pkt) == rdp.ConnectionRequest(None, True, None)


def test_confirm_variants() -> None:
    assert rdp.parse_confirm(rdp.connection_confirm(None)) == rdp.ConnectionConfirm(None)
    assert rdp.parse_confirm(rdp.connection_confirm(None)).selected_name == "rdp"
    fail = rdp.parse_confirm(rdp.connection_confirm(None, failure=5))
    assert fail == rdp.ConnectionConfirm(None, failure=5)
    assert fail.selected_name == "failure:hybrid_required_by_server"
    assert rdp.parse_confirm(rdp.connection_confirm(0x40)).selected_name == "0x40"


def test_cookie_is_cut_and_made_printable() -> None:
    req = rdp.parse_request(rdp.connection_request("a\x1b[31m" + "x" * 200, 1))
    assert isinstance(req, rdp.ConnectionRequest)
    assert req.cookie is not None
    assert "\x1b" not in req.cookie
    assert len(req.cookie) == rdp.MAX_COOKIE


@pytest.mark.parametrize(("data", "reason"), [
    (b"GET / HTTP/1.1\r\n", "not TPKT (first byte 0x47)"),
    (b"\x03\x01\x00\x20", "reserved byte set"),
    (b"\x03\x00\x00\x05", "too short"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not TPKT"),
])
def test_not_tpkt(data: bytes, reason: str) -> None:
    got = rdp.first_packet(data)
    assert isinstance(got, rdp.Malformed)
    assert reason in got.reason


def test_incomplete_packets_need_more() -> None:
    for n in range(len(MSTSC_CR)):
        assert isinstance(rdp.first_packet(MSTSC_CR[:n]), rdp.NeedMore)


@pytest.mark.parametrize("mutate", [
    lambda p: p[:4] + bytes([p[4] + 1]) + p[5:],  # wrong length indicator
    lambda p: p[:5] + b"\xd0" + p[6:],  # a confirm where a request belongs
    lambda p: p.replace(b"\r\n", b"\r\r"),  # cookie without CR LF
    lambda p: p[:-8] + b"\x09" + p[-7:],  # not an RDP_NEG_REQ
    lambda p: p[:-6] + b"\x09\x00" + p[-4:],  # RDP_NEG_REQ length != 8
    lambda p: p[:-3],  # truncated RDP_NEG_REQ (lengths fixed below)
])
def test_malformed_requests(mutate: object) -> None:
    pkt = bytearray(mutate(MSTSC_CR))  # type: ignore[operator]
    if len(pkt) != len(MSTSC_CR) and pkt[4] == MSTSC_CR[4]:
        pkt[3] = len(pkt)
        pkt[4] = len(pkt) - 5
    assert isinstance(rdp.parse_request(bytes(pkt)), rdp.Malformed)


def test_malformed_confirms() -> None:
    assert isinstance(rdp.parse_confirm(MSTSC_CR), rdp.Malformed)  # a request, not a confirm
    bad = bytearray(SERVER_CC)
    bad[11] = 0x07
    assert isinstance(rdp.parse_confirm(bytes(bad)), rdp.Malformed)
    assert isinstance(rdp.parse_confirm(b"\x03\x00\x00\x05\x00"), rdp.Malformed)


def test_random_bytes_never_raise() -> None:
    rnd = random.Random(4711)  # noqa: S311 - fuzzing, not cryptography
    seeds = [MSTSC_CR, SERVER_CC, rdp.connection_request("u", 3), b""]
    for _ in range(20_000):
        base = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(0, 4)):
            op = rnd.randint(0, 2)
            if op == 0 and base:
                base[rnd.randrange(len(base))] = rnd.randrange(256)
            elif op == 1:
                base[rnd.randint(0, len(base)):rnd.randint(0, len(base))] = b""
            else:
                base.insert(rnd.randint(0, len(base)), rnd.randrange(256))
        data = bytes(base) if rnd.random() < 0.9 else rnd.randbytes(rnd.randint(0, 80))
        got = rdp.first_packet(data)
        assert isinstance(got, bytes | rdp.NeedMore | rdp.Malformed)
        for parse in (rdp.parse_request, rdp.parse_confirm):
            assert isinstance(parse(data), rdp.ConnectionRequest | rdp.ConnectionConfirm
                              | rdp.Malformed)
