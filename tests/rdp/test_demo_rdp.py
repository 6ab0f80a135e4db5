"""``bastion-broker demo --rdp``: the README's RDP walkthrough, run for real.

The demo's ``win01`` (FreeRDP's shadow server with NLA under its own Xvfb) is reached the way the
README says: OpenSSH ``ssh -N -L LOCAL:win01:3389 alice@bastion``, then ``xfreerdp`` with the
credentials from ``demo.json``. The right password logs in, a wrong one does not, the tunnel's
session and audit event carry the RDP user name, and nothing the demo started outlives it,
whether it is stopped by SIGTERM, Ctrl-C or killed outright.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.demo_rdp import TOOLS, start_xvfb, stop
from broker.runtime import free_port
from tests.conftest import BIN, Demo, start_demo, stop_demo
from tests.e2e.test_tunnel_lab import Forwarder, wait_for

pytestmark = [pytest.mark.rdp, pytest.mark.e2e]


@pytest.fixture(scope="module")
def rdp_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = start_demo(tmp_path_factory.mktemp("rdp-demo") / "state", users=2, extra=("--rdp",))
    try:
        yield d
    finally:
        stop_demo(d)
        log = d.broker_log()
        assert "Traceback" not in log, f"the demo logged a traceback:\n{log[-4000:]}"


@pytest.fixture(scope="module")
def client_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A display and a private HOME for xfreerdp (it needs both even for +auth-only)."""
    tmp = tmp_path_factory.mktemp("xfreerdp")
    xvfb, display = start_xvfb(shutil.which("Xvfb") or "Xvfb", tmp / "xvfb.log")
    try:
        yield dict(os.environ, DISPLAY=display, HOME=str(tmp))
    finally:
        stop(xvfb)


def _forward(demo: Demo, user: str, tmp: Path, dests: list[str]) -> Forwarder:
    """``ssh -N -L 127.0.0.1:LOCAL:win01:3389 user@bastion`` (one free LOCAL per destination),
    as the README has it."""
    locals_ = [free_port() for _ in dests]
    args = [a for lp, d in zip(locals_, dests, strict=True) for a in ("-L", f"127.0.0.1:{lp}:{d}")]
    log = tmp / f"ssh-{locals_[0]}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            demo.ssh_args(user, "-N", "-v", "-o", "ExitOnForwardFailure=yes", *args),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f, env=demo.env(user))
    fw = Forwarder(proc, log, locals_)
    try:
        wait_for(lambda: fw.text().count("forwarding listening on 127.0.0.1 port") == len(dests)
                 or proc.poll() is not None, "the ssh -L listeners", timeout=60)
    except AssertionError:
        fw.stop()
        raise
    if proc.poll() is not None:
        raise AssertionError(f"ssh -L failed:\n{fw.text()[-3000:]}")
    return fw


def _xfreerdp(env: dict[str, str], port: int, user: str,
              password: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["xfreerdp", f"/v:localhost:{port}", f"/u:{user}", f"/p:{password}", "/cert:ignore",
         "+auth-only"], env=env, capture_output=True, timeout=90, stdin=subprocess.DEVNULL)


def _win01_tunnels(demo: Demo, user: str) -> list[dict[str, Any]]:
    return [s for s in demo.sessions() if s["kind"] == "tunnel"
            and s["user"].startswith(user + "@") and s["target_name"] == "win01"]


