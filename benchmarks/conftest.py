"""pytest-benchmark set-up for the kernel microbenchmarks: ``pytest benchmarks/ --benchmark-only``.

Collects ``bench_*.py`` besides the usual ``test_*.py`` (so ``pytest`` on ``tests/`` never picks these up)
and runs every benchmark on each backend that works here, CUDA simulator excepted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import backprop as bp
from backprop.backend import Backend, resolve_backend


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _backends() -> list[str]:
    names = []
    for name in bp.available_backends():
        if not resolve_backend(name).is_simulated:
            names.append(name)
    return names


@pytest.fixture(params=_backends())
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each available, non-simulated backend in turn."""
    return resolve_backend(request.param)
