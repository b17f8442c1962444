"""Packaging metadata, the README's install notes and the install hints in the source agree.

Static checks on ``pyproject.toml``, ``LICENSE``, ``README.md`` and the package source: nothing is built
or installed, and the package is not imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="tomllib (Python 3.11+) or tomli is needed to read pyproject.toml")

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("backprop", "kernels")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


@pytest.fixture(scope="module")
def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def _requirement_name(req: str) -> str:
    """The distribution name of a requirement string such as ``numba-cuda[cu12]>=0.20``, normalized."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert name, f"unreadable requirement {req!r}"
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


def _readme_extras(readme: str) -> list[str]:
    """The extras named in the first column of the README's table of extras (header ``| extra | ...``)."""
    lines = readme.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"\|\s*extra\s*\|", line)), None)
    assert start is not None, "README.md has no table of extras (a row starting with '| extra |')"
    names: list[str] = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        first = line.strip("|").split("|")[0]
        if set(first.strip()) <= set("-: "):
            continue  # the separator row
        found = re.findall(r"`([^`]+)`", first)
        assert found, f"a row of the README's table of extras names no extra in backticks: {line!r}"
        names.extend(found)
    return names


def test_distribution_name(pyproject: dict) -> None:
    assert pyproject["project"]["name"] == "backprop-kernels"


def test_every_package_is_listed(pyproject: dict) -> None:
    """Each directory with an ``__init__.py`` under a mapped source directory (``kernels/cupy_gpu`` included) is
    named in ``[tool.setuptools] packages``, so the wheel carries it (links are not followed)."""
    import os

    setuptools = pyproject["tool"]["setuptools"]
    found = set()
    for name, where in setuptools["package-dir"].items():
        for dirpath, _, files in os.walk(ROOT / where):
            if "__init__.py" in files:
                parts = Path(dirpath).relative_to(ROOT / where).parts
                found.add(".".join((name, *parts)))
    assert found and found <= set(setuptools["packages"]), sorted(found - set(setuptools["packages"]))


def test_license_is_spdx_mit_with_file(pyproject: dict) -> None:
    project = pyproject["project"]
    assert project["license"] == "MIT", "license must be the SPDX expression string 'MIT' (PEP 639), not a table"
    assert project.get("license-files") == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 The backprop-kernels authors" in text
    assert "Permission is hereby granted, free of charge, to any person obtaining a copy" in text
    assert "The above copyright notice and this permission notice shall be included in all" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_no_license_classifier_with_spdx_license(pyproject: dict) -> None:
    """PEP 639: a ``License ::`` classifier must not accompany a license expression."""
    classifiers = pyproject["project"].get("classifiers", [])
    assert not [c for c in classifiers if c.startswith("License ::")]


def test_build_backend_understands_spdx_license(pyproject: dict) -> None:
    """``project.license`` as a string needs setuptools 77 or newer."""
    requires = pyproject["build-system"]["requires"]
    setuptools = [r for r in requires if _requirement_name(r) == "setuptools"]
    assert len(setuptools) == 1, requires
    low = re.search(r">=\s*(\d+)", setuptools[0])
    assert low and int(low.group(1)) >= 77, f"setuptools pin too low for PEP 639 license strings: {setuptools[0]}"


