"""What every SSH server of the broker refuses: remote forwarding (``-R``) and UNIX-socket
forwarding, on the outer connection and inside a recorded jump alike, each refusal audited."""

from __future__ import annotations

import asyncssh


class ForwardRefusingServer(asyncssh.SSHServer):
    """An ``asyncssh.SSHServer`` that refuses them; subclasses say how a refusal is recorded."""

    def _refuse_forward(self, kind: str, what: str, reason: str) -> None:
        raise NotImplementedError

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
