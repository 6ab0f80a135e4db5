"""Tunnels (ssh -L, ssh -D): one direct-tcpip channel <-> one TCP connection the broker dials.

Each tunnel is checked against the forwarding policy and a live grant before anything is
dialled, and is a recorded session (who, grant, destination, start/end, bytes each way; the
payload itself is not stored). The enforcer ends it with its grant; it also ends when idle.

On RDP ports the first packet each way is read before the session row is written, so the
listing and the audit show the RDP user name the client announced, the protocols it asked for
and the one the server picked. Nothing beyond that negotiation crosses before the session is
recorded. Flow control: a full SSH channel pauses reading the target socket and a full socket
pauses the channel, so memory per tunnel stays bounded by the channel window.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast

import asyncssh
import structlog
from asyncssh.channel import SSHChannel

from broker.domain import forwarding as fwd
from broker.domain import rdp
from broker.domain.models import Grant, Instance, Principal
from broker.errors import BrokerError, UpstreamError
from broker.services.sessions import LiveSession, SessionRequest
from broker.ssh import jump, patches, via_target
from broker.ssh.relay import RelayDeps

log = structlog.get_logger("broker.tunnel")

P = ParamSpec("P")
R = TypeVar("R")
HELLO_CAP = rdp.MAX_PACKET + 4096  # bytes held while waiting for a first RDP packet


def policy_of(deps: RelayDeps) -> fwd.PortPolicy:
    f = deps.config.forwarding
    return fwd.PortPolicy(
        # an OS the [forwarding] ports table leaves out keeps its default (22 / 3389)
        os_ports={**fwd.PortPolicy().os_ports, **{k: frozenset(v) for k, v in f.ports.items()}},
        stack_ports={k: frozenset(v) for k, v in f.stack_ports.items()},
        rdp_ports=frozenset(f.rdp_ports),
        raw_ssh_targets=frozenset(t.casefold() for t in f.raw_ssh_targets),
    )


async def _resolve(host: str, port: int, limit: float) -> list[str]:
    """The addresses a destination stands for: itself if an IP literal, else what DNS says."""
    ip = fwd.ip_of(host)
    if ip is not None:
        return [str(ip)]
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), limit)
    except (OSError, TimeoutError, UnicodeError):
        return []
    return sorted({str(info[4][0]) for info in infos})


async def decide(deps: RelayDeps, principal: Principal, host: str, port: int,
                 own: frozenset[tuple[str, int]]) -> fwd.Verdict:
    """Resolve ``host`` through the inventory (or DNS) and apply the forwarding policy."""
    if not deps.config.forwarding.enabled:
        return fwd.Verdict(False, "port forwarding is disabled on this bastion",
                           "forwarding disabled")
    named = None
    resolved: list[str] = []
    reachable: list[tuple[Instance, Grant]] = []
    if host and len(host) <= 255 and host.isprintable():
        result = await deps.access.decide(principal, host)
        if result.instance is not None:
            named = (result.instance, result.decision)
        else:
            resolved = await _resolve(host, port, deps.config.forwarding.connect_timeout_seconds)
            reachable = await deps.access.reachable(principal)
    return fwd.decide(host, port, named=named, resolved=resolved, reachable=reachable,
                      policy=policy_of(deps), own=own)


def _guarded(fn: Callable[P, R]) -> Callable[P, R]:
    """A callback that fails ends its own tunnel, not the client's whole SSH connection."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            tunnel = args[0]._tunnel if isinstance(args[0], _Target) else args[0]
            log.error("tunnel.internal_error", callback=fn.__name__, error=repr(exc),
                      exc_info=True)
            if isinstance(tunnel, Tunnel):
                tunnel._close("internal error")
            return cast(R, None)  # eof_received: None closes the channel

    return wrapper


class _Target(asyncio.Protocol):
    """The TCP connection to the destination; everything goes to the tunnel."""

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    @_guarded
    def data_received(self, data: bytes) -> None:
        self._tunnel.from_target(data)

    @_guarded
    def eof_received(self) -> bool:
        self._tunnel.target_eof()
        return True  # half-close: the client may still send

    @_guarded
    def pause_writing(self) -> None:
        self._tunnel.target_full(True)

    @_guarded
    def resume_writing(self) -> None:
        self._tunnel.target_full(False)

    @_guarded
    def connection_lost(self, exc: Exception | None) -> None:
        self._tunnel.target_closed(exc)


