"""A production install, as docs/operations.md tells it: a clean venv, the runtime lock alone
(``--require-hashes``) and the project wheel with ``--no-deps``. It holds no dev tool, and its own
``bastion-broker serve`` passes a real login from the OpenSSH client to a real sshd target."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO, Demo

pytestmark = pytest.mark.e2e

RUNTIME_LOCK = REPO / "requirements" / "runtime.txt"
DEV_TOOLS = ("pytest", "mypy", "ruff", "moto", "uv", "asciinema")
# what `python -m venv` itself puts in a venv (setuptools too, up to Python 3.11)
VENV_SEED = {"pip", "setuptools"}


def _env() -> dict[str, str]:
    """This environment without what would let the new venv see the dev venv or the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if Path(sys.executable).parent != Path(p))
    return env


def _run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    r = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def locked_here() -> dict[str, str]:
    """The runtime lock's pins that apply to this interpreter and platform: name -> version."""
    pins: dict[str, str] = {}
    for line in RUNTIME_LOCK.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            req = Requirement(line.removesuffix("\\").strip())
            if req.marker is None or req.marker.evaluate():
                pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return pins


@dataclass
class RuntimeVenv:
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def broker(self) -> Path:
        return self.path / "bin" / "bastion-broker"


@pytest.fixture(scope="session")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> RuntimeVenv:
    tmp = tmp_path_factory.mktemp("runtime-install")
    # the wheel, built from a copy of the sources (no build/ or egg-info in the checkout) by the
    # dev venv's locked setuptools, offline
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "broker", src / "broker",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(dist), str(src)], cwd=tmp)
    [wheel] = dist.glob("bastion_broker-*.whl")
    venv = RuntimeVenv(tmp / "venv")
    _run([sys.executable, "-m", "venv", str(venv.path)], cwd=tmp)
    _run([str(venv.python), "-m", "pip", "install", "-q", "--require-hashes", "--only-binary",
          ":all:", "-r", str(RUNTIME_LOCK)], cwd=tmp)
    _run([str(venv.python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp)
    return venv


PROBE = (
    "import importlib.metadata as m, importlib.util as u, json, sys, broker\n"
    "print(json.dumps({'dists': {d.metadata['Name']: d.version for d in m.distributions()},"
    f" 'tools': [t for t in {DEV_TOOLS!r} if u.find_spec(t)],"
    " 'broker': broker.__file__, 'prefix': sys.prefix}))\n"
)


def probe(python: Path) -> dict[str, Any]:
    """What PYTHON holds: distributions, importable dev tools, where ``broker`` comes from."""
    return dict(json.loads(_run([str(python), "-c", PROBE], cwd=python.parent)))


@pytest.mark.timeout(600)  # the install: about 20 s with pip's cache, longer with a cold one
def test_runtime_venv_holds_exactly_the_runtime_lock(runtime_venv: RuntimeVenv) -> None:
    assert probe(Path(sys.executable))["tools"] == list(DEV_TOOLS)  # the probe does find them
    got = probe(runtime_venv.python)
    assert got["tools"] == [], "dev tools in the production venv"
    assert Path(got["prefix"]) == runtime_venv.path
    assert Path(got["broker"]).is_relative_to(runtime_venv.path), "broker imported from elsewhere"
    dists: dict[str, str] = {canonicalize_name(n): v for n, v in got["dists"].items()}
    assert dists.pop("bastion-broker") == "0.1.0"
    for seed in VENV_SEED:
        dists.pop(seed, None)
    assert dists == locked_here()


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


def serve(binary: Path, cfg: Path, log: Path) -> Served:
    """``BINARY --config CFG serve``; its port is read from the log line ``broker.listening``."""
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(binary), "--config", str(cfg), "serve"], cwd=log.parent,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=f,
                                stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_bytes().splitlines():
            if b'"broker.listening"' in line:
                return Served(proc, int(json.loads(line)["port"]), log)
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{binary} serve did not start:\n{log.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def runtime_broker(demo: Demo, runtime_venv: RuntimeVenv, tmp_path: Path) -> Iterator[Served]:
    cfg = demo.variant_config(tmp_path)
    cfg.write_text(cfg.read_text() + "[web]\nenabled = false\n")
    served = serve(runtime_venv.broker, cfg, tmp_path / "broker.log")
    try:
        yield served
    finally:
        stop(served.proc)


@pytest.mark.timeout(600)
def test_runtime_install_serves_a_real_login(demo: Demo, runtime_venv: RuntimeVenv,
                                             runtime_broker: Served, tmp_path: Path) -> None:
    # the process serving is the production venv's interpreter running its entry point
    cmdline = Path(f"/proc/{runtime_broker.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[:2] == [bytes(runtime_venv.python), bytes(runtime_venv.broker)]
    user = demo.take_user()
    args = demo.ssh_args(f"{user}+web01", port=runtime_broker.port,
                         known_hosts=demo.known_hosts_for(tmp_path, runtime_broker.port))
    r = subprocess.run([*args, "echo via-runtime-install; exit 7"], capture_output=True,
                       timeout=60, env=demo.env(user), stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout) == (7, b"via-runtime-install\n"), r.stderr
    assert any(s["user"].startswith(user + "@") and s["target"] == "i-0web01"
               for s in demo.sessions())
    stop(runtime_broker.proc)
    assert runtime_broker.proc.returncode == 0
    assert "Traceback" not in runtime_broker.log.read_text(errors="replace")
