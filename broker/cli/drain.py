"""``drain``: take a running bastion out of service without cutting anyone off.

The command sends SIGQUIT (the signal nginx and Teleport drain on) to the broker whose pid file
it finds: ``STATE_DIR/broker.pid``, written by ``serve`` once it listens (the parent's pid with
``[ssh] workers``: it passes the signal on) and removed when it exits. What a drain does is in
``broker.app.Broker.drain``. ``--pid`` names the process instead (under systemd also
``systemctl kill -s QUIT --kill-whom=main bastion-broker``); ``--wait`` returns when it has exited.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import structlog

from broker.cli.common import config_of, leaf
from broker.cli.output import out
from broker.config import BrokerConfig
from broker.errors import UsageError

log = structlog.get_logger("broker.cli.drain")


def pid_path(config: BrokerConfig) -> Path:
    return config.state_dir / "broker.pid"


class PidFile:
    """This process's pid in ``path`` while it serves (one broker per state directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pid = os.getpid()

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{self._pid}")
        try:
            tmp.write_text(f"{self._pid}\n")
            tmp.replace(self.path)  # a reader never sees half a number
        except OSError as exc:  # the broker serves anyway; only `drain` without --pid is lost
            log.warning("broker.pid_file_unwritable", path=str(self.path), error=str(exc))
            with contextlib.suppress(OSError):
                tmp.unlink()

    def remove(self) -> None:
        """Only our own: another broker may have taken the file over meanwhile."""
        with contextlib.suppress(OSError, ValueError):
            if int(self.path.read_text().strip()) == self._pid:
                self.path.unlink()


def _running(pid: int) -> bool:
    """Alive and not a zombie (a broker that has exited but whose parent has not reaped it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: the signal check above is all there is
    return stat.rpartition(")")[2].split()[0] != "Z"


def _is_broker(pid: int) -> bool | None:
    """Whether ``pid`` runs this program (None: cannot tell): a stale pid file may name a pid
    the system has since given to another process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return b"broker" in cmdline


def _target(args: argparse.Namespace, config: BrokerConfig) -> int:
    if args.pid is not None:
        pid = int(args.pid)
    else:
        path = pid_path(config)
        try:
            pid = int(path.read_text().strip())
        except FileNotFoundError:
            raise UsageError(f"no broker is running on this state directory ({path} does not "
                             "exist; `serve` writes it once it listens), or name it with "
                             "--pid") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the broker's pid from {path}: {exc}") from None
    if pid <= 1 or not _running(pid):
        raise UsageError(f"no broker runs as pid {pid}" + (" (stale pid file)"
                                                           if args.pid is None else ""))
    if _is_broker(pid) is False:
        raise UsageError(f"pid {pid} is not a bastion-broker process; refusing to signal it")
    return pid


def cmd_drain(args: argparse.Namespace) -> int:
    config = config_of(args)
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    pid = _target(args, config)
    try:
        os.kill(pid, signal.SIGQUIT)
    except PermissionError:
        raise UsageError(f"not allowed to signal pid {pid}: run as root or as the broker's "
                         "user") from None
    s = config.shutdown
    out(f"drain requested: broker {pid} is not ready from now on, accepts new connections for "
        f"{s.drain_accept_seconds:g} s more, and exits when its last session ends (sessions "
        f"still live after {s.drain_seconds:g} s are ended)")
    if not args.wait:
        return 0
    # the deadline, then the shutdown's grace, then a margin for closing recordings
    timeout = args.timeout or s.drain_seconds + s.grace_seconds + 60
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            out(f"broker {pid} has not exited within {timeout:g} s")
            return 1
        time.sleep(0.2)
    out(f"broker {pid} has exited")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser(
        "drain", parents=leaf(),
        help="take the running broker out of service: /readyz fails, new connections stop "
             "after [shutdown] drain_accept_seconds, it exits when its last session ends")
    s.add_argument("--pid", type=int, help="the broker's pid (default: from STATE_DIR/broker.pid)")
    s.add_argument("--wait", action="store_true", help="return once the broker has exited")
    s.add_argument("--timeout", type=float,
                   help="with --wait: give up (exit status 1) after this many seconds (default: "
                        "drain_seconds + grace_seconds + 60)")
    s.set_defaults(func=cmd_drain)
