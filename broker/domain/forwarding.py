"""Port forwarding policy: may this user open a tunnel to HOST:PORT now, and where does it go?

``ssh -L``/``-D`` send the destination as the client typed it. It must name an inventory instance
(id, name, or its address; a DNS name counts through the addresses it resolves to) that a live
grant covers, on a port the policy allows for the instance's OS or stack. The broker then dials
the inventory address it checked, never the name again (no DNS rebinding). Link-local and cloud
metadata addresses, the bastion's own loopback and its own listeners are refused whatever the
inventory says. Pure: the caller resolves names and evaluates grants.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from broker.domain.models import Decision, Grant, Instance

SSH_PORT = 22
RDP_PORT = 3389
# instance metadata and link-local services of clouds; all of 169.254.0.0/16 and fe80::/10 too
METADATA = frozenset({"169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"})
NO_GRANT = "no live grant covers this destination"  # same text for unknown and ungranted targets


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """Ports a tunnel may reach: per OS, replaced per stack where a stack has its own list."""

    os_ports: Mapping[str, frozenset[int]] = field(default_factory=lambda: {
        "linux": frozenset({SSH_PORT}), "windows": frozenset({RDP_PORT})})
    stack_ports: Mapping[str, frozenset[int]] = field(default_factory=dict)
    rdp_ports: frozenset[int] = frozenset({RDP_PORT})
    raw_ssh_targets: frozenset[str] = frozenset()  # casefolded instance ids/names

    def allowed_ports(self, inst: Instance) -> frozenset[int]:
        if inst.stack_id in self.stack_ports:
            return self.stack_ports[inst.stack_id]
        return self.os_ports.get(inst.os, frozenset())


@dataclass(frozen=True, slots=True)
class Verdict:
    """A forwarding decision. ``reason`` is what the user sees; ``detail`` goes to the audit log."""

    allowed: bool
    reason: str
    detail: str
    instance: Instance | None = None
    grant: Grant | None = None
    dial_host: str = ""
    dial_port: int = 0
    # tcp | rdp | ssh (recorded ProxyJump) | ssh-raw | target-local (from the target itself)
    service: str = "tcp"


def _deny(reason: str, detail: str | None = None, inst: Instance | None = None) -> Verdict:
    return Verdict(False, reason, detail or reason, inst)


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address if ``host`` is an IP literal (brackets allowed around IPv6), else None."""
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        return None


def forbidden_address(addr: str) -> str | None:
    """Why a destination address is never forwarded to, or None."""
    ip = ip_of(addr)
    if ip is None:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if str(ip) in METADATA or ip.is_link_local:
        return "link-local and metadata addresses are never forwarded"
    if ip.is_loopback or ip.is_unspecified:
        return "the bastion itself is not a forwarding destination"
    if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        return "multicast and broadcast addresses are never forwarded"
    return None


def dial_port(inst: Instance, port: int, policy: PortPolicy) -> int:
    """The port actually dialled: the inventory's port stands for the OS's service port.

    A Linux instance's ``port`` is its SSH port (22 asked -> that port). For a Windows instance
    the inventory ``port`` is its RDP port unless it is the default 22 (3389 asked -> that port).
    """
    if inst.os == "linux" and port == SSH_PORT:
        return inst.port
    if inst.os == "windows" and port in policy.rdp_ports and inst.port != SSH_PORT:
        return inst.port
    return port


def _check_instance(inst: Instance, decision: Decision, port: int, policy: PortPolicy,
                    own: frozenset[tuple[str, int]]) -> Verdict:
    if not decision.allowed or decision.grant is None:
        return _deny(NO_GRANT, f"{inst.id}: {decision.reason}", inst)
    if port not in policy.allowed_ports(inst):
        allowed = ",".join(str(p) for p in sorted(policy.allowed_ports(inst))) or "none"
        return _deny(f"port {port} is not open for forwarding to {inst.name} "
                     f"(allowed: {allowed})", inst=inst)
    bad = forbidden_address(inst.address)
    if bad and bad.startswith("link-local"):
        return _deny(bad, f"{inst.id} has a link-local address {inst.address}", inst)
    dport = dial_port(inst, port, policy)
    if (inst.address, dport) in own or ("*", dport) in own:
        return _deny("the bastion itself is not a forwarding destination",
                     f"{inst.id} {inst.address}:{dport} is a listener of the bastion", inst)
    service = "tcp"
    if inst.os == "linux" and port == SSH_PORT:
        # ProxyJump: recorded by terminating the inner connection, unless raw is allowed here
        raw = {inst.id.casefold(), inst.name.casefold()} & policy.raw_ssh_targets
        service = "ssh-raw" if raw else "ssh"
    elif port in policy.rdp_ports:
        service = "rdp"
    return Verdict(True, "granted", "granted", inst, decision.grant, inst.address, dport, service)


