"""``GET /api/ssh/known_hosts`` on a real aiohttp server, and ``bastion-broker known-hosts``
against it and against servers that answer wrongly: public, text/plain, the lines OpenSSH
reads, loaded once per TTL, and every failure a one-line error that writes nothing."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest
import pytest_asyncio
from aiohttp import DummyCookieJar, web
from aiohttp.test_utils import TestClient, TestServer

from broker.runtime import free_port
from broker.web import create_app
from broker.web.known_hosts import PATH, KnownHosts, SshTrust
from tests.conftest import BIN
from tests.web.conftest import FakeClock, build_context

pytestmark = pytest.mark.timeout(60)

HOST_KEY = asyncssh.generate_private_key("ssh-ed25519", comment="bastion-broker host key")
HOST_CA = asyncssh.generate_private_key("ssh-ed25519", comment="bastion-broker host CA")


def _pub(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


@dataclass
class Source:
    """What the broker's SSH side would publish, counting how often it is asked."""

    patterns: tuple[str, ...] = ("i-0web01", "web01")
    ssh_port: int = 2222
    loads: int = 0
    fail: bool = False
    now: list[float] = field(default_factory=lambda: [1000.0])

    async def load(self) -> SshTrust:
        self.loads += 1
        await asyncio.sleep(0.01)  # concurrent requests overlap the load
        if self.fail:
            raise OSError("inventory unreachable")
        return SshTrust(_pub(HOST_KEY), _pub(HOST_CA), self.patterns, self.ssh_port)

    def clock(self) -> float:
        return self.now[0]


@dataclass
class Served:
    client: TestClient
    source: Source

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")


async def _serve(tmp_path: Path, public_url: str | None = None) -> AsyncIterator[Served]:
    ctx, db, _ = build_context(tmp_path, FakeClock())
    source = Source()
    ctx.known_hosts = KnownHosts(source.load, public_url, ttl=60.0, clock=source.clock)
    client = TestClient(TestServer(create_app(ctx), host="127.0.0.1"),
                        cookie_jar=DummyCookieJar())
    await client.start_server()
    try:
        yield Served(client, source)
    finally:
        await client.close()
        db.close()


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async for s in _serve(tmp_path):
        yield s


async def _get(s: Served, query: str = "") -> tuple[int, str, str]:
    r = await s.client.get(PATH + query)
    text = await r.text()
    assert "Traceback" not in text
    return r.status, r.headers.get("Content-Type", ""), text


# -- the route ---------------------------------------------------------------------------------
async def test_public_text_lines_that_openssh_reads(served: Served) -> None:
    status, ctype, text = await _get(served)  # no cookie, no token
    assert status == 200 and ctype.startswith("text/plain")
    assert text.endswith("\n")
    bastion, ca = text.splitlines()
    assert bastion == f"[127.0.0.1]:2222 {_pub(HOST_KEY)}"
    assert ca == f"@cert-authority i-0web01,web01 {_pub(HOST_CA)}"
    # each key part is what asyncssh (and so OpenSSH's format) reads back as the same key
    for part, key in ((bastion.split()[1:3], HOST_KEY), (ca.split()[2:4], HOST_CA)):
        assert asyncssh.import_public_key(" ".join(part)).get_fingerprint() == \
            key.get_fingerprint()


@pytest.mark.parametrize(("query", "entry"), [
    ("?host=bastion.corp.example.com", "[bastion.corp.example.com]:2222"),
    ("?host=bastion.corp.example.com:22", "bastion.corp.example.com"),
    ("?host=10.0.0.5:2200", "[10.0.0.5]:2200"),
    ("?host=%5B2001:db8::5%5D", "[2001:db8::5]:2222"),
    ("?host=%5B2001:db8::5%5D:22", "2001:db8::5"),
])
async def test_the_bastion_as_the_engineer_names_it(served: Served, query: str,
                                                    entry: str) -> None:
    status, _, text = await _get(served, query)
    assert status == 200
    assert text.splitlines()[0] == f"{entry} {_pub(HOST_KEY)}"


