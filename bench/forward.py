"""Benchmark: 1 GiB through a local forward (``ssh -N -L``), OpenSSH sshd bastion vs the broker.

One run, all on loopback: a TCP source/sink server as the destination, (a) an OpenSSH sshd as
the bastion (``AllowTcpForwarding yes``, one hop) and (b) the broker (a ``bastion-broker demo``
state served with a ``[forwarding]`` policy that allows the sink's port). One ``ssh -N -L``
client per path stays up; each round opens one new TCP connection through each forward and moves
SIZE bytes down (destination -> client), then SIZE bytes up. Rounds alternate the paths;
medians of the rounds and their ratio are printed and written to their own section of
``docs/benchmarks.md`` (outside the generated block of bench/run.py).

Then ``scp -J`` of JUMP_SIZE up and down to the demo's ``web01`` sshd, (a) through the OpenSSH
bastion (a client certificate from the demo's user CA, signed for the run) and (b) through the
broker's recorded ProxyJump (a new broker login per copy, one demo user each: TOTP codes are
single use) and (c) through the broker with the raw, unrecorded channel that ``raw_ssh_targets``
allows (the same sshd under a second inventory name, ``web01-raw``; the inner connection then
ends at the target, authenticated with the same client certificate as (a)). Recordings are
deleted after each copy to keep the disk free.

Usage (repository root, as root: the demo creates its target accounts)::

    .venv/bin/python bench/forward.py                 # 1 GiB, 5 rounds, docs updated
    .venv/bin/python bench/forward.py --size 64M --jump-size 64M --rounds 3 --no-docs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyotp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import free_port, log, parse_size

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
BIN = Path(sys.executable).parent / "bastion-broker"
BEGIN = "<!-- BEGIN forward.py -->"
END = "<!-- END forward.py -->"
CIPHER = "aes128-gcm@openssh.com"
KEX = "curve25519-sha256"
CHUNK = 1 << 20
ZEROS = bytes(CHUNK)
ASKPASS = """#!/bin/sh
case "$1" in
  *Password*) printf '%s\\n' "$BB_PASSWORD";;
  *Verification*) printf '%s\\n' "$BB_CODE";;
  *) exit 1;;
