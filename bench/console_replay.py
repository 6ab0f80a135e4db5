"""Replay of a large recording in the security console: time to the first frame in a real
Chromium, and the broker's memory while it serves the replay.

A real session through the broker (OpenSSH client, ``ssh -tt``, a demo target) prints about
``--mb`` MiB of text over ``--seconds`` seconds; once it is sealed, the demo auditor logs in to the
console in Debian's Chromium (Playwright) and opens the session: from the start, at a moment in
the middle (a search hit's link), and near the end. For each, the time from navigation to the
first output on the player's screen, the bytes of recording the page fetched, and the broker's
resident memory (VmRSS of the demo process, sampled every 20 ms) before and at most during it.

    .venv/bin/python bench/console_replay.py [--mb 100] [--seconds 60]

Results go to stdout as a Markdown table and to bench/results/console_replay.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from playwright.sync_api import Page, sync_playwright

from tests.conftest import Demo, start_demo, stop_demo

TERM = "pre.ap-term-text"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """The highest VmRSS of ``pid`` seen while it runs (every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self.peak = rss_kib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def make_recording(demo: Demo, mb: int, seconds: int) -> dict[str, Any]:
    """A terminal session that prints ``mb`` MiB of numbered text lines, evenly over
    ``seconds`` seconds (one write every 50 ms), through the broker."""
    user = demo.take_user()
    ticks = seconds * 20
    per_tick = mb * 1024 * 1024 // ticks
    program = (
        "import sys,time\n"
        f"line=b'%08d the quick brown fox jumps over the lazy dog 0123456789 abcdef\\n'\n"
        f"n=0\nt0=time.monotonic()\nfor i in range({ticks}):\n"
        f"    buf=bytearray()\n"
        f"    while len(buf)<{per_tick}:\n"
        "        buf+=line%n; n+=1\n"
        "    sys.stdout.buffer.write(buf); sys.stdout.buffer.flush()\n"
        "    d=t0+(i+1)*0.05-time.monotonic()\n"
        "    d>0 and time.sleep(d)\n"
        "print('bench-replay-end', n)\n"
    )
    before = {s["id"] for s in demo.sessions()}
    t0 = time.monotonic()
    command = f'python3 -c "{program}"'
    r = subprocess.run([*demo.ssh_args(f"{user}+web01", "-tt"), command],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       env=demo.env(user), timeout=seconds * 10 + 120)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"the session failed: {r.stderr.decode(errors='replace')[-500:]}")
    (s,) = [s for s in demo.sessions() if s["id"] not in before]
    manifest = Path(str(s["recording"])).with_suffix(".manifest.json")
    deadline = time.monotonic() + 600
    while not manifest.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the recording was not sealed in 10 minutes")
        time.sleep(0.2)
    s["rec_bytes"] = Path(str(s["recording"])).stat().st_size
    cast = Path(str(s["recording"])).with_suffix(".cast")
    s["cast_bytes"] = cast.stat().st_size if cast.exists() else None
    s["session_seconds"] = took
    return s


def login(page: Page, demo: Demo) -> None:
    a = demo.info["auditor"]
    page.goto(demo.info["web_url"] + "/")
    page.get_by_label("User").fill(a["user"])
    page.get_by_label("Password").fill(a["password"])
    page.get_by_label("Verification code").fill(demo.next_code(a["user"]))
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/#/sessions")


def first_frame(page: Page, demo: Demo, session_id: str, at: float | None,
                pid: int) -> dict[str, Any]:
    """Navigate to the session page and wait for output on the player's screen; count the
    recording bytes the page received (DevTools network events: a window the console stops
    reading early has no body to ask for afterwards)."""
    casts: set[str] = set()
    received: dict[str, int] = {}

    def sent(ev: dict[str, Any]) -> None:
        if "recording.cast" in ev["request"]["url"]:
            casts.add(ev["requestId"])

    def data(ev: dict[str, Any]) -> None:
        if ev["requestId"] in casts:
            received[ev["requestId"]] = received.get(ev["requestId"], 0) + ev["dataLength"]

    page.goto(demo.info["web_url"] + "/#/sessions")  # off the session page first
    page.wait_for_selector("table.sessions")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.on("Network.requestWillBeSent", sent)
    cdp.on("Network.dataReceived", data)
    suffix = f"?t={at}" if at is not None else "?t=0"
    with RssSampler(pid) as rss:
        base_rss = rss.peak
        t0 = time.monotonic()
        page.goto(demo.info["web_url"] + f"/#/session/{session_id}{suffix}")
        page.wait_for_function(
            f"() => /\\d{{8}} the quick/.test(document.querySelector('{TERM}')?.textContent || '')",
            timeout=60_000, polling=10)
        took = time.monotonic() - t0
        page.wait_for_timeout(2000)  # playing on: the next window is fetched meanwhile
    cdp.detach()
    sizes = [received.get(r, 0) for r in casts]
    return {"at": at or 0.0, "first_frame_s": round(took, 3), "rss_before_mib": base_rss / 1024,
            "rss_peak_mib": rss.peak / 1024, "requests": len(casts),
            "fetched_mib": sum(sizes) / 2**20,
            "largest_request_mib": max(sizes, default=0) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=100, help="MiB the session prints")
    ap.add_argument("--seconds", type=int, default=60, help="over this many seconds")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    tmp = Path(tempfile.mkdtemp(prefix="bb-console-bench-"))
    demo = start_demo(tmp / "state", users=4)
    try:
        pid = int(demo.info["pid"])
        print(f"recording a session of ~{args.mb} MiB over {args.seconds} s ...", flush=True)
        s = make_recording(demo, args.mb, args.seconds)
        print(f"session {s['id']}: .rec {s['rec_bytes'] / 2**20:.1f} MiB, "
              f"duration {s['duration_s']:.1f} s; broker RSS {rss_kib(pid) / 1024:.0f} MiB",
              flush=True)
        rows = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            login(page, demo)
            dur = float(s["duration_s"])
            for at in (None, round(dur / 2, 1), round(dur * 0.95, 1)):
                rows.append(first_frame(page, demo, str(s["id"]), at, pid))
            browser.close()
        print("\n| open at | first frame | recording read (largest request) | requests "
              "| broker RSS before -> peak |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['at']:.1f} s | {r['first_frame_s'] * 1000:.0f} ms "
                  f"| {r['fetched_mib']:.1f} MiB ({r['largest_request_mib']:.1f} MiB) "
                  f"| {r['requests']} | {r['rss_before_mib']:.0f} -> {r['rss_peak_mib']:.0f} MiB |")
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        (out / "console_replay.json").write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "mb": args.mb, "seconds": args.seconds,
            "session": {k: s[k] for k in ("id", "duration_s", "rec_bytes", "cast_bytes",
                                          "session_seconds")},
            "rows": rows}, indent=2))
    finally:
        stop_demo(demo)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