@pytest.mark.parametrize(("host_header", "first"), [
    ("bastion.corp.example.com:8443", "[bastion.corp.example.com]:2222 "),  # not the API's port
    ("[2001:db8::5]:8443", "[2001:db8::5]:2222 "),
    ("a b", "@cert-authority "),  # not a plain host: no bastion line, the CA line still
    ("*.example.com", "@cert-authority "),
])
async def test_the_bastion_as_the_request_named_the_api(served: Served, host_header: str,
                                                        first: str) -> None:
    r = await served.client.get(PATH, headers={"Host": host_header})
    assert r.status == 200
    assert (await r.text()).startswith(first)


async def test_public_url_names_the_bastion(tmp_path: Path) -> None:
    async for s in _serve(tmp_path, public_url="https://bastion.corp.example.com/"):
        s.source.ssh_port = 22
        _, _, text = await _get(s)
        assert text.splitlines()[0] == f"bastion.corp.example.com {_pub(HOST_KEY)}"


@pytest.mark.parametrize("query", [
    "?host=a%20b", "?host=*", "?host=web01,web02", "?host=web01%0A", "?host=h:0",
    "?host=h:70000", "?host=%5Bzz%5D", "?host=" + "a" * 300, "?host=", "?hosts=web01",
    "?host=a&x=1",
])
async def test_bad_query_is_a_json_400(served: Served, query: str) -> None:
    r = await served.client.get(PATH + query)
    assert r.status == 400
    body = await r.json()
    assert body["error"] == "invalid" and body["detail"]["message"]


async def test_loaded_once_per_ttl_however_many_ask(served: Served) -> None:
    answers = await asyncio.gather(*(_get(served) for _ in range(50)))
    assert {a[0] for a in answers} == {200}
    assert served.source.loads == 1
    served.source.now[0] += 59
    await _get(served)
    assert served.source.loads == 1
    served.source.now[0] += 2
    served.source.patterns = ("db01", "i-0db01")  # the inventory changed (a reload, AWS)
    _, _, text = await _get(served)
    assert served.source.loads == 2
    assert text.splitlines()[1].startswith("@cert-authority db01,i-0db01 ")


async def test_a_failed_load_serves_the_last_answer_or_a_503(tmp_path: Path) -> None:
    async for s in _serve(tmp_path):
        s.source.fail = True
        r = await s.client.get(PATH)
        assert r.status == 503
        assert (await r.json())["error"] == "unavailable"
        s.source.now[0] += 61
        s.source.fail = False
        good = await _get(s)
        assert good[0] == 200
        s.source.now[0] += 61
        s.source.fail = True
        assert await _get(s) == good  # stale but right: the keys rarely change


async def test_no_linux_targets_no_wildcard_ca_line(served: Served) -> None:
    served.source.patterns = ()
    _, _, text = await _get(served)
    assert "@cert-authority" not in text and "*" not in text
    assert len(text.splitlines()) == 1


async def test_openapi_documents_it_as_public_text(served: Served) -> None:
    doc = await (await served.client.get("/api/openapi.json")).json()
    op = doc["paths"][PATH]["get"]
    assert op["security"] == []
    assert "text/plain" in op["responses"]["200"]["content"]
    assert [p["name"] for p in op["parameters"]] == ["host"]
    assert op["responses"]["200"]["content"]["text/plain"]["schema"]["$ref"].endswith(
        "/KnownHosts")


# -- the CLI -----------------------------------------------------------------------------------
async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN), "known-hosts", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_prints_and_writes_the_lines(served: Served, tmp_path: Path) -> None:
    _, _, text = await _get(served)
    code, out, err = await _cli("--api", served.url)
    assert (code, out, err) == (0, text, "")
    dest = tmp_path / "known_hosts_bastion"
    code, out, err = await _cli("--api", served.url + "/", "--output", str(dest),
                                "--bastion", "bastion.corp.example.com:22")
    assert (code, out, err) == (0, "", "")
    assert dest.read_text().splitlines()[0] == f"bastion.corp.example.com {_pub(HOST_KEY)}"
    assert oct(dest.stat().st_mode & 0o777) == "0o644"


