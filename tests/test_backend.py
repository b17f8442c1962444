"""The backend switch: names, availability, the context manager and the environment variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import backprop as bp
from backprop import backend as backend_module
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


def test_environment_variable_with_unknown_name_fails_at_import_naming_it():
    env = dict(os.environ, BACKPROP_BACKEND="cuda")
    out = subprocess.run([sys.executable, "-c", "import backprop"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: unknown backend 'cuda' in environment variable BACKPROP_BACKEND; known: "
                           f"{', '.join(BACKEND_MODULES)} or 'auto'"), last


@pytest.fixture
def fresh_backend(monkeypatch):
    """No backend chosen yet, so the next get_backend() reads $BACKPROP_BACKEND; the choice is restored after."""
    monkeypatch.setattr(backend_module, "_current", None)
    return backend_module


@pytest.mark.parametrize("value", ["nonsense", "cuda", "numpy2", "auto,numpy"])
def test_bad_environment_variable_is_named_with_its_value_and_the_known_backends(monkeypatch, fresh_backend, value):
    monkeypatch.setenv("BACKPROP_BACKEND", value)
    with pytest.raises(ValueError) as info:
        bp.get_backend()
    message = str(info.value)
    assert "BACKPROP_BACKEND" in message and repr(value) in message
    assert all(name in message for name in BACKEND_MODULES) and "'auto'" in message
    assert fresh_backend._current is None  # nothing chosen: fixing the variable fixes the next call
    monkeypatch.setenv("BACKPROP_BACKEND", "numpy")
    assert bp.get_backend().name == "numpy"


def test_environment_variable_check_imports_no_backend(monkeypatch, fresh_backend):
    monkeypatch.setattr(backend_module, "load_backend_module", lambda name: pytest.fail(f"imported {name}"))
    monkeypatch.setenv("BACKPROP_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus' in environment variable BACKPROP_BACKEND"):
        backend_module._env_backend_name()
    for value, name in [(" NumPy ", "numpy"), ("", "auto"), ("numba-cuda", "numba-cuda")]:
        monkeypatch.setenv("BACKPROP_BACKEND", value)
        assert backend_module._env_backend_name() == name


@pytest.mark.parametrize("value", ["", "  ", "AUTO"])
def test_empty_or_auto_environment_variable_means_auto(monkeypatch, fresh_backend, value):
    monkeypatch.setenv("BACKPROP_BACKEND", value)
    assert bp.get_backend() is backend_module.resolve_backend("auto")


def test_unavailable_backend_in_environment_variable_is_named_at_first_use(monkeypatch, fresh_backend):
    if "cupy" in bp.available_backends():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("BACKPROP_BACKEND", "cupy")
    with pytest.raises(ValueError, match=r"environment variable BACKPROP_BACKEND='cupy': backend 'cupy' is not "
                                         r"available on this machine: .*; available here: .*numpy"):
        bp.get_backend()
    assert fresh_backend._current is None


def test_importing_backprop_loads_no_optional_dependency():
    code = ("import sys, backprop; bad = [m for m in ('sklearn', 'cupy', 'numba', 'torch', 'matplotlib', 'tqdm') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("missing", [("scipy", "sklearn"), ("sklearn",)])
def test_backprop_sklearn_without_scikit_learn_says_what_to_install(missing):
    """Without SciPy / scikit-learn (simulated: None in sys.modules makes their import fail), importing
    backprop.sklearn is an ImportError with the install hint, raised from the original error."""
    code = ("import sys\n"
            f"for name in {missing!r}: sys.modules[name] = None\n"
            "try:\n"
            "    import backprop.sklearn\n"
            "except ImportError as exc:\n"
            "    print(type(exc).__name__, type(exc.__cause__).__name__)\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kinds, message = out.stdout.splitlines()[:2]
    assert kinds == "ImportError ModuleNotFoundError"
    assert message.startswith("backprop.sklearn needs scikit-learn (and SciPy): "
                              "pip install 'backprop-kernels[sklearn]'")
    assert missing[0] in message  # and says what was missing
