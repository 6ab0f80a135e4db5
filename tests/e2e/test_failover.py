"""Failover of a fleet: a real HAProxy (PROXY protocol v2, health checks on each broker's
``/readyz``) in front of three brokers on one PostgreSQL, shipping to one S3 bucket (moto), used
with the real OpenSSH client. Logins spread over the brokers; ``kill -9`` of one leaves the
sessions on the others untouched and new logins working; back with the same configuration, it
repairs and ships the killed session's recording and closes its row; a revoke through one
broker ends the user's sessions on all of them.

One fleet for the whole story (starting it is most of the cost); every wait is a poll with a
deadline, generous because other suites share the machine.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pyotp
import pytest

from broker.domain import recording as fmt
from tests import haproxy
from tests.aws.conftest import REGION, MotoServer
from tests.conftest import BIN, Demo, broker_cli
from tests.contract import pgserver
from tests.e2e.test_durability import BrokerProcess, Client
from tests.haproxy import HAProxy, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.fleet, pytest.mark.postgres, pytest.mark.s3]

NAMES = ("b1", "b2", "b3")
ENFORCE_S = 1.0  # [grants] enforce_interval_seconds: how soon a revoke reaches every broker
CHECK_INTER_MS, FALL, RISE = 500, 2, 2
SOURCE = "127.0.0.5"  # the client's address, carried to the brokers in the PROXY header

SECTIONS = """frontend ssh
  bind 127.0.0.1:{front}
  default_backend bastions
