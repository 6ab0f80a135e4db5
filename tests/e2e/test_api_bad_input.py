"""The web API answers bad input with its JSON errors: a 4xx status, ``{"error", "detail"}``, and
one log line without a traceback, whether the request is malformed HTTP (refused by aiohttp's
parser before any handler), malformed JSON, or a method the path does not have; and schemathesis,
fuzzing the whole OpenAPI document, finds no 5xx."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Demo

pytestmark = pytest.mark.e2e


def _raw(demo: Demo, request: bytes) -> tuple[int, dict[str, str], bytes]:
    url = urllib.parse.urlsplit(demo.info["web_url"])
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, body


def _json_error(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert headers.get("content-type", "").startswith("application/json"), headers
    data = json.loads(body)
    assert set(data) == {"error", "detail"}, data
    return dict(data)


@pytest.mark.parametrize("request_bytes", [
    b"GET /api/me HTTP/1.1\r\nHost: x\r\nX-Probe: a\x00b\r\n\r\n",  # NUL in a header value
    b"GET /api/me HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",  # header line
    b"GET /api/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # request line
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # TLS to HTTP
    b"GET /api/me HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",  # bad framing
])
def test_malformed_http_gets_a_json_400_and_no_traceback(demo: Demo, request_bytes: bytes) -> None:
    before = len(demo.broker_log())
    status, headers, body = _raw(demo, request_bytes)
    assert status == 400
    err = _json_error(headers, body)
    assert err["error"] == "bad request" and err["detail"]["message"]
    log = demo.broker_log()[before:]
    assert "Traceback" not in log and "Error handling request" not in log
    assert '"web.bad_request"' in log


def _call(demo: Demo, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(demo.info["web_url"] + path, data=body, method=method,  # noqa: S310
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback test URL
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


@pytest.mark.parametrize("depth", [100, 5000, 30000])
def test_deeply_nested_json_is_a_400(demo: Demo, depth: int) -> None:
    body = b"[" * depth + b"]" * depth
    for doc in (body, b'{"user": ' + body + b"}"):
        status, headers, raw = _call(demo, "POST", "/api/login", doc)
        assert status == 400, raw
        assert _json_error(headers, raw)["error"] == "invalid"


def test_a_method_the_path_lacks_is_a_405_with_allow(demo: Demo) -> None:
    for method, path in (("PUT", "/api/grants"), ("DELETE", "/api/login"),
                         ("TRACE", "/api/tokens")):
        status, headers, raw = _call(demo, method, path, b"{}")
        assert status == 405, (method, path, raw)
        assert headers.get("allow"), headers
        assert method not in headers["allow"]
        assert _json_error(headers, raw)["error"] == "method not allowed"


def _token(demo: Demo) -> str:
    import http.cookiejar

    user = demo.take_user()
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    login = json.dumps({"user": user, "password": demo.info["password"],
                        "code": demo.next_code(user)}).encode()
    r = opener.open(urllib.request.Request(demo.info["web_url"] + "/api/login", data=login,  # noqa: S310
                                           headers={"Content-Type": "application/json"}))
    csrf = json.loads(r.read())["csrf"]
    r = opener.open(urllib.request.Request(  # noqa: S310
        demo.info["web_url"] + "/api/tokens", headers={
            "Content-Type": "application/json", "X-CSRF-Token": csrf},
        data=json.dumps({"name": "fuzz", "scopes": ["grants:read", "grants:write",
                                                       "sessions:read"]}).encode()))
    return str(json.loads(r.read())["token"])


@pytest.mark.fuzz
def test_schemathesis_finds_no_server_error(demo: Demo, tmp_path: Path) -> None:
    """Every operation of the OpenAPI document, with generated valid and invalid input, never
    answers 5xx (and, through the demo fixture's teardown, never logs a traceback)."""
    before = len(demo.broker_log())
    cli = Path(sys.executable).parent / "schemathesis"
    r = subprocess.run(
        [str(cli), "run", demo.info["web_url"] + "/api/openapi.json",
         "-H", f"Authorization: Bearer {_token(demo)}", "--checks", "not_a_server_error",
         "--max-examples", "40", "--seed", "20261207", "--no-color",
         "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "passed" in r.stdout
    log = demo.broker_log()[before:]
    assert "Traceback" not in log and '"web.internal_error"' not in log
