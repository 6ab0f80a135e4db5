"""``bastion-broker demo``: a working bastion on embedded defaults with real sshd targets.

Writes a config, a users file, an inventory and grants under STATE_DIR, starts one OpenSSH sshd
per demo instance on loopback (trusting the broker's CA), runs the broker, and writes
``STATE_DIR/demo.json`` with everything a person or a test needs to connect. With ``--rdp`` also
a Windows-like RDP target (``broker.demo_rdp``) in the granted stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from broker.config import load_config
from broker.demo_rdp import NAME as RDP_NAME
from broker.demo_rdp import RdpTarget, running
from broker.domain import totp
from broker.domain.models import Grant, GrantState, Level, Trigger
from broker.errors import BrokerError, ConfigError
from broker.identity.passwords import hash_password
from broker.runtime import free_port
from broker.ssh.keys import load_or_create_key, load_or_create_user_ca

DOMAIN = "corp.example.com"
VPC = "vpc-0demo"
INSTANCES = [  # (id, name, stack)
    ("i-0web01", "web01", "stack-web"),
    ("i-0web02", "web02", "stack-web"),
    ("i-0db01", "db01", "stack-db"),
]
GRANTED_STACK = "stack-web"
# demo accounts with a role and no grant: the security console's auditor, an approver, and an
# admin (locks in the console; a second approver)
STAFF = {"auditor": "bastion-auditors", "approver": "bastion-approvers", "admin": "bastion-admins"}
ADMIN_LOGIN = "bb-admin"
READ_ONLY_LOGIN = "bb-readonly"


def find_sshd() -> str:
    path = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.access(path, os.X_OK):
        raise ConfigError("OpenSSH server (sshd) is not installed: run scripts/bootstrap first")
    return path


def _tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.access(path, os.X_OK):
        raise ConfigError(f"{name} not found: the demo needs it to create its target accounts")
    return path


def ensure_logins() -> tuple[str, str]:
    """Target logins for admin and read-only grants.

    As root: two unprivileged local accounts (created once, no password, key/cert login only).
    Otherwise sshd can only log in as the user running it, so both levels map to that user.
    """
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        return me, me
    for name in (ADMIN_LOGIN, READ_ONLY_LOGIN):
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(  # noqa: S603 - fixed arguments
                [_tool("useradd"), "--create-home", "--shell", "/bin/bash", name],
                check=True, capture_output=True,
            )
        # useradd leaves the account locked ('!'), which sshd refuses without PAM
        subprocess.run([_tool("usermod"), "-p", "*", name],  # noqa: S603 - fixed arguments
                       check=True, capture_output=True)
    return ADMIN_LOGIN, READ_ONLY_LOGIN


@dataclass
class Target:
    id: str
    name: str
    stack: str
    port: int
    dir: Path
    host_pub: str
    proc: subprocess.Popen[bytes] | None = None


def _write_sshd_config(t: Target, ca_pub: Path) -> Path:
    cfg = t.dir / "sshd_config"
    cfg.write_text(
        "\n".join([
            f"Port {t.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {t.dir / 'ssh_host_ed25519_key'}",
            f"PidFile {t.dir / 'sshd.pid'}",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "AuthorizedKeysFile none",
            f"TrustedUserCAKeys {ca_pub}",
            "PermitRootLogin no",
            "AllowAgentForwarding no",
            # the broker's forwarding certificates only (ProxyJump -L/-D to the target's
            # loopback, VS Code Remote-SSH); session certificates do not permit it
            "AllowTcpForwarding local",
            "PermitOpen localhost:* 127.0.0.1:* [::1]:*",
            "X11Forwarding no",
            "AcceptEnv LANG LC_*",
            "MaxStartups 200:30:400",
            "MaxSessions 50",
            "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp",
            "",
        ])
    )
    return cfg


def start_target(t: Target, ca_pub: Path) -> None:
    cfg = _write_sshd_config(t, ca_pub)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = open(t.dir / "sshd.log", "ab")  # noqa: SIM115 - handed to the child process
    start = log.tell()
    t.proc = subprocess.Popen([find_sshd(), "-D", "-e", "-f", str(cfg)],  # noqa: S603
                              stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    # Ready when sshd says so in its log: probing the port would show up as a connection.
    log_path = t.dir / "sshd.log"
    for _ in range(500):
        if t.proc.poll() is not None:
            raise ConfigError(f"sshd for {t.name} exited; see {log_path}")
        with open(log_path, "rb") as f:
            f.seek(start)
            if f"Server listening on 127.0.0.1 port {t.port}".encode() in f.read():
                return
        time.sleep(0.01)
    raise ConfigError(f"sshd for {t.name} did not start listening on port {t.port}")


def stop_target(t: Target) -> None:
    if t.proc and t.proc.poll() is None:
        t.proc.terminate()
        try:
            t.proc.wait(5)
        except subprocess.TimeoutExpired:
            t.proc.kill()
            t.proc.wait()


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def prepare(state_dir: Path, ssh_port: int, users: int, workers: int = 1,
            public_keys: bool = False, rdp: RdpTarget | None = None) -> dict[str, Any]:
    """Write config, keys, users, inventory and grants; return the demo description.

    ``rdp``: the running Windows-like target, listed in the granted stack (RDP port 3389 maps to
    its real port, as for any Windows instance)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    ca_key = load_or_create_user_ca(state_dir / "ca" / "user_ca")
    ca_pub = state_dir / "ca" / "user_ca.pub"
    ca_pub.write_bytes(ca_key.export_public_key())
    admin_login, ro_login = ensure_logins()

    targets: list[Target] = []
    for iid, name, stack in INSTANCES:
        d = state_dir / "targets" / name
        d.mkdir(parents=True, exist_ok=True)
        hk = load_or_create_key(d / "ssh_host_ed25519_key", f"demo target {name}")
        targets.append(Target(iid, name, stack, free_port(), d,
                              hk.export_public_key().decode().strip()))

    inv = []
    for stack in ("stack-web", "stack-db"):
        inv.append(f'[[stacks]]\nid = "{stack}"\nvpc = "{VPC}"\n')
        for t in targets:
            if t.stack == stack:
                inv.append(
                    f'[[stacks.instances]]\nid = "{t.id}"\nname = "{t.name}"\n'
                    f'address = "127.0.0.1"\nport = {t.port}\nos = "linux"\n'
                    f"host_keys = [{_toml_str(t.host_pub)}]\n"
                )
        if rdp is not None and stack == GRANTED_STACK:
            inv.append(f'[[stacks.instances]]\nid = "{rdp.id}"\nname = "{rdp.name}"\n'
                       f'address = "127.0.0.1"\nport = {rdp.port}\nos = "windows"\n')
    (state_dir / "inventory.toml").write_text("\n".join(inv))

    password = secrets.token_urlsafe(12)
    pw_hash = hash_password(password)  # one hash shared by all demo users: the demo is one person
    names = ["alice"] + [f"user{n:03d}" for n in range(2, users + 1)]
    web_port = free_port()
    diag_port = free_port()
    (state_dir / "users.toml").write_text("".join(
        f'[[users]]\nname = "{n}"\npassword_hash = {_toml_str(pw_hash)}\ngroups = ["ops"]\n\n'
        for n in names
    ) + "".join(
        f'[[users]]\nname = "{n}"\npassword_hash = {_toml_str(pw_hash)}\n'
        f'groups = ["ops", "{group}"]\n\n' for n, group in STAFF.items()
    ))
    (state_dir / "broker.toml").write_text(
        f'state_dir = "."\n\n[ssh]\nlisten_host = "127.0.0.1"\nlisten_port = {ssh_port}\n'
        f"workers = {workers}\n\n"
        f'[upstream]\nadmin_login = "{admin_login}"\nread_only_login = "{ro_login}"\n\n'
        f'[identity]\nbackend = "static"\nusers_file = "users.toml"\n'
        f'default_domain = "{DOMAIN}"\ndomain_aliases = {{ CORP = "{DOMAIN}" }}\n'
        + ("public_keys = true\n" if public_keys else "") + "\n"
        f'[inventory]\nbackend = "static"\nfile = "inventory.toml"\n\n'
        "# The demo auditor reads every session and the audit log; the approver decides requests\n"
        f'[roles]\nauditor_groups = ["{STAFF["auditor"]}"]\n'
        f'approver_groups = ["{STAFF["approver"]}"]\n'
        f'admin_groups = ["{STAFF["admin"]}"]\n\n'
        "# Every demo client comes from loopback: never penalise it for failed logins\n"
        '[limits]\npenalty_exempt = ["127.0.0.0/8", "::1/128"]\n\n'
        "# The grant API over plain HTTP on loopback: cookies without the Secure flag\n"
        f'[web]\nlisten_host = "127.0.0.1"\nlisten_port = {web_port}\nsecure_cookies = false\n\n'
        "# Health and metrics (/healthz, /readyz, /metrics) on loopback; with workers, one port\n"
        "# each from this one up\n"
        f'[diag]\nenabled = true\nlisten_host = "127.0.0.1"\nlisten_port = {diag_port}\n'
    )
    return {"targets": targets, "password": password, "names": names,
            "ca_pub": ca_pub, "logins": (admin_login, ro_login),
            "web_url": f"http://127.0.0.1:{web_port}",
            "diag_url": f"http://127.0.0.1:{diag_port}"}