def test_authors_and_classifiers(pyproject: dict) -> None:
    project = pyproject["project"]
    assert project["authors"] == [{"name": "The backprop-kernels authors"}]
    classifiers = set(project["classifiers"])
    low = re.fullmatch(r">=\s*3\.(\d+)", project["requires-python"])
    assert low, project["requires-python"]
    versions = sorted(int(c.rsplit(".", 1)[1]) for c in classifiers
                      if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert versions and versions[0] == int(low.group(1)), (versions, project["requires-python"])
    assert versions == list(range(versions[0], versions[-1] + 1)), f"a gap in the Python classifiers: {versions}"
    assert "Development Status :: 3 - Alpha" in classifiers
    assert "Environment :: GPU :: NVIDIA CUDA" in classifiers
    assert [c for c in classifiers if c.startswith("Operating System ::")]


def test_readme_extras_table_matches_pyproject(pyproject: dict, readme: str) -> None:
    named = _readme_extras(readme)
    assert len(named) == len(set(named)), f"an extra is named twice in the README's table: {named}"
    declared = set(pyproject["project"]["optional-dependencies"])
    assert set(named) == declared, (
        f"README table only: {sorted(set(named) - declared)}; pyproject only: {sorted(declared - set(named))}")


def test_bench_extra_brings_numba(pyproject: dict) -> None:
    """The quick start's benchmark shows the numba backend next to numpy, with the numba extra's own pin."""
    extras = pyproject["project"]["optional-dependencies"]
    bench_numba = [r for r in extras["bench"] if _requirement_name(r) == "numba"]
    numba = [r for r in extras["numba"] if _requirement_name(r) == "numba"]
    assert bench_numba, extras["bench"]
    assert bench_numba == numba


def test_readme_quick_start_commands(readme: str) -> None:
    assert 'pip install -e ".[bench]" && backprop-bench --quick' in readme
    assert 'pip install -e ".[test]" && python -m pytest' in readme


def test_readme_has_no_relative_links(readme: str) -> None:
    """Relative links do not resolve on the package index's page: only absolute URLs and in-page anchors."""
    bad = re.findall(r"!?\[[^\]]*\]\((?!https?://|#)[^)]*\)", readme)
    bad += re.findall(r"(?m)^\s*\[[^\]]+\]:\s*(?!https?://|#)\S+", readme)  # reference-style definitions
    bad += re.findall(r"""(?:href|src)\s*=\s*["'](?!https?://|#)[^"']*["']""", readme)  # inline HTML
    assert not bad, bad


def _source_files() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert files
    return files


def test_install_hints_name_the_distribution() -> None:
    """Every ``pip install`` hint for this project names ``backprop-kernels[...]``, never a bare ``backprop``."""
    bare_extra = re.compile(r"(?<![\w.-])backprop\[")
    bare_name = re.compile(r"pip install\s+[\"']?backprop(?![\w-])")
    hints = 0
    problems: list[str] = []
    for path in [*_source_files(), ROOT / "README.md"]:
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{no}: {line.strip()}"
            if bare_extra.search(line) or bare_name.search(line):
                problems.append(where)
            if "pip install" in line and "backprop" in line and path.suffix == ".py":
                hints += 1
                if "backprop-kernels[" not in line:
                    problems.append(where)
    assert not problems, "\n".join(problems)
    assert hints, "no install hint found in the package source: has the search gone stale?"


def _package_imports(root: Path) -> dict[str, set[str]]:
    """For each module of the package at ``root`` (``network``, ``bench.cli``, ...), the package's modules it
    imports at run time (anywhere in the file, ``if TYPE_CHECKING:`` blocks left out)."""
    import ast

    names = {p.relative_to(root).with_suffix("").as_posix().replace("/", "."): p for p in root.rglob("*.py")}
    names = {n.removesuffix(".__init__").removesuffix("__init__"): p for n, p in names.items()}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()

        class Visitor(ast.NodeVisitor):
            def visit_If(self, node: ast.If) -> None:
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    self.generic_visit(node)

            def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
                if node.level:
                    parts = package.split(".") if package else []
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                    for alias in node.names:
                        whole = f"{base}.{alias.name}".strip(".")
                        found.add(whole if whole in names else base)

        Visitor().visit(ast.parse(path.read_text()))
        graph[name] = {m for m in found if m in names and m not in ("", name)}
    return graph


def test_no_import_cycles_in_the_api() -> None:
    """No module of backprop/ imports, directly or through others, a module that imports it back."""
    graph = _package_imports(Path(__file__).resolve().parents[1] / "backprop")

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            seen.add(nxt)
            if nxt == goal or reaches(nxt, goal, seen):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_api_reads_capabilities_instead_of_probing_kernels() -> None:
    """No ``getattr``/``hasattr`` on a kernels module in backprop/: what a backend can do beyond the required
    primitives is its declared ``CAPABILITIES`` record (the probe that a missing hook silently skips is gone)."""
    root = Path(__file__).resolve().parents[1] / "backprop"
    probes = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr") and node.args):
                target = ast.unparse(node.args[0])
                if target in ("k", "kernels", "module") or target.endswith(".kernels"):
                    probes.append(f"{path.relative_to(root.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not probes, "\n".join(probes)
