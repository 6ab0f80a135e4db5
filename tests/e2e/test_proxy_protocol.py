"""A broker behind a real HAProxy sending the PROXY protocol (v2 and v1): the client's own
address reaches the audit, the session rows and the per-source penalties; what does not come
from a trusted balancer with a valid header is closed before any SSH byte; and a broker without
``proxy_protocol`` treats a PROXY header as the failed handshake it is."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import haproxy
from tests.conftest import Demo, serve_broker
from tests.haproxy import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.fleet]

HAPROXY_SECTIONS = """frontend via_v2
  bind 127.0.0.1:{v2}
  default_backend brokers_v2
backend brokers_v2
  server b1 127.0.0.1:{broker} send-proxy-v2 check inter 500ms check-send-proxy
frontend via_v1
  bind 127.0.0.1:{v1}
  default_backend brokers_v1
backend brokers_v1
  server b1 127.0.0.1:{broker} send-proxy
frontend to_plain
  bind 127.0.0.1:{plain}
  default_backend plain
backend plain
  server d1 127.0.0.1:{demo} send-proxy-v2
"""


@dataclass
class Lab:
    broker_port: int
    v2: int
    v1: int
    plain: int
    log: list[bytes]
    diag: int  # the broker's diagnostics port (/metrics)


@pytest.fixture(scope="module")
def lab(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A second broker with ``proxy_protocol`` and HAProxy in front of it (and of the demo)."""
    tmp = tmp_path_factory.mktemp("proxyproto")
    diag = free_port()
    cfg = demo.variant_config(
        tmp, ssh="proxy_protocol = true\ntrusted_proxies = ['127.0.0.1/32']\n"
                 "proxy_header_timeout_seconds = 1",
        limits="source_penalty_after = 3\nsource_penalty_seconds = 60\n"
               "account_free_failures = 20",
        extra=f"[diag]\nenabled = true\nlisten_port = {diag}\n")
    broker, port = serve_broker(cfg)
    log: list[bytes] = []
    assert broker.stderr is not None
    drain = threading.Thread(target=lambda: log.extend(broker.stderr or ()), daemon=True)
    drain.start()  # its log, read to the end (a full pipe would stall it)
    lab = Lab(port, free_port(), free_port(), free_port(), log, diag)
    sections = HAPROXY_SECTIONS.format(v2=lab.v2, v1=lab.v1, plain=lab.plain, broker=port,
                                       demo=demo.port)
    try:
        with haproxy.running(tmp, sections, (lab.v2, lab.v1, lab.plain)):
            yield lab
    finally:
        broker.terminate()
        broker.wait(30)
        drain.join(10)
        text = b"".join(log).decode(errors="replace")
        assert "Traceback" not in text, text[-4000:]


async def _ssh(demo: Demo, user: str, port: int, known: Path, source: str, *,
               password: str | None = None, code: str | None = None) -> tuple[int, bytes]:
    args = demo.ssh_args(f"{user}+web01", "-b", source, port=port, known_hosts=known)
    proc = await asyncio.create_subprocess_exec(
        *args, "echo ok", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=demo.env(user, password=password, code=code))
    out, err = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode is not None
    return proc.returncode, out + err


@pytest.mark.parametrize("version", ["v2", "v1"])
async def test_client_address_through_haproxy(demo: Demo, lab: Lab, tmp_path: Path,
                                              version: str) -> None:
    port = lab.v2 if version == "v2" else lab.v1
    user = demo.take_user()
    rc, out = await _ssh(demo, user, port, demo.known_hosts_for(tmp_path, port), "127.0.0.7")
    assert rc == 0, out
    assert out.startswith(b"ok\n")
    rows = [s for s in demo.sessions() if s["user"].startswith(user)]
    assert rows and all(str(s["peer"]).startswith("127.0.0.7:") for s in rows), rows
    mine = [e for e in demo.audit_lines() if user in str(e.get("user", "")) and "peer" in e]
    assert mine, "no audit event of this login carries a peer"
    assert all(str(e["peer"]).startswith("127.0.0.7:") for e in mine), mine


async def test_penalty_is_per_client_not_per_balancer(demo: Demo, lab: Lab,
                                                      tmp_path: Path) -> None:
    known = demo.known_hosts_for(tmp_path, lab.v2)
    user = demo.take_user()
    for _ in range(3):
        rc, out = await _ssh(demo, user, lab.v2, known, "127.0.0.17", password="wrong",
                             code="000000")
        assert rc == 255 and b"Permission denied" in out, out
    # the right password from that client is now cut before authentication...
    rc, out = await _ssh(demo, user, lab.v2, known, "127.0.0.17")
    assert rc == 255 and b"Permission denied" not in out, out
    # ...while another client through the same HAProxy logs in
    rc, out = await _ssh(demo, user, lab.v2, known, "127.0.0.18")
    assert rc == 0, out
    penalised = [e["peer"] for e in demo.audit_lines() if e["event"] == "source.penalised"]
    assert "127.0.0.17" in penalised
    assert "127.0.0.1" not in penalised


