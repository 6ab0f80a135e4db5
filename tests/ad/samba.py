"""A real Samba AD DC on loopback, provisioned into a temp dir: used by the AD test fixture
(tests/ad/conftest.py) and the login benchmark (bench/ad_logins.py).

Samba's LDAP ports are fixed (389/636 on loopback), so only one DC can run per machine:
``preflight`` refuses to start if they are taken instead of using someone else's server.

Process model: Samba 4.17's default (also with ``-i``) is ``prefork``: a master plus "prefork
children" (4) LDAP worker processes, each connection served by one of them, so the DC uses every
core as a production DC would. ``start(model=...)`` can pick ``single`` or ``standard`` to compare.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REALM = "CORP.EXAMPLE.TEST"
FQDN = "corp.example.test"
NETBIOS = "CORP"
BASE_DN = "DC=corp,DC=example,DC=test"
ADMIN_PASSWORD = "Adm1n!Passw0rd-bb"
PASSWORD = "Corr3ct!Horse-bb"
SVC_USER = "svc-bastion"
SVC_PASSWORD = "Svc!Acc0unt-pw-bb"
LDAP_PORTS = (389, 636, 3268, 3269)

# name -> (groups, extra attributes); every user gets PASSWORD unless told otherwise
USERS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "alice": (["bastion-users", "bastion-approvers"], {}),
    "wendy": (["bastion-users"], {}),            # wrong-password cases
    "tim": (["bastion-users"], {}),              # timing: many wrong passwords
    "disabled-dan": (["bastion-users"], {"userAccountControl": 514}),
    "expired-erin": (["bastion-users"], {"expired": True}),
    "change-chris": (["bastion-users"], {"pwdLastSet": 0}),
    "locked-lou": (["bastion-users"], {}),       # a lockout policy applies (with locked-lara)
    "locked-lara": (["bastion-users"], {}),      # lookup of a locked-out account
    "outsider-olga": (["other-group"], {}),
    "nested-nick": (["ops-team"], {}),           # bastion-users > ops-team > nested-nick
    "deep-dora": (["deep-team"], {}),            # bastion-users > ops-team > deep-team > deep-dora
    "auditor-ann": (["bastion-auditors", "ops-team"], {}),
    "carl": (["bastion-users"], {"cn": "Carl Ops", "upn": "carl.ops@corp.example.test"}),
    "a(b)": (["bastion-users"], {}),              # filter metacharacters in a real name
    "sneaky-sam": (["role:approver"], {}),        # in a group whose CN looks like a role marker
}
# group -> parent groups
GROUPS: dict[str, list[str]] = {
    "bastion-users": [],
    "ops-team": ["bastion-users"],
    "deep-team": ["ops-team"],
    "bastion-approvers": [],
    "bastion-auditors": [],
    "other-group": [],
    "role:approver": ["bastion-users"],           # a group whose CN looks like a role marker
}


def _filetime(dt: datetime) -> int:
    return int((dt - datetime(1601, 1, 1, tzinfo=UTC)).total_seconds() * 10_000_000)


def _port_taken(port: int) -> bool:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect((host, port))
                return True
            except OSError:
                pass
    return False


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A throwaway CA (certificate, key)."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", f"/CN={name}"],
        check=True, capture_output=True,
    )
    return cert, key


def make_leaf(directory: Path, ca: tuple[Path, Path], sans: str) -> tuple[Path, Path]:
    """A server certificate signed by ``ca`` with the given subjectAltName (key mode 600)."""
    key, csr, cert = directory / "dc.key", directory / "dc.csr", directory / "dc.pem"
    subprocess.run(
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
         "-subj", f"/CN=dc1.{FQDN}"],
        check=True, capture_output=True,
    )
    ext = directory / "dc.ext"
    ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    subprocess.run(
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
         "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)],
        check=True, capture_output=True,
    )
    key.chmod(0o600)
    return cert, key


@dataclass
class SambaDC:
    """A provisioned DC in ``root``; ``start``/``stop`` can be called repeatedly on the same dir."""

    root: Path
    ca_file: Path
    other_ca_file: Path
    proc: subprocess.Popen[bytes] | None = None
    users: dict[str, str] = field(default_factory=dict)  # sAMAccountName -> DN
    groups: dict[str, str] = field(default_factory=dict)  # CN -> DN
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def smb_conf(self) -> Path:
        return self.root / "dc" / "etc" / "smb.conf"

    def start(self, timeout: float = 60, model: str | None = None) -> None:
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return
            out = open(self.root / "samba.out", "ab")
            self.proc = subprocess.Popen(
                ["samba", "-s", str(self.smb_conf), "-i", "--debug-stdout",
                 *(["-M", model] if model else [])],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            out.close()
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    tail = (self.root / "samba.out").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"samba exited with {self.proc.returncode}:\n{tail}")
                if _port_taken(636) and self._ldaps_answers():
                    return
                if time.monotonic() > deadline:
                    self._kill()
                    raise RuntimeError(f"samba did not open 636 within {timeout} s")
                time.sleep(0.1)

    def _ldaps_answers(self) -> bool:
        """636 accepting is not enough right after start: wait for a completed TLS handshake."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with socket.create_connection(("127.0.0.1", 636), timeout=2) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        with self._lock:
            self._kill()
            deadline = time.monotonic() + 15
            while _port_taken(636) and time.monotonic() < deadline:
                time.sleep(0.1)

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        # prefork children and helpers share the session we started: end that group by its id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(10)

    def admin(self) -> Any:
        """An ldap3 connection bound as Administrator over validated LDAPS."""
        import ldap3  # type: ignore[import-untyped]

        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(self.ca_file))
        server = ldap3.Server("127.0.0.1", port=636, use_ssl=True, tls=tls, connect_timeout=5)
        conn = ldap3.Connection(server, user=f"Administrator@{FQDN}", password=ADMIN_PASSWORD,
                                receive_timeout=10, auto_referrals=False, raise_exceptions=True)
        conn.open()
        conn.bind()
        return conn

    def add_users(self, names: list[str], groups: list[str], password: str = PASSWORD) -> None:
        """More users (e.g. for the benchmark), each a direct member of ``groups``."""
        import ldap3

        conn = self.admin()
        try:
            for name in names:
                dn = f"CN={ldap3.utils.dn.escape_rdn(name)},CN=Users,{BASE_DN}"
                conn.add(dn, ["top", "person", "organizationalPerson", "user"], {
                    "sAMAccountName": name, "userPrincipalName": f"{name}@{FQDN}",
                    "unicodePwd": f'"{password}"'.encode("utf-16-le"), "userAccountControl": 512,
                })
                self.users[name] = dn
            for g in groups:
                conn.modify(self.groups[g], {"member": [(ldap3.MODIFY_ADD,
                                                         [self.users[n] for n in names])]})
        finally:
            conn.unbind()

    def populate(self) -> None:
        """Users, nested groups and a lockout policy for one user only, over LDAP (one connection
        instead of ~30 samba-tool processes at ~1 s each)."""
        import ldap3

        conn = self.admin()
        users_ou = f"CN=Users,{BASE_DN}"

        def pw(p: str) -> bytes:
            return f'"{p}"'.encode("utf-16-le")

        def esc(cn: str) -> str:
            return ldap3.utils.dn.escape_rdn(cn)

        for name in GROUPS:
            dn = f"CN={esc(name)},{users_ou}"
            conn.add(dn, ["top", "group"], {"sAMAccountName": name.replace(":", "-")})
            self.groups[name] = dn
        all_users = {SVC_USER: ([], {}), **USERS}
        for name, (_groups, extra) in all_users.items():
            dn = f"CN={esc(extra.get('cn', name))},{users_ou}"
            attrs: dict[str, Any] = {
                "sAMAccountName": name,
                "userPrincipalName": extra.get("upn", f"{name}@{FQDN}"),
                "unicodePwd": pw(SVC_PASSWORD if name == SVC_USER else PASSWORD),
                "userAccountControl": extra.get("userAccountControl", 512),
            }
            if "pwdLastSet" in extra:
                attrs["pwdLastSet"] = extra["pwdLastSet"]
            if extra.get("expired"):
                attrs["accountExpires"] = _filetime(datetime.now(UTC) - timedelta(days=1))
            conn.add(dn, ["top", "person", "organizationalPerson", "user"], attrs)
            self.users[name] = dn
        for name, (groups, _extra) in USERS.items():
            for g in groups:
                conn.modify(self.groups[g], {"member": [(ldap3.MODIFY_ADD, [self.users[name]])]})
        for name, parents in GROUPS.items():
            for p in parents:
                conn.modify(self.groups[p], {"member": [(ldap3.MODIFY_ADD, [self.groups[name]])]})
        # A fine-grained password policy: lockout after 3 bad passwords, for locked-* only, so
        # other tests may fail passwords freely.
        conn.add(
            f"CN=bb-lockout,CN=Password Settings Container,CN=System,{BASE_DN}",
            ["msDS-PasswordSettings"],
            {
                "msDS-PasswordSettingsPrecedence": 1,
                "msDS-PasswordReversibleEncryptionEnabled": "FALSE",
                "msDS-PasswordHistoryLength": 0,
                "msDS-PasswordComplexityEnabled": "FALSE",
                "msDS-MinimumPasswordLength": 1,
                "msDS-MinimumPasswordAge": 0,
                "msDS-MaximumPasswordAge": -(10**15),
                "msDS-LockoutThreshold": 3,
                "msDS-LockoutObservationWindow": -18_000_000_000,
                "msDS-LockoutDuration": -18_000_000_000,
                "msDS-PSOAppliesTo": [self.users["locked-lou"], self.users["locked-lara"]],
            },
        )
        conn.unbind()


