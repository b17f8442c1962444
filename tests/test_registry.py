"""The registry of activations and losses: each record's forms agree with each other, and one record is
all a new activation takes (the rest of the suite then covers it on every backend)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from backprop.kernels import numba_math as nm
from backprop.kernels import numpy_ref as ref
from backprop.kernels import registry as r

from .conftest import targets_for

ROOT = Path(__file__).resolve().parents[1]
ELEMENTWISE = [n for n, a in r.ACTIVATIONS.items() if not a.rowwise]
ALPHA = {"leaky_relu": 0.05, "elu": 0.7}
PLAIN = nm.build(lambda f: f)  # the Numba scalar forms and their dispatch, run as Python


def _alpha(name: str) -> float:
    return ALPHA.get(name, r.ACTIVATIONS[name].default_alpha)


def _points(rng: np.random.Generator) -> np.ndarray:
    """Pre-activations away from the kinks at 0, where a slope is one-sided."""
    u = rng.normal(size=40) * 2
    return u[np.abs(u) > 1e-3]


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_scalar_form_matches_numpy_form(name, rng):
    """The Numba scalar ``f`` and slope give the NumPy forms' values, element by element, in float64."""
    u = _points(rng)
    alpha = _alpha(name)
    y = ref.activate(u, name, alpha)
    c = PLAIN.consts(u)
    code = nm.ACT_CODES[name]
    np.testing.assert_allclose([PLAIN.activate(v, code, alpha, c) for v in u], y, rtol=1e-14, atol=1e-15)
    slope = ref.activation_slope(y, u, name, alpha)
    got = [PLAIN.slope(yi, ui, code, alpha, c) for yi, ui in zip(y, u)]
    np.testing.assert_allclose(got, slope, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name", [n for n in ELEMENTWISE if n != "step"])
def test_slope_is_the_derivative_of_f(name, rng):
    """``phi(f(u))`` (or ``f'(u)``) against central differences of the NumPy ``f``."""
    u = _points(rng)
    alpha, h = _alpha(name), 1e-6
    numeric = (ref.activate(u + h, name, alpha) - ref.activate(u - h, name, alpha)) / (2 * h)
    slope = ref.activation_slope(ref.activate(u, name, alpha), u, name, alpha)
    np.testing.assert_allclose(slope, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", [n for n, x in r.LOSSES.items() if not x.rowwise])
def test_loss_forms_agree_and_grad_is_the_derivative(name, rng):
    """Per element: the scalar loss equals the NumPy value's element, and the scalar and NumPy ``dL/dy`` agree
    with a central difference of the value (for the fused loss, ``dL/du = y - t`` with the sigmoid output)."""
    rec = r.LOSSES[name]
    u = rng.normal(size=(6, 3)) * 2
    out = rec.outputs[0]
    y = ref.activate(u, out, _alpha(out))
    t = targets_for(rng, name, *u.shape)
    k = 0.5 if rec.param_range else rec.default_param
    ops = ref._ops(y)
    per_element = rec.value(y, u, t, k, ops)
    assert per_element.shape == y.shape and per_element.dtype == y.dtype
    c = PLAIN.consts(y)
    code = nm.LOSS_CODES[name]
    scalar = [PLAIN.elementwise_loss(a, b, d, code, k, c) for a, b, d in zip(y.flat, u.flat, t.flat)]
    np.testing.assert_allclose(scalar, per_element.ravel(), rtol=1e-13, atol=1e-15)
    h = 1e-6
    if rec.fused:  # d/du of the summed loss is y - t, with y = f(u)
        def at(v):  # type: ignore[no-untyped-def]
            return float(rec.value(ref.activate(v, out, _alpha(out)), v, t, k, ops).sum())

        assert (at(u + h) - at(u - h)) / (2 * h) == pytest.approx(float((y - t).sum()), rel=1e-6)
        return
    r_ = y - t
    grad = rec.grad(r_.copy(), k, np.empty_like(r_), ops)
    np.testing.assert_allclose([PLAIN.loss_grad(v, code, k, c) for v in r_.flat], grad.ravel(), rtol=1e-14)
    bumped = y.copy()
    bumped.flat[0] += h
    dropped = y.copy()
    dropped.flat[0] -= h
    numeric = (float(rec.value(bumped, u, t, k, ops).sum()) - float(rec.value(dropped, u, t, k, ops).sum())) / (2 * h)
    assert numeric == pytest.approx(grad.flat[0], rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("name", list(r.LOSSES))
def test_loss_value_is_the_loss_of_each_element(name, rng):
    """Every loss's NumPy ``value`` (row-wise cross-entropy too) returns an array of ``y``'s shape and dtype, whose
    row sums are the per-sample losses: ``-sum_j t_j log y_j`` for cross-entropy, the scalar forms' sums for the
    others."""
    rec = r.LOSSES[name]
    u = rng.normal(size=(5, 4)) * 2
    out = rec.outputs[0] if rec.allowed_outputs else "identity"
    y = ref.activate(u, out, _alpha(out))
    t = targets_for(rng, name, *u.shape)
    k = 0.5 if rec.param_range else rec.default_param
    per_element = rec.value(y, u, t, k, ref._ops(y))
    assert per_element.shape == y.shape and per_element.dtype == y.dtype
    if rec.rowwise:
        want = -(t * np.log(y)).sum(axis=1)
    else:
        c, code = PLAIN.consts(y), nm.LOSS_CODES[name]
        want = [sum(PLAIN.elementwise_loss(a, b, d, code, k, c) for a, b, d in zip(*row)) for row in zip(y, u, t)]
    np.testing.assert_allclose(per_element.sum(axis=1), want, rtol=1e-12, atol=1e-14)


def test_every_record_has_each_backends_form():
    for name, a in r.ACTIVATIONS.items():
        forms = (a.phi, a.scalar_f, a.scalar_phi, a.cuda_f, a.cuda_phi)
        if a.rowwise:
            assert a.f is not None and not a.hidden, name
        else:
            assert all(f is not None for f in forms), f"{name} lacks a form"
    for name, x in r.LOSSES.items():
        if not x.rowwise:
            assert x.scalar_value is not None and x.cuda_body is not None, name
            assert x.fused or (x.grad is not None and x.scalar_grad is not None), name


def test_names_and_aliases_are_unique_and_resolve():
    for table, resolve in ((r.ACTIVATIONS, r.activation_name), (r.LOSSES, r.loss_name)):
        seen: set[str] = set()
        for name, rec in table.items():
            for alias in (name, *rec.aliases):
                assert alias not in seen
                seen.add(alias)
                assert resolve(alias.upper()) == name
    assert r.activation_name("no_such") is None and r.loss_name("no_such") is None


def test_unknown_code_reaches_the_default_of_a_generated_ladder():
    def case(x):  # type: ignore[no-untyped-def]
        return x + 1

    def default(x, code):  # type: ignore[no-untyped-def]
        return -1

    ladder = nm.dispatch(lambda f: f, "ladder", "x, code", {3: case, 5: None}, default)
    assert ladder(1, 3) == 2 and ladder(1, 5) is None and ladder(1, 4) == -1


def test_the_registry_closes_once_a_backend_builds_from_it():
    nm.ACT_CODES  # numba_math is imported: the codes are numbered
    with pytest.raises(RuntimeError, match="closed"):
        r.add_activation(r.ACTIVATIONS["tanh"])
    with pytest.raises(TypeError, match="Activation record"):
        r.add_activation("tanh")  # type: ignore[arg-type]


def test_the_registry_key_follows_the_scalar_forms():
    key = r.registry_key()
    assert key == r.registry_key() and re.fullmatch(r"[0-9a-f]{16}", key)
    r.SCALAR_FUNCTIONS.append(lambda v: v)
    try:
        assert r.registry_key() != key
    finally:
        r.SCALAR_FUNCTIONS.pop()


# --------------------------------------------------------------------------- one record
#: A new activation, softsign ``u / (1 + |u|)``, as one record: nothing else is added anywhere.
SOFTSIGN_RECORD = '''
from backprop.kernels.registry import ONE, Activation, add_activation, scalar


def _np_softsign(v, alpha, out, ops):
    ops.xm.abs(v, out=out)
    out += 1
    return ops.xm.divide(v, out, out=out)


def _np_softsign_phi(y, u, alpha, out, ops):
    ops.xm.abs(y, out=out)
    ops.xm.subtract(1, out, out=out)
    out *= out
    return out


@scalar
def softsign_f(v, alpha, c):
    return v / (c[ONE] + abs(v))


@scalar
def softsign_phi(y, u, alpha, c):
    s = c[ONE] - abs(y)
    return s * s


add_activation(Activation(
    "softsign", "u / (1 + |u|)", "phi(y) = (1 - |y|)^2", _np_softsign, _np_softsign_phi, softsign_f,
    softsign_phi, "(v / ((T)1 + fabs(v)))", "(((T)1 - fabs(y)) * ((T)1 - fabs(y)))",
))
'''

#: The shared suites that cover every activation of the registry on every backend.
SHARED_SUITES = ["tests/test_kernels.py", "tests/test_numba_backends.py", "tests/test_cupy_sources.py",
                 "tests/test_cupy_backend.py", "tests/test_registry.py"]


@pytest.mark.exhaustive
def test_one_record_adds_an_activation_on_every_backend(tmp_path):
    """Softsign, defined in one record and nothing else, passes the shared suites on every backend: the
    NumPy reference, Numba CPU, the numba-cuda kernels under the CUDA simulator, the CuPy sources in the
    host emulator and the CuPy backend over the fake CuPy."""
    (tmp_path / "softsign_record.py").write_text(textwrap.dedent(SOFTSIGN_RECORD))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"), "BACKPROP_QUIET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "softsign_record", "-p", "no:cacheprovider", "-k", "softsign",
         "-rfE", *SHARED_SUITES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = int(re.search(r"(\d+) passed", proc.stdout).group(1))  # type: ignore[union-attr]
    assert passed >= 40, tail  # forward, slope, output error: per backend and dtype