class Tunnel(asyncssh.SSHTCPSession[bytes]):
    """One tunnel; also the ``SessionControl`` the grant enforcer uses to end it."""

    def __init__(self, deps: RelayDeps, principal: Principal, peer: str, host: str, port: int,
                 verdict: fwd.Verdict, links: via_target.TargetLinks | None = None,
                 parent: jump.ParentId | None = None) -> None:
        self._deps = deps
        self._parent = parent  # the recorded ProxyJump session carrying this one, if any
        self.session_id: str | None = None  # kept after the end: inner sessions name it
        self._links = links  # forwards from the target go over these connections
        self._principal = principal
        self._peer = peer
        self._host = host
        self._port = port
        self._v = verdict
        self._cfg = deps.config.forwarding
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []  # client bytes for the target, written at the iteration's end
        self._live: LiveSession | None = None
        # relay | client-hello | server-hello | starting | closed
        self._phase = "client-hello" if verdict.service == "rdp" else "starting"
        self._up = bytearray()  # client bytes not yet sent to the target
        self._down = bytearray()  # target bytes not yet sent to the client
        self._sent_up = 0  # negotiation bytes already sent to the target
        self._hold_client = False
        self._hold_target = True  # until the channel is open
        self._client_blocked = False  # the channel's send buffer is full
        self._target_blocked = False  # the socket's send buffer is full
        self._client_eof = False
        self._target_eof = False
        self._note = ""  # RDP negotiation summary for the session row
        self._rdp_req: rdp.ConnectionRequest | None = None
        self._target_gone = False  # the target hung up before the channel was open
        self._status: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0
        self._loop = asyncio.get_running_loop()
        self._inner: asyncio.Task[None] | None = None  # the ProxyJump inner server
        self._inner_failure: str | None = None  # why it ended, if not by the client

    # -- open -------------------------------------------------------------------------------
    async def open(self) -> Tunnel:
        """Dial the destination and, for plain TCP, write the session before any byte flows."""
        v = self._v
        try:
            if v.service == "ssh" and v.instance is not None:
                # recorded ProxyJump: the inner SSH connection is served here
                transport = await self._serve_jump(v.instance)
            elif v.service == "target-local":
                # inside a ProxyJump: the target's loopback, reached from the target itself
                # (never dialled here: on the bastion it would be the bastion's own loopback)
                if self._links is None or v.grant is None:
                    raise BrokerError("a forward from the target without its connection")
                transport = await asyncio.wait_for(self._links.open(
                    v.grant, v.dial_host, v.dial_port, _Target(self)),
                    self._cfg.connect_timeout_seconds)
            else:
                transport, _ = await asyncio.wait_for(
                    self._loop.create_connection(lambda: _Target(self), v.dial_host,
                                                 v.dial_port),
                    self._cfg.connect_timeout_seconds)
        except (OSError, TimeoutError, asyncssh.Error, UpstreamError) as exc:
            self._audit("tunnel.failed", reason=f"connect {v.dial_host}:{v.dial_port}: {exc}")
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                            "destination unavailable") from None
        self._transport = transport
        self._transport.pause_reading()
        with contextlib.suppress(OSError):
            sock = self._transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._phase == "starting":
            try:
                self._live = await self._start_session()
            except BrokerError as exc:
                self._transport.abort()
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                                exc.user_message) from None
        return self

    async def _serve_jump(self, instance: Instance) -> asyncio.Transport:
        """The tunnel's end of a link whose other end serves the inner connection."""
        names = list(dict.fromkeys([self._host, instance.id, instance.name]))
        parent = self._session_id
        forward = functools.partial(open_from_target, self._deps, principal=self._principal,
                                    peer=self._peer, parent=parent)
        ours, self._inner = await jump.start_inner(self._deps, self._principal, instance,
                                                   self._peer, names, _Target(self), forward,
                                                   parent, self._inner_failed)
        return ours

    def _session_id(self) -> str | None:
        return self.session_id

    def _inner_failed(self, reason: str) -> None:
        self._inner_failure = reason

    async def _start_session(self) -> LiveSession:
        v = self._v
        if v.instance is None or v.grant is None:
            raise BrokerError("tunnel without an instance or grant")
        command = fwd.summary(self._host, self._port, v) + (f" {self._note}" if self._note else "")
        live = await self._deps.sessions.start(SessionRequest(
            principal=self._principal, instance=v.instance, grant=v.grant, login="",
            kind="jump" if v.service == "ssh" else "tunnel", command=command, term_type=None,
            width=0, height=0, peer=self._peer,
            parent_id=self._parent() if self._parent is not None else None,
        ))
        self.session_id = live.id
        return live

    def _audit(self, event: str, **fields: object) -> None:
        self._deps.audit.emit(event, user=str(self._principal), peer=self._peer,
                              destination=f"{self._host}:{self._port}",
                              session_id=self._live.id if self._live else None, **fields)

    def connection_made(self, chan: SSHChannel[bytes]) -> None:
        self.chan = cast(asyncssh.SSHTCPChannel[bytes], chan)

    @_guarded
    def session_started(self) -> None:
        self._hold_target = False
        if self._target_gone:
            self._close(None)
            return
        if self._phase == "client-hello":
            self._timer = self._loop.call_later(self._cfg.negotiation_timeout_seconds,
                                                self._hello_timeout)
        else:
            self._relay()
        self._flow()

    def _relay(self) -> None:
        """Negotiation over (or none): flush what was held and pass bytes straight through."""
        live = self._live
        if live is None or self.chan is None or self._transport is None:
            return
        self._phase = "relay"
        live.bytes_in += self._sent_up
        if self._down:
            live.bytes_out += len(self._down)
            self.chan.write(bytes(self._down))
            self._down.clear()
        if self._target_eof:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.chan.write_eof()
        if self._up:
            live.bytes_in += len(self._up)
            self._transport.write(bytes(self._up))
            self._up.clear()
        if self._client_eof and self._transport.can_write_eof():
            self._transport.write_eof()
        self._hold_client = self._hold_target = False
        live.control = self
        self._last = self._loop.time()
        if self._timer is not None:
            self._timer.cancel()
        idle = self._cfg.idle_timeout_seconds
        if idle > 0 and self._v.service != "ssh":  # inner sessions of a jump have their own
            self._timer = self._loop.call_later(min(idle, 5.0), self._idle_check)
        self._flow()

    def _flow(self) -> None:
        """Apply holds and backpressure to both read sides."""
        if self._phase == "closed":
            return
        if self.chan is not None:
            if self._hold_client or self._target_blocked:
                self.chan.pause_reading()
            else:
                self.chan.resume_reading()
        if self._transport is not None and not self._transport.is_closing():
            if self._hold_target or self._client_blocked:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    # -- RDP negotiation --------------------------------------------------------------------
    def _client_hello(self) -> None:
        got = rdp.first_packet(bytes(self._up))
        if isinstance(got, rdp.NeedMore):
            if len(self._up) > HELLO_CAP:
                self._not_rdp("no complete TPKT packet in the first bytes")
            return
        if isinstance(got, rdp.Malformed):
            self._not_rdp(got.reason)
            return
        req = rdp.parse_request(got)
        if isinstance(req, rdp.Malformed):
            self._not_rdp(req.reason)
            return
        self._rdp_req = req
        if self._transport is None:
            return
        self._sent_up = len(self._up)
        self._transport.write(bytes(self._up))  # only the connection request
        self._up.clear()
        self._phase = "server-hello"
        self._hold_client = True  # a client waits for the confirm; hold anything else
        self._flow()
        self._server_hello()

    def _server_hello(self) -> None:
        if not self._down:
            return
        got = rdp.first_packet(bytes(self._down))
        if isinstance(got, rdp.NeedMore):
            if len(self._down) > HELLO_CAP:
                self._not_rdp("server: no complete TPKT packet in the first bytes")
            return
        conf = got if isinstance(got, rdp.Malformed) else rdp.parse_confirm(got)
        req = self._rdp_req
        if req is None:
            return
        fields: dict[str, object] = {
            "rdp_user": req.cookie, "rdp_routing_token": req.routing_token,
            "rdp_requested": req.requested_names}
        if isinstance(conf, rdp.Malformed):
            fields["rdp_server_error"] = conf.reason
            self._note = (f"rdp user={req.cookie or '-'} requested="
                          f"{'+'.join(req.requested_names)} server-not-rdp")
        else:
            fields["rdp_selected"] = conf.selected_name
            self._note = (f"rdp user={req.cookie or '-'} requested="
                          f"{'+'.join(req.requested_names)} selected={conf.selected_name}")
        self._begin(fields, cut=isinstance(conf, rdp.Malformed) and self._cfg.non_rdp == "cut")

    def _not_rdp(self, reason: str) -> None:
        self._note = f"not-rdp ({reason})"
        self._begin({"rdp_error": reason}, cut=self._cfg.non_rdp == "cut")

    def _hello_timeout(self) -> None:
        if self._phase == "client-hello":
            self._not_rdp(f"no RDP connection request within "
                          f"{self._cfg.negotiation_timeout_seconds:g} s")
        elif self._phase == "server-hello":
            self._not_rdp(f"no RDP connection confirm within "
                          f"{self._cfg.negotiation_timeout_seconds:g} s")

    def _begin(self, fields: dict[str, object], *, cut: bool) -> None:
        """Negotiation seen (or not RDP): write the session, then relay or cut."""
        self._phase = "starting"
        self._hold_client = self._hold_target = True
        self._flow()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop.create_task(self._begin_async(fields, cut))

    async def _begin_async(self, fields: dict[str, object], cut: bool) -> None:
        try:
            self._live = await self._start_session()
            self._audit("tunnel.rdp", **fields, action="cut" if cut else "relay")
        except BrokerError as exc:
            log.error("tunnel.start_failed", error=str(exc))
            self._close("start failed")
            return
        except Exception as exc:
            log.error("tunnel.internal_error", error=repr(exc), exc_info=True)
            self._close("internal error")
            return
        if self._phase == "closed":  # the client or target left meanwhile
            await self._finish()
            return
        if cut:
            self._close("cut:not rdp")
            return
        self._relay()

    # -- client -> target -------------------------------------------------------------------
    @_guarded
    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._phase == "relay":
            live, t = self._live, self._transport
            if live is None or t is None:
                return
            live.bytes_in += len(data)
            self._last = self._loop.time()
            self._out.append(data)
            if len(self._out) == 1:  # the packets decrypted in this loop iteration: one writev
                self._loop.call_soon(self._flush_out)
            return
        if self._phase == "closed":
            return
        self._up += data
        if self._phase == "client-hello":
            self._client_hello()
        elif len(self._up) > HELLO_CAP:
            self._hold_client = True
            self._flow()

    def _flush_out(self) -> None:
        out, self._out = self._out, []
        t = self._transport
        if out and t is not None and not t.is_closing():
            t.writelines(out)

    @_guarded
    def eof_received(self) -> bool:
        self._client_eof = True
        if self._phase == "relay" and self._transport is not None:
            self._flush_out()
            if self._transport.can_write_eof():
                self._transport.write_eof()
        elif self._phase == "client-hello":
            self._not_rdp("client closed before an RDP connection request")
        if self._target_eof:
            self._close(None)
        return True

    @_guarded
    def pause_writing(self) -> None:
        self._client_blocked = True
        self._flow()

    @_guarded
    def resume_writing(self) -> None:
        self._client_blocked = False
        self._flow()

    @_guarded
    def connection_lost(self, exc: Exception | None) -> None:
        self._close(None)

    # -- target -> client -------------------------------------------------------------------
    def from_target(self, data: bytes) -> None:
        if self._phase == "relay":
            live, chan = self._live, self.chan
            if live is None or chan is None:
                return
            live.bytes_out += len(data)
            self._last = self._loop.time()
            with contextlib.suppress(OSError, asyncssh.Error), patches.corked():
                chan.write(data)  # a large read becomes several packets: one writev for them
            return
        if self._phase == "closed":
            return
        self._down += data
        if self._phase == "server-hello":
            self._server_hello()
        elif len(self._down) > HELLO_CAP:
            self._hold_target = True
            self._flow()

    def target_eof(self) -> None:
        self._target_eof = True
        if self._phase == "relay" and self.chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.chan.write_eof()
        elif self._phase in ("client-hello", "server-hello"):
            self._not_rdp("server closed during the RDP negotiation")
        if self._client_eof:
            self._close(None)

    def target_full(self, full: bool) -> None:
        self._target_blocked = full
        self._flow()

    def target_closed(self, exc: Exception | None) -> None:
        if self.chan is None:
            self._target_gone = True  # still opening: session_started ends the tunnel
            return
        if self._v.service == "ssh":
            # a recorded ProxyJump: the "target" is the broker's own inner server, which ends
            # when the client ends the inner connection (closed by client) or it failed
            failure = self._inner_failure
            self._close(f"ended:inner connection: {failure}" if failure else None)
            return
        self._close("target error" if exc is not None else None)

    # -- end --------------------------------------------------------------------------------
    def _idle_check(self) -> None:
        idle = self._cfg.idle_timeout_seconds
        left = self._last + idle - self._loop.time()
        if left <= 0:
            self.terminate("idle timeout")
        else:
            self._timer = self._loop.call_later(min(left, 5.0), self._idle_check)

    def notify(self, text: str) -> None:
        """A tunnel has no terminal: warnings only go to the log (the enforcer audits them)."""
        log.info("tunnel.notice", session_id=self._live.id if self._live else None, text=text)

    def terminate(self, reason: str) -> None:
        if self._phase != "closed":
            self._close(f"terminated:{reason}")

    def _close(self, status: str | None) -> None:
        if self._phase == "closed":
            return
        starting = self._phase == "starting" and self._live is None
        self._phase = "closed"
        self._status = status or "closed"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            if status:
                self._transport.abort()
            else:
                self._flush_out()
                self._transport.close()
        if self.chan is not None:
            self.chan.close()
        if not starting:  # a session still being written is finished by _begin_async
            self._loop.create_task(self._finish())

    async def _finish(self) -> None:
        live, self._live = self._live, None
        if live is None:
            return
        live.control = None
        try:
            await self._deps.sessions.finish(live, self._status)
        except BrokerError as exc:
            log.error("tunnel.finish_failed", session_id=live.id, error=str(exc))


