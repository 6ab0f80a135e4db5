"""A repeated ``ssh-userauth`` service request during authentication is accepted, as OpenSSH's
sshd accepts it.

paramiko sends MSG_SERVICE_REQUEST before every authentication method it tries (the "none"
probe, then a key, then keyboard-interactive, and again after a mistyped password); asyncssh
2.24 expects exactly one and disconnects the second with "Unexpected service in service
request", so Ansible, Fabric and scripts built on paramiko could not log in. RFC 4253 (section
10) does not forbid a repeat, and OpenSSH answers each one with SERVICE_ACCEPT while the client
is still authenticating. A request for any other service, or one after authentication, still
goes to asyncssh's own handler (which refuses it). The same change is offered upstream:
``docs/asyncssh-repeated-service-request.patch``.
"""

from __future__ import annotations

from typing import Any

from asyncssh import connection as _connection
from asyncssh.constants import MSG_SERVICE_ACCEPT, MSG_SERVICE_REQUEST
from asyncssh.packet import SSHPacket, String

from broker.ssh.patches.private import replace_item

_USERAUTH = b"ssh-userauth"


def _process_service_request(self: Any, pkttype: int, pktid: int, packet: Any) -> None:
    if (self.is_server() and self._recv_encryption and self._auth_in_progress
            and not self._auth_complete):
        payload = packet.get_remaining_payload()
        service = packet.get_string()
        if service == _USERAUTH and not packet:
            self.logger.debug2("Accepting a repeated request for service %s", service)
            self.send_packet(MSG_SERVICE_ACCEPT, String(service))
            return
        packet = SSHPacket(payload)  # not ours: asyncssh's handler reads it from the start
    _ORIGINAL(self, pkttype, pktid, packet)


_ORIGINAL = _connection.SSHConnection._packet_handlers[MSG_SERVICE_REQUEST]


def install() -> None:
    """Only through ``broker.ssh.patches.install()`` (the version gate)."""
    replace_item(_connection.SSHConnection, "_packet_handlers", MSG_SERVICE_REQUEST,
                 _process_service_request)


def installed() -> bool:
    return (_connection.SSHConnection._packet_handlers[MSG_SERVICE_REQUEST]
            is _process_service_request)
