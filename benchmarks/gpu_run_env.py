#!/usr/bin/env python
"""What ``gpu_run.sh`` records of the machine: the Python packages' versions and the GPU as CuPy and numba-cuda
see it, as the lines ``versions: ...`` and ``device: ...`` (which summary.md repeats), then the details. Exit
status 1 where neither sees a device (the CUDA simulator counts as one).

    python benchmarks/gpu_run_env.py
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import sys

PACKAGES = ("numpy", "scipy", "numba", "numba-cuda", "nvmath-python", "cuda-bindings", "cuda-core",
            "cuda-pathfinder", "torch", "triton", "pytest", "pytest-xdist")


def installed_versions() -> tuple[list[str], list[str]]:
    """("name version" of each package installed, including any ``cupy*`` distribution; names of those missing)."""
    cupy = sorted({d.metadata["Name"] for d in metadata.distributions()
                   if (d.metadata["Name"] or "").lower().startswith("cupy")})
    found, missing = [], []
    for name in [PACKAGES[0], *cupy, *PACKAGES[1:]]:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    return found, missing


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cupy_device() -> str | None:
    """CuPy's device 0 (name, compute capability, SMs, memory, runtime and driver), or ``None`` with the reason
    printed."""
    try:
        import cupy

        rt = cupy.cuda.runtime
        p = rt.getDeviceProperties(0)
        return (f"{text(p['name'])}, sm_{p.get('major', '?')}{p.get('minor', '?')}, "
                f"{p.get('multiProcessorCount', '?')} SMs, {p['totalGlobalMem'] / 2**30:.0f} GiB "
                f"(CUDA runtime {rt.runtimeGetVersion()}, driver {rt.driverGetVersion()})")
    except Exception as exc:  # noqa: BLE001 (no CuPy, no GPU, no driver: all said the same way)
        print(f"cupy: no device: {type(exc).__name__}: {exc}")
        return None


def numba_cuda_device() -> str | None:
    """numba-cuda's current device, "the CUDA simulator", or ``None`` with the reason printed."""
    try:
        from numba import config, cuda

        if config.ENABLE_CUDASIM:
            return "the CUDA simulator"
        if not cuda.is_available():
            print("numba-cuda: no device")
            return None
        d = cuda.get_current_device()
        return f"{text(d.name)}, compute capability {d.compute_capability}"
    except Exception as exc:  # noqa: BLE001
        print(f"numba-cuda: no device: {type(exc).__name__}: {exc}")
        return None


def main() -> int:
    found, missing = installed_versions()
    print(f"versions: python {platform.python_version()}, {', '.join(found)}"
          + (f" (not installed: {', '.join(missing)})" if missing else ""))
    by_cupy, by_numba = cupy_device(), numba_cuda_device()
    print(f"device: {by_cupy or by_numba or 'none'}")
    print(f"cupy device: {by_cupy}\nnumba-cuda device: {by_numba}")
    print(f"python: {sys.executable}\nplatform: {platform.platform()}\nPYTHONPATH: {os.environ.get('PYTHONPATH', '')}")
    if not (by_cupy or by_numba):
        print("no GPU found: the GPU tests will skip, and the benchmark's GPU sections too")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
