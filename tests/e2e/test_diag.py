"""The diagnostics listener of a real broker: /healthz, /readyz and /metrics, read the way a
load balancer and Prometheus read them, after real OpenSSH logins and sessions through it."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.app import Broker
from broker.config import load_config
from tests.conftest import Demo, serve_broker

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
CHECKS = ["store", "audit", "recordings_disk", "directory", "draining"]


def get(url: str) -> tuple[int, bytes, str]:
    """(status, body, content type), 503 included."""
    try:
        with urllib.request.urlopen(url, timeout=15) as r:  # noqa: S310 - a loopback test URL
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def scrape(base: str) -> Samples:
    status, body, ctype = get(base + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wrong_code(demo: Demo, user: str) -> str:
    """A code none of the steps the broker accepts now would give (it differs in every digit
    from the current one; the previous and next steps are checked too)."""
    import pyotp

    totp = pyotp.TOTP(demo.secret(user))
    step = int(time.time()) // 30
    valid = {totp.generate_otp(s) for s in range(step - 2, step + 3)}
    for n in range(1_000_000):
        code = f"{(n * 7919) % 1_000_000:06d}"
        if code not in valid:
            return code
    raise AssertionError("no wrong code found")


def test_health_and_readiness_of_the_demo(demo: Demo) -> None:
    base = demo.info["diag_url"]
    status, body, _ = get(base + "/healthz")
    assert status == 200
    assert json.loads(body) == {"status": "alive"}
    status, body, _ = get(base + "/readyz")
    ready = json.loads(body)
    assert status == 200, ready
    assert ready["status"] == "ready"
    assert ready["failing"] == []
    assert [c["name"] for c in ready["checks"]] == CHECKS
    assert all(c["ok"] for c in ready["checks"])
    assert "GiB free" in next(c["detail"] for c in ready["checks"]
                              if c["name"] == "recordings_disk")
    status, _, _ = get(base + "/nothing-here")
    assert status == 404


def test_metrics_count_a_real_login_session_and_grant_decision(demo: Demo) -> None:
    base = demo.info["diag_url"]
    before = scrape(base)
    user = demo.take_user()
    r = demo.ssh(user, "web01", "echo hi")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hi\n"
    after = scrape(base)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("bastion_broker_logins_total", result="success", reason="password_totp") == 1
    assert delta("bastion_broker_login_duration_seconds_count", outcome="success") == 1
    # at login (user+target) and again when the exec session starts
    assert delta("bastion_broker_grant_decisions_total", decision="allow") >= 2
    assert delta("bastion_broker_sessions_total", kind="exec", outcome="ok") >= 1
    assert delta("bastion_broker_relayed_bytes_total", direction="out", kind="exec") >= 3
    assert delta("bastion_broker_directory_call_duration_seconds_count", op="authenticate") >= 1
    assert delta("bastion_broker_store_call_duration_seconds_count") >= 5
    assert value(after, "bastion_broker_sessions_active", kind="exec") == 0
    assert value(after, "bastion_broker_accounts_locked") == 0
    assert value(after, "bastion_broker_metrics_source_up", source="accounts") == 1
    assert value(after, "bastion_broker_recordings_disk_free_bytes") > 0
    lag = value(after, "bastion_broker_recording_sync_lag_seconds")
    assert 0 < lag < 10  # flushed about every second ([recordings] sync_interval_seconds)


def test_failed_login_and_denied_target_are_counted(demo: Demo) -> None:
    base = demo.info["diag_url"]
    before = scrape(base)
    user = demo.take_user()
    r = demo.ssh(user, "web01", "true", code=wrong_code(demo, user))
    assert r.returncode == 255
    assert b"Permission denied" in r.stderr
    mid = scrape(base)
    assert (value(mid, "bastion_broker_logins_total", result="failure", reason="totp_bad")
            - value(before, "bastion_broker_logins_total", result="failure",
                    reason="totp_bad")) == 1
    assert (value(mid, "bastion_broker_login_duration_seconds_count", outcome="failure")
            > value(before, "bastion_broker_login_duration_seconds_count", outcome="failure"))

    denied = demo.info["denied_target"]
    r = demo.ssh(demo.take_user(), denied, "true")
    assert r.returncode != 0
    assert f"no access to {denied}".encode() in r.stderr
    after = scrape(base)
    assert (value(after, "bastion_broker_grant_decisions_total", decision="deny")
            - value(mid, "bastion_broker_grant_decisions_total", decision="deny")) == 1
    assert (value(after, "bastion_broker_logins_total", result="success",
                  reason="password_totp")
            - value(mid, "bastion_broker_logins_total", result="success",
                    reason="password_totp")) == 1


async def test_readiness_names_the_recordings_disk_below_its_threshold(
    demo: Demo, tmp_path: Path
) -> None:
    """A second broker on the demo's state whose min free space (1 EiB) cannot be met."""
    cfg = demo.variant_config(tmp_path, extra=(
        "[web]\nenabled = false\n"
        "[recordings]\nmin_free_bytes = 1152921504606846976\n"
        "[diag]\nenabled = true\nlisten_port = 0\ncheck_timeout_seconds = 5\n"))
    broker = Broker(load_config(cfg))
    await broker.start()
    try:
        assert broker.diag_url is not None
        async with aiohttp.ClientSession() as http:
            async with http.get(broker.diag_url + "/healthz") as r:
                assert r.status == 200
            async with http.get(broker.diag_url + "/readyz") as r:
                body: dict[str, Any] = await r.json()
                assert r.status == 503, body
        assert body["status"] == "not ready"
        assert body["failing"] == ["recordings_disk"]
        assert [c["name"] for c in body["checks"]] == CHECKS
        disk = next(c for c in body["checks"] if c["name"] == "recordings_disk")
        assert "below its free-space threshold" in disk["detail"]
        assert all(c["ok"] for c in body["checks"] if c["name"] != "recordings_disk")
    finally:
        await broker.stop()
    # the demo itself (default thresholds, same disk) stays ready
    status, _, _ = get(demo.info["diag_url"] + "/readyz")
    assert status == 200


