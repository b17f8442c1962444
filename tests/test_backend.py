"""The backend switch: names, availability, the context manager and the environment variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import backprop as bp
from backprop.kernels import BACKEND_MODULES


def test_numpy_is_always_available():
    assert "numpy" in bp.available_backends()
    assert set(bp.available_backends()) <= set(BACKEND_MODULES)


def test_set_and_get_backend():
    previous = bp.get_backend()
    try:
        b = bp.set_backend("numpy")
        assert bp.get_backend() is b
        assert b.name == "numpy"
        import numpy as np

        assert b.xp is np
    finally:
        bp.set_backend(previous.name)


def test_use_backend_restores_previous_even_after_an_exception():
    before = bp.get_backend()
    with pytest.raises(RuntimeError):
        with bp.use_backend("numpy") as b:
            assert bp.get_backend() is b
            raise RuntimeError("boom")
    assert bp.get_backend() is before


@pytest.mark.parametrize("name", ["tensorflow", "", "NUMPY2"])
def test_unknown_backend_lists_what_is_available(name):
    with pytest.raises(ValueError, match="available here: .*numpy"):
        bp.set_backend(name)


def test_backend_name_must_be_a_string():
    with pytest.raises(TypeError):
        bp.set_backend(3)  # type: ignore[arg-type]


def test_gpu_backend_without_gpu_says_so():
    if "cupy" in bp.available_backends():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="'cupy' is not available"):
        bp.set_backend("cupy")


def test_auto_never_picks_a_simulated_backend():
    assert not bp.set_backend("auto").is_simulated


def _run(env_value: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BACKPROP_BACKEND=env_value)
    return subprocess.run([sys.executable, "-c", "import backprop as bp; print(bp.get_backend().name)"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_sets_initial_backend():
    out = _run("numpy")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "numpy"


def test_environment_variable_with_unknown_name_fails_clearly():
    out = _run("nonsense")
    assert out.returncode != 0
    assert "unknown backend 'nonsense'" in out.stderr


def test_importing_backprop_loads_no_optional_dependency():
    code = ("import sys, backprop; bad = [m for m in ('sklearn', 'cupy', 'numba', 'torch', 'matplotlib', 'tqdm') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
