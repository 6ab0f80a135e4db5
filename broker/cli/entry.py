"""``main``: parse, run one command, and keep the terminal clean.

Errors are one line (``bastion-broker: error: ...``, exit status 2), never a traceback. Warnings
from dependencies (say, a deprecation in a library's import) go through logging, not straight to
stderr: a command that succeeds prints only its output.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from broker import logs
from broker.errors import BrokerError


def main(argv: Sequence[str] | None = None) -> int:
    logs.configure_cli()  # before any import that may warn (asyncssh, cryptography, boto3)
    from broker.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokerError as exc:
        sys.stderr.write(f"bastion-broker: error: {exc.user_message}\n")
        return 2
    except KeyboardInterrupt:
        return 130
