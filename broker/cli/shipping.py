"""``bastion-broker shipping status``: what waits to go to S3 and CloudWatch Logs, and why.

Reads the spool read-only, so it runs beside a live broker and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from typing import Any

from broker.cli.common import config_of, leaf
from broker.cli.output import out, table
from broker.errors import StoreError


def _status(args: argparse.Namespace) -> dict[str, Any]:

    cfg = config_of(args)
    sh = cfg.shipping
    db_path = cfg.shipping_spool_dir / "spool.db"
    result: dict[str, Any] = {
        "s3": None if sh.s3 is None else {"bucket": sh.s3.bucket, "prefix": sh.s3.prefix,
                                          "endpoint_url": sh.s3.endpoint_url},
        "cloudwatch": None if sh.cloudwatch is None else {
            "log_group": sh.cloudwatch.log_group, "log_stream": sh.cloudwatch.log_stream},
        "spool": str(db_path), "uploads": {}, "waiting": [], "audit_backlog_bytes": {},
    }
    if not db_path.exists():
        return result
    from broker.shipping.backlog import open_spool_read_only

    db = open_spool_read_only(db_path)
    try:
        result["uploads"] = dict(db.execute(
            "SELECT state, COUNT(*) FROM uploads GROUP BY state ORDER BY state").fetchall())
        now = time.time()
        result["waiting"] = [
            {"session_id": sid, "attempts": n, "queued_s_ago": round(now - queued),
             "next_try_in_s": max(0, round(nxt - now)), "last_error": err or ""}
            for sid, n, queued, nxt, err in db.execute(
                "SELECT session_id, attempts, queued_at, next_attempt, last_error FROM uploads"
                " WHERE state = 'pending' ORDER BY queued_at LIMIT ?", (args.limit,))]
        from broker.shipping.backlog import audit_unread
        from broker.shipping.spool import audit_chain

        offsets = db.execute("SELECT name, inode, offset FROM offsets ORDER BY name").fetchall()
        # across rotated files: the rest of the file each shipper reads and all after it
        result["audit_backlog_bytes"].update(audit_unread(audit_chain(cfg.audit_path), offsets))
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {db_path}: {exc}") from None
    finally:
        db.close()
    return result


def cmd_status(args: argparse.Namespace) -> int:
    st = _status(args)
    if args.json:
        out(json.dumps(st, indent=2))
        return 0
    s3 = st["s3"]
    out(f"S3:         {'off' if s3 is None else 's3://' + s3['bucket'] + '/' + s3['prefix']}")
    cw = st["cloudwatch"]
    out(f"CloudWatch: {'off' if cw is None else cw['log_group']}")
    counts = ", ".join(f"{k} {v}" for k, v in st["uploads"].items()) or "none yet"
    out(f"sessions:   {counts}")
    for name, backlog in st["audit_backlog_bytes"].items():
        out(f"audit bytes not yet read by {name}: {backlog}")
    if st["waiting"]:
        out()
        table(st["waiting"], ["session_id", "attempts", "queued_s_ago", "next_try_in_s",
                              "last_error"])
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sh = sub.add_parser("shipping", help="copies to S3 and CloudWatch Logs"
                        ).add_subparsers(dest="sub", required=True)
    s = sh.add_parser("status", parents=leaf(),
                       help="sessions waiting for S3, audit backlog, last errors")
    s.add_argument("--limit", type=int, default=20, help="waiting sessions to list")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
