"""pyproject.toml and the lock files (requirements/runtime.txt, requirements/dev.txt) agree.

Every check runs on the real files, and again on a doctored copy that it must reject, so none of
them can pass vacuously.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = REPO / "pyproject.toml"
RUNTIME_LOCK = REPO / "requirements" / "runtime.txt"
DEV_LOCK = REPO / "requirements" / "dev.txt"
# uv's annotation for a requirement the project itself names
DIRECT = "bastion-broker (pyproject.toml)"
HASH = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass
class Pin:
    """One requirement line of a lock file with its hashes and its ``# via`` annotation."""

    req: Requirement
    hashes: list[str]
    via: list[str] = field(default_factory=list)

    @property
    def name(self) -> NormalizedName:
        return canonicalize_name(self.req.name)

    @property
    def version(self) -> Version | None:
        """The pinned version, or None unless the line is exactly one ``==`` clause."""
        specs = list(self.req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            return None
        try:
            return Version(specs[0].version)
        except InvalidVersion:
            return None


def parse_lock(text: str) -> list[Pin]:
    """The requirement lines of a ``uv pip compile`` output; any other kind of line is an error."""
    lines: list[str] = []
    continued = False
    for raw in text.splitlines():
        s = raw.strip()
        body = s.removesuffix("\\").strip()
        if continued:
            lines[-1] += " " + body
        else:
            lines.append(body)
        continued = s.endswith("\\")
    pins: list[Pin] = []
    via_list = False
    for line in lines:
        if not line:
            continue
        if line.startswith("#"):
            comment = line.lstrip("#").strip()
            if not pins:
                continue  # the header
            if comment == "via":
                via_list = True
            elif comment.startswith("via "):
                pins[-1].via.append(comment.removeprefix("via ").strip())
                via_list = False
            elif via_list:
                pins[-1].via.append(comment)
            continue
        via_list = False
        req_text, *hashes = line.split(" --hash=")
        if req_text.startswith("-"):
            raise ValueError(f"not a requirement line in a lock: {line!r}")
        pins.append(Pin(Requirement(req_text), [h.strip() for h in hashes]))
    return pins


@dataclass
class Inputs:
    runtime_reqs: list[Requirement]
    dev_reqs: list[Requirement]  # the runtime ones plus the dev extra
    build_reqs: list[Requirement]
    runtime: list[Pin]
    dev: list[Pin]

    @classmethod
    def parse(cls, pyproject: str, runtime_lock: str, dev_lock: str) -> Inputs:
        doc = tomllib.loads(pyproject)
        runtime = [Requirement(s) for s in doc["project"]["dependencies"]]
        extra = [Requirement(s) for s in doc["project"]["optional-dependencies"]["dev"]]
        build = [Requirement(s) for s in doc["build-system"]["requires"]]
        return cls(runtime, runtime + extra, build, parse_lock(runtime_lock), parse_lock(dev_lock))


def unhashed_or_inexact(i: Inputs) -> list[str]:
    problems = []
    for lock, pins in (("runtime", i.runtime), ("dev", i.dev)):
        if not pins:
            problems.append(f"{lock} lock pins nothing")
        for p in pins:
            if p.version is None:
                problems.append(f"{lock} lock: {p.req} is not one exact == pin")
            if not p.hashes:
                problems.append(f"{lock} lock: {p.req} carries no --hash")
            problems += [f"{lock} lock: {p.req}: bad hash {h!r}" for h in p.hashes
                         if not HASH.fullmatch(h)]
    return problems


def _outside(reqs: list[Requirement], pins: list[Pin], what: str) -> list[str]:
    problems = []
    for r in reqs:
        found = [p for p in pins if p.name == canonicalize_name(r.name)]
        if not found:
            problems.append(f"{r} ({what}) is not pinned")
        for p in found:
            if p.version is None or not r.specifier.contains(p.version, prereleases=True):
                problems.append(f"{r} ({what}) does not admit the pin {p.req}")
    return problems


def outside_bounds(i: Inputs) -> list[str]:
    return (_outside(i.runtime_reqs, i.runtime, "runtime lock")
            + _outside(i.dev_reqs, i.dev, "dev lock"))


def direct_mismatch(i: Inputs) -> list[str]:
    problems = []
    for lock, reqs, pins in (("runtime", i.runtime_reqs, i.runtime), ("dev", i.dev_reqs, i.dev)):
        want = {canonicalize_name(r.name) for r in reqs}
        have = {p.name for p in pins if DIRECT in p.via}
        problems += [f"{lock} lock: {n} is in pyproject.toml but not a direct dependency there"
                     for n in sorted(want - have)]
        problems += [f"{lock} lock: {n} is a direct dependency there but not in pyproject.toml"
                     for n in sorted(have - want)]
    return problems


def runtime_not_in_dev(i: Inputs) -> list[str]:
    dev = {(p.name, p.version): set(p.hashes) for p in i.dev}
    problems = []
    for p in i.runtime:
        if (p.name, p.version) not in dev:
            problems.append(f"runtime lock pins {p.req}; the dev lock does not")
        elif set(p.hashes) != dev[(p.name, p.version)]:
            problems.append(f"{p.req}: the two locks list different hashes")
    return problems


def asyncssh_not_exact(i: Inputs) -> list[str]:
    reqs = [r for r in i.runtime_reqs if canonicalize_name(r.name) == "asyncssh"]
    if len(reqs) != 1:
        return [f"pyproject.toml names asyncssh {len(reqs)} times among the runtime dependencies"]
    specs = list(reqs[0].specifier)
    if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
        return [f"{reqs[0]}: asyncssh must be pinned with == (its private internals are patched)"]
    return []


def build_backend_unlocked(i: Inputs) -> list[str]:
    """The build backend comes from the dev lock (scripts/bootstrap builds without isolation)."""
    return _outside(i.build_reqs, i.dev, "build-system, dev lock")


CHECKS: dict[str, Callable[[Inputs], list[str]]] = {
    "hashed-and-exact": unhashed_or_inexact,
    "within-bounds": outside_bounds,
    "direct-dependencies": direct_mismatch,
    "runtime-in-dev": runtime_not_in_dev,
    "asyncssh-exact": asyncssh_not_exact,
    "build-backend": build_backend_unlocked,
}


def real_texts() -> tuple[str, str, str]:
    return PYPROJECT.read_text(), RUNTIME_LOCK.read_text(), DEV_LOCK.read_text()


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_pyproject_and_locks_agree(check: str) -> None:
    problems = CHECKS[check](Inputs.parse(*real_texts()))
    assert not problems, "run scripts/lock (see docs/operations.md):\n" + "\n".join(problems)


def test_the_locks_are_the_closures_pyproject_names() -> None:
    i = Inputs.parse(*real_texts())
    names = {p.name for p in i.dev}
    assert {"asyncssh", "cryptography", "prometheus-client", "pytest", "uv", "setuptools"} <= names
    # production gets no dev tool
    assert not {"pytest", "mypy", "ruff", "moto", "uv", "setuptools"} & {p.name for p in i.runtime}


def sub(pattern: str, repl: str, text: str) -> str:
    out, n = re.subn(pattern, repl, text, count=1, flags=re.MULTILINE)
    assert n == 1, f"the doctored input did not change: {pattern!r}"
    return out


Doctor = Callable[[str, str, str], tuple[str, str, str]]

BROKEN: list[tuple[str, str, Doctor]] = [
    # a pin without hashes: the continuation lines of the dev lock's asyncssh are cut off
    ("hashed-and-exact", "carries no --hash",
     lambda py, rt, dev: (py, rt, sub(r"^(asyncssh==\S+) \\\n(\s+--hash=\S+ \\\n)*\s+--hash=\S+$",
                                      r"\1", dev))),
    ("hashed-and-exact", "not one exact == pin",
     lambda py, rt, dev: (py, sub(r"^pyotp==", "pyotp>=", rt), dev)),
    # a pin the bound in pyproject.toml does not admit (cryptography>=42)
    ("within-bounds", "does not admit the pin cryptography==41.0.0",
     lambda py, rt, dev: (py, rt, sub(r"^cryptography==[^ ;\\]+", "cryptography==41.0.0", dev))),
    # a dependency added to pyproject.toml without running scripts/lock
    ("within-bounds", "not-yet-locked>=1 (runtime lock) is not pinned",
     lambda py, rt, dev: (sub(r"^dependencies = \[$", 'dependencies = [\n    "not-yet-locked>=1",',
                              py), rt, dev)),
    ("direct-dependencies", "not-yet-locked is in pyproject.toml but not a direct dependency",
     lambda py, rt, dev: (sub(r"^dev = \[$", 'dev = [\n    "not-yet-locked>=1",', py), rt, dev)),
    # a dependency dropped from pyproject.toml that the lock still calls direct
    ("direct-dependencies", "qrcode is a direct dependency there but not in pyproject.toml",
     lambda py, rt, dev: (sub(r'^\s+"qrcode[^"]*",\n', "", py), rt, dev)),
    # the runtime lock drifting from the versions the suite ran with
    ("runtime-in-dev", "runtime lock pins structlog==0.1; the dev lock does not",
     lambda py, rt, dev: (py, sub(r"^structlog==[^ ;\\]+", "structlog==0.1", rt), dev)),
    ("runtime-in-dev", "the two locks list different hashes",
     lambda py, rt, dev: (py, sub(r"^(six==\S+ \\\n\s+--hash=sha256:)[0-9a-f]{64}",
                                  r"\g<1>" + "0" * 64, rt), dev)),
    ("asyncssh-exact", "must be pinned with ==",
     lambda py, rt, dev: (sub(r'"asyncssh==([^"]+)"', r'"asyncssh>=\1"', py), rt, dev)),
    # a build backend the dev lock does not carry
    ("build-backend", "setuptools>=77 (build-system, dev lock) does not admit the pin setuptools==65",
     lambda py, rt, dev: (py, rt, sub(r"^setuptools==[^ ;\\]+", "setuptools==65", dev))),
]


@pytest.mark.parametrize(("check", "expected", "doctor"), BROKEN,
                         ids=[f"{c}-{n}" for n, (c, _, _) in enumerate(BROKEN)])
def test_each_check_rejects_a_doctored_input(check: str, expected: str, doctor: Doctor) -> None:
    problems = CHECKS[check](Inputs.parse(*doctor(*real_texts())))
    assert any(expected in p for p in problems), problems


def test_every_check_has_a_doctored_input() -> None:
    assert {c for c, _, _ in BROKEN} == set(CHECKS)


def test_parse_lock_rejects_option_lines_and_reads_annotations() -> None:
    with pytest.raises(ValueError, match="not a requirement line"):
        parse_lock("-e .\n")
    [a, b] = parse_lock(
        "# header\nfoo==1.0 ; sys_platform == 'win32' \\\n    --hash=sha256:" + "a" * 64
        + "\n    # via bastion-broker (pyproject.toml)\nbar==2 \\\n    --hash=sha256:" + "b" * 64
        + " \\\n    --hash=sha256:" + "c" * 64 + "\n    # via\n    #   foo\n    #   "
        + DIRECT + "\n")
    assert (a.name, a.version, str(a.req.marker)) == ("foo", Version("1.0"), 'sys_platform == "win32"')
    assert a.via == [DIRECT]
    assert (b.name, b.version, len(b.hashes), b.via) == ("bar", Version("2"), 2, ["foo", DIRECT])
