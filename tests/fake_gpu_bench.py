"""benchmarks/gpu_vs_torch.py on the CPU stand-in for CuPy: the benchmark of ``gpu_run.sh --dry-run``.

    python -m tests.fake_gpu_bench [the options of gpu_vs_torch.py]

The backend ``cupy`` runs against the fake CuPy and fake nvmath-python of ``tests/test_cupy_backend.py`` (the
CUDA C kernels in the host emulator), without PyTorch, and every device section measures tiny nets
(:func:`use_tiny_cases`), so that the sections run in seconds and write the files a GPU run writes. Needs a C++
compiler for the emulator; no GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest


def use_tiny_cases(setattr_: Callable) -> None:
    """Give every device section of ``backprop.bench.user_paths`` a tiny net (``setattr_``: a monkeypatch's
    ``setattr``, which puts the real cases back)."""
    from backprop.bench import user_paths as up

    tiny = up.Case("tiny", (6, 7, 3), 8, "tanh", "multiclass", (6, 7, 3), 8)
    bound = up.Case("gemm_bound", (8, 8, 8), 8, "relu", "regression", (8, 8, 8), 8, gemm_bound=True)
    narrow = up.Case("narrow", (6, 16, 16, 2), 8, "relu", "regression", (6, 16, 16, 2), 8)
    setattr_(up.cases, "FIT", up.FitCase((6, 8, 3), 16, 16, (6, 8, 3), 16, 16))
    setattr_(up.cases, "API_CASES", [tiny])
    setattr_(up.cases, "STEP_CASES", [tiny, bound])
    setattr_(up.cases, "GRAPH_CASE", tiny)
    setattr_(up.cases, "TF32_CASE", bound)
    setattr_(up.cases, "FUSED_CASE", up.Case("narrow", (6, 16, 2), 8, "relu", "regression", (6, 16, 2), 8))
    setattr_(up.cases, "EPILOGUE_CASES", [(narrow, 1.5), (bound, None)])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark's ``main`` with ``argv`` on the fake CuPy; its exit status, or 2 if no fake loads."""
    from backprop.bench import user_paths as up
    from tests import test_cupy_backend as fake_cupy

    patch = pytest.MonkeyPatch()
    try:
        try:
            fake_cupy._load_fake(patch, nvmath=True)
        except pytest.skip.Exception as exc:
            print(f"the fake CuPy cannot run here: {exc}", file=sys.stderr)
            return 2
        patch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
        use_tiny_cases(patch.setattr)
        try:
            return up.main(list(sys.argv[1:] if argv is None else argv))
        finally:
            fake_cupy._unload_fake()
    finally:
        patch.undo()


if __name__ == "__main__":
    sys.exit(main())
