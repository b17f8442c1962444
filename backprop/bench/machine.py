"""What the figures were measured on: platform, CPU, load, library versions, BLAS, GPU."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from ..threads import _limit as _limit_threads

__all__ = ["blas_info", "cpu_name", "cpu_pressure", "load_average", "machine_info", "nvidia_smi", "restore_threads",
           "set_threads", "tune_malloc"]

_DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "numba": ("numba",),
    "numba-cuda": ("numba-cuda", "numba_cuda"),
    "cupy": ("cupy", "cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x"),
    "torch": ("torch",),
    "tqdm": ("tqdm",),
    "matplotlib": ("matplotlib",),
    "threadpoolctl": ("threadpoolctl",),
}


def _version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (``None`` where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def cpu_pressure() -> dict[str, float] | None:
    """Linux pressure-stall information for the CPU (``some avg10/avg60/avg300``: the percentage of
    time runnable tasks waited for a CPU); high values mean other work competed with the benchmark."""
    try:
        with open("/proc/pressure/cpu") as fh:
            for line in fh:
                if line.startswith("some"):
                    return {k: float(v) for k, v in (f.split("=") for f in line.split()[1:]) if k != "total"}
    except (OSError, ValueError):
        pass
    return None


def blas_info() -> list[dict[str, Any]]:
    """The BLAS/OpenMP libraries NumPy runs on and their thread counts (via threadpoolctl if installed,
    else NumPy's build configuration)."""
    try:
        from threadpoolctl import threadpool_info

        keep = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture", "prefix")
        return [{k: d.get(k) for k in keep if k in d} for d in threadpool_info()]
    except ImportError:
        pass
    try:
        import numpy as np

        cfg = np.show_config(mode="dicts")  # numpy >= 1.26
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        return [{"user_api": "blas", "internal_api": blas.get("name"), "version": blas.get("version")}]
    except Exception:  # noqa: BLE001 - informational only
        return []


_RESTORE: list[Callable[[], None]] = []


def set_threads(n: int) -> list[str]:
    """Limit BLAS/OpenMP pools (threadpoolctl, when installed) and Numba (when installed) to ``n`` threads;
    returns what was limited. :func:`restore_threads` undoes it. One implementation with
    :func:`backprop.set_num_threads` (:mod:`backprop.threads`), which it calls with ``strict=False``."""
    done, restore = _limit_threads(n, strict=False)
    _RESTORE.append(restore)
    return done


def tune_malloc() -> str:
    """Keep freed memory in the process (glibc: raise the mmap and trim thresholds), so that the fresh
    arrays a pass allocates reuse warm pages instead of being returned to the OS and faulted in again
    on the next call. Returns what was done, ``""`` where nothing could be (not glibc)."""
    if not sys.platform.startswith("linux"):
        return ""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 512 << 20) == 1
    except (OSError, AttributeError):
        return ""
    return "glibc mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 512 MiB" if ok else ""


def restore_threads() -> None:
    """Undo :func:`set_threads` (``main()`` called in-process leaves no global limit behind)."""
    while _RESTORE:
        _RESTORE.pop()()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _gpus(backends: list[Any]) -> list[dict[str, Any]]:
    """What each GPU backend says of its device (``device_info``, where it answers such queries), and its
    TF32 mode."""
    gpus = []
    for b in backends:
        if not b.is_gpu:
            continue
        info: dict[str, Any] = {"backend": b.name}
        caps, k = b.capabilities, b.kernels
        try:
            if caps.tf32:
                info["tf32"] = bool(k.tf32_enabled())
            if caps.device_queries:
                info.update(k.device_info())
        except Exception as exc:  # noqa: BLE001 - informational only
            info["error"] = str(exc)
        gpus.append(info)
    return gpus


_SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.max.sm", "power.limit")


def nvidia_smi() -> list[dict[str, str]]:
    """What ``nvidia-smi`` says of each NVIDIA GPU (name, driver, memory, clock, power limit); empty
    where there is no ``nvidia-smi`` or it fails. Independent of any backend."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(_SMI_FIELDS)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [dict(zip(_SMI_FIELDS, (f.strip() for f in line.split(",")))) for line in out.stdout.splitlines()
            if line.strip()]


def machine_info(backends: list[Any] | None = None) -> dict[str, Any]:
    """Everything needed to read the figures later; cheap (no benchmark of its own)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    mem_total = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    from .. import __version__

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_bytes": mem_total,
        "load_average": load_average(),
        "cpu_pressure": cpu_pressure(),
        "backprop": __version__,
        "git_commit": _git_commit(),
        "versions": {k: _version(v) for k, v in _DISTRIBUTIONS.items()},
        "blas": blas_info(),
        "gpus": _gpus(backends or []),
        "nvidia_smi": nvidia_smi(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                            "NUMBA_NUM_THREADS", "BACKPROP_BACKEND", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
    }