backend bastions
  balance leastconn
  option redispatch
  retries 3
  option httpchk GET /readyz
  http-check expect status 200
  default-server send-proxy-v2 check inter {inter}ms fall {fall} rise {rise}
{servers}"""


def wait_for(what: str, ok: Callable[[], object], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := ok()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


@dataclass
class Node:
    """One broker of the fleet: its config, ports and directories (the same across restarts)."""

    name: str
    cfg: Path
    ssh_port: int
    diag_port: int
    dir: Path
    proc: BrokerProcess | None = None

    @property
    def rec(self) -> Path:
        return self.dir / "rec"

    @property
    def audit(self) -> Path:
        return self.dir / "audit.jsonl"

    def start(self) -> None:
        self.proc = BrokerProcess(self.cfg, self.dir / "broker.log")

    def live(self) -> set[str]:
        """Sessions this broker is recording now (their ``.open`` markers)."""
        d = self.rec / ".open"
        return {m.name for m in d.iterdir()} if d.is_dir() else set()

    def events(self, event: str) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        lines = (json.loads(x) for x in self.audit.read_text().splitlines() if x)
        return [e for e in lines if e.get("event") == event]


@dataclass
class Fleet:
    nodes: list[Node]
    lb: HAProxy
    front: int
    known: Path
    s3: Any
    bucket: str
    tmp: Path


@pytest.fixture(scope="module")
def fleet(demo: Demo, moto: MotoServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("failover")
    s3 = boto3.client("s3", endpoint_url=moto.url, region_name=REGION)
    bucket = f"fleet-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    with pgserver.running() as pg:
        nodes = []
        for name in NAMES:
            d = tmp / name
            ssh_port, diag_port = free_port(), free_port()
            extra = (
                "[web]\nenabled = false\n"
                f"[diag]\nenabled = true\nlisten_port = {diag_port}\n"
                f'[recordings]\ndir = "{d / "rec"}"\n[audit]\npath = "{d / "audit.jsonl"}"\n'
                f'[shipping]\nspool_dir = "{d / "spool"}"\n'
                f'[shipping.s3]\nbucket = "{bucket}"\nregion = "{REGION}"\n'
                f'endpoint_url = "{moto.url}"\nmax_attempts = 1\nconnect_timeout_seconds = 2\n'
                "read_timeout_seconds = 5\nbackoff_initial_seconds = 0.2\n"
                "backoff_max_seconds = 1\nsettle_seconds = 0.5\nscan_interval_seconds = 0.2\n"
                "delete_local_after_upload = false\n")
            cfg = demo.fleet_config(
                tmp, name, pg.dsn(), extra=extra, enforce_interval=ENFORCE_S,
                listen_port=ssh_port,
                ssh="proxy_protocol = true\ntrusted_proxies = ['127.0.0.1/32']\n",
                # the first login with a code opens the window for the later ones from SOURCE,
                # on whichever broker (it lives in PostgreSQL)
                totp="reauth_window_seconds = 900\n")
            nodes.append(Node(name, cfg, ssh_port, diag_port, d))
        try:
            with ThreadPoolExecutor(len(nodes)) as pool:  # one migrates, the others wait
                list(pool.map(Node.start, nodes))
            front = free_port()
            servers = "".join(f"  server {n.name} 127.0.0.1:{n.ssh_port} check port "
                              f"{n.diag_port}\n" for n in nodes)
            sections = SECTIONS.format(front=front, inter=CHECK_INTER_MS, fall=FALL, rise=RISE,
                                       servers=servers)
            with haproxy.running(tmp, sections, [front]) as lb:
                yield Fleet(nodes, lb, front, demo.known_hosts_for(tmp, front), s3, bucket,
                            tmp)
        finally:
            for n in nodes:
                if n.proc is not None and n.proc.proc.poll() is None:
                    n.proc.proc.send_signal(signal.SIGTERM)
                    n.proc.wait(40)
            for n in nodes:
                log = (n.dir / "broker.log").read_text(errors="replace")
                assert "Traceback" not in log, f"{n.name}:\n{log[-4000:]}"


class Term(Client):
    """An interactive session (``ssh -tt``) through the balancer, from ``SOURCE``."""

    def __init__(self, demo: Demo, user: str, fleet: Fleet, code: str) -> None:
        args = demo.ssh_args(f"{user}+web01", "-tt", "-b", SOURCE, port=fleet.front,
                             known_hosts=fleet.known)
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=demo.env(user, code=code))
        self.out = b""
        self.err = b""
        self.n = 0

    def echo(self, timeout: float = 30) -> None:
        """Type a command; its output (not the echo of the typing) must come back."""
        self.n += 1
        self.send(f"echo tick-$((1000+{self.n}))\n".encode())
        self.pump(f"tick-{1000 + self.n}".encode(), timeout)


def login_once(demo: Demo, user: str, fleet: Fleet) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*demo.ssh_args(f"{user}+web01", "-b", SOURCE, port=fleet.front,
                        known_hosts=fleet.known), "echo ok"],
        capture_output=True, timeout=60, env=demo.env(user, code=""))


def rows(fleet: Fleet, user: str) -> list[dict[str, Any]]:
    out = broker_cli(fleet.nodes[0].cfg, "sessions", "list", "--json", "--limit", "1000")
    return [r for r in json.loads(out) if str(r["user"]).startswith(user + "@")]


def test_failover_behind_haproxy(demo: Demo, fleet: Fleet) -> None:
    nodes = fleet.nodes
    inter = CHECK_INTER_MS / 1000
    fleet.lb.wait_states("bastions", dict.fromkeys(NAMES, "UP"))
    user = demo.take_user()
    cfg = nodes[0].cfg
    secret = re.search(r"secret=([A-Z2-7]+)", broker_cli(cfg, "totp", "enroll", user))
    assert secret is not None
    grant = json.loads(broker_cli(
        cfg, "grant", "add", "--user", user, "--domain", demo.info["domain"], "--stack",
        "stack-web", "--vpc", "vpc-0demo", "--level", "read-only", "--ticket", "CHG-20",
        "--reason", "failover", "--json"))

    # 1. three interactive sessions in a row: one on each broker (leastconn, all up)
    terms: dict[str, Term] = {}
    clients: list[Term] = []
    try:
        for i in range(3):
            code = pyotp.TOTP(secret.group(1)).now() if i == 0 else ""
            before = {n.name: n.live() for n in nodes}
            t = Term(demo, user, fleet, code)
            clients.append(t)
            t.echo(60)
            (holder,) = wait_for("the session's recording", lambda b=before: [
                n for n in nodes if n.live() - b[n.name]])
            assert holder.name not in terms, f"two sessions on {holder.name}"
            terms[holder.name] = t
        live = {n.name: next(iter(n.live())) for n in nodes}
        for n in nodes:  # each broker saw the client's own address, not the balancer's
            peers = {e["peer"].rsplit(":", 1)[0] for e in n.events("auth.success")}
            assert peers == {SOURCE}, (n.name, peers)
            (row,) = [r for r in rows(fleet, user) if r["id"] == live[n.name]]
            assert row["recording"].startswith(str(n.rec)) and row["ended_at"] is None
            assert row["peer"].startswith(SOURCE + ":")

        # 2. kill -9 the second broker; the sessions on the others go on
        victim, others = nodes[1], [nodes[0], nodes[2]]
        assert victim.proc is not None
        victim.proc.proc.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        assert victim.proc.wait(30) == -signal.SIGKILL
        dropped = terms[victim.name]
        assert dropped.finish(30) == 255  # its client sees the connection go
        assert b"closed by remote host" in dropped.err, dropped.err
        for n in others:
            terms[n.name].echo()
        # new logins work at once, none refused: until its health checks fail, HAProxy
        # tries the dead broker (leastconn: it has no session left) and, refused there,
        # redispatches to a live one; then it stops sending there (fall x inter)
        for _ in range(3):
            r = login_once(demo, user, fleet)
            assert r.returncode == 0 and r.stdout == b"ok\n", r.stderr
        fleet.lb.wait_states("bastions", {victim.name: "DOWN"}, timeout=30)
        assert time.monotonic() - t_kill < FALL * inter + 10  # 1 s on a quiet machine
        for n in others:
            terms[n.name].echo()
        assert victim.live() == {live[victim.name]}  # the marker a crash leaves

        # 3. back with the same config: repaired, row closed, shipped; HAProxy takes it back
        victim.start()
        sid = live[victim.name]
        (row,) = [r for r in rows(fleet, user) if r["id"] == sid]
        assert row["ended_at"] is not None and row["exit_status"] == "interrupted", row
        (end,) = [e for e in victim.events("session.end") if e["session_id"] == sid]
        assert end["synthesized"] is True and end["reason"] == "interrupted"
        assert not victim.live()
        fleet.lb.wait_states("bastions", dict.fromkeys(NAMES, "UP"),
                             timeout=RISE * inter + 20)
        (up,) = wait_for("the repaired recording shipped", lambda: [
            e for e in victim.events("recording.uploaded") if e["session_id"] == sid])
        check_shipped(fleet, victim, sid, up["objects"])
        for n in others:
            terms[n.name].echo()

        # a new session goes to the broker with none (leastconn): the user is on all three
        before = victim.live()
        again = Term(demo, user, fleet, "")
        clients.append(again)
        again.echo(60)
        assert wait_for("a session on the restarted broker", lambda: victim.live() - before)
        terms[victim.name] = again

        # 4. a revoke through one broker ends the user's sessions on all of them
        broker_cli(nodes[2].cfg, "grant", "revoke", grant["id"])
        t0 = time.monotonic()
        for name, t in terms.items():
            assert t.finish(30) == 255, name
            # with a PTY the message comes on the terminal, not on stderr
            assert b"access ended (grant revoked)" in t.out, (name, t.out[-300:], t.err)
        assert time.monotonic() - t0 < ENFORCE_S + 10  # about 1 s on a quiet machine
        wait_for("every row closed", lambda: all(r["ended_at"] for r in rows(fleet, user)), 30)
    finally:
        for t in clients:
            if t.proc.poll() is None:
                t.proc.kill()
                t.proc.wait()


def check_shipped(fleet: Fleet, node: Node, sid: str, objects: list[dict[str, Any]]) -> None:
    """The repaired session's files are in S3 byte for byte as on the broker (SHA-256 in the
    object's metadata, as the shipper checks), and the S3 copy alone verifies against its
    signed manifest as an interrupted session."""
    names = {o["key"].rsplit("/", 1)[1] for o in objects}
    assert {f"{sid}.rec", f"{sid}.manifest.json", f"{sid}.cast"} <= names, names
    copy = fleet.tmp / f"from-s3-{sid}"
    for o in objects:
        got = fleet.s3.get_object(Bucket=fleet.bucket, Key=o["key"])
        body = got["Body"].read()
        digest = hashlib.sha256(body).hexdigest()
        assert digest == o["sha256"] == got["Metadata"]["sha256"]
        day = o["key"].split("/")[-3]
        (local,) = node.rec.glob(f"{day}/{o['key'].rsplit('/', 1)[1]}")
        assert local.read_bytes() == body
        (copy / day).mkdir(parents=True, exist_ok=True)
        (copy / day / o["key"].rsplit("/", 1)[1]).write_bytes(body)
    rec = fmt.parse((next(copy.glob(f"*/{sid}.rec"))).read_bytes())
    last = rec.frames[-1]
    assert (last.kind, last.data) == (fmt.EXIT, b"interrupted")
    cfg = node.cfg.with_name("verify-s3.toml")
    cfg.write_text(re.sub(r'(\[recordings\]\ndir = )"[^"]*"', rf'\1"{copy}"',
                          node.cfg.read_text()))
    r = subprocess.run([str(BIN), "--config", str(cfg), "verify", sid, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    checked = json.loads(r.stdout)["reports"][0]["checked"]
    assert checked["interrupted"] is True and checked["exit_status"] == "interrupted"
