"""A real RDP client through the broker: ``xfreerdp +auth-only`` over an ``ssh -L`` tunnel to
FreeRDP's shadow server with NLA. The right password logs in, a wrong one fails, an ungranted
host or port is refused before anything is dialled, and the tunnel's session shows the RDP
user name and the protocols negotiated."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Demo
from tests.e2e.test_tunnel_lab import (
    LabBroker,
    _Server,
    inventory,
    port_of,
    stack,
    start_forwarder,
    start_lab_broker,
    tcp_server,
    wait_for,
)
from tests.rdp.conftest import RDP_PASSWORD, RDP_USER, RdpTarget

pytestmark = [pytest.mark.rdp, pytest.mark.e2e]


@dataclass
class Lab:
    broker: LabBroker
    ungranted: _Server  # behind the ungranted Windows instance: must never be dialled
    tmp: Path


@pytest.fixture(scope="module")
def lab(demo: Demo, rdp_target: RdpTarget,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("rdp-lab")
    with tcp_server("echo") as ungranted:
        inv = inventory(demo, stack("stack-web", ("i-0rdp01", "rdp01", "windows", rdp_target.port))
                        + stack("stack-db", ("i-0rdpdb", "rdpdb", "windows", port_of(ungranted))))
        broker = start_lab_broker(demo, tmp / "broker", inv, "")
        try:
            yield Lab(broker, ungranted, tmp)
        finally:
            broker.stop()


def _xfreerdp(target: RdpTarget, port: int, password: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["xfreerdp", f"/v:127.0.0.1:{port}", f"/u:{RDP_USER}", f"/p:{password}",
         "/cert:ignore", "+auth-only"],
        env=target.env, capture_output=True, timeout=90, stdin=subprocess.DEVNULL)


def _tunnels(demo: Demo, user: str) -> list[dict[str, Any]]:
    return [s for s in demo.sessions() if s["user"].startswith(user + "@") and s["kind"] == "tunnel"]


def test_xfreerdp_through_the_broker(demo: Demo, lab: Lab, rdp_target: RdpTarget) -> None:
    user = demo.take_user()
    fw = start_forwarder(demo, lab.broker, user, lab.tmp,
                         ["rdp01:3389", "rdpdb:3389", "rdp01:3390"])
    ok_port, ungranted_port, bad_port = fw.locals
    try:
        right = _xfreerdp(rdp_target, ok_port, RDP_PASSWORD)
        assert right.returncode == 0, right.stderr[-2000:]
        wrong = _xfreerdp(rdp_target, ok_port, "not-the-password")
        assert wrong.returncode != 0
        for port in (ungranted_port, bad_port):
            refused = _xfreerdp(rdp_target, port, RDP_PASSWORD)
            assert refused.returncode != 0
        wait_for(lambda: fw.text().count("open failed") >= 2, "both refusals in the ssh log")
        text = fw.text()
    finally:
        fw.stop()
    assert "no live grant covers this destination" in text
    assert "port 3390 is not open for forwarding to rdp01" in text
    assert lab.ungranted.connections == 0  # refused before any connection was made

    wait_for(lambda: len([s for s in _tunnels(demo, user) if s["ended_at"]]) == 2,
             "both RDP tunnel sessions ended")
    sessions = _tunnels(demo, user)
    assert len(sessions) == 2  # the refused ones are not sessions, only audit events
    for s in sessions:
        assert f"rdp user={RDP_USER} " in s["command"]
        assert "selected=hybrid" in s["command"]
        assert "hybrid" in s["command"].split("requested=")[1].split()[0]
        assert s["bytes_in"] > 0
        assert s["bytes_out"] > 0
        assert s["grant_id"] == f"g-demo-{user}"
    ids = {s["id"] for s in sessions}
    rdp_events = [e for e in demo.audit_lines()
                  if e["event"] == "tunnel.rdp" and e.get("session_id") in ids]
    assert [e["rdp_user"] for e in rdp_events] == [RDP_USER, RDP_USER]
    assert all(e["rdp_selected"] == "hybrid" for e in rdp_events)
    denied = [e for e in demo.audit_lines()
              if e["event"] == "tunnel.denied" and e["user"].startswith(user + "@")]
    assert {e["destination"] for e in denied} == {"rdpdb:3389", "rdp01:3390"}
