"""``sessions unseal SESSION --key FILE --reason TEXT``: break-glass reading of withheld input.

Input a target did not echo (a password at a no-echo prompt) is a marker in the recording; with
``[recordings] input = "sealed"`` its bytes are also in ``SESSION_ID.sealed``, encrypted to a
break-glass key the broker does not hold (``broker.recordings.sealed``). This command decrypts
them with the private key. The audit event ``recording.unsealed`` (who, why, which key) is
written before anything is shown: no audit line, nothing unsealed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from broker.cli import resolve
from broker.cli.common import config_of, leaf, run_async, unix_user
from broker.cli.output import out
from broker.domain.sanitize import printable
from broker.errors import NotFoundError, UsageError
from broker.recordings import sealed
from broker.recordings.local import LocalRecordingSink


def _unsealed(path: Path, key_file: Path) -> tuple[list[sealed.Unsealed], sealed.SealedFile, str]:
    key = sealed.load_private_key(key_file)
    info = sealed.SealedFile("", "")
    items = list(sealed.read(path, key, info))
    return items, info, sealed.fingerprint(key.public_key())


async def _unseal(args: argparse.Namespace) -> int:
    from broker.stores import connect_stores

    reason = (args.reason or "").strip()
    if not reason:
        raise UsageError("--reason must say why (it goes into the audit log)")
    config = config_of(args)
    stores = await connect_stores(config)
    try:
        rec = await resolve.session(stores.sessions, args.session_id)
        if not rec.recording:
            raise NotFoundError(f"session {rec.id} was not recorded")
        path = sealed.sealed_path(LocalRecordingSink(config.recordings_dir)
                                  .path_of(rec.recording))
        # decrypted (so the key is the right one) but shown only once the audit has the event
        items, info, key_id = await asyncio.to_thread(_unsealed, path, Path(args.key))
        if info.session_id != rec.id:
            raise sealed.UnsealError(f"{path.name} belongs to session {info.session_id}, not {rec.id}")
        stores.audit.emit("recording.unsealed", user=f"operator:{unix_user()}",
                          session_id=rec.id, reason=reason, key=key_id, records=len(items),
                          bytes=sum(len(i.data) for i in items), complete=info.complete)
    finally:
        await stores.close()
    if args.json:
        doc: dict[str, Any] = {
            "session_id": rec.id, "complete": info.complete,
            "input": [{"t": round(i.t_us / 1e6, 6),
                       "text": i.data.decode("utf-8", "backslashreplace")} for i in items]}
        out(json.dumps(doc, indent=2))
        return 0
    for i in items:
        out(f"{i.t_us / 1e6:10.3f}s  {printable(i.data.decode('utf-8', 'backslashreplace'))}")
    if not info.complete:
        out("(the sealed file has no end record: the session did not end cleanly, or the file "
            "was cut)")
    return 0


def register(ss: Any) -> None:
    s = ss.add_parser("unseal", parents=leaf(), help="break glass: show the input a session "
                      "withheld from its recording (sealed mode; audited)")
    s.add_argument("session_id", help="session id or a unique prefix of it")
    s.add_argument("--key", required=True, metavar="PRIVATE_KEY_FILE",
                   help="the break-glass X25519 private key (PEM)")
    s.add_argument("--reason", required=True, help="why (ticket, incident): audited")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_async(_unseal))
