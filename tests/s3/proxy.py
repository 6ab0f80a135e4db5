"""A loopback TCP proxy in front of an emulator, to make an endpoint go down and come back.

Restarting moto itself would lose its state (it keeps everything in memory); stopping this proxy
refuses connections on the endpoint's port exactly like a stopped S3 or CloudWatch endpoint, and
``cut_after`` breaks the connection in the middle of a transfer, and ``start(stall=True)`` accepts
connections but never answers (an endpoint that hangs).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

_METHODS = {b"GET", b"HEAD", b"PUT", b"POST", b"DELETE"}


class TcpProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._srv: socket.socket | None = None
        self._acceptor = threading.Thread()
        self._budget: int | None = None
        self._stall = False
        # requests whose request line matches go through; their answers are held back
        self.hold_if: Callable[[bytes], bool] | None = None
        self.forwarded = 0  # bytes sent upstream since the last start
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._srv is not None

    def start(self, *, stall: bool = False) -> None:
        self._stall = stall
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        srv.settimeout(0.1)
        self.forwarded = 0
        self._srv = srv
        self._acceptor = threading.Thread(target=self._accept, args=(srv,), daemon=True)
        self._acceptor.start()

    def cut_after(self, n: int) -> None:
        """Stop (and break every connection) once ``n`` more bytes went upstream."""
        self._budget = self.forwarded + n

    def stop(self) -> None:
        with self._lock:
            srv, self._srv = self._srv, None
            conns, self._conns = self._conns, set()
            self._budget = None
        if srv is not None:
            # the accept thread still polls the socket: it only leaves LISTEN once that ends
            self._acceptor.join(5)
            srv.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, srv: socket.socket) -> None:
        while self._srv is srv:
            try:
                client, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._stall:  # hold the connection open, forward nothing
                with self._lock:
                    if self._srv is not srv:
                        client.close()
                        return
                    self._conns.add(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._srv is not srv:
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            held = threading.Event()  # the answer to this connection's request is held back
            for args in ((client, upstream, True, held), (upstream, client, False, held)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool,
              held: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if up and data.split(b" ", 1)[0] in _METHODS:
                    line = data.split(b"\r\n", 1)[0]
                    if self.hold_if is not None and self.hold_if(line):
                        held.set()
                    else:
                        held.clear()
                if up:
                    self.forwarded += len(data)
                    budget = self._budget
                    if budget is not None and self.forwarded > budget:
                        self.stop()
                        return
                while not up and held.is_set() and self.hold_if is not None and self.running:
                    time.sleep(0.02)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
