"""Helpers for tunnel tests (no tests here): a broker with tunnel targets, ssh -L/-D, TCP peers."""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from broker.domain import rdp
from broker.runtime import free_port
from tests.conftest import BIN, Demo


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    connections = 0


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.connections += 1  # type: ignore[attr-defined]
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _RdpLike(socketserver.BaseRequestHandler):
    """Answers a Connection Request with a Connection Confirm (HYBRID), then echoes."""

    def handle(self) -> None:
        self.server.connections += 1  # type: ignore[attr-defined]
        head = _recv_exact(self.request, 4)
        if len(head) < 4:
            return
        _recv_exact(self.request, struct.unpack(">H", head[2:4])[0] - 4)
        self.request.sendall(rdp.connection_confirm(0x02))
        while data := self.request.recv(65536):
            self.request.sendall(data)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


@contextmanager
def tcp_server(kind: str) -> Iterator[_Server]:
    handler = _RdpLike if kind == "rdp" else _Echo
    srv = _Server(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def port_of(srv: _Server) -> int:
    return int(srv.server_address[1])


def inventory(demo: Demo, extra: str) -> str:
    """The demo's inventory plus ``extra`` instances (TOML appended under the right stacks)."""
    return (demo.state_dir / "inventory.toml").read_text() + "\n" + extra


def stack(sid: str, *instances: tuple[str, str, str, int]) -> str:
    """A [[stacks]] entry in the demo VPC with (id, name, os, port) instances on loopback."""
    out = f'[[stacks]]\nid = "{sid}"\nvpc = "vpc-0demo"\n'
    for iid, name, os_, port in instances:
        out += (f'[[stacks.instances]]\nid = "{iid}"\nname = "{name}"\n'
                f'address = "127.0.0.1"\nport = {port}\nos = "{os_}"\n')
    return out


@dataclass
class LabBroker:
    proc: subprocess.Popen[bytes]
    port: int
    known_hosts: Path
    log: Path

    def stop(self) -> None:
        """Stop it; its log must hold no traceback."""
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        text = self.log.read_text(errors="replace")
        assert "Traceback" not in text, f"the lab broker logged a traceback:\n{text[-4000:]}"


def start_lab_broker(demo: Demo, tmp: Path, inventory_text: str, forwarding: str) -> LabBroker:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = demo.variant_config(tmp, inventory=inventory_text,
                              limits="penalty_exempt = ['127.0.0.0/8']")
    cfg.write_text(cfg.read_text() + "[web]\nenabled = false\n"
                   "[grants]\nenforce_interval_seconds = 0.5\n"
                   f"[forwarding]\n{forwarding}\n")
    log = tmp / "broker.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(BIN), "--config", str(cfg), "serve"], stderr=f,
                                stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        lines = [json.loads(x) for x in log.read_text().splitlines() if '"broker.listening"' in x]
        if lines:
            port = int(lines[0]["port"])
            return LabBroker(proc, port, demo.known_hosts_for(tmp, port), log)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"lab broker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


@dataclass
class Forwarder:
    """``ssh -N -L ... / -D ...`` running in the background, with its verbose log."""

    proc: subprocess.Popen[bytes]
    log: Path
    locals: list[int] = field(default_factory=list)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_forwarder(demo: Demo, lab: LabBroker, user: str, tmp: Path, specs: list[str],
                    *, dynamic: bool = False) -> Forwarder:
    """Forward one free local port per spec (``HOST:PORT``; with ``dynamic`` a SOCKS port)."""
    args: list[str] = []
    locals_: list[int] = []
    for spec in specs:
        lp = free_port()
        locals_.append(lp)
        args += ["-D", f"127.0.0.1:{lp}"] if dynamic else ["-L", f"127.0.0.1:{lp}:{spec}"]
    log = tmp / f"ssh-{user}-{locals_[0]}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            demo.ssh_args(user, "-N", "-v", "-o", "ExitOnForwardFailure=yes", *args,
                          port=lab.port, known_hosts=lab.known_hosts),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f, env=demo.env(user))
    fw = Forwarder(proc, log, locals_)
    wanted = len(specs)
    deadline = time.monotonic() + 60
    while fw.text().count("forwarding listening on 127.0.0.1 port") < wanted:
        if proc.poll() is not None or time.monotonic() > deadline:
            fw.stop()
            raise AssertionError(f"ssh forwarder did not start:\n{fw.text()[-3000:]}")
        time.sleep(0.05)
    return fw


def wait_for(pred: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def closed_by_peer(s: socket.socket, timeout: float = 20) -> bool:
    """True once the peer closes (reads EOF or a reset), within ``timeout``."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def socks5_connect(port: int, host: str, dport: int) -> socket.socket:
    """A SOCKS5 CONNECT by host name through ssh -D (what browsers and RDP gateways do)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(b"\x05\x01\x00")
    assert _recv_exact(s, 2) == b"\x05\x00"
    name = host.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", dport))
    return s