esac
"""


class _Sink(socketserver.BaseRequestHandler):
    """'D' + size: send size bytes then close. 'U' + size: read size bytes, answer b'K'."""

    def handle(self) -> None:
        head = self.request.recv(9, socket.MSG_WAITALL)
        if len(head) != 9:
            return
        size = struct.unpack(">Q", head[1:])[0]
        if head[:1] == b"D":
            left = size
            while left:
                n = self.request.send(ZEROS[:min(left, CHUNK)])
                left -= n
            self.request.shutdown(socket.SHUT_WR)
            self.request.recv(1)
        else:
            buf = bytearray(CHUNK)
            left = size
            while left:
                n = self.request.recv_into(buf, min(left, CHUNK))
                if not n:
                    return
                left -= n
            self.request.sendall(b"K")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def transfer(port: int, direction: str, size: int) -> float:
    """Seconds to move ``size`` bytes through the forward listening on ``port``."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(direction.encode() + struct.pack(">Q", size))
        buf = bytearray(CHUNK)
        if direction == "D":
            got = 0
            while n := s.recv_into(buf):
                got += n
            if got != size:
                raise RuntimeError(f"download through :{port}: {got} of {size} bytes")
        else:
            left = size
            while left:
                left -= s.send(ZEROS[:min(left, CHUNK)])
            if s.recv(1) != b"K":
                raise RuntimeError(f"upload through :{port}: no acknowledgement")
    return time.perf_counter() - t0


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        with open(log_path, "wb") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=f, stdin=subprocess.DEVNULL, env=env)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def wait_text(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited: {content[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {text!r} in {path}")


SSH_OPTS = ["-F", "/dev/null", "-N", "-v", "-o", "ExitOnForwardFailure=yes",
            "-o", f"Ciphers={CIPHER}", "-o", f"KexAlgorithms={KEX}", "-o", "Compression=no",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]


def openssh_forward(work: Path, procs: Procs, sink: int) -> tuple[int, int]:
    """sshd as a plain forwarding bastion, and ssh -L through it (public key auth)."""
    d = work / "sshd"
    d.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    os.chmod(d / "client", 0o600)
    port = free_port()
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host'}",
        f"PidFile {d / 'sshd.pid'}", "UsePAM no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "StrictModes no",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "AllowTcpForwarding yes", f"Ciphers {CIPHER}", f"KexAlgorithms {KEX}", ""]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    sshd = procs.start(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                       d / "sshd.log")
    wait_text(d / "sshd.log", f"Server listening on 127.0.0.1 port {port}", sshd)
    lp = free_port()
    user = os.environ.get("USER") or "root"
    ssh = procs.start(["ssh", *SSH_OPTS, "-i", str(d / "client"), "-p", str(port),
                       "-L", f"127.0.0.1:{lp}:127.0.0.1:{sink}", f"{user}@127.0.0.1"],
                      d / "ssh.log")
    wait_text(d / "ssh.log", f"forwarding listening on 127.0.0.1 port {lp}", ssh)
    return lp, port


def broker_forward(work: Path, procs: Procs, sink: int) -> tuple[int, int, dict[str, Any]]:
    """The broker (demo state, a sink instance in the granted stack) and ssh -L through it."""
    state = work / "demo"
    demo = procs.start([str(BIN), "demo", "--state-dir", str(state), "--users", "40"],
                       work / "demo.log")
    deadline = time.monotonic() + 60
    while not (state / "demo.json").exists():
        if demo.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"demo did not start: {(work / 'demo.log').read_text()[-2000:]}")
        time.sleep(0.05)
    info = json.loads((state / "demo.json").read_text())
    inv = work / "inventory.toml"
    inv.write_text((state / "inventory.toml").read_text() +
                   '\n[[stacks]]\nid = "stack-web"\nvpc = "vpc-0demo"\n[[stacks.instances]]\n'
                   'id = "i-0sink"\nname = "sink"\naddress = "127.0.0.1"\nport = 22\n'
                   'os = "linux"\n'
                   # web01 again under a name whose ProxyJump is the raw channel (column c)
                   '[[stacks.instances]]\nid = "i-0web01raw"\nname = "web01-raw"\n'
                   f'address = "127.0.0.1"\nport = {info["target_ports"]["web01"]}\n'
                   'os = "linux"\n')
    cfg = work / "broker.toml"
    cfg.write_text(
        f'state_dir = "{state}"\n[ssh]\nlisten_host = "127.0.0.1"\nlisten_port = 0\n'
        f'[upstream]\nadmin_login = "{info["admin_login"]}"\n'
        f'read_only_login = "{info["read_only_login"]}"\n'
        f'[identity]\nusers_file = "{state / "users.toml"}"\n'
        f'default_domain = "{info["domain"]}"\n[inventory]\nfile = "{inv}"\n'
        "[limits]\npenalty_exempt = ['127.0.0.0/8']\n[web]\nenabled = false\n"
        f"[forwarding]\nports = {{ linux = [22, {sink}] }}\nraw_ssh_targets = ['web01-raw']\n")
    broker = procs.start([str(BIN), "--config", str(cfg), "serve"], work / "broker.log")
    text = wait_text(work / "broker.log", '"broker.listening"', broker)
    port = next(json.loads(x)["port"] for x in text.splitlines() if '"broker.listening"' in x)
    user = info["users"][0]
    askpass = work / "askpass"
    askpass.write_text(ASKPASS)
    askpass.chmod(0o700)
    env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0",
               BB_PASSWORD=info["password"], BB_CODE=pyotp.TOTP(user["totp_secret"]).now())
    lp = free_port()
    ssh = procs.start(["ssh", *SSH_OPTS, "-o", "PreferredAuthentications=keyboard-interactive",
                       "-p", str(port), "-L", f"127.0.0.1:{lp}:sink:{sink}",
                       f"{user['user']}@127.0.0.1"], work / "ssh-broker.log", env=env)
    wait_text(work / "ssh-broker.log", f"forwarding listening on 127.0.0.1 port {lp}", ssh)
    return lp, int(port), info


def jump_configs(work: Path, broker_port: int, bastion_port: int, info: dict[str, Any],
                 ) -> tuple[Path, Path]:
    """ssh_config files for scp -J to the demo's web01 sshd: through the OpenSSH bastion (a
    client certificate from the demo's user CA, signed here) and through the broker."""
    d = work / "sshd"
    state = work / "demo"
    subprocess.run(["ssh-keygen", "-q", "-s", str(state / "ca" / "user_ca"), "-I", "bench",
                    "-n", info["read_only_login"], "-V", "-5m:+2h", str(d / "client.pub")],
                   check=True)
    web01 = info["target_ports"]["web01"]
    common = ("  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
              f"  Ciphers {CIPHER}\n  KexAlgorithms {KEX}\n  Compression no\n")
    user = os.environ.get("USER") or "root"
    openssh = work / "ssh_config_openssh"
    openssh.write_text(
        f"Host osbastion\n  HostName 127.0.0.1\n  Port {bastion_port}\n  User {user}\n"
        f"  IdentityFile {d / 'client'}\n{common}"
        f"Host web01\n  HostName 127.0.0.1\n  Port {web01}\n  User {info['read_only_login']}\n"
        f"  IdentityFile {d / 'client'}\n  CertificateFile {d / 'client-cert.pub'}\n"
        f"  ProxyJump osbastion\n{common}")
    broker = work / "ssh_config_broker"
    broker.write_text(
        f"Host bbastion\n  HostName 127.0.0.1\n  Port {broker_port}\n  User @@USER@@\n"
        f"  PreferredAuthentications keyboard-interactive\n  BatchMode no\n{common}"
        f"Host web01\n  ProxyJump bbastion\n  User ec2-user\n{common}"
        f"Host web01raw\n  HostName web01-raw\n  ProxyJump bbastion\n"
        f"  User {info['read_only_login']}\n  IdentityFile {d / 'client'}\n"
        f"  CertificateFile {d / 'client-cert.pub'}\n{common}")
    return openssh, broker


class JumpLogins:
    """A fresh demo user per broker login: each TOTP code is single use per user and step."""

    def __init__(self, work: Path, info: dict[str, Any], template: Path) -> None:
        self._users = list(info["users"][1:])  # the first one holds the -L forward
        self._info = info
        self._askpass = work / "askpass"
        self._template = template.read_text()
        self._config = template.with_name(template.name + ".login")

    def next(self) -> tuple[Path, dict[str, str]]:
        u = self._users.pop(0)
        self._config.write_text(self._template.replace("@@USER@@", u["user"]))
        return self._config, dict(
            os.environ, SSH_ASKPASS=str(self._askpass), SSH_ASKPASS_REQUIRE="force",
            DISPLAY=":0", BB_PASSWORD=self._info["password"],
            BB_CODE=pyotp.TOTP(u["totp_secret"]).now())


def scp_jump(config: Path, direction: str, local: Path, remote: str,
             env: dict[str, str] | None, host: str = "web01") -> float:
    """Seconds for one scp (SFTP protocol) through the ProxyJump in ``config``."""
    src, dst = (str(local), f"{host}:{remote}") if direction == "U" else (f"{host}:{remote}",
                                                                          "/dev/null")
    t0 = time.perf_counter()
    r = subprocess.run(["scp", "-q", "-F", str(config), src, dst], capture_output=True,
                       timeout=900, env=env, stdin=subprocess.DEVNULL)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"scp -J ({config.name}) failed: {r.stderr.decode(errors='replace')}")
    return secs


