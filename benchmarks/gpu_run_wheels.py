#!/usr/bin/env python
"""The wheels ``gpu_run.sh`` installs from a folder: nvmath-python, and only what the machine lacks.

    python benchmarks/gpu_run_wheels.py WHEEL_DIR TARGET

Every ``*.whl`` below WHEEL_DIR (searched recursively) is judged by its file name: it is installed only if
it is built for this Python and platform, is the newest of its distribution there, and its distribution is
not installed already, so that nothing brought along can shadow the machine's own packages (cuda-bindings,
cuda-core, cuda-pathfinder, ...). The chosen wheels go with ``pip --no-deps`` into TARGET, which the caller
appends to ``PYTHONPATH``. One line per wheel says what became of it, and a last line says whether
nvmath-python can be imported. Exit status: 0 if wheels were installed, 3 if none was usable, 1 if pip failed.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import subprocess
import sys
from pathlib import Path

NVMATH = "nvmath-python"
INSTALLED, NOTHING_USABLE, PIP_FAILED = 0, 3, 1
#: The machine's CUDA Python packages, named in the report with the path they load from.
MACHINE_PACKAGES = ("cuda-bindings", "cuda-core", "cuda-pathfinder")


def normalized(name: str) -> str:
    """A distribution name in the normalized form of PEP 503 (``Cuda_Core`` -> ``cuda-core``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_parts(path: Path) -> tuple[str, str, set[str]]:
    """(normalized distribution, version, tags ``python-abi-platform``) from a wheel's file name (PEP 427)."""
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"not a wheel file name: {path.name}")
    python, abi, platform = parts[-3:]
    tags = {f"{p}-{a}-{q}" for p in python.split(".") for a in abi.split(".") for q in platform.split(".")}
    return normalized(parts[0]), parts[1], tags


def version_key(version: str):
    """A sort key of a version: PEP 440 order where ``packaging`` is importable, else by numeric parts."""
    try:
        from packaging.version import Version

        return (0, Version(version), ())
    except Exception:  # noqa: BLE001 (no packaging, or a version it refuses)
        return (1, None, tuple(int(n) for n in re.findall(r"\d+", version)))


def supported_tags() -> set[str] | None:
    """The wheel tags this interpreter installs, or ``None`` where ``packaging`` is missing (no check then)."""
    try:
        from packaging.tags import sys_tags
    except ImportError:
        return None
    return {str(t) for t in sys_tags()}


def installed_version(distribution: str) -> str | None:
    """The version of ``distribution`` installed here (``PYTHONPATH`` included), or ``None``."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def choose_wheels(wheel_dir: Path) -> tuple[list[Path], list[str]]:
    """The wheels below ``wheel_dir`` to install, and one line per wheel saying what becomes of it."""
    tags = supported_tags()
    newest: dict[str, tuple[Path, str]] = {}
    lines = []
    for path in sorted(wheel_dir.rglob("*.whl")):
        try:
            name, version, wheel_tags = wheel_name_parts(path)
        except ValueError as exc:
            lines.append(f"skipped {path}: {exc}")
            continue
        if tags is not None and not wheel_tags & tags:
            lines.append(f"skipped {path}: not built for this Python and platform ({', '.join(sorted(wheel_tags))})")
            continue
        have = installed_version(name)
        if have is not None:
            lines.append(f"skipped {path}: the machine's own {name} {have} is used")
            continue
        if name in newest and version_key(newest[name][1]) >= version_key(version):
            lines.append(f"skipped {path}: a newer {name} is installed ({newest[name][1]})")
            continue
        if name in newest:
            lines.append(f"skipped {newest[name][0]}: a newer {name} is installed ({version})")
        newest[name] = (path, version)
    chosen = [path for path, _ in newest.values()]
    lines += [f"installing {path}" for path in chosen]
    return chosen, lines


def pip_install(wheels: list[Path], target: Path) -> subprocess.CompletedProcess:
    """``pip install --no-deps`` of ``wheels`` into ``target``, from the files alone (no index)."""
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--disable-pip-version-check", "--target", str(target),
                           *map(str, wheels)], capture_output=True, text=True)


def import_report(target: Path) -> str:
    """Where nvmath-python and the machine's CUDA Python packages load from once ``target`` is appended to
    ``PYTHONPATH``, asked of a fresh interpreter."""
    code = ("import importlib, importlib.metadata as md\n"
            f"for dist, module in [({NVMATH!r}, 'nvmath')] + [(d, d.replace('-', '.')) for d in {MACHINE_PACKAGES!r}]:\n"
            "    try:\n"
            "        m = importlib.import_module(module)\n"
            "        print(f'{dist} {md.version(dist)} from {m.__path__[0] if hasattr(m, \"__path__\") else m.__file__}')\n"
            "    except Exception as exc:\n"
            "        print(f'{dist} not importable: {type(exc).__name__}: {exc}')\n")
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=f"{path}{os.pathsep}{target}" if path else str(target))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    return (proc.stdout + proc.stderr[-2000:]).strip()


def main(argv: list[str] | None = None) -> int:
    wheel_dir, target = (Path(a) for a in (sys.argv[1:] if argv is None else argv))
    chosen, lines = choose_wheels(wheel_dir) if wheel_dir.is_dir() else ([], [f"no folder {wheel_dir}"])
    print("\n".join(lines))
    if not chosen:
        have = installed_version(NVMATH)
        print(f"{wheel_dir} holds no usable wheel: " + (f"the machine's own {NVMATH} {have} is used" if have else
              f"no {NVMATH} here, so the cupy backend runs without it (no graph=True, no cuBLASLt epilogues)"))
        return NOTHING_USABLE
    proc = pip_install(chosen, target)
    if proc.returncode != 0:
        print(f"pip failed ({proc.returncode}); nothing from {wheel_dir} is used:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return PIP_FAILED
    print(f"installed {len(chosen)} wheel(s) into {target} (appended to PYTHONPATH)")
    print(import_report(target))
    return INSTALLED


if __name__ == "__main__":
    sys.exit(main())
