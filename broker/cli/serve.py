"""``serve`` and ``demo``: the two commands that run a broker (and the only ones that create
keys in the state directory)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from broker.cli.common import config_path, leaf
from broker.errors import UsageError


def cmd_serve(args: argparse.Namespace) -> int:
    from broker import logs
    from broker.app import run
    from broker.cli.drain import PidFile, pid_path
    from broker.config import load_config

    path = config_path(args)
    config = load_config(path)
    logs.configure(config.log_level)
    pid = PidFile(pid_path(config))  # once listening: what `drain` signals
    try:
        return run(config, lambda _port: pid.write(), config_path=path)  # SIGHUP: read again
    finally:
        pid.remove()


def cmd_demo(args: argparse.Namespace) -> int:
    from broker.demo import run_demo

    if args.users < 1 or args.users > 5000:
        raise UsageError("--users must be between 1 and 5000")
    if not 0 <= args.workers <= 64:
        raise UsageError("--workers must be between 0 (one per core) and 64")
    return run_demo(Path(args.state_dir), args.ssh_port, args.users, args.workers,
                    public_keys=args.public_keys, rdp=args.rdp)


def register(sub: Any) -> None:
    s = sub.add_parser("serve", parents=leaf(), help="run the broker")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("demo", parents=leaf(),
                       help="run a demo broker with real sshd targets on loopback")
    s.add_argument("--state-dir", required=True, help="directory for all demo state")
    s.add_argument("--ssh-port", type=int, default=0, help="broker SSH port (default: a free one)")
    s.add_argument("--users", type=int, default=1,
                   help="demo users: alice plus user002..userN (for trying concurrency)")
    s.add_argument("--workers", type=int, default=1,
                   help="broker processes sharing the port (0: one per core)")
    s.add_argument("--public-keys", action="store_true",
                   help="also accept a demo SSH key (written to the state dir) instead of the "
                        "password; the code is still asked")
    s.add_argument("--rdp", action="store_true",
                   help="also run a Windows-like RDP target, win01 (FreeRDP's shadow server with "
                        "NLA under Xvfb), granted like web01: reach it with ssh -L")
    s.set_defaults(func=cmd_demo)
