"""The layers point one way and no module imports itself round a loop.

    base (domain, errors, ports)  <-  services  <-  adapters (ssh, web, store, ...)  <-  app/cli

Every import counts, including those inside functions and under ``TYPE_CHECKING``: a lazy
import hides a dependency from the interpreter, not from the reader.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

import broker

ROOT = Path(broker.__file__).parent

BASE = {"broker", "errors", "domain", "ports", "aws_names"}
SERVICES = {"services"}
ADAPTERS = {"audit", "config", "diag", "identity", "integrity", "inventory", "notify",
            "recordings", "sftp", "shipping", "ssh", "store", "web"}
APP = {"app", "cli", "demo", "demo_rdp", "workers", "runtime", "logs", "play", "__main__",
       "stores", "wiring", "reload"}
RANK = {**dict.fromkeys(BASE, 0), **dict.fromkeys(SERVICES, 1), **dict.fromkeys(ADAPTERS, 2),
        **dict.fromkeys(APP, 3)}

# adapter -> adapter imports that are part of the design, each with its reason (``config``, the
# typed settings of every adapter, may be read by all of them)
ADAPTER_EDGES = {
    ("ssh", "sftp"): "the SSH adapter serves the SFTP subsystem it records",
    ("audit", "integrity"): "the audit log signs its checkpoints with the bastion's key",
    ("integrity", "audit"): "verify reads the audit log's checkpoint format",
    ("integrity", "recordings"): "manifests describe recording files",
    ("shipping", "recordings"): "shipping uploads finished recordings",
}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = ["broker", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "broker":
                    yield _resolve(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "broker":
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield _resolve(full if full in MODULES else node.module)


GRAPH: dict[str, set[str]] = {m: {d for d in _imports(p) if d != m} for m, p in MODULES.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "broker"


def test_every_package_has_a_layer() -> None:
    unknown = sorted({_part(m) for m in MODULES} - set(RANK))
    assert not unknown, f"give these a layer in {__name__}: {unknown}"


def _violations() -> list[str]:
    found = []
    for mod, deps in GRAPH.items():
        src = _part(mod)
        for dep in deps:
            dst = _part(dep)
            if src == dst or dep == "broker":
                continue
            if RANK[dst] > RANK[src]:
                found.append(f"{mod} -> {dep} (a lower layer imports a higher one)")
            elif RANK[src] == RANK[dst] == 2 and "config" not in (src, dst) \
                    and (src, dst) not in ADAPTER_EDGES:
                found.append(f"{mod} -> {dep} (adapters talk through services and ports)")
            elif RANK[src] == RANK[dst] == 0 and src == "domain" and dst not in ("errors",):
                found.append(f"{mod} -> {dep} (the domain depends on nothing but errors)")
    return sorted(found)


def test_layers_point_one_way() -> None:
    assert _violations() == []


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert _cycles() == []


@pytest.mark.parametrize(("edges", "expected"), [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_cycle_finder_finds_cycles(monkeypatch: pytest.MonkeyPatch,
                                       edges: dict[str, set[str]],
                                       expected: list[list[str]]) -> None:
    monkeypatch.setattr(__import__(__name__, fromlist=["GRAPH"]), "GRAPH", edges)
    assert _cycles() == expected


def test_the_layer_check_finds_an_upward_import(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = defaultdict(set, {"broker.services.x": {"broker.ssh.y"}, "broker.ssh.y": set(),
                              "broker.store.z": {"broker.ssh.y"}})
    monkeypatch.setattr(__import__(__name__, fromlist=["GRAPH"]), "GRAPH", graph)
    assert _violations() == [
        "broker.services.x -> broker.ssh.y (a lower layer imports a higher one)",
        "broker.store.z -> broker.ssh.y (adapters talk through services and ports)",
    ]