ChannelAndOpener = tuple[asyncssh.SSHTCPChannel[bytes], Coroutine[Any, Any, "Tunnel"]]


def open_tunnel(deps: RelayDeps, conn: asyncssh.SSHServerConnection, principal: Principal,
                peer: str, host: str, port: int, own: frozenset[tuple[str, int]],
                ) -> ChannelAndOpener:
    """What ``connection_requested`` returns: a channel and the coroutine that decides/opens."""

    async def verdict() -> fwd.Verdict:
        return await decide(deps, principal, host, port, own)

    return _channel(deps, conn, principal, peer, host, port, verdict)


def open_from_target(deps: RelayDeps, conn: asyncssh.SSHServerConnection, principal: Principal,
                     peer: str, links: via_target.TargetLinks, host: str, port: int,
                     parent: jump.ParentId | None = None) -> ChannelAndOpener:
    """``connection_requested`` inside a recorded ProxyJump connection to ``links.instance``
    (or after a ``user+target`` login): only its own loopback, with a fresh grant decision
    (``fwd.decide_target_local``), over the client connection's ``links``; ``parent`` names
    the jump session carrying it."""
    instance = links.instance

    async def verdict() -> fwd.Verdict:
        result = await deps.access.decide(principal, instance.id)
        return fwd.decide_target_local(host, port, result.instance or instance, result.decision,
                                       enabled=deps.config.forwarding.target_loopback)

    return _channel(deps, conn, principal, peer, host, port, verdict, links, parent)


