"""Logging set-up: JSON lines on stderr for the daemon, quiet one-liners for the CLI.

Everything that reaches stderr goes through here, warnings included: a library's
``DeprecationWarning`` at import (asyncssh's DSA import under recent cryptography, for one) would
otherwise print raw, multi-line text into the JSON log and onto an operator's terminal. The daemon
logs each warning once as a ``python.warning`` event; the CLI keeps them at debug level, shown only
with ``BASTION_BROKER_LOG_LEVEL=debug``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

_warning_level = logging.WARNING


def _source(filename: str) -> str:
    """``package/module.py`` rather than an absolute path of this machine."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in filename:
            return filename.rsplit(marker, 1)[1]
    return os.path.basename(filename)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    structlog.get_logger("py.warnings").log(
        _warning_level, "python.warning", category=category.__name__, message=str(message),
        source=f"{_source(filename)}:{lineno}")


def route_warnings(level: int) -> None:
    """Send ``warnings.warn`` through structlog at ``level`` (once per location, as Python's
    default filter does), never as raw text."""
    global _warning_level
    _warning_level = level
    warnings.showwarning = _show_warning
    logging.captureWarnings(False)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, or a redirect made
    after logging was set up), not to the stream that was current at set-up."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    return structlog.PrintLogger(sys.stderr)


def _stdlib_handler(renderer: Any) -> logging.Handler:
    """Libraries' stdlib logging (asyncssh, aiohttp, botocore) rendered like our own events."""
    handler = _Stderr()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           structlog.processors.TimeStamper(fmt="iso", utc=True),
                           structlog.processors.format_exc_info]))
    return handler


def _install_root(handler: logging.Handler, level: int) -> None:
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # asyncssh logs every packet-level event at INFO; keep warnings and above
    logging.getLogger("asyncssh").setLevel(max(level, logging.WARNING))


def configure(level: str) -> None:
    """The daemon (``serve``, ``demo``): one JSON object per line on stderr."""
    renderer = structlog.processors.JSONRenderer(sort_keys=True)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # one write per line (text and newline together): PrintLogger's print() makes two, and
        # lines of worker processes sharing one stderr pipe then interleave
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _install_root(_stdlib_handler(renderer), logging.WARNING)
    route_warnings(logging.WARNING)


def _cli_render(_logger: Any, _name: str, event: Any) -> str:
    level = event.pop("level", "info")
    text = str(event.pop("event", ""))
    event.pop("timestamp", None)
    extra = " ".join(f"{k}={v}" for k, v in sorted(event.items()))
    return f"bastion-broker: {level}: {text}" + (f" ({extra})" if extra else "")


def configure_cli() -> None:
    """Commands: only warnings and errors, as one line each; dependency warnings at debug.
    ``BASTION_BROKER_LOG_LEVEL=debug`` shows everything."""
    level = _LEVELS.get(os.environ.get("BASTION_BROKER_LOG_LEVEL", "warning"), logging.WARNING)
    structlog.configure(
        processors=[structlog.processors.add_log_level, _cli_render],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,  # ``serve`` re-configures for JSON
    )
    _install_root(_stdlib_handler(_cli_render), level)
    route_warnings(logging.DEBUG)
