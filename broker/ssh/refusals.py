"""What every SSH server of the broker refuses: remote forwarding (``-R``) and UNIX-socket
forwarding, on the outer connection and inside a recorded jump alike, each refusal audited."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncssh
import structlog

from broker.domain.models import Instance, Principal

if TYPE_CHECKING:
    from broker.ssh.relay import RelayDeps

log = structlog.get_logger("broker.ssh")


class ForwardRefusingServer(asyncssh.SSHServer):
    """An ``asyncssh.SSHServer`` that refuses them; subclasses set the attributes below."""

    _deps: RelayDeps
    _principal: Principal | None
    _peer: str
    _instance: Instance | None  # the target, when the connection is bound to one

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self._refuse_forward("remote", f"{listen_host}:{listen_port}",
                             "remote forwarding (-R) is not allowed")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self._refuse_forward("streamlocal", dest_path, "UNIX socket forwarding is not allowed")
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                        "UNIX socket forwarding is not allowed")

    def unix_server_requested(self, listen_path: str) -> bool:
        self._refuse_forward("remote-streamlocal", listen_path,
                             "remote UNIX socket forwarding is not allowed")
        return False

    def _refuse_forward(self, kind: str, what: str, reason: str) -> None:
        target = {"target": self._instance.id} if self._instance is not None else {}
        self._deps.audit.emit("tunnel.denied", user=str(self._principal), peer=self._peer,
                              kind=kind, destination=what, reason=reason, **target)
        log.info("tunnel.denied", peer=self._peer, kind=kind, destination=what)
