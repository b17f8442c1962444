"""Shared fixtures: the backend suite runs every test on every backend that works here.

GPU backends skip cleanly without a GPU; ``numba-cuda`` also runs under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``), where the tests pick tiny shapes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Without a GPU, run the numba-cuda kernels under the CUDA simulator (set before numba.cuda is imported).
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

# One BLAS/OpenMP thread per pytest-xdist worker (``-n auto`` starts one worker per core): workers that each
# start a thread per core would fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # the test extra brings it; without it the workers keep the libraries' defaults
        pass

import numpy as np  # noqa: E402
import pytest

from backprop.backend import Backend, resolve_backend  # noqa: E402
from backprop.kernels import BACKEND_MODULES  # noqa: E402

GPU_ONLY = {"cupy"}
CUDA_KERNELS = {"numba-cuda"}  # runs without a GPU too, under the CUDA simulator


def backend_marks(name: str) -> list:
    """The marks of backend ``name``'s tests: ``gpu`` (needs a GPU), ``cuda`` (CUDA kernels, simulated without
    one), so that ``-m "gpu or cuda"`` picks every test of a GPU backend on a GPU machine."""
    return [pytest.mark.gpu] if name in GPU_ONLY else [pytest.mark.cuda] if name in CUDA_KERNELS else []


def _params() -> list:
    return [pytest.param(n, marks=backend_marks(n), id=n) for n in BACKEND_MODULES]


@pytest.fixture(params=_params())
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each backend in turn; skipped where it does not work on this machine."""
    try:
        return resolve_backend(request.param)
    except ValueError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def small(backend: Backend) -> bool:
    """True where shapes must stay tiny (the CUDA simulator runs one Python thread per GPU thread)."""
    return backend.is_simulated


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def targets_for(rng: np.random.Generator, loss: str, batch: int, n: int, labels: bool = False) -> np.ndarray:
    """Random targets that loss ``loss`` accepts, by its record's ``targets`` (see the registry): one-hot rows (or
    class labels with ``labels``), values in [0, 1], non-negative counts, or any real values."""
    from backprop.kernels.registry import LOSSES

    kind = LOSSES[loss].targets
    if kind == "distribution":
        classes = rng.integers(0, n, batch)
        return classes if labels else np.eye(n)[classes]
    if kind == "unit":
        return rng.uniform(size=(batch, n))
    if kind == "nonnegative":
        return rng.poisson(2.0, size=(batch, n)).astype(np.float64)
    return rng.normal(size=(batch, n))


def tolerance(dtype: np.dtype) -> dict[str, float]:
    """Agreement expected with the float64 reference."""
    return {"rtol": 2e-4, "atol": 2e-5} if np.dtype(dtype) == np.float32 else {"rtol": 1e-10, "atol": 1e-12}


def snapshot(root: Path) -> list[tuple[str, bytes | None]]:
    """Every path below ``root`` with its bytes (``None`` for a directory): compare two to see that
    nothing was created or changed."""
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


@contextmanager
def switching_often() -> Iterator[None]:
    """Make the interpreter switch threads every microsecond, so that calls from several threads overlap
    wherever they can (a race shows up at once instead of now and then)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def must_not_run(name: str):
    """A stand-in for function ``name`` that fails the test if it is ever called."""
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran although it should not have")

    return fail