def _raw(port: int, source: str, data: bytes, wait: float = 3.0) -> bytes:
    """What the broker sends back to ``data`` before closing (or until ``wait``)."""
    with socket.create_connection(("127.0.0.1", port), 5, source_address=(source, 0)) as s:
        if data:
            s.sendall(data)
        s.settimeout(wait)
        got = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(4096):
                got += chunk
        return got


def _refused(demo: Demo, source: str, reason: str) -> bool:
    return any(e["event"] == "connection.refused" and str(e["peer"]).startswith(source + ":")
               and reason in str(e["reason"]) for e in demo.audit_lines())


def test_untrusted_peer_with_forged_header_is_closed_before_any_ssh_byte(
        demo: Demo, lab: Lab) -> None:
    forged = b"PROXY TCP4 10.9.9.9 127.0.0.1 4444 22\r\nSSH-2.0-OpenSSH_9.2\r\n"
    t0 = time.monotonic()
    assert _raw(lab.broker_port, "127.0.0.9", forged) == b""
    assert time.monotonic() - t0 < 2.0  # closed at once, not at a timeout
    assert _refused(demo, "127.0.0.9", "not a trusted proxy")
    assert not any("10.9.9.9" in str(e.get("peer")) for e in demo.audit_lines())


def test_trusted_peer_without_a_valid_header_is_closed(demo: Demo, lab: Lab) -> None:
    assert _raw(lab.broker_port, "127.0.0.1", b"SSH-2.0-OpenSSH_9.2\r\n") == b""
    assert _refused(demo, "127.0.0.1", "no PROXY protocol header")
    t0 = time.monotonic()
    assert _raw(lab.broker_port, "127.0.0.1", b"PROXY TCP4 10.0.0.1", wait=10) == b""
    assert 0.8 < time.monotonic() - t0 < 5  # proxy_header_timeout_seconds = 1
    assert _refused(demo, "127.0.0.1", "no PROXY header within 1 s")


def _proxy_refusals(lab: Lab) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{lab.diag}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^bastion_broker_proxy_refusals_total\{reason="([a-z_]+)"\} (\S+)$', text, re.M)}


def test_refusals_are_counted_in_metrics_by_reason(demo: Demo, lab: Lab) -> None:
    """Each refusal adds one to its bounded reason; every reason is exported from the start."""
    before = _proxy_refusals(lab)
    assert set(before) == {"untrusted_peer", "header_timeout", "bad_header",
                           "closed_before_header", "listener_closed"}, before
    assert _raw(lab.broker_port, "127.0.0.9", b"PROXY TCP4 10.9.9.9 127.0.0.1 4 22\r\n") == b""
    assert _raw(lab.broker_port, "127.0.0.1", b"PROXY TCP9 what\r\n") == b""
    assert _raw(lab.broker_port, "127.0.0.1", b"PROXY TCP4 10.0.0.1", wait=10) == b""
    after = _proxy_refusals(lab)
    for reason in ("untrusted_peer", "bad_header", "header_timeout"):
        assert after[reason] - before[reason] >= 1, (reason, before, after)
    assert after["listener_closed"] == before["listener_closed"]  # none of these


async def test_without_proxy_protocol_a_header_is_a_failed_handshake(
        demo: Demo, lab: Lab, tmp_path: Path) -> None:
    user = demo.take_user()
    rc, out = await _ssh(demo, user, lab.plain, demo.known_hosts_for(tmp_path, lab.plain),
                         "127.0.0.27")
    assert rc == 255, out
    assert b"Permission denied" not in out
    assert not any("127.0.0.27" in str(e.get("peer")) for e in demo.audit_lines())
    assert not any(str(s["user"]).startswith(user) for s in demo.sessions())


def test_proxy_protocol_on_stock_asyncssh_is_refused_at_start(demo: Demo, tmp_path: Path) -> None:
    """Without the asyncssh patches the broker cannot hand a listener's transport to asyncssh:
    it says so and does not start (no listener that would take PROXY headers as SSH)."""
    cfg = demo.variant_config(tmp_path, ssh="proxy_protocol = true\n"
                                            "trusted_proxies = ['127.0.0.1/32']")
    r = subprocess.run([*demo.cli_args(cfg), "serve"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "BASTION_BROKER_STOCK_ASYNCSSH": "1"})
    assert r.returncode != 0
    assert "proxy_protocol needs the asyncssh patches" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