def demo_user_key(state_dir: Path) -> Path:
    """The demo's user key (private, OpenSSH format), created once: ``--public-keys``."""
    path = state_dir / "demo_user_ed25519"
    load_or_create_key(path, "bastion-broker demo user key")  # also writes PATH.pub
    return path


async def _seed(config_path: Path, names: list[str],
                user_key: Path | None = None) -> dict[str, str]:
    """Enrol TOTP and grant read-only access to the web stack for every demo user (and register
    ``user_key`` for each, when given)."""
    from broker.stores import open_stores

    config = load_config(config_path)
    stores = open_stores(config, "broker")
    now = stores.clock.now()
    secrets_by_user: dict[str, str] = {}
    try:
        for n in names:
            key = f"{n}@{DOMAIN}"
            secret = totp.new_secret()
            await stores.totp.set_secret(key, secret)
            if user_key is not None:
                pub = user_key.with_name(user_key.name + ".pub").read_text().strip()
                await stores.keys.add(key, pub, "demo")
            secrets_by_user[n] = secret
            grant = Grant(
                id=f"g-demo-{n}", username=n, domain=DOMAIN, stack_ids=(GRANTED_STACK,),
                vpc_id=VPC, level=Level.READ_ONLY, state=GrantState.APPROVED,
                starts_at=now, expires_at=now + timedelta(hours=8), trigger=Trigger.INCIDENT,
                ticket="DEMO-1", reason="bastion-broker demo", requested_by=n,
                approved_by="demo", created_at=now,
            )
            if await stores.grants.get(grant.id) is None:
                await stores.grants.add(grant)
            else:  # a restarted demo renews its grants for another 8 hours
                await stores.grants.replace(grant)
            stores.audit.emit("grant.added", grant_id=grant.id, user=key, actor="demo",
                              level=str(grant.level), expires_at=grant.expires_at.isoformat())
        for n in STAFF:  # TOTP only: their role comes from their group, access needs a grant
            secret = totp.new_secret()
            await stores.totp.set_secret(f"{n}@{DOMAIN}", secret)
            secrets_by_user[n] = secret
    finally:
        await stores.close()
    return secrets_by_user


