"""nvcc for the tests, and the on-disk cache of what they build.

* :data:`NVCC`: the compiler, or ``None`` (the tests that need it skip).
* :func:`locked_build_dir`: a directory named by the digest of what is built in it, shared by the processes of a
  test run (pytest-xdist workers) and kept across runs; a lock makes the others wait for the first build.
* :func:`nvcc_ptx`: a source's PTX for ``compute_80``.
* :func:`kernel_resources`: what ``nvcc -cubin -Xptxas -v`` reports of each kernel (registers, spills, static
  shared memory) and its ``__launch_bounds__``, built once per source, architecture and nvcc release.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: each process builds its own
    fcntl = None

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
#: Where builds are kept, one directory per digest of the command and source.
BUILD_CACHE = Path(tempfile.gettempdir()) / f"backprop-emulators-{getattr(os, 'getuid', lambda: 0)()}"


@contextmanager
def locked_build_dir(stem: str, key: list[str]) -> Iterator[Path]:
    """The directory ``<stem>_<digest of key>`` under :data:`BUILD_CACHE`, held under an exclusive lock: build
    there what is missing, then read it. Without ``fcntl``, a fresh directory each time."""
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:20]
    out = BUILD_CACHE / f"{stem}_{digest}" if fcntl else Path(tempfile.mkdtemp(prefix=f"{stem}_"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "lock", "w") as lock:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield out


def nvcc_ptx(source: str, tmp: Path, stem: str) -> str:
    """``source``'s PTX for ``compute_80`` (flush to zero, as the float32 checks want it)."""
    cu, ptx = tmp / f"{stem}.cu", tmp / f"{stem}.ptx"
    cu.write_text(source)
    proc = subprocess.run([NVCC, "--ptx", "-arch=compute_80", "-ftz=true", "-o", str(ptx), str(cu)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed on {stem}:\n{proc.stderr[-4000:]}"
    return ptx.read_text()


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    """``release 13.0, V13.0.88``: the line of ``nvcc --version`` that names the release."""
    out = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    return next((line.split(",", 1)[1].strip() for line in out.splitlines() if "release" in line), out.strip())


def cubin_build(source: str, arch: str) -> tuple[str, str]:
    """``(ptxas's report, PTX)`` of ``source`` built for ``arch`` (``"sm_90"``) by ``nvcc -cubin -Xptxas -v``: the
    report is its standard error, the PTX the intermediate it kept. Built once per source, architecture and nvcc
    release (:func:`locked_build_dir`)."""
    command = [NVCC, "-cubin", f"-arch={arch}", "-Xptxas", "-v"]
    with locked_build_dir(f"ptxas_{arch}", command + [nvcc_version(), source]) as out:
        report, ptx = out / "ptxas.txt", out / "module.ptx"
        if not report.exists():
            work = out / "work"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            (work / "module.cu").write_text(source)
            proc = subprocess.run(command + ["--keep", "--keep-dir", str(work), "-o", str(work / "module.cubin"),
                                             str(work / "module.cu")], capture_output=True, text=True)
            assert proc.returncode == 0, f"nvcc -cubin -arch={arch} failed:\n{proc.stderr[-4000:]}"
            os.replace(work / "module.ptx", ptx)
            shutil.rmtree(work)
            (out / "ptxas.tmp").write_text(proc.stderr)
            os.replace(out / "ptxas.tmp", report)
        return report.read_text(), ptx.read_text()


@dataclass(frozen=True)
class KernelResources:
    """One kernel's resources for one architecture, as ptxas reports them."""

    registers: int  # a thread's
    spill_stores: int  # bytes, the kernel's and those of the device functions compiled with it
    spill_loads: int
    static_smem: int  # bytes a block
    max_threads: int | None  # its __launch_bounds__ (the PTX's .maxntid); None without


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(")
_MAXNTID = re.compile(r"\.maxntid\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?")


def ptxas_figures(report: str) -> dict[str, dict[str, int]]:
    """Registers, spill stores and loads, static shared memory of each kernel of a ptxas ``-v`` report. The spills
    of a device function that is not inlined (its own ``Function properties`` while a kernel is compiled) count
    for that kernel."""
    found: dict[str, dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        if m := _ENTRY.search(line):
            current = found.setdefault(m.group(1), {"registers": -1, "spill_stores": 0, "spill_loads": 0,
                                                    "static_smem": 0})
        elif current is None:
            continue
        elif m := _FRAME.search(line):
            current["spill_stores"] += int(m.group(2))
            current["spill_loads"] += int(m.group(3))
        elif m := _USED.search(line):
            current["registers"] = int(m.group(1))
            smem = _SMEM.search(line)
            current["static_smem"] = int(smem.group(1)) if smem else 0
    missing = [name for name, r in found.items() if r["registers"] < 0]
    assert not missing, f"ptxas reported no registers for {missing}"
    return found


def launch_bounds(ptx: str) -> dict[str, int]:
    """The most threads a block of each kernel may have, where its ``__launch_bounds__`` says (``.maxntid``, the
    directives between an entry's parameters and its body)."""
    bounds = {}
    for m in _PTX_ENTRY.finditer(ptx):
        head = ptx[m.end():ptx.find("{", m.end())]
        if b := _MAXNTID.search(head):
            bounds[m.group(1)] = int(b.group(1)) * int(b.group(2) or 1) * int(b.group(3) or 1)
    return bounds


def kernel_resources(source: str, arch: str) -> dict[str, KernelResources]:
    """Each kernel of ``source`` built for ``arch``, by name (:func:`cubin_build`)."""
    report, ptx = cubin_build(source, arch)
    bounds = launch_bounds(ptx)
    return {name: KernelResources(**figures, max_threads=bounds.get(name))
            for name, figures in ptxas_figures(report).items()}