def preflight() -> str | None:
    """Why a DC cannot be started here (not root, tools missing, ports taken); None if it can."""
    if os.geteuid() != 0:
        return "the Samba AD DC needs root (samba binds 389/636)"
    for tool in ("samba", "samba-tool", "openssl"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found: run scripts/bootstrap (installs samba, samba-ad-dc)"
    taken = [p for p in LDAP_PORTS if _port_taken(p)]
    if taken:
        return (f"ports {taken} on loopback are already in use (another samba or LDAP server?); "
                "the AD DC needs them free: only one DC can run per machine")
    return None


@contextlib.contextmanager
def running_dc(model: str | None = None) -> Iterator[SambaDC]:
    """Provision, start and populate a DC in a temp dir; stopped and removed on exit."""
    problem = preflight()
    if problem:
        raise RuntimeError(problem)
    root = Path(tempfile.mkdtemp(prefix="bb-samba-"))
    dc: SambaDC | None = None
    try:
        dc = provision(root)
        dc.start(model=model)
        dc.populate()
        yield dc
    finally:
        if dc is not None:
            dc.stop()
        shutil.rmtree(root, ignore_errors=True)


def provision(root: Path) -> SambaDC:
    """Certificates and ``samba-tool domain provision`` (~12-18 s); not started yet."""
    certs = root / "certs"
    certs.mkdir()
    ca = make_ca(certs, "bb-test-ca")
    other = root / "other"
    other.mkdir()
    other_ca, _ = make_ca(other, "unrelated-ca")
    # No IP:::1 on purpose: connecting to [::1] must fail the hostname check.
    cert, key = make_leaf(certs, ca, f"DNS:dc1.{FQDN},DNS:localhost,IP:127.0.0.1")
    d = root / "dc"
    (d / "run").mkdir(parents=True)
    (d / "cache").mkdir()
    opts = {
        "interfaces": "lo", "bind interfaces only": "yes", "server services": "ldap, kdc",
        "pid directory": f"{d}/run", "log file": f"{d}/log.%m", "disable netbios": "yes",
        "ncalrpc dir": f"{d}/run/ncalrpc", "winbindd socket directory": f"{d}/run/wb",
        "tls keyfile": str(key), "tls certfile": str(cert), "tls cafile": "",
    }
    args = [
        "samba-tool", "domain", "provision", f"--targetdir={d}", f"--realm={REALM}",
        f"--domain={NETBIOS}", "--server-role=dc", "--dns-backend=NONE",
        f"--adminpass={ADMIN_PASSWORD}", "--host-name=dc1", "--host-ip=127.0.0.1",
        *[f"--option={k}={v}" for k, v in opts.items()],
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(
            f"samba-tool domain provision failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return SambaDC(root=root, ca_file=ca[0], other_ca_file=other_ca)


def ad_settings_dict(dc: SambaDC, **overrides: Any) -> dict[str, Any]:
    """Raw ``[identity.ad]`` settings for the test domain; ``overrides`` replace domain or
    top-level keys."""
    domain: dict[str, Any] = {
        "fqdn": FQDN, "netbios": NETBIOS, "servers": ["ldaps://127.0.0.1:636"],
        "base_dn": BASE_DN, "bind_user": f"{SVC_USER}@{FQDN}", "bind_password": SVC_PASSWORD,
        "ca_file": str(dc.ca_file), "required_groups": ["bastion-users"],
        "approver_groups": [f"CN=bastion-approvers,CN=Users,{BASE_DN}"],
        "auditor_groups": ["bastion-auditors"],
    }
    top: dict[str, Any] = {"connect_timeout_seconds": 5, "operation_timeout_seconds": 10}
    for k, v in overrides.items():
        (top if k in _TOP_LEVEL else domain)[k] = v
    return {"domains": [domain], **top}


_TOP_LEVEL = frozenset({"connect_timeout_seconds", "operation_timeout_seconds", "max_concurrency",
                        "default_domain", "dc_retry_seconds", "pool_size", "group_cache_seconds"})


def ad_settings(dc: SambaDC, **overrides: Any) -> Any:
    """ADSettings for the test domain; ``overrides`` replace domain or top-level keys."""
    from broker.identity.ad_settings import ADSettings

    return ADSettings.model_validate(ad_settings_dict(dc, **overrides))
