"""Every primitive of every backend against the NumPy float64 reference, on fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from backprop.kernels import ACTIVATIONS, FUSED_PAIRS, LOSSES, PRIMITIVES
from backprop.kernels import numpy_ref as ref

from .conftest import tolerance

DTYPES = [np.float32, np.float64]
HIDDEN = [n for n, s in ACTIVATIONS.items() if s.hidden]
ALPHA = {"leaky_relu": 0.05, "elu": 0.7}
PAIRS = [(o, loss) for loss, s in LOSSES.items() for o in s.outputs] + [("softmax", "cross_entropy")]
PAIRS = sorted(set(PAIRS))


def shapes(small: bool) -> tuple[int, int, int]:
    return (5, 4, 3) if small else (67, 33, 29)


def host(backend, a):
    return np.asarray(backend.kernels.to_host(a), dtype=np.float64)


def test_backend_defines_every_primitive(backend):
    missing = [p for p in PRIMITIVES if not callable(getattr(backend.kernels, p, None))]
    assert not missing, f"{backend.name} lacks {missing}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", HIDDEN + ["softmax"])
def test_layer_forward(backend, small, rng, act, dtype):
    batch, n_in, n_out = shapes(small)
    x, W, b = rng.normal(size=(batch, n_in)), rng.normal(size=(n_out, n_in)) / 2, rng.normal(size=n_out)
    k = backend.kernels
    alpha = ALPHA.get(act, ACTIVATIONS[act].default_alpha)
    y, u = k.layer_forward(k.to_device(x, dtype), k.to_device(W, dtype), k.to_device(b, dtype), act, alpha, True)
    y_ref, u_ref = ref.layer_forward(x, W, b, act, alpha, True)
    np.testing.assert_allclose(host(backend, u), u_ref, **tolerance(dtype))
    np.testing.assert_allclose(host(backend, y), y_ref, **tolerance(dtype))
    assert k.to_host(y).dtype == dtype
    y2, u2 = k.layer_forward(k.to_device(x, dtype), k.to_device(W, dtype), k.to_device(b, dtype), act, alpha, False)
    assert u2 is None
    np.testing.assert_allclose(host(backend, y2), y_ref, **tolerance(dtype))


@pytest.mark.parametrize("act", HIDDEN)
def test_reference_slope_matches_finite_differences(rng, act):
    """phi(y) = f'(f^{-1}(y)) equals the numerical derivative of f (away from kinks)."""
    u = rng.normal(size=200) * 3
    u = u[np.abs(u) > 1e-3]
    alpha = ALPHA.get(act, ACTIVATIONS[act].default_alpha)
    h = 1e-6
    numeric = (ref.activate(u + h, act, alpha) - ref.activate(u - h, act, alpha)) / (2 * h)
    slope = ref.activation_slope(ref.activate(u, act, alpha), u, act, alpha)
    np.testing.assert_allclose(slope, numeric, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", HIDDEN)
def test_delta_backward(backend, small, rng, act, dtype):
    batch, n_prev, n = shapes(small)
    alpha = ALPHA.get(act, ACTIVATIONS[act].default_alpha)
    delta, W = rng.normal(size=(batch, n)), rng.normal(size=(n, n_prev))
    u_prev = rng.normal(size=(batch, n_prev)) * 2
    y_prev = ref.activate(u_prev, act, alpha)
    k = backend.kernels
    got = k.delta_backward(k.to_device(delta, dtype), k.to_device(W, dtype), k.to_device(y_prev, dtype),
                           k.to_device(u_prev, dtype), act, alpha)
    np.testing.assert_allclose(host(backend, got), ref.delta_backward(delta, W, y_prev, u_prev, act, alpha),
                               **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_gradients_into_buffers(backend, small, rng, dtype):
    batch, n_in, n_out = shapes(small)
    delta, x = rng.normal(size=(batch, n_out)), rng.normal(size=(batch, n_in))
    k = backend.kernels
    dW = k.to_device(np.full((n_out, n_in), np.nan), dtype)  # poisoned: every element must be written
    db = k.to_device(np.full(n_out, np.nan), dtype)
    dW2, db2 = k.weight_gradients(k.to_device(delta, dtype), k.to_device(x, dtype), dW, db)
    rW, rb = ref.weight_gradients(delta, x)
    np.testing.assert_allclose(host(backend, dW2), rW, **tolerance(dtype))
    np.testing.assert_allclose(host(backend, db2), rb, **tolerance(dtype))
    np.testing.assert_allclose(host(backend, dW), rW, **tolerance(dtype))
    fW, fb = k.weight_gradients(k.to_device(delta, dtype), k.to_device(x, dtype))
    np.testing.assert_allclose(host(backend, fW), rW, **tolerance(dtype))
    np.testing.assert_allclose(host(backend, fb), rb, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_update_from_delta(backend, small, rng, dtype, weight_decay):
    batch, n_in, n_out = shapes(small)
    delta, x = rng.normal(size=(batch, n_out)), rng.normal(size=(batch, n_in))
    W, b = rng.normal(size=(n_out, n_in)), rng.normal(size=n_out)
    k = backend.kernels
    Wd, bd = k.to_device(W, dtype), k.to_device(b, dtype)
    k.sgd_update_from_delta(Wd, bd, k.to_device(delta, dtype), k.to_device(x, dtype), 0.05, weight_decay)
    ref.sgd_update_from_delta(W, b, delta, x, 0.05, weight_decay)
    np.testing.assert_allclose(host(backend, Wd), W, **tolerance(dtype))
    np.testing.assert_allclose(host(backend, bd), b, **tolerance(dtype))


def _targets(rng, loss, batch, n):
    if loss == "cross_entropy":
        return np.eye(n)[rng.integers(0, n, batch)]
    if loss == "bce":
        return rng.uniform(size=(batch, n))
    return rng.normal(size=(batch, n))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output,loss", PAIRS)
def test_output_error(backend, small, rng, output, loss, dtype):
    batch, _, n = shapes(small)
    alpha = ALPHA.get(output, ACTIVATIONS[output].default_alpha)
    u = rng.normal(size=(batch, n)) * 2
    y = ref.activate(u, output, alpha)
    t = _targets(rng, loss, batch, n)
    param = 0.5 if loss == "huber" else LOSSES[loss].default_param
    k = backend.kernels
    value, delta = k.output_error(k.to_device(y, dtype), k.to_device(u, dtype), k.to_device(t, dtype),
                                  output, loss, param, alpha)
    rv, rd = ref.output_error(y, u, t, output, loss, param, alpha)
    np.testing.assert_allclose(float(host(backend, value)), float(rv), **tolerance(dtype))
    np.testing.assert_allclose(host(backend, delta), rd, **tolerance(dtype))


@pytest.mark.parametrize("output,loss", sorted(FUSED_PAIRS))
def test_fused_losses_are_finite_for_huge_logits(backend, output, loss):
    k = backend.kernels
    u = np.array([[1e4, -1e4], [-1e4, 1e4], [0.0, 1e4]])
    y = ref.activate(u, output)
    t = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    value, delta = k.output_error(k.to_device(y, np.float32), k.to_device(u, np.float32),
                                  k.to_device(t, np.float32), output, loss, 0.0, 0.0)
    assert np.isfinite(float(host(backend, value)))
    assert np.isfinite(host(backend, delta)).all()
    rv, _ = ref.output_error(y, u, t, output, loss)
    np.testing.assert_allclose(float(host(backend, value)), float(rv), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_update(backend, small, rng, dtype, nesterov):
    shape = (4, 3) if small else (31, 17)
    p, g, v = rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape)
    k = backend.kernels
    pd, vd = k.to_device(p, dtype), k.to_device(v, dtype)
    k.momentum_update(pd, k.to_device(g, dtype), vd, 0.1, 0.9, nesterov, 0.01)
    ref.momentum_update(p, g, v, 0.1, 0.9, nesterov, 0.01)
    np.testing.assert_allclose(host(backend, pd), p, **tolerance(dtype))
    np.testing.assert_allclose(host(backend, vd), v, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [1, 7])
def test_adam_update(backend, small, rng, dtype, step):
    shape = (4, 3) if small else (31, 17)
    p, g = rng.normal(size=shape), rng.normal(size=shape)
    m, v = rng.normal(size=shape), rng.uniform(size=shape)
    k = backend.kernels
    pd, md, vd = k.to_device(p, dtype), k.to_device(m, dtype), k.to_device(v, dtype)
    k.adam_update(pd, k.to_device(g, dtype), md, vd, 1e-2, 0.9, 0.999, 1e-8, step, 0.01)
    ref.adam_update(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, step, 0.01)
    for got, want in ((pd, p), (md, m), (vd, v)):
        np.testing.assert_allclose(host(backend, got), want, **tolerance(dtype))


def test_all_finite(backend):
    k = backend.kernels
    assert k.all_finite(k.to_device(np.ones((3, 2)), np.float32))
    bad = np.ones((3, 2))
    bad[1, 1] = np.nan
    assert not k.all_finite(k.to_device(bad, np.float32))