def run_demo(state_dir: Path, ssh_port: int, users: int, workers: int = 1,
             public_keys: bool = False, rdp: bool = False) -> int:
    """Run the demo until SIGINT/SIGTERM; with ``rdp`` also the RDP target ``win01``, started
    first (its port goes into the inventory) and stopped last."""
    state_dir = state_dir.resolve()
    if not rdp:
        return _run_demo(state_dir, ssh_port, users, workers, public_keys, None)
    with running(state_dir / "targets" / RDP_NAME) as win:
        return _run_demo(state_dir, ssh_port, users, workers, public_keys, win)


def _run_demo(state_dir: Path, ssh_port: int, users: int, workers: int, public_keys: bool,
              rdp: RdpTarget | None) -> int:
    from broker import logs
    from broker.app import run

    info = prepare(state_dir, ssh_port, users, workers, public_keys, rdp)
    config_path = state_dir / "broker.toml"
    config = load_config(config_path)
    logs.configure(config.log_level)
    user_key = demo_user_key(state_dir) if public_keys else None
    secrets_by_user = asyncio.run(_seed(config_path, info["names"], user_key))
    targets: list[Target] = info["targets"]
    try:
        for t in targets:
            start_target(t, info["ca_pub"])

        def ready(port: int) -> None:
            users_out = [
                {"user": n, "password": info["password"], "totp_secret": secrets_by_user[n]}
                for n in info["names"]
            ]
            desc = {
                "ssh_host": "127.0.0.1", "ssh_port": port, "user": "alice",
                "password": info["password"], "totp_secret": secrets_by_user["alice"],
                "domain": DOMAIN,
                "targets": [t.name for t in targets if t.stack == GRANTED_STACK],
                "denied_target": next(t.name for t in targets if t.stack != GRANTED_STACK),
                "config": str(config_path),
                "admin_login": info["logins"][0], "read_only_login": info["logins"][1],
                "target_ports": {t.name: t.port for t in targets},
                "target_logs": {t.name: str(t.dir / "sshd.log") for t in targets},
                "users": users_out, "pid": os.getpid(), "web_url": info["web_url"],
                "diag_url": info["diag_url"],
                "user_key": str(user_key) if user_key else None,
                # the console's demo staff (roles from their groups; no grant)
                **{n: {"user": n, "password": info["password"],
                       "totp_secret": secrets_by_user[n], "group": group}
                   for n, group in STAFF.items()},
                # the Windows-like target's own account (RDP/NLA), reached through ssh -L
                "rdp": rdp.describe() if rdp else None,
            }
            out = state_dir / "demo.json"
            tmp = state_dir / "demo.json.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(desc, f, indent=2)
            tmp.replace(out)
            print(  # noqa: T201 - this is the demo's user interface
                f"\nbastion-broker demo is running (Ctrl-C to stop)\n"
                f"  connect:   ssh -p {port} alice+web01@127.0.0.1\n"
                f"  menu:      ssh -p {port} alice@127.0.0.1\n"
                f"  password:  {info['password']}\n"
                f"  TOTP:      secret {secrets_by_user['alice']} "
                f"(code now: bastion-broker totp code --secret {secrets_by_user['alice']})\n"
                f"  denied:    ssh -p {port} alice+{desc['denied_target']}@127.0.0.1\n"
                f"  sessions:  bastion-broker --config {config_path} sessions list\n"
                f"  API:       {info['web_url']}/api/openapi.json "
                f"(bastion-broker --api {info['web_url']} login)\n"
                f"  metrics:   {info['diag_url']}/metrics (/healthz, /readyz)\n"
                + (f"  RDP:       ssh -p {port} -N -L 13389:{rdp.name}:3389 alice@127.0.0.1\n"
                   f"             then xfreerdp /v:localhost:13389 /u:{rdp.user} "
                   f"/p:{rdp.password} /cert:ignore\n" if rdp else "")
                + f"  details:   {out}\n",
                flush=True,
            )

        # SIGHUP to the pid in demo.json reloads config_path (with workers: in each of them)
        status = run(config, on_ready=ready, config_path=config_path)
    except BrokerError as exc:
        print(f"bastion-broker: error: {exc.user_message}", file=sys.stderr)  # noqa: T201
        return 2
    finally:
        for t in targets:
            stop_target(t)
        with contextlib.suppress(FileNotFoundError):
            (state_dir / "demo.json").unlink()
    return status

