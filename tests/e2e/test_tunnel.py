"""Tunnels with the real OpenSSH client (ssh -L, ssh -D): only granted instances on allowed
ports, everything else refused with a reason before anything is dialled; each tunnel is a
session with bytes each way, the RDP negotiation in its listing, ended by revoke or idleness."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.domain import rdp
from tests.conftest import Demo
from tests.e2e.test_tunnel_lab import (
    LabBroker,
    _Server,
    closed_by_peer,
    inventory,
    port_of,
    socks5_connect,
    stack,
    start_forwarder,
    start_lab_broker,
    tcp_server,
    wait_for,
)

pytestmark = pytest.mark.e2e


@dataclass
class Lab:
    broker: LabBroker
    rdp_srv: _Server  # answers an RDP connection request, then echoes (win01)
    echo_srv: _Server  # plain echo (web01 on an extra allowed port; win02 "RDP" port)
    ungranted_srv: _Server  # behind windb in the ungranted stack: must never be dialled
    tmp: Path


@pytest.fixture(scope="module")
def lab(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("tunnel")
    with tcp_server("rdp") as rdp_srv, tcp_server("echo") as echo_srv, \
            tcp_server("rdp") as ungranted:
        inv = inventory(demo, stack("stack-web",
                                    ("i-0win01", "win01", "windows", port_of(rdp_srv)),
                                    ("i-0win02", "win02", "windows", port_of(echo_srv)))
                        + stack("stack-db", ("i-0windb", "windb", "windows", port_of(ungranted))))
        broker = start_lab_broker(
            demo, tmp / "broker", inv,
            f"ports = {{ linux = [22, {port_of(echo_srv)}], windows = [3389] }}\n"
            'raw_ssh_targets = ["web02"]\n')
        try:
            yield Lab(broker, rdp_srv, echo_srv, ungranted, tmp)
        finally:
            broker.stop()


def _tunnels(demo: Demo, user: str) -> list[dict[str, Any]]:
    return [s for s in demo.sessions()
            if s["user"].startswith(user + "@") and s["kind"] in ("tunnel", "jump")]


def _ended(demo: Demo, user: str, n: int = 1) -> list[dict[str, Any]]:
    wait_for(lambda: len([s for s in _tunnels(demo, user) if s["ended_at"]]) >= n,
             f"{n} ended tunnel session(s) of {user}")
    return _tunnels(demo, user)


def _rdp_handshake(s: socket.socket, cookie: str) -> bytes:
    s.sendall(rdp.connection_request(cookie, 0x03))
    got = b""
    while len(got) < 4 or len(got) < int.from_bytes(got[2:4], "big"):
        chunk = s.recv(4096)
        assert chunk, "tunnel closed during the RDP negotiation"
        got += chunk
    return got


def _echo(s: socket.socket, payload: bytes) -> bytes:
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        assert chunk, "tunnel closed early"
        got += chunk
    return got


def test_rdp_tunnel_is_a_session_with_the_negotiation(demo: Demo, lab: Lab) -> None:
    user = demo.take_user()
    fw = start_forwarder(demo, lab.broker, user, lab.tmp, ["i-0win01:3389"])
    try:
        with socket.create_connection(("127.0.0.1", fw.locals[0]), timeout=20) as s:
            confirm = _rdp_handshake(s, "alice.rdp")
            assert rdp.parse_confirm(confirm) == rdp.ConnectionConfirm(0x02)
            payload = os.urandom(100_000)
            assert _echo(s, payload) == payload
    finally:
        fw.stop()
    [sess] = _ended(demo, user)
    cr = rdp.connection_request("alice.rdp", 0x03)
    assert sess["command"] == (f"forward i-0win01:3389 -> i-0win01 127.0.0.1:{port_of(lab.rdp_srv)}"
                               " rdp user=alice.rdp requested=ssl+hybrid selected=hybrid")
    assert sess["bytes_in"] == len(cr) + 100_000
    assert sess["bytes_out"] == len(confirm) + 100_000
    assert sess["grant_id"] == f"g-demo-{user}"
    assert sess["exit_status"] == "closed"
    [ev] = [e for e in demo.audit_lines()
            if e["event"] == "tunnel.rdp" and e.get("session_id") == sess["id"]]
    assert ev["rdp_user"] == "alice.rdp"
    assert ev["rdp_requested"] == ["ssl", "hybrid"]
    assert ev["rdp_selected"] == "hybrid"
    starts = [e for e in demo.audit_lines()
              if e["event"] == "session.start" and e.get("session_id") == sess["id"]]
    assert starts and starts[0]["kind"] == "tunnel"


def test_plain_forward_is_byte_identical_and_counted(demo: Demo, lab: Lab) -> None:
    user = demo.take_user()
    echo_port = port_of(lab.echo_srv)
    fw = start_forwarder(demo, lab.broker, user, lab.tmp, [f"web01:{echo_port}"])
    payload = os.urandom(4 * 1024 * 1024)
    try:
        with socket.create_connection(("127.0.0.1", fw.locals[0]), timeout=30) as s:
            assert _echo(s, payload) == payload
    finally:
        fw.stop()
    [sess] = _ended(demo, user)
    assert sess["bytes_in"] == sess["bytes_out"] == len(payload)
    assert sess["target"] == "i-0web01"
    assert sess["command"] == f"forward web01:{echo_port} -> i-0web01 127.0.0.1:{echo_port}"


REFUSALS = [  # (destination, the reason OpenSSH shows)
    ("db01:22", "no live grant covers this destination"),
    ("i-0windb:3389", "no live grant covers this destination"),
    ("nosuch-instance.invalid:3389", "no live grant covers this destination"),
    ("web01:8080", "port 8080 is not open for forwarding to web01"),
    ("win01:22", "port 22 is not open for forwarding to win01"),
    ("169.254.169.254:80", "link-local and metadata addresses are never forwarded"),
    ("[fe80::1]:3389", "link-local and metadata addresses are never forwarded"),
    ("127.0.0.1:3389", "the bastion itself is not a forwarding destination"),
    ("localhost:22", "the bastion itself is not a forwarding destination"),
]


def test_everything_else_is_refused_with_a_reason(demo: Demo, lab: Lab) -> None:
    user = demo.take_user()
    before = lab.ungranted_srv.connections
    fw = start_forwarder(demo, lab.broker, user, lab.tmp, [d for d, _ in REFUSALS])
    try:
        for lp in fw.locals:
            with socket.create_connection(("127.0.0.1", lp), timeout=20) as s:
                assert closed_by_peer(s), "a refused tunnel must be closed"
        wait_for(lambda: fw.text().count("open failed") >= len(REFUSALS), "all refusals logged")
        text = fw.text()
    finally:
        fw.stop()
    for dest, reason in REFUSALS:
        assert reason in text, f"{dest}: {reason!r} not in the client's log"
    assert lab.ungranted_srv.connections == before  # nothing was dialled for an ungranted host
    assert _tunnels(demo, user) == []
    denied = [e for e in demo.audit_lines()
              if e["event"] == "tunnel.denied" and e["user"].startswith(user + "@")]
    assert len(denied) == len(REFUSALS)
    assert any("i-0db01" in e["reason"] for e in denied)  # the audit names the real cause


def test_bastion_own_port_is_refused_even_by_instance_name(demo: Demo, lab: Lab) -> None:
    user = demo.take_user()
    fw = start_forwarder(demo, lab.broker, user, lab.tmp,
                         [f"127.0.0.1:{lab.broker.port}", f"localhost:{lab.broker.port}"])
    try:
        for lp in fw.locals:
            with socket.create_connection(("127.0.0.1", lp), timeout=20) as s:
                assert closed_by_peer(s)
        wait_for(lambda: fw.text().count("open failed") >= 2, "refusals logged")
        assert fw.text().count("the bastion itself is not a forwarding destination") == 2
    finally:
        fw.stop()


def test_remote_forwarding_is_refused(demo: Demo, lab: Lab) -> None:
    user = demo.take_user()
    r = subprocess.run(
        demo.ssh_args(user, "-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9",
                      port=lab.broker.port, known_hosts=lab.broker.known_hosts),
        capture_output=True, timeout=60, env=demo.env(user), stdin=subprocess.DEVNULL)
    assert r.returncode == 255
    assert b"remote port forwarding failed" in r.stderr
    assert any(e["event"] == "tunnel.denied" and e.get("kind") == "remote"
               and e["user"].startswith(user + "@") for e in demo.audit_lines())


def test_dynamic_forward_checks_every_connection(demo: Demo, lab: Lab) -> None:
    user = demo.take_user()
    fw = start_forwarder(demo, lab.broker, user, lab.tmp, ["socks"], dynamic=True)
    try:
        with socks5_connect(fw.locals[0], "win01", 3389) as s:
            reply = s.recv(10)
            assert reply[:2] == b"\x05\x00", reply
            assert rdp.parse_confirm(_rdp_handshake(s, "bob")) == rdp.ConnectionConfirm(0x02)
            assert _echo(s, b"hello") == b"hello"
        with socks5_connect(fw.locals[0], "windb", 3389) as s:
            assert closed_by_peer(s)
    finally:
        fw.stop()
    [sess] = _ended(demo, user)
    assert "rdp user=bob" in sess["command"]


def test_revoke_ends_a_live_tunnel(demo: Demo, lab: Lab) -> None:
    user = demo.take_user()
    fw = start_forwarder(demo, lab.broker, user, lab.tmp, [f"web01:{port_of(lab.echo_srv)}"])
    try:
        with socket.create_connection(("127.0.0.1", fw.locals[0]), timeout=20) as s:
            assert _echo(s, b"ping") == b"ping"
            demo.cli("grant", "revoke", f"g-demo-{user}")
            assert closed_by_peer(s, timeout=30)
    finally:
        fw.stop()
    [sess] = _ended(demo, user)
    assert sess["exit_status"] == "terminated:grant revoked"


def test_non_rdp_bytes_on_the_rdp_port_are_recorded_and_cut(demo: Demo, lab: Lab) -> None:
    user = demo.take_user()
    fw = start_forwarder(demo, lab.broker, user, lab.tmp, ["win02:3389"])
    try:
        with socket.create_connection(("127.0.0.1", fw.locals[0]), timeout=20) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_peer(s)
    finally:
        fw.stop()
    [sess] = _ended(demo, user)
    assert sess["exit_status"] == "cut:not rdp"
    assert "not-rdp (not TPKT (first byte 0x47))" in sess["command"]
    assert lab.echo_srv.connections >= 1  # dialled (granted), but nothing was relayed back


def test_idle_tunnel_ends(demo: Demo, tmp_path: Path) -> None:
    with tcp_server("echo") as echo:
        inv = inventory(demo, "")
        broker = start_lab_broker(demo, tmp_path / "b", inv,
                                  f"ports = {{ linux = [{port_of(echo)}] }}\n"
                                  "idle_timeout_seconds = 1\n")
        user = demo.take_user()
        try:
            fw = start_forwarder(demo, broker, user, tmp_path, [f"web02:{port_of(echo)}"])
            try:
                with socket.create_connection(("127.0.0.1", fw.locals[0]), timeout=20) as s:
                    # no traffic at all: ended by the idle timer (no echo asserted first, which
                    # a busy machine could delay past the 1 s timeout)
                    assert closed_by_peer(s, timeout=30)
            finally:
                fw.stop()
        finally:
            broker.stop()
    [sess] = _ended(demo, user)
    assert sess["exit_status"] == "terminated:idle timeout"


def test_ssh_port_is_the_recorded_jump_unless_raw_is_allowed(demo: Demo, lab: Lab) -> None:
    user = demo.take_user()
    fw = start_forwarder(demo, lab.broker, user, lab.tmp, ["web01:22", "web02:22"])
    banners = []
    try:
        for lp in fw.locals:
            with socket.create_connection(("127.0.0.1", lp), timeout=20) as s:
                s.sendall(b"SSH-2.0-probe\r\n")
                banners.append(s.recv(256).split(b"\r\n")[0])
    finally:
        fw.stop()
    assert banners[0] == b"SSH-2.0-bastion-broker"  # web01: the broker answers (recorded jump)
    assert banners[1].startswith(b"SSH-2.0-OpenSSH")  # web02: raw channel to its sshd
    sessions = _ended(demo, user, 2)
    assert sorted(s["kind"] for s in sessions if s["target"] in ("i-0web01", "i-0web02")) == [
        "jump", "tunnel"]


def test_agent_and_x11_forwarding_are_refused(demo: Demo, tmp_path: Path) -> None:
    user = demo.take_user()
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, "the ssh-agent socket")
        env = demo.env(user)
        env.update(SSH_AUTH_SOCK=str(sock), DISPLAY="127.0.0.1:99", XAUTHORITY="/dev/null")
        r = subprocess.run(
            [*demo.ssh_args(f"{user}+web01", "-A", "-X", "-v"),
             'echo "agent=${SSH_AUTH_SOCK:-none} display=${DISPLAY:-none}"'],
            capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    finally:
        agent.terminate()
        agent.wait()
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert r.stdout == b"agent=none display=none\n"
    assert b"X11 forwarding request failed" in r.stderr
    assert b"Requesting authentication agent forwarding" in r.stderr