def _channel(deps: RelayDeps, conn: asyncssh.SSHServerConnection, principal: Principal,
             peer: str, host: str, port: int,
             verdict: Callable[[], Coroutine[Any, Any, fwd.Verdict]],
             links: via_target.TargetLinks | None = None,
             parent: jump.ParentId | None = None) -> ChannelAndOpener:
    chan = conn.create_tcp_channel(window=deps.config.ssh.window_bytes,
                                   max_pktsize=deps.config.ssh.max_packet_bytes)

    async def run() -> Tunnel:
        try:
            return await _open(deps, principal, peer, host, port, await verdict(), links,
                               parent)
        except asyncssh.ChannelOpenError:
            raise
        except BrokerError as exc:  # e.g. the audit log cannot be written: refuse (fail closed)
            log.error("tunnel.open_failed", user=str(principal), error=str(exc))
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                            exc.user_message) from None
        except Exception as exc:
            # anything else would make asyncssh drop the whole SSH connection
            log.error("tunnel.internal_error", user=str(principal), error=repr(exc),
                      exc_info=True)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                            "internal error") from None

    return chan, run()


async def _open(deps: RelayDeps, principal: Principal, peer: str, host: str, port: int,
                v: fwd.Verdict, links: via_target.TargetLinks | None,
                parent: jump.ParentId | None = None) -> Tunnel:
    """Dial what was decided: a refusal is audited and reaches the client with its reason."""
    if not v.allowed:
        deps.audit.emit("tunnel.denied", user=str(principal), peer=peer,
                        destination=f"{host}:{port}", reason=v.detail)
        log.info("tunnel.denied", user=str(principal), destination=f"{host}:{port}",
                 reason=v.detail)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, v.reason)
    return await Tunnel(deps, principal, peer, host, port, v, links, parent).open()
