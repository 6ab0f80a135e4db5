"""``ssh user@bastion`` without a target: list what the user may reach now, then exit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import cast

import asyncssh
from asyncssh.channel import SSHChannel

from broker.domain.models import Principal
from broker.services.access import AccessService


class MenuSession(asyncssh.SSHServerSession[str]):
    def __init__(self, access: AccessService, principal: Principal) -> None:
        self._access = access
        self._principal = principal
        self._chan: asyncssh.SSHServerChannel[str] | None = None

    def connection_made(self, chan: SSHChannel[str]) -> None:
        self._chan = cast(asyncssh.SSHServerChannel[str], chan)

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        return True

    def eof_received(self) -> bool:
        return True  # a client with empty stdin sends EOF at once; still show the menu

    def session_started(self) -> None:
        asyncio.get_running_loop().create_task(self._show())

    async def _show(self) -> None:
        chan = self._chan
        if chan is None:
            return
        rows = await self._access.reachable(self._principal)
        lines = [f"bastion-broker: targets {self._principal} may reach now:"]
        if not rows:
            lines.append("  (none: request access with 'bastion-broker grant request')")
        for inst, grant in sorted(rows, key=lambda r: r[0].name):
            left = grant.expires_at.strftime("%Y-%m-%d %H:%M UTC")
            lines.append(
                f"  {inst.name:<16} {inst.id:<20} {inst.os:<8} {grant.level!s:<10} until {left}"
            )
        lines.append(f"connect with: ssh {self._principal.username}+TARGET@<this bastion>")
        with contextlib.suppress(OSError, asyncssh.Error):  # client gone: nothing to show
            chan.write("\r\n".join(lines) + "\r\n")
            chan.exit(0)