@dataclass
class Wrong:
    """A server that answers the known_hosts path wrongly, one way per test."""

    body: bytes
    content_type: str = "text/plain"
    status: int = 200


@pytest_asyncio.fixture
async def wrong_server() -> AsyncIterator[Callable[[Wrong], str]]:
    answer: list[Wrong] = []

    async def handle(_: web.Request) -> web.Response:
        a = answer[0]
        return web.Response(body=a.body, status=a.status, content_type=a.content_type)

    app = web.Application()
    app.router.add_get(PATH, handle)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()

    def use(a: Wrong) -> str:
        answer[:] = [a]
        return str(client.make_url("")).rstrip("/")

    try:
        yield use
    finally:
        await client.close()


CA_LINE = f"@cert-authority web01 {_pub(HOST_CA)}\n"


def _files(d: Path) -> list[Path]:
    return list(d.iterdir())


@pytest.mark.parametrize(("answer", "message"), [
    (Wrong(b"<html>sign in</html>", "text/html"), "text/html, not text/plain"),
    (Wrong(b"Welcome to the proxy\n"), "line 1"),
    (Wrong(b"web01 ssh-ed25519 AAAAnotakey\n"), "line 1: not a valid ssh-ed25519 key"),
    (Wrong(f"[127.0.0.1]:22 {_pub(HOST_KEY)}\n".encode()), "no @cert-authority line"),
    (Wrong(f"@cert-authority * {_pub(HOST_CA)}\n".encode()), "for every host"),
    (Wrong(f"@trust-me web01 {_pub(HOST_CA)}\n".encode()), "unknown marker"),
    (Wrong((CA_LINE + "x\x1b[2J ssh-ed25519 AAAA\n").encode()), "line 2 has control"),
    (Wrong(CA_LINE.encode() * 1000), "over 65536 bytes"),
    (Wrong(CA_LINE.encode("utf-16")), "not UTF-8"),
    (Wrong(b'{"error": "not found", "detail": null}', "application/json", 404),
     "404 not found: no /api/ssh/known_hosts there"),
])
async def test_cli_refuses_a_bad_answer_in_one_line(
        wrong_server: Callable[[Wrong], str], tmp_path: Path, answer: Wrong,
        message: str) -> None:
    dest = tmp_path / "known_hosts"
    code, out, err = await _cli("--api", wrong_server(answer), "--output", str(dest))
    assert code == 2 and out == ""
    assert err.startswith("bastion-broker: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "\x1b" not in err
    assert not _files(tmp_path)  # nothing written, no temporary file left


async def test_cli_unreachable_and_bad_urls() -> None:
    port = free_port()  # nothing listens there
    code, _, err = await _cli("--api", f"http://127.0.0.1:{port}")
    assert code == 2 and err.count("\n") == 1
    assert f"cannot reach http://127.0.0.1:{port}: " in err and "refused" in err
    code, _, err = await _cli("--api", "ftp://example.com")
    assert code == 2 and "must be an http:// or https:// URL" in err
    code, _, err = await _cli()
    assert code == 2 and "give the API URL" in err


@pytest_asyncio.fixture
async def self_signed(tmp_path: Path) -> AsyncIterator[str]:
    """An HTTPS server whose certificate nobody trusts."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    proc = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1", stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def handle(_: web.Request) -> web.Response:
        return web.Response(text=CA_LINE)

    app = web.Application()
    app.router.add_get(PATH, handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls)
    await site.start()
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_cli_tls_failure(self_signed: str, tmp_path: Path) -> None:
    dest = tmp_path / "kh"
    code, out, err = await _cli("--api", self_signed, "-o", str(dest))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"TLS failure talking to {self_signed}: certificate verify failed" in err
    assert not dest.exists()
