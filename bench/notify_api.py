"""Does notification delivery slow the API down? Grant requests (``POST /api/grants``) timed
against three brokers in the same run: (a) with no notification channel; (b) with
``--channels`` (100) webhook subscribers, every one taking ``grant.requested``, of which one
never answers (its sends end at ``[notify] timeout_seconds``, 10 s, and are retried) and the
others answer 200 at once; (c) with as many subscribers, all answering. (b) against (a) is what
100 subscribers and a hanging one cost a request; (b) against (c) what the hanging one adds.

The brokers are ``bastion-broker serve`` processes sharing the state of a ``demo`` (SQLite,
users, TOTP, inventory); the receivers run in a process of their own (an aiohttp server on
127.0.0.1; each request's HMAC signature is checked). ``--rounds`` (5) rounds of ``--requests``
(200) requests each at ``--rate`` (2) per second, by one logged-in requester per broker (a
session cookie, as the console), the order of the brokers rotating each round. Before each
round the deliveries of the earlier ones are left to arrive, so a round never runs beside
another broker's backlog. p50 and p99 per round, then the median over rounds; also how many
deliveries the receivers got and how long the last one of each request took to arrive.

    .venv/bin/python bench/notify_api.py [--channels 100] [--requests 200] [--rounds 5] [--rate 2]

Raw numbers go to bench/results/notify_api-TIMESTAMP.json; paste the table into
docs/benchmarks.md ("Notifications (issue 19)").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.domain.notify import verify
from tests.conftest import Demo, serve_broker, start_demo, stop_demo

REPO = Path(__file__).resolve().parent.parent


# -- the receivers (``--receivers PORTFILE SECRET``: a process of their own) -----------------------
async def _receive(secret: bytes) -> None:
    got: list[tuple[float, str, bool]] = []  # (time, X-Bastion-Delivery's event id, signed ok)
    hang = asyncio.Event()

    async def hook(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        ok = verify(secret, request.headers.get("X-Bastion-Timestamp", ""), body,
                    request.headers.get("X-Bastion-Signature", ""), time.time())
        if request.match_info["kind"] == "hang":
            await hang.wait()
        got.append((time.time(), json.loads(body)["data"].get("ticket", ""), ok))
        return web.Response(status=200)

    async def stats(request: web.Request) -> web.StreamResponse:
        return web.json_response(got)

    app = web.Application()
    app.router.add_post("/{kind}/{n}", hook)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(runner.addresses[0][1], flush=True)  # the port, for the benchmark process
    await asyncio.Event().wait()


# -- the measurement -----------------------------------------------------------------------------
def _config(demo: Demo, tmp: Path, name: str, hooks: list[str], web_port: int) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "secret").write_text(SECRET)
    # channel names of their own: the brokers share one outbox, and each sends only its own
    notify = "".join(f'[[notify.webhooks]]\nname = "{name}-{i}"\nurl = "{u}"\n'
                     f'secret_file = "secret"\nevents = ["grant.requested"]\n'
                     for i, u in enumerate(hooks))
    return demo.variant_config(d, limits="penalty_exempt = ['127.0.0.0/8']", extra=(
        '[web]\nlisten_host = "127.0.0.1"\n'
        f"listen_port = {web_port}\nsecure_cookies = false\n[notify]\n{notify}"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Client:
    def __init__(self, base: str) -> None:
        self.base = base
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def login(self, demo: Demo, user: str) -> None:
        async with self.http.post(self.base + "/api/login", json={
                "user": user, "password": demo.info["password"],
                "code": demo.next_code(user)}) as r:
            assert r.status == 200, await r.text()
            self.csrf = (await r.json())["csrf"]

    async def request(self, ticket: str) -> float:
        body = {"stacks": ["stack-web"], "vpc": "vpc-0demo", "level": "admin", "hours": 1,
                "ticket": ticket, "reason": "benchmark"}
        t0 = time.perf_counter()
        async with self.http.post(self.base + "/api/grants", json=body,
                                  headers={"X-CSRF-Token": self.csrf}) as r:
            await r.read()
            assert r.status == 201, r.status
        return time.perf_counter() - t0


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p * (len(s) - 1)))]


async def _drained(http: aiohttp.ClientSession, stats_url: str, want: int) -> list[Any]:
    """Wait until the answering receivers have ``want`` deliveries (at most 120 s)."""
    deadline = time.monotonic() + 120
    while True:
        async with http.get(stats_url) as r:
            got = await r.json()
        if len(got) >= want or time.monotonic() > deadline:
            return list(got)
        await asyncio.sleep(0.2)


SECRET = "whsec-bench-" + secrets.token_hex(8)
NAMES = ["none", "hooks", "answering"]  # the three brokers: see the module docstring


def _start(args: argparse.Namespace, demo: Demo, tmp: Path,
           procs: list[subprocess.Popen[bytes]]) -> tuple[str, dict[str, str]]:
    """The receivers' process and the two brokers; returns the receivers' base URL and each
    broker's API URL."""
    recv = subprocess.Popen([sys.executable, __file__, "--receivers", SECRET],
                            stdout=subprocess.PIPE)
    procs.append(recv)
    assert recv.stdout is not None
    base = f"http://127.0.0.1:{int(recv.stdout.readline())}"
    hooks = [f"{base}/hang/0"] + [f"{base}/ok/{i}" for i in range(1, args.channels)]
    answering = [f"{base}/ok/{i}" for i in range(args.channels, 2 * args.channels)]
    urls: dict[str, str] = {}
    for name, hs in (("none", []), ("hooks", hooks), ("answering", answering)):
        port = _free_port()
        proc, _ = serve_broker(_config(demo, tmp, name, hs, port))
        procs.append(proc)
        assert proc.stderr is not None
        # its log is not kept, but read: a full pipe would stop the broker
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        urls[name] = f"http://127.0.0.1:{port}"
    return base, urls