def jump_bench(work: Path, args: argparse.Namespace, broker_port: int, bastion_port: int,
               info: dict[str, Any], jump: dict[str, dict[str, list[float]]]) -> None:
    """scp -J up and down: OpenSSH bastion, the broker's recorded ProxyJump and its raw
    channel, the order of the paths rotating from round to round."""
    os_cfg, bb_cfg = jump_configs(work, broker_port, bastion_port, info)
    logins = JumpLogins(work, info, bb_cfg)
    local = work / "jump.bin"
    with open(local, "wb") as f:
        f.truncate(args.jump_size)
    remote = f"/tmp/bb-forward-bench-{os.getpid()}.bin"
    recordings = work / "demo" / "recordings"
    try:
        paths = list(jump)
        for r in range(args.rounds):
            for p in paths[r % len(paths):] + paths[:r % len(paths)]:
                for d in ("U", "D"):
                    cfg, env = (os_cfg, None) if p == "openssh" else logins.next()
                    host = "web01raw" if p == "raw" else "web01"
                    secs = scp_jump(cfg, d, local, remote, env, host)
                    jump[p][d].append(secs)
                    log(f"round {r + 1} scp -J {p:8} {'down' if d == 'D' else 'up':4} "
                        f"{args.jump_size / secs / 1e6:8.1f} MB/s")
                    for rec in recordings.rglob("*.rec"):  # 1 GiB each: keep the disk free
                        with contextlib.suppress(OSError):
                            rec.unlink()
    finally:
        Path(remote).unlink(missing_ok=True)


