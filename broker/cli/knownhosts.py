"""``known-hosts --api URL``: an engineer's known_hosts lines for ``ssh -J``, from the API.

No login and no state directory (``ca known-hosts`` needs the bastion's): the lines are public
(``GET /api/ssh/known_hosts``). What comes back is checked to be a well-formed known_hosts set
with an ``@cert-authority`` line before anything is printed or written, so a proxy's error page
or a truncated answer never lands in ``~/.ssh``; failures are one line each.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from broker.cli.common import leaf
from broker.domain.sanitize import printable
from broker.errors import BrokerError, UsageError

PATH = "/api/ssh/known_hosts"
MAX_BYTES = 64 * 1024  # the broker's answer is a few hundred bytes per hundred targets
TIMEOUT = 20.0
MARKERS = ("@cert-authority", "@revoked")
_HOSTS = re.compile(r"^[A-Za-z0-9.:_\-*?!\[\],%|=+/]+$")  # patterns, [host]:port, hashed |1|..
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


class FetchError(BrokerError):
    """The API could not be reached or gave an answer that is not known_hosts lines."""

    @property
    def user_message(self) -> str:  # type: ignore[override]
        return str(self)


def check_known_hosts(text: str) -> list[str]:
    """The lines of ``text`` if every one is a known_hosts entry whose key OpenSSH can read (or
    a comment), with at least one ``@cert-authority`` line; ``FetchError`` naming the first
    line that is not."""
    import asyncssh

    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    cert_authority = False
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in line):
            raise FetchError(f"line {n} has control characters: not a known_hosts line")
        fields = line.split()
        marker = fields.pop(0) if fields[0].startswith("@") else None
        if marker is not None and marker not in MARKERS:
            raise FetchError(f"line {n}: unknown marker {printable(marker[:40])}")
        if len(fields) < 3:
            raise FetchError(f"line {n}: expected hosts, key type and key")
        hosts, keytype, blob = fields[:3]
        if not _HOSTS.match(hosts) or not _BASE64.match(blob):
            raise FetchError(f"line {n} is not a known_hosts line")
        try:
            key = asyncssh.import_public_key(f"{keytype} {blob}")
        except (asyncssh.KeyImportError, ValueError):
            raise FetchError(f"line {n}: not a valid {printable(keytype[:40])} key") from None
        if key.get_algorithm() != keytype:
            raise FetchError(f"line {n}: the key is not of type {printable(keytype[:40])}")
        if marker == "@cert-authority":
            if any(not re.search(r"[A-Za-z0-9]", p) for p in hosts.split(",")):
                # "*": the CA would vouch for every host (the broker never sends it)
                raise FetchError(f"line {n}: @cert-authority for every host ({hosts}) refused")
            cert_authority = True
    if not cert_authority:
        raise FetchError("no @cert-authority line in the answer (has the inventory any Linux "
                         "targets?)")
    return lines


def _error_of(status: int, raw: bytes) -> str:
    try:
        payload = json.loads(raw)
        detail = payload.get("detail") if isinstance(payload, dict) else None
        msg = detail.get("message") if isinstance(detail, dict) else None
        err = payload.get("error") if isinstance(payload, dict) else None
    except (ValueError, RecursionError):
        msg = err = None
    if status == 404 and not msg:
        msg = f"no {PATH} there (a broker older than this command, or not its API URL?)"
    return printable(f"{status} {err or 'error'}: {msg or ''}".rstrip(": ")[:300])


def fetch(api: str, bastion: str | None = None) -> str:
    """The body of ``GET /api/ssh/known_hosts``; ``FetchError`` (one line) for anything but a
    text/plain 200 of at most ``MAX_BYTES``."""
    base = api.rstrip("/")
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise UsageError("--api must be an http:// or https:// URL")
    url = base + PATH + ("?" + urllib.parse.urlencode({"host": bastion}) if bastion else "")
    req = urllib.request.Request(url, headers={"Accept": "text/plain"})  # noqa: S310 - checked
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:  # noqa: S310 - scheme checked
            raw: bytes = resp.read(MAX_BYTES + 1)
            ctype = str(resp.headers.get_content_type())
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{base} refused: {_error_of(exc.code, exc.read(MAX_BYTES))}") from None
    except urllib.error.URLError as exc:
        reason: Any = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise FetchError(f"TLS failure talking to {base}: certificate verify failed: "
                             f"{printable(str(reason.verify_message))}") from None
        if isinstance(reason, ssl.SSLError):
            raise FetchError(f"TLS failure talking to {base}: "
                             f"{printable(str(reason.reason or reason))}") from None
        raise FetchError(f"cannot reach {base}: {printable(str(reason))}") from None
    except ssl.SSLError as exc:
        raise FetchError(f"TLS failure talking to {base}: {printable(str(exc))}") from None
    except (http.client.HTTPException, OSError) as exc:  # not HTTP, reset, timeout
        raise FetchError(f"cannot reach {base}: {printable(str(exc) or type(exc).__name__)}"
                         ) from None
    if len(raw) > MAX_BYTES:
        raise FetchError(f"bad answer from {base}: over {MAX_BYTES} bytes")
    if ctype != "text/plain":
        raise FetchError(f"bad answer from {base}: {printable(ctype)}, not text/plain (is "
                         "that the broker's API URL?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FetchError(f"bad answer from {base}: not UTF-8 text") from None


def _plain_http_elsewhere(api: str) -> bool:
    parts = urllib.parse.urlsplit(api)
    if parts.scheme != "http" or not parts.hostname:
        return False
    try:
        return not ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return parts.hostname != "localhost"


def _write(path: Path, text: str) -> None:
    """Replace ``path`` at once: a reader (ssh) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"cannot write {path}: {exc.strerror or exc}") from None


def _known_hosts(args: argparse.Namespace) -> int:
    api = getattr(args, "api", None) or os.environ.get("BASTION_BROKER_API")
    if not api:
        raise UsageError("give the API URL: --api URL or $BASTION_BROKER_API")
    text = "".join(line + "\n" for line in check_known_hosts(fetch(api, args.bastion)))
    if _plain_http_elsewhere(api):
        sys.stderr.write("bastion-broker: warning: fetched over plain http: check the keys "
                         "with your administrators, or use the https:// URL\n")
    if args.output:
        _write(Path(args.output), text)
    else:
        sys.stdout.write(text)
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("known-hosts", parents=leaf(),
                       help="known_hosts lines for ssh -J from the API (no login needed)")
    s.add_argument("--output", "-o", metavar="FILE",
                   help="write them to FILE (replaced whole) instead of printing them")
    s.add_argument("--bastion", metavar="HOST[:PORT]",
                   help="the bastion as you reach it over SSH (default: the API's host name "
                        "and the bastion's SSH port)")
    s.set_defaults(func=_known_hosts)