async def _measure(args: argparse.Namespace, demo: Demo, base: str,
                   urls: dict[str, str]) -> dict[str, Any]:
    clients: dict[str, Client] = {}
    for name, url in urls.items():
        clients[name] = Client(url)
        await clients[name].login(demo, demo.take_user())
    stats = aiohttp.ClientSession()
    lat: dict[str, list[list[float]]] = {name: [] for name in NAMES}
    sent_at: dict[str, float] = {}
    expected = 0
    try:
        for rnd in range(args.rounds):
            order = NAMES[rnd % 3:] + NAMES[:rnd % 3]
            for name in order:
                await _drained(stats, f"{base}/stats", expected)
                times = []
                start = time.monotonic()
                for i in range(args.requests):
                    if args.rate:  # requests at a fixed rate, as people make them
                        await asyncio.sleep(max(0.0, start + i / args.rate - time.monotonic()))
                    ticket = f"B-{name}-{rnd}-{i}"
                    sent_at[ticket] = time.time()
                    times.append(await clients[name].request(ticket))
                lat[name].append(times)
                expected += args.requests * {"none": 0, "hooks": args.channels - 1,
                                             "answering": args.channels}[name]
                print(f"round {rnd + 1} {name}: p50 {_pct(times, 0.5) * 1000:.2f} ms, "
                      f"p99 {_pct(times, 0.99) * 1000:.2f} ms", flush=True)
        got = await _drained(stats, f"{base}/stats", expected)
    finally:
        await stats.close()
        for c in clients.values():
            await c.http.close()
    last: dict[str, float] = {}
    for t, ticket, _ok in got:
        last[ticket] = max(last.get(ticket, 0.0), t)
    arrive = [last[k] - sent_at[k] for k in last if k in sent_at]
    return {"lat": lat, "deliveries": len(got), "expected": expected,
            "signed_ok": sum(1 for _, _, ok in got if ok), "arrive": arrive}


def _summary(args: argparse.Namespace, res: dict[str, Any]) -> str:
    def med(name: str, p: float) -> float:
        return statistics.median(_pct(r, p) for r in res["lat"][name]) * 1000

    rows = []
    for label, p in (("p50", 0.5), ("p99", 0.99)):
        a, b, c = med("none", p), med("hooks", p), med("answering", p)
        rows.append(f"| `POST /api/grants` {label}, ms | {a:.2f} | {b:.2f} | {c:.2f} "
                    f"| {b / a:.2f}x | {b / c:.2f}x |")
    arrive = res["arrive"]
    load = os.getloadavg()[0]
    return "\n".join([
        f"| Measurement | (a) no channels | (b) {args.channels} webhooks, 1 hanging "
        f"| (c) {args.channels} webhooks, none hanging | (b)/(a) | (b)/(c) |",
        "|---|---:|---:|---:|---:|---:|", *rows, "",
        "Deliveries received by the answering receivers of (b) and (c): "
        f"{res['deliveries']:,} of {res['expected']:,}, signature valid on "
        f"{res['signed_ok']:,}. Request sent -> the last of its "
        f"deliveries received: p50 {_pct(arrive, 0.5) * 1000:.0f} ms, p99 "
        f"{_pct(arrive, 0.99) * 1000:.0f} ms. Load average (1 min) after: {load:.2f}.",
        "", "Per-round p50 / p99, ms: " + "; ".join(
            f"{n}: " + " / ".join(f"{_pct(r, 0.5) * 1000:.2f}/{_pct(r, 0.99) * 1000:.2f}"
                                   for r in res["lat"][n]) for n in NAMES)])


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--receivers":
        asyncio.run(_receive(sys.argv[2].encode()))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=100)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rate", type=float, default=2.0,
                   help="requests per second (0: each as soon as the last is answered)")
    args = p.parse_args()
    command = ".venv/bin/python bench/notify_api.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="bb-notify-bench-") as tmp:
        demo = start_demo(Path(tmp) / "state", users=50)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            base, urls = _start(args, demo, Path(tmp), procs)
            res = asyncio.run(_measure(args, demo, base, urls))
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            stop_demo(demo)
    text = _summary(args, res)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / "bench" / "results" / f"notify_api-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "command": command.strip(),
                               "latency_s": res["lat"], "deliveries": res["deliveries"],
                               "expected": res["expected"], "arrive_s": res["arrive"]}))
    print(f"\nGenerated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command.strip()}`.\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