def rounds(size: int, secs: dict[str, dict[str, list[float]]], order: str) -> str:
    """Each path's rate per round, as 'Rounds (MB/s, down/up): openssh 600/500, ...; broker ...'."""
    names = "/".join("down" if d == "D" else "up" for d in order)
    return f"Rounds (MB/s, {names}): " + "; ".join(
        f"{p} " + ", ".join("/".join(f"{size / s / 1e6:.0f}" for s in pair)
                            for pair in zip(*(dirs[d] for d in order), strict=True))
        for p, dirs in secs.items()) + ".\n\n"


def jump_section(args: argparse.Namespace, jump: dict[str, dict[str, list[float]]]) -> str:
    mbps = {p: {d: args.jump_size / statistics.median(v) / 1e6 for d, v in dirs.items()}
            for p, dirs in jump.items()}
    rows = []
    for d, name in (("U", "up (scp file -> target)"), ("D", "down (target -> client)")):
        ratio = mbps["broker"][d] / mbps["openssh"][d]
        rows.append(f"| {name} | {mbps['openssh'][d]:.0f} MB/s | {mbps['broker'][d]:.0f} MB/s "
                    f"| {ratio:.2f}x | {'met' if ratio >= 0.75 else 'missed'} "
                    f"| {mbps['raw'][d]:.0f} MB/s ({mbps['raw'][d] / mbps['openssh'][d]:.2f}x) |")
    size = (f"{args.jump_size >> 30} GiB" if args.jump_size % (1 << 30) == 0
            else f"{args.jump_size >> 20} MiB")
    return (f"`scp -J` of {size} (SFTP protocol, a new login per copy) to the demo's `web01` "
            "sshd, through an OpenSSH sshd bastion (raw channel) and through the broker's "
            "recorded ProxyJump (inner connection terminated, sftp recorded and audited), and "
            "through the broker's raw channel (`raw_ssh_targets`: unrecorded, as OpenSSH does it), "
            f"median of {args.rounds} rounds:\n\n"
            "| direction | (a) OpenSSH bastion | (b) broker, recorded | ratio b/a | goal >= 0.75x "
            "| (c) broker, raw channel (c/a) |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            + rounds(args.jump_size, jump, "UD"))


def write_block(section: str, begin: str, end: str, where: str) -> None:
    """Replace the generated block between ``begin`` and ``end`` in docs/benchmarks.md with
    ``section``; without one yet, insert it before the heading ``where`` (or at the end)."""
    text = DOCS.read_text()
    block = f"{begin}\n{section}{end}\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end) + 1:]
    elif where in text:
        text = text.replace(where, block + "\n" + where, 1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    DOCS.write_text(text)


def write_docs(section: str) -> None:
    write_block(section, BEGIN, END, "## SFTP file-transfer audit")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--jump-size", type=parse_size, default=1 << 30,
                    help="scp -J file size (0: skip the ProxyJump comparison)")
    ap.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)  # internal
    args = ap.parse_args()
    if args.sink:  # the destination, in its own process (and GIL) apart from the client
        sink_srv = _Server(("127.0.0.1", 0), _Sink)
        print(sink_srv.server_address[1], flush=True)
        sink_srv.serve_forever()
        return 0
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    procs = Procs()
    srv = subprocess.Popen([sys.executable, __file__, "--sink"], stdout=subprocess.PIPE,
                           stdin=subprocess.DEVNULL)
    assert srv.stdout is not None
    sink = int(srv.stdout.readline())
    results: dict[str, dict[str, list[float]]] = {
        p: {"D": [], "U": []} for p in ("openssh", "broker")}
    jump: dict[str, dict[str, list[float]]] = {
        p: {"D": [], "U": []} for p in ("openssh", "broker", "raw")}
    with tempfile.TemporaryDirectory(prefix="bb-forward-") as tmp:
        try:
            work = Path(tmp)
            os_lp, bastion_port = openssh_forward(work, procs, sink)
            bb_lp, broker_port, info = broker_forward(work, procs, sink)
            ports = {"openssh": os_lp, "broker": bb_lp}
            for lp in ports.values():  # warm-up, and a check that both paths work
                transfer(lp, "D", 1 << 20)
                transfer(lp, "U", 1 << 20)
            for r in range(args.rounds):
                order = ("openssh", "broker") if r % 2 == 0 else ("broker", "openssh")
                for p in order:
                    for d in ("D", "U"):
                        secs = transfer(ports[p], d, args.size)
                        results[p][d].append(secs)
                        log(f"round {r + 1} {p:8} {'down' if d == 'D' else 'up':4} "
                            f"{args.size / secs / 1e6:8.1f} MB/s")
            if args.jump_size:
                jump_bench(work, args, broker_port, bastion_port, info, jump)
        finally:  # the broker may still be closing recordings: stop it before the cleanup
            procs.stop_all()
            srv.terminate()
            srv.wait()
    mbps = {p: {d: args.size / statistics.median(v) / 1e6 for d, v in dirs.items()}
            for p, dirs in results.items()}
    size = f"{args.size >> 30} GiB" if args.size % (1 << 30) == 0 else f"{args.size >> 20} MiB"
    rows = []
    for d, name in (("D", "down (destination -> client)"), ("U", "up (client -> destination)")):
        ratio = mbps["broker"][d] / mbps["openssh"][d]
        rows.append(f"| {name} | {mbps['openssh'][d]:.0f} MB/s | {mbps['broker'][d]:.0f} MB/s "
                    f"| {ratio:.2f}x | {'met' if ratio >= 0.8 else 'missed'} |")
    section = (
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on this"
        f" machine ({os.cpu_count()} cores, Python {platform.python_version()}): {size} per "
        f"transfer through `ssh -N -L`, median of {args.rounds} alternating rounds, "
        f"{CIPHER}, one SSH connection per path, a new forwarded TCP connection per transfer.\n\n"
        "Command: `.venv/bin/python bench/forward.py`\n\n"
        "| direction | (a) OpenSSH sshd bastion | (b) broker | ratio | goal >= 0.8x |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        + rounds(args.size, results, "DU"))
    if args.jump_size:
        section += jump_section(args, jump)
    print(section)
    if not args.no_docs:
        write_docs(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