def _free_run(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports, below the kernel's ephemeral range
    (an ssh client or the broker's own port 0 could take one there before the workers bind)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()  # noqa: S311 - picking a test port
    for _ in range(200):
        first = rng.randrange(10000, low - n)
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no run of free ports")


def test_each_worker_serves_its_own_metrics_on_its_own_port(demo: Demo, tmp_path: Path) -> None:
    first = _free_run(2)
    cfg = demo.variant_config(tmp_path, ssh="workers = 2", extra=(
        "[web]\nenabled = false\n"
        f"[diag]\nenabled = true\nlisten_port = {first}\n"))
    proc, port = serve_broker(cfg)
    try:
        bases = [f"http://127.0.0.1:{p}" for p in (first, first + 1)]
        deadline = time.monotonic() + 30
        while True:  # the second worker may still be starting
            try:
                statuses = [get(b + "/healthz")[0] for b in bases]
                break
            except OSError:
                assert time.monotonic() < deadline, "a worker's diagnostics never listened"
                time.sleep(0.2)
        assert statuses == [200, 200]
        known = demo.known_hosts_for(tmp_path, port)
        logins = 4
        for _ in range(logins):
            user = demo.take_user()
            args = demo.ssh_args(f"{user}+web01", port=port, known_hosts=known)
            r = subprocess.run([*args, "true"], capture_output=True, timeout=60,
                               env=demo.env(user))
            assert r.returncode == 0, r.stderr
        per_worker = [value(scrape(b), "bastion_broker_logins_total", result="success",
                            reason="password_totp") for b in bases]
        # every login counted once, by the worker the kernel gave its connection to (one
        # process serving both ports would count each twice; an unserved worker, not at all)
        assert sum(per_worker) == logins, per_worker
        for b in bases:
            status, body, _ = get(b + "/readyz")
            assert status == 200, body
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