def decide(
    host: str, port: int, *, named: tuple[Instance, Decision] | None,
    resolved: Sequence[str], reachable: Iterable[tuple[Instance, Grant]],
    policy: PortPolicy, own: frozenset[tuple[str, int]],
) -> Verdict:
    """Decide a direct-tcpip request for ``host``:``port``.

    ``named``: the instance ``host`` names by id or name, with its grant decision (None if it
    names none). ``resolved``: the addresses ``host`` stands for otherwise (itself if an IP
    literal, else what DNS said; empty if it did not resolve). ``reachable``: the instances the
    user's live grants cover. ``own``: the bastion's listeners as (address, port), "*" = any.
    """
    if not host or len(host) > 255 or any(c.isspace() or ord(c) < 32 for c in host):
        return _deny("not a valid destination host")
    if not 1 <= port <= 65535:
        return _deny("not a valid destination port")
    if named is not None:
        return _check_instance(named[0], named[1], port, policy, own)
    if not resolved:
        return _deny(NO_GRANT, f"{host} is not an instance and does not resolve")
    for addr in resolved:
        bad = forbidden_address(addr)
        if bad:
            return _deny(bad, f"{host} -> {addr}: {bad}")
    wanted = {str(ip_of(a) or a) for a in resolved}
    candidates = [(i, g) for i, g in reachable if str(ip_of(i.address) or i.address) in wanted]
    covered = {str(ip_of(i.address) or i.address) for i, _ in candidates}
    if not candidates or covered != wanted:
        missing = ", ".join(sorted(wanted - covered))
        return _deny(NO_GRANT, f"{host}: no live grant covers {missing}")
    # several granted instances may share an address (different ports): pick one that allows it
    verdicts = [_check_instance(i, Decision(True, "granted", g), port, policy, own)
                for i, g in candidates]
    return next((v for v in verdicts if v.allowed), verdicts[0])


TARGET_LOCAL_ONLY = ("only the target's own loopback can be forwarded to from a ProxyJump "
                     "connection; other hosts need their own grant")
TARGET_SSH_PORT = ("the target's SSH port is reached through the recorded jump, not through a "
                   "forward")
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def names_loopback(host: str) -> bool:
    """``localhost`` (and its usual aliases) or a loopback address literal."""
    ip = ip_of(host)
    return host.casefold() in LOCAL_NAMES or (ip is not None and ip.is_loopback)


def decide_target_local(host: str, port: int, inst: Instance, decision: Decision, *,
                        enabled: bool) -> Verdict:
    """Decide a direct-tcpip request made inside a recorded ProxyJump connection to ``inst``
    (or on a connection logged in as ``user+inst``).

    There, ``localhost`` means the target (what ``ssh -L 8080:localhost:8080 target`` and VS
    Code Remote-SSH's SOCKS proxy ask for): the broker opens the channel *from the target*, over
    its own connection to the target's sshd. Only the target's loopback is allowed, so a grant
    for one instance never reaches another host through it (no pivoting), and not its SSH port
    (a nested SSH session in a forward would not be recorded)."""
    if not enabled:
        return _deny("forwarding from the target is disabled on this bastion",
                     f"{inst.id}: target_loopback is off", inst)
    if not decision.allowed or decision.grant is None:
        return _deny(NO_GRANT, f"{inst.id}: {decision.reason}", inst)
    if not 1 <= port <= 65535:
        return _deny("not a valid destination port", inst=inst)
    if inst.os != "linux":
        return _deny("forwarding from the target needs an SSH (Linux) target", inst=inst)
    if not names_loopback(host):
        return _deny(TARGET_LOCAL_ONLY, f"{inst.id}: {host}:{port} is not the target's loopback",
                     inst)
    if port in (SSH_PORT, inst.port):
        # a nested SSH connection through a forward would be a session nobody records
        return _deny(TARGET_SSH_PORT, f"{inst.id}: {host}:{port} is its SSH port", inst)
    ip = ip_of(host)
    dial = str(ip) if ip is not None else "localhost"
    return Verdict(True, "granted", "granted", inst, decision.grant, dial, port, "target-local")


def summary(host: str, port: int, v: Verdict) -> str:
    """The ``command`` text of a tunnel session: what was asked and where it went."""
    if v.instance is None:
        return f"forward {host}:{port}"
    if v.service == "target-local":
        return f"forward {host}:{port} -> {v.instance.id} (from the target) {v.dial_host}:{v.dial_port}"
    return f"forward {host}:{port} -> {v.instance.id} {v.dial_host}:{v.dial_port}"
