"""The bastion's own listeners, which the forwarding policy refuses as destinations."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from broker.config import BrokerConfig
from broker.ssh.server import own_endpoints
from broker.ssh.tunnel import policy_of


def _deps(**cfg: Any) -> Any:
    return cast(Any, SimpleNamespace(config=BrokerConfig.model_validate(
        {"state_dir": Path("/nonexistent"), **cfg})))


def test_own_endpoints_cover_ssh_and_web_on_every_local_name() -> None:
    deps = _deps(ssh={"listen_host": "10.0.0.1", "listen_port": 0},
                 web={"listen_host": "127.0.0.1", "listen_port": 8443})
    own = own_endpoints(deps, ("10.0.0.1", 40022))
    for host in ("10.0.0.1", "127.0.0.1", "::1", "localhost"):
        assert (host, 40022) in own
        assert (host, 8443) in own
    assert ("10.0.0.2", 40022) not in own
    assert not any(p == 0 for _, p in own)


def test_web_port_not_own_when_web_is_off() -> None:
    own = own_endpoints(_deps(web={"enabled": False, "listen_port": 8443}), ("127.0.0.1", 2222))
    assert ("127.0.0.1", 8443) not in own
    assert ("127.0.0.1", 2222) in own


def test_policy_from_config() -> None:
    p = policy_of(_deps(forwarding={
        "ports": {"linux": [22, 5432]}, "stack_ports": {"stack-x": [80]},
        "raw_ssh_targets": ["Web01"]}))
    assert p.os_ports["linux"] == frozenset({22, 5432})
    assert p.os_ports["windows"] == frozenset({3389})  # an OS left out keeps its default
    assert p.stack_ports == {"stack-x": frozenset({80})}
    assert p.raw_ssh_targets == frozenset({"web01"})
    assert p.rdp_ports == frozenset({3389})
