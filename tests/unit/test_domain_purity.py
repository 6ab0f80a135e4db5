"""broker/domain/ is pure: no module imports anything that does I/O, none calls open()."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import broker.domain

DOMAIN_DIR = Path(broker.domain.__file__).parent
MODULES = sorted(DOMAIN_DIR.glob("*.py"))
FORBIDDEN = frozenset(
    {
        "asyncio",
        "socket",
        "sqlite3",
        "os",
        "subprocess",
        "asyncssh",
        "aiohttp",
        "boto3",
        "botocore",
        "pathlib",
        "shutil",
        "tempfile",
        "io",
        "urllib",
        "http",
        "requests",
        "fcntl",
        "select",
        "selectors",
        "ssl",
        "threading",
        "multiprocessing",
        "time",
        "logging",
        "structlog",
        "builtins",
    }
)
FORBIDDEN_CALLS = frozenset({"open", "exec", "eval", "__import__", "print", "input"})


def imported_roots(tree: ast.AST) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_domain_modules_found() -> None:
    names = {m.stem for m in MODULES}
    assert {"models", "selector", "grants", "totp", "recording", "audit"} <= names


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_no_io_imports(module: Path) -> None:
    tree = ast.parse(module.read_text(encoding="utf-8"), filename=str(module))
    roots = imported_roots(tree)
    assert roots & FORBIDDEN == set(), f"{module.name} imports {sorted(roots & FORBIDDEN)}"
    # imports inside the package stay inside the domain
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("broker"):
            assert node.module.startswith("broker.domain"), f"{module.name}: {node.module}"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_no_open_or_dynamic_calls(module: Path) -> None:
    tree = ast.parse(module.read_text(encoding="utf-8"), filename=str(module))
    bad = [
        (node.lineno, node.func.id)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in FORBIDDEN_CALLS
    ]
    assert bad == [], f"{module.name} calls {bad}"


def test_checker_catches_violations() -> None:
    tree = ast.parse("import os.path\nfrom asyncio import sleep\nimport json\nopen('x')\n")
    assert imported_roots(tree) == {"os", "asyncio", "json"}
