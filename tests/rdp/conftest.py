"""A real RDP target: FreeRDP's shadow server with NLA (a SAM file) on an Xvfb display."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.demo_rdp import stop
from broker.runtime import free_port

RDP_USER = "rdpuser"
RDP_PASSWORD = "Corr3ct-horse-battery"  # a throwaway test account


@dataclass
class RdpTarget:
    port: int
    env: dict[str, str]  # DISPLAY and a private HOME for xfreerdp


def _listening(port: int) -> bool:
    """Whether 127.0.0.1:port is in LISTEN state (probing it would be an RDP connection)."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1] == want and parts[3] == "0A":
            return True
    return False


def _start_shadow(tmp: Path, sam: Path, env: dict[str, str]
                  ) -> tuple[subprocess.Popen[bytes], int]:
    """freerdp-shadow-cli on a free port; a port another process took meanwhile means a retry."""
    logs = []
    for attempt in range(3):
        port = free_port()
        log_path = tmp / f"shadow-{attempt}.log"
        with open(log_path, "wb") as log:
            shadow = subprocess.Popen(
                ["freerdp-shadow-cli", "/bind-address:127.0.0.1", f"/port:{port}", "/sec:nla",
                 f"/sam-file:{sam}"], env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while shadow.poll() is None and not _listening(port):
            if time.monotonic() > deadline:
                stop(shadow)
                raise AssertionError("freerdp-shadow-cli did not listen in 30 s: "
                                     + log_path.read_text()[-2000:])
            time.sleep(0.05)
        if shadow.poll() is None:
            return shadow, port
        logs.append(log_path.read_text()[-2000:])
    raise AssertionError("freerdp-shadow-cli exited at start three times:\n" + "\n".join(logs))


@pytest.fixture(scope="module")
def rdp_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RdpTarget]:
    tmp = tmp_path_factory.mktemp("rdp")
    r, w = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-nolisten", "tcp",
                             "-screen", "0", "1024x768x24"],
                            pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        num = b""
        deadline = time.monotonic() + 30
        while not num.endswith(b"\n") and time.monotonic() < deadline:
            chunk = os.read(r, 16)
            if not chunk:
                break
            num += chunk
        os.close(r)
        assert num.strip(), "Xvfb did not report a display"
        env = dict(os.environ, DISPLAY=":" + num.decode().strip(), HOME=str(tmp))
        sam = tmp / "sam"
        with open(sam, "wb") as f:
            subprocess.run(["winpr-hash", "-u", RDP_USER, "-p", RDP_PASSWORD, "-f", "sam"],
                           stdout=f, check=True)
        shadow, port = _start_shadow(tmp, sam, env)
        try:
            yield RdpTarget(port, env)
        finally:
            stop(shadow)
    finally:
        stop(xvfb)