def test_xfreerdp_through_the_demo_tunnel(rdp_demo: Demo, client_env: dict[str, str],
                                          tmp_path: Path) -> None:
    rdp = rdp_demo.info["rdp"]
    assert (rdp["target"], rdp["port"], rdp["user"]) == ("win01", 3389, "Administrator")
    fw = _forward(rdp_demo, "alice", tmp_path, ["win01:3389", "win01:22"])
    local, other_port = fw.locals
    try:
        right = _xfreerdp(client_env, local, rdp["user"], rdp["password"])
        assert right.returncode == 0, right.stderr[-2000:]
        wrong = _xfreerdp(client_env, local, rdp["user"], rdp["password"] + "x")
        assert wrong.returncode != 0
        refused = _xfreerdp(client_env, other_port, rdp["user"], rdp["password"])
        assert refused.returncode != 0
        wait_for(lambda: "open failed" in fw.text(), "the refusal in the ssh log")
        text = fw.text()
    finally:
        fw.stop()
    # the README quotes this line
    assert "administratively prohibited: port 22 is not open for forwarding to win01 " \
           "(allowed: 3389)" in text

    wait_for(lambda: len([s for s in _win01_tunnels(rdp_demo, "alice") if s["ended_at"]]) == 2,
             "both RDP tunnel sessions ended")
    sessions = _win01_tunnels(rdp_demo, "alice")
    assert len(sessions) == 2
    for s in sessions:
        # 3389 asked, the shadow server's real port dialled: the inventory's Windows mapping
        assert s["command"].startswith(
            f"forward win01:3389 -> i-0win01 127.0.0.1:{rdp['target_port']} "
            f"rdp user={rdp['user']} "), s["command"]
        assert s["command"].endswith(" selected=hybrid")  # NLA
        assert s["grant_id"] == "g-demo-alice"
        assert s["bytes_in"] > 0
        assert s["bytes_out"] > 0
    ids = {s["id"] for s in sessions}
    events = [e for e in rdp_demo.audit_lines()
              if e["event"] == "tunnel.rdp" and e.get("session_id") in ids]
    assert [e["rdp_user"] for e in events] == [rdp["user"]] * 2
    assert {e["destination"] for e in events} == {"win01:3389"}
    assert all(e["user"] == "alice@corp.example.com" for e in events)


def test_an_ssh_session_to_the_windows_host_says_to_use_rdp(rdp_demo: Demo) -> None:
    """win01 is granted, but its port is RDP's: the refusal names the tunnel to open instead
    (OpenSSH prints the channel-open failure text)."""
    user = rdp_demo.take_user()
    r = rdp_demo.ssh(user, "win01", "true")
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "win01 is a Windows host: no SSH session there; open an RDP tunnel instead" in err, err
    assert "ssh -N -L 13389:win01:3389" in err


def _running(pid: int, name: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process of program ``name``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and cmd.endswith(name.encode())


def _mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (the demo's state directory)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes() and _running(int(d.name), ""):
                    pids.append(int(d.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return pids


def _assert_started(demo: Demo) -> dict[str, int]:
    pids = {k: int(v) for k, v in demo.info["rdp"]["pids"].items()}
    assert _running(pids["xvfb"], "Xvfb")
    assert _running(pids["shadow"], "freerdp-shadow-cli")
    return pids


def test_sigterm_stops_xvfb_and_the_shadow_server(rdp_demo: Demo) -> None:
    pids = _assert_started(rdp_demo)
    stop_demo(rdp_demo)  # SIGTERM
    assert rdp_demo.proc.returncode == 0
    assert not _running(pids["xvfb"], "Xvfb")
    assert not _running(pids["shadow"], "freerdp-shadow-cli")
    assert _mentioning(str(rdp_demo.state_dir)) == []  # the sshd targets are gone as well


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_no_rdp_process_outlives_the_demo(sig: signal.Signals,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    demo = start_demo(tmp_path_factory.mktemp("rdp-demo-stop") / "state", users=1,
                      extra=("--rdp",))
    try:
        pids = _assert_started(demo)
        demo.proc.send_signal(sig)
        demo.proc.wait(30)
        # killed, it cannot stop them itself: they get SIGTERM from the kernel (PDEATHSIG)
        wait_for(lambda: not _running(pids["xvfb"], "Xvfb")
                 and not _running(pids["shadow"], "freerdp-shadow-cli"),
                 "Xvfb and freerdp-shadow-cli gone", timeout=15)
        if sig == signal.SIGINT:
            assert demo.proc.returncode == 0
            assert _mentioning(str(demo.state_dir)) == []
    finally:
        stop_demo(demo)
        for pid in _mentioning(str(demo.state_dir)):  # a killed demo's sshd targets
            os.kill(pid, signal.SIGTERM)


def test_missing_packages_are_named_in_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    r = subprocess.run([str(BIN), "demo", "--state-dir", str(tmp_path / "state"), "--rdp"],
                       env=dict(os.environ, PATH=str(empty)), capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("bastion-broker: error: --rdp needs ")
    for tool, package in TOOLS.items():
        assert tool in r.stderr
        assert package in r.stderr
    assert not (tmp_path / "state").exists()  # checked before anything was written
