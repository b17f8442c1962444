"""Every primitive of every backend against the NumPy float64 reference, on fresh random inputs."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from backprop.kernels import (
    ACTIVATIONS, CAPABILITY_FUNCTIONS, FUSED_PAIRS, LOSSES, REQUIRED, Capabilities, KernelModule, check_capabilities,
    missing_names,
)
from backprop.kernels import numpy_ref as ref
from backprop.kernels.contract import (
    GUARD_FAILED,
    GUARD_LOSS_SUM,
    GUARD_OK,
    GUARD_SIZE,
    GUARD_STEPS,
    STAT_FIRST_NONFINITE,
    STAT_MAX,
    STAT_MIN,
    STAT_NON_INTEGER,
    STAT_NONFINITE,
    STAT_ROW_SUM_ERROR,
    STATS_SIZE,
)

from .conftest import targets_for, tolerance

DTYPES = [np.float32, np.float64]
HIDDEN = [n for n, s in ACTIVATIONS.items() if s.hidden]
ALPHA = {"leaky_relu": 0.05, "elu": 0.7}
PAIRS = [(o, loss) for loss, s in LOSSES.items() for o in s.outputs] + [("softmax", "cross_entropy")]
PAIRS = sorted(set(PAIRS))
OPTIMIZERS = ["sgd", "momentum", "nesterov", "adam"]
GUARD_FAILURES = ["nan_grad", "inf_grad", "nan_loss", "inf_loss"]


# --------------------------------------------------------------------------- shared helpers
def shapes(small: bool) -> tuple[int, int, int]:
    return (5, 4, 3) if small else (67, 33, 29)


def host(backend, a):
    """A float64 host copy of backend array ``a`` (for comparisons with the reference)."""
    return np.asarray(backend.kernels.to_host(a), dtype=np.float64)


def host_copy(k, a) -> np.ndarray:
    """A host copy of ``a`` in its own dtype, detached from it (``to_host`` may return ``a`` itself)."""
    return np.array(k.to_host(a), copy=True)


def poisoned(k, shape, dtype):
    """An output buffer full of NaN: every element the primitive should write shows up if it is not."""
    return k.to_device(np.full(shape, np.nan), dtype)


def alpha_of(act: str) -> float:
    return ALPHA.get(act, ACTIVATIONS[act].default_alpha)


def _forward_inputs(rng, small):
    batch, n_in, n_out = shapes(small)
    return rng.normal(size=(batch, n_in)), rng.normal(size=(n_out, n_in)) / 2, rng.normal(size=n_out)


def _backward_inputs(rng, small, act):
    """``(delta, W, y_prev, u_prev)`` for ``delta_backward`` through activation ``act``."""
    batch, n_prev, n = shapes(small)
    delta, W = rng.normal(size=(batch, n)), rng.normal(size=(n, n_prev))
    u_prev = rng.normal(size=(batch, n_prev)) * 2
    return delta, W, ref.activate(u_prev, act, alpha_of(act)), u_prev


def _targets(rng, loss, batch, n):
    return targets_for(rng, loss, batch, n)


def _output_inputs(rng, small, output, loss):
    """``(y, u, t, param)`` for ``output_error`` of the pair ``(output, loss)``."""
    batch, _, n = shapes(small)
    u = rng.normal(size=(batch, n)) * 2
    y = ref.activate(u, output, alpha_of(output))
    param = 0.5 if loss == "huber" else LOSSES[loss].default_param
    return y, u, _targets(rng, loss, batch, n), param


def _row_weights(rng, batch: int) -> np.ndarray:
    """Positive row weights, far from all equal."""
    return rng.uniform(0.2, 3.0, size=batch)


def _optimizer_state(rng, small) -> dict[str, np.ndarray]:
    """Host ``p``, ``g``, ``m``, ``v`` of one parameter (``v`` non-negative, as Adam's is)."""
    shape = (4, 3) if small else (31, 17)
    return {"p": rng.normal(size=shape), "g": rng.normal(size=shape), "m": rng.normal(size=shape),
            "v": rng.uniform(size=shape)}


def _apply_optimizer(k, name, s, guard=None) -> None:
    """One in-place update by optimizer ``name`` of the arrays ``s`` (``p``, ``g``, ``m``, ``v``),
    with weight decay; ``guard`` is passed only when given."""
    extra = {} if guard is None else {"guard": guard}
    if name == "sgd":
        k.sgd_update(s["p"], s["g"], 0.05, 0.01, **extra)
    elif name in ("momentum", "nesterov"):
        k.momentum_update(s["p"], s["g"], s["v"], 0.1, 0.9, name == "nesterov", 0.01, **extra)
    else:
        k.adam_update(s["p"], s["g"], s["m"], s["v"], 1e-2, 0.9, 0.999, 1e-8, 3, 0.01, **extra)


def _guard_with(k, ok: float):
    """A guard in the ``GUARD_*`` layout whose ``GUARD_OK`` entry is ``ok``."""
    g = np.zeros(GUARD_SIZE)
    g[GUARD_OK], g[GUARD_STEPS], g[GUARD_FAILED], g[GUARD_LOSS_SUM] = ok, 2.0, 0.0 if ok else 2.0, 1.5
    return k.to_device(g, np.float64)


def _stats(backend, a, dtype) -> np.ndarray:
    """``array_stats`` of host data ``a`` moved to the backend as ``dtype``, checked for its form."""
    s = backend.kernels.array_stats(backend.kernels.to_device(a, dtype))
    assert isinstance(s, np.ndarray) and s.dtype == np.float64 and s.shape == (STATS_SIZE,)
    return s


# --------------------------------------------------------------------------- the contract
def test_backend_defines_every_primitive(backend):
    k = backend.kernels
    missing = missing_names(k)
    assert not missing, f"{backend.name} lacks {missing}"
    functions = [n for n in REQUIRED if n not in KernelModule.__annotations__]
    assert not [n for n in functions if not callable(getattr(k, n))]
    assert isinstance(k.CAPABILITIES, Capabilities) and backend.capabilities is k.CAPABILITIES
    assert not check_capabilities(k), f"{backend.name} promises {check_capabilities(k)} and lacks them"
    assert backend.is_gpu is k.CAPABILITIES.gpu


def test_capabilities_promise_what_they_name():
    """Each field of the record has its list of functions, and a module that declares a field without them
    is caught."""
    assert set(CAPABILITY_FUNCTIONS) == {f.name for f in dataclasses.fields(Capabilities)}
    hollow = types.SimpleNamespace(CAPABILITIES=Capabilities(graphs=True), capture=lambda fn: None)
    assert check_capabilities(hollow) == ["capture_unavailable_reason", "replay"]
    assert check_capabilities(types.SimpleNamespace()) != []


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", HIDDEN + ["softmax"])
def test_layer_forward(backend, small, rng, act, dtype):
    """``y = f(W x + b)`` (and ``u``) against the reference; into (poisoned) buffers given, the same bits as
    without them, with and without ``keep_u``."""
    x, W, b = _forward_inputs(rng, small)
    k = backend.kernels
    alpha = alpha_of(act)
    xd, Wd, bd = k.to_device(x, dtype), k.to_device(W, dtype), k.to_device(b, dtype)
    y_ref, u_ref = ref.layer_forward(x, W, b, act, alpha, True)
    for keep_u in (True, False):
        y_free, u_free = k.layer_forward(xd, Wd, bd, act, alpha, keep_u)
        assert k.to_host(y_free).dtype == dtype and (u_free is None) is not keep_u
        np.testing.assert_allclose(host(backend, y_free), y_ref, **tolerance(dtype))
        if keep_u:
            np.testing.assert_allclose(host(backend, u_free), u_ref, **tolerance(dtype))
        shape = (x.shape[0], W.shape[0])
        y_buf = poisoned(k, shape, dtype)
        u_buf = poisoned(k, shape, dtype) if keep_u else None
        y, u = k.layer_forward(xd, Wd, bd, act, alpha, keep_u, y=y_buf, u=u_buf)
        assert y is y_buf and u is u_buf  # u is None without keep_u
        np.testing.assert_array_equal(host_copy(k, y), host_copy(k, y_free))
        if keep_u:
            np.testing.assert_array_equal(host_copy(k, u), host_copy(k, u_free))


@pytest.mark.parametrize("act", HIDDEN)
def test_reference_slope_matches_finite_differences(rng, act):
    """phi(y) = f'(f^{-1}(y)) equals the numerical derivative of f (away from kinks)."""
    u = rng.normal(size=200) * 3
    u = u[np.abs(u) > 1e-3]
    alpha = alpha_of(act)
    h = 1e-6
    numeric = (ref.activate(u + h, act, alpha) - ref.activate(u - h, act, alpha)) / (2 * h)
    slope = ref.activation_slope(ref.activate(u, act, alpha), u, act, alpha)
    np.testing.assert_allclose(slope, numeric, rtol=1e-7, atol=1e-8)


# --------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", HIDDEN)
def test_delta_backward(backend, small, rng, act, dtype):
    """``delta^{l-1} = f'(u^{l-1}) * W^T delta^l`` against the reference; into a (poisoned) ``out``, the same bits."""
    delta, W, y_prev, u_prev = _backward_inputs(rng, small, act)
    alpha = alpha_of(act)
    k = backend.kernels
    args = (k.to_device(delta, dtype), k.to_device(W, dtype), k.to_device(y_prev, dtype),
            k.to_device(u_prev, dtype), act, alpha)
    free = k.delta_backward(*args)
    np.testing.assert_allclose(host(backend, free), ref.delta_backward(delta, W, y_prev, u_prev, act, alpha),
                               **tolerance(dtype))
    out = poisoned(k, y_prev.shape, dtype)
    got = k.delta_backward(*args, out=out)
    assert got is out
    np.testing.assert_array_equal(host_copy(k, got), host_copy(k, free))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_gradients_into_buffers(backend, small, rng, dtype):
    batch, n_in, n_out = shapes(small)
    delta, x = rng.normal(size=(batch, n_out)), rng.normal(size=(batch, n_in))
    k = backend.kernels
    dW = poisoned(k, (n_out, n_in), dtype)  # poisoned: every element must be written
    db = poisoned(k, n_out, dtype)
    dW2, db2 = k.weight_gradients(k.to_device(delta, dtype), k.to_device(x, dtype), dW, db)
    rW, rb = ref.weight_gradients(delta, x)
    np.testing.assert_allclose(host(backend, dW2), rW, **tolerance(dtype))
    np.testing.assert_allclose(host(backend, db2), rb, **tolerance(dtype))
    np.testing.assert_allclose(host(backend, dW), rW, **tolerance(dtype))
    fW, fb = k.weight_gradients(k.to_device(delta, dtype), k.to_device(x, dtype))
    np.testing.assert_allclose(host(backend, fW), rW, **tolerance(dtype))
    np.testing.assert_allclose(host(backend, fb), rb, **tolerance(dtype))


# --------------------------------------------------------------------------- output error
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output,loss", PAIRS)
def test_output_error(backend, small, rng, output, loss, dtype):
    """The loss and ``delta^L`` against the reference: without weights; into (poisoned) buffers, the same bits;
    with row weights ``w``, ``sum_i w_i L_i / batch`` and each row's delta times ``w_i``; with weights of ones,
    the unweighted bits."""
    y, u, t, param = _output_inputs(rng, small, output, loss)
    alpha = alpha_of(output)
    k = backend.kernels
    args = (k.to_device(y, dtype), k.to_device(u, dtype), k.to_device(t, dtype), output, loss, param, alpha)
    free_value, free_delta = k.output_error(*args)
    rv, rd = ref.output_error(y, u, t, output, loss, param, alpha)
    np.testing.assert_allclose(float(host(backend, free_value)), float(rv), **tolerance(dtype))
    np.testing.assert_allclose(host(backend, free_delta), rd, **tolerance(dtype))

    delta_buf, value_buf = poisoned(k, y.shape, dtype), poisoned(k, (), dtype)
    value, delta = k.output_error(*args, delta=delta_buf, value=value_buf)
    assert value is value_buf and delta is delta_buf
    np.testing.assert_array_equal(host_copy(k, value), host_copy(k, free_value))
    np.testing.assert_array_equal(host_copy(k, delta), host_copy(k, free_delta))

    w = _row_weights(rng, y.shape[0])
    delta_buf, value_buf = poisoned(k, y.shape, dtype), poisoned(k, (), dtype)
    value, delta = k.output_error(*args, delta=delta_buf, value=value_buf, weights=k.to_device(w, dtype))
    assert value is value_buf and delta is delta_buf
    rv, rd = ref.output_error(y, u, t, output, loss, param, alpha, weights=w)
    np.testing.assert_allclose(float(host(backend, value)), float(rv), **tolerance(dtype))
    np.testing.assert_allclose(host(backend, delta), rd, **tolerance(dtype))

    ones = k.to_device(np.ones(y.shape[0]), dtype)
    w_value, w_delta = (host_copy(k, a) for a in k.output_error(*args, weights=ones))
    np.testing.assert_array_equal(w_value.reshape(-1).view(np.uint8),
                                  host_copy(k, free_value).reshape(-1).view(np.uint8))
    np.testing.assert_array_equal(w_delta.view(np.uint8), host_copy(k, free_delta).view(np.uint8))


@pytest.mark.parametrize("output,loss", [p for p in sorted(FUSED_PAIRS) if p[0] != "exp"])  # exp(1e4) is inf
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


# --------------------------------------------------------------------------- row weights
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output,loss", [("identity", "mse"), ("sigmoid", "bce"), ("softmax", "cross_entropy")])
def test_output_error_refuses_wrong_weights_before_writing(backend, small, rng, output, loss, dtype):
    """Weights of another length, another number of dimensions or another dtype, or no array at all: a
    ``ValueError`` naming ``weights``, and the buffers are left as they were."""
    y, u, t, param = _output_inputs(rng, small, output, loss)
    batch = y.shape[0]
    k = backend.kernels
    other = np.float64 if dtype == np.float32 else np.float32
    wrong = [k.to_device(np.ones(batch + 1), dtype), k.to_device(np.ones((batch, 1)), dtype),
             k.to_device(np.ones(batch), other), [1.0] * batch]
    args = (k.to_device(y, dtype), k.to_device(u, dtype), k.to_device(t, dtype), output, loss, param)
    for weights in wrong:
        delta, value = poisoned(k, y.shape, dtype), poisoned(k, (), dtype)
        with pytest.raises(ValueError, match="weights"):
            k.output_error(*args, delta=delta, value=value, weights=weights)
        assert np.isnan(host(backend, delta)).all() and np.isnan(float(host(backend, value)))


@pytest.mark.parametrize("output,loss", PAIRS)
def test_reference_weighted_output_error_weighs_each_row(rng, output, loss):
    """The reference's weighted loss is ``sum_i w_i L_i / batch`` with ``L_i`` the loss of row ``i`` alone, and
    its delta row ``i`` is ``w_i`` times the unweighted one."""
    y, u, t, param = _output_inputs(rng, True, output, loss)
    batch = y.shape[0]
    w = _row_weights(rng, batch)
    alpha = alpha_of(output)
    value, delta = ref.output_error(y, u, t, output, loss, param, alpha, weights=w)
    _, plain_delta = ref.output_error(y, u, t, output, loss, param, alpha)
    rows = [float(ref.output_error(y[i:i + 1], u[i:i + 1], t[i:i + 1], output, loss, param, alpha)[0])
            for i in range(batch)]
    assert float(value) == pytest.approx(float(np.dot(w, rows)) / batch, rel=1e-12)
    np.testing.assert_array_equal(delta, plain_delta * w[:, None])


@pytest.mark.parametrize("output,loss", PAIRS)
def test_reference_weighted_delta_is_the_gradient_of_the_weighted_loss(rng, output, loss):
    """float64: the weighted delta against central differences of the weighted loss in the logits ``u``
    (the output ``y = f(u)`` recomputed at each point)."""
    batch, n = 4, 3
    alpha = alpha_of(output)
    u = rng.normal(size=(batch, n)) * 2
    t = _targets(rng, loss, batch, n)
    param = 0.5 if loss == "huber" else LOSSES[loss].default_param
    w = _row_weights(rng, batch)

    def loss_at(v: np.ndarray) -> float:
        return float(ref.output_error(ref.activate(v, output, alpha), v, t, output, loss, param, alpha,
                                      weights=w)[0])

    _, delta = ref.output_error(ref.activate(u, output, alpha), u, t, output, loss, param, alpha, weights=w)
    h = 1e-6
    numeric = np.empty_like(u)
    for idx in np.ndindex(*u.shape):
        up, down = u.copy(), u.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (loss_at(up) - loss_at(down)) / (2 * h)
    # the differences carry the rounding of the whole loss: about eps |E| / h in each quotient
    np.testing.assert_allclose(delta, numeric, rtol=1e-6, atol=max(1e-9, 1e-15 * abs(loss_at(u)) / h))


# --------------------------------------------------------------------------- updates
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_update(backend, small, rng, dtype, weight_decay):
    s = _optimizer_state(rng, small)
    p, g = s["p"], s["g"]
    k = backend.kernels
    pd = k.to_device(p, dtype)
    k.sgd_update(pd, k.to_device(g, dtype), 0.05, weight_decay)
    ref.sgd_update(p, g, 0.05, weight_decay)
    np.testing.assert_allclose(host(backend, pd), p, **tolerance(dtype))


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_corrections_and_count_step(backend, dtype):
    """adam_corrections: out = (lr / (1 - b1^t), 1 - b2^t) for t = count + 1, rounded from float64 to the
    dtype as the host computes them for an int step, count unchanged; count_step counts unless the guard
    says no."""
    k = backend.kernels
    lr, b1, b2 = 3e-3, 0.9, 0.999
    count, out = k.zeros((1,), np.float64), k.zeros((2,), dtype)
    dt = np.dtype(dtype).type
    for t in range(1, 6):
        k.adam_corrections(count, lr, b1, b2, out)
        assert host_copy(k, count).tolist() == [float(t - 1)]
        want = np.array([dt(lr / (1 - b1**t)), dt(1 - b2**t)], dtype=dtype)
        np.testing.assert_array_equal(host_copy(k, out).view(np.uint8), want.view(np.uint8), err_msg=f"t={t}")
        k.count_step(count, _guard_with(k, 1.0) if t % 2 else None)
    assert host_copy(k, count).tolist() == [5.0]
    for ok in (0.0, np.nan, 2.0):
        k.count_step(count, _guard_with(k, ok))
        assert host_copy(k, count).tolist() == [5.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_update_with_device_corrections_is_bit_identical(backend, small, rng, dtype, weight_decay):
    """Over several steps (guarded and not), adam_update given the corrections array of
    adam_corrections equals adam_update given the int step, bit for bit (lr ignored in the first)."""
    k = backend.kernels
    s = _optimizer_state(rng, small)
    host_form = {n: k.to_device(a, dtype) for n, a in s.items()}
    dev_form = {n: k.to_device(a, dtype) for n, a in s.items()}
    count, corr = k.zeros((1,), np.float64), k.zeros((2,), dtype)
    ok = _guard_with(k, 1.0)
    for t in range(1, 6):
        g = k.to_device(rng.normal(size=s["g"].shape), dtype)
        guard = ok if t % 2 else None
        k.adam_corrections(count, 2e-2, 0.9, 0.99, corr)
        k.adam_update(host_form["p"], g, host_form["m"], host_form["v"], 2e-2, 0.9, 0.99, 1e-8, t, weight_decay,
                      guard=guard)
        k.adam_update(dev_form["p"], g, dev_form["m"], dev_form["v"], 123.0, 0.9, 0.99, 1e-8, corr, weight_decay,
                      guard=guard)
        k.count_step(count, guard)
        for n in "pmv":
            a, b = host_copy(k, dev_form[n]), host_copy(k, host_form[n])
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=f"{n}, step {t}")
    failed = _guard_with(k, 0.0)
    before = {n: host_copy(k, dev_form[n]) for n in "pmv"}
    k.adam_corrections(count, 2e-2, 0.9, 0.99, corr)
    k.adam_update(dev_form["p"], g, dev_form["m"], dev_form["v"], 0.0, 0.9, 0.99, 1e-8, corr, weight_decay,
                  guard=failed)
    k.count_step(count, failed)
    for n in "pmv":
        np.testing.assert_array_equal(host_copy(k, dev_form[n]), before[n])
    assert host_copy(k, count).tolist() == [5.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_update_with_ok_guard_equals_update_without_guard(backend, small, rng, optimizer, dtype):
    s = _optimizer_state(rng, small)
    k = backend.kernels
    guarded = {n: k.to_device(a, dtype) for n, a in s.items()}
    free = {n: k.to_device(a, dtype) for n, a in s.items()}
    _apply_optimizer(k, optimizer, guarded, guard=_guard_with(k, 1.0))
    _apply_optimizer(k, optimizer, free)
    for n in "pmv":
        np.testing.assert_array_equal(host_copy(k, guarded[n]), host_copy(k, free[n]), err_msg=n)
    assert not np.array_equal(host_copy(k, free["p"]), s["p"].astype(dtype))  # the update did something


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_update_with_failed_guard_leaves_state_bit_identical(backend, small, rng, optimizer, dtype):
    s = _optimizer_state(rng, small)
    s["g"][0, 0] = np.nan  # what makes a guard fail; written anywhere it would show
    k = backend.kernels
    dev = {n: k.to_device(a, dtype) for n, a in s.items()}
    guard = _guard_with(k, 0.0)
    before = {n: host_copy(k, a) for n, a in dev.items()}
    guard_before = host_copy(k, guard)
    _apply_optimizer(k, optimizer, dev, guard=guard)
    for n in "pmv":
        assert np.array_equal(host_copy(k, dev[n]), before[n]), f"{optimizer} changed {n} under a failed guard"
    assert np.array_equal(host_copy(k, guard), guard_before)


def _apply_optimizer_probe(k, name, s, guard, corrections=None) -> None:
    """:func:`_apply_optimizer`'s update as a probe (Adam from the device corrections when given)."""
    if name == "sgd":
        k.sgd_update(s["p"], s["g"], 0.05, 0.01, guard=guard, probe=True)
    elif name in ("momentum", "nesterov"):
        k.momentum_update(s["p"], s["g"], s["v"], 0.1, 0.9, name == "nesterov", 0.01, guard=guard, probe=True)
    else:
        step = 3 if corrections is None else corrections
        k.adam_update(s["p"], s["g"], s["m"], s["v"], 1e-2, 0.9, 0.999, 1e-8, step, 0.01, guard=guard, probe=True)


def _overflowing_state(rng, small, optimizer, dtype) -> dict[str, np.ndarray]:
    """A state whose update overflows at one element (finite inputs, a result that is not)."""
    s = _optimizer_state(rng, small)
    big = float(np.finfo(dtype).max)
    i = (1, 2)
    if optimizer == "adam":  # g^2 overflows in v
        s["g"][i] = big / 2
    else:  # p - lr g overflows: p and -lr g both near the largest number
        s["p"][i], s["g"][i] = big * 0.99, -big
    return s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_probe_writes_nothing_and_passes_a_finite_update(backend, small, rng, optimizer, dtype):
    """A probe of a finite update leaves every array and the guard bit for bit as they were, and the
    update it stands for is then applied as without a probe."""
    k = backend.kernels
    s = _optimizer_state(rng, small)
    dev = {n: k.to_device(a, dtype) for n, a in s.items()}
    guard = _guard_with(k, 1.0)
    before = {n: host_copy(k, a) for n, a in dev.items()}
    guard_before = host_copy(k, guard)
    corr = None
    if optimizer == "adam" and backend.name != "numpy":  # the device form too
        corr = k.zeros((2,), dtype)
        k.adam_corrections(k.to_device(np.array([2.0]), np.float64), 1e-2, 0.9, 0.999, corr)
    _apply_optimizer_probe(k, optimizer, dev, guard, corr)
    for n in "pgmv":
        np.testing.assert_array_equal(host_copy(k, dev[n]).view(np.uint8), before[n].view(np.uint8), err_msg=n)
    np.testing.assert_array_equal(host_copy(k, guard), guard_before)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the CUDA simulator's NumPy scalars
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_probe_of_an_overflowing_update_fails_the_step(backend, small, rng, optimizer, dtype):
    """Finite parameters, gradients and state whose update overflows at one element: the probe fails the
    step (ok = 0, the step's number recorded) and changes nothing else; the guarded update then changes
    nothing. A second failure keeps the first failing step's number."""
    k = backend.kernels
    s = _overflowing_state(rng, small, optimizer, dtype)
    dev = {n: k.to_device(a, dtype) for n, a in s.items()}
    before = {n: host_copy(k, a) for n, a in dev.items()}
    assert all(np.isfinite(a).all() for a in before.values())
    want = np.zeros(GUARD_SIZE)
    want[GUARD_OK], want[GUARD_STEPS], want[GUARD_FAILED], want[GUARD_LOSS_SUM] = 0.0, 2.0, 2.0, 1.5
    guard = _guard_with(k, 1.0)
    _apply_optimizer_probe(k, optimizer, dev, guard)
    np.testing.assert_array_equal(host_copy(k, guard), want)
    _apply_optimizer(k, optimizer, dev, guard=guard)
    for n in "pgmv":
        np.testing.assert_array_equal(host_copy(k, dev[n]).view(np.uint8), before[n].view(np.uint8), err_msg=n)
    # the reference agrees that this update is not finite
    ref_state = {n: a.astype(dtype) for n, a in s.items()}
    with np.errstate(over="ignore", invalid="ignore"):
        _apply_optimizer(ref, optimizer, ref_state)
    assert not all(np.isfinite(ref_state[n]).all() for n in "pmv")
    # an earlier failure is kept: a guard that failed at step 1 stays so
    older = np.array([1.0, 2.0, 1.0, 1.5])
    guard = k.to_device(older, np.float64)
    _apply_optimizer_probe(k, optimizer, dev, guard)
    np.testing.assert_array_equal(host_copy(k, guard), [0.0, 2.0, 1.0, 1.5])


def test_probe_needs_a_guard(backend):
    k = backend.kernels
    p = k.to_device(np.ones(3), np.float64)
    with pytest.raises(ValueError, match="probe=True needs the step's guard"):
        k.sgd_update(p, p, 0.1, probe=True)


# --------------------------------------------------------------------------- guard_step
def _guard_step_both(backend, guard, guard_ref, loss: float, grads: np.ndarray, weight: float, dtype) -> np.ndarray:
    """One ``guard_step`` on the backend and on the reference with the same ``dtype`` inputs; checks that
    they agree and returns the backend's guard on the host."""
    k = backend.kernels
    k.guard_step(guard, k.to_device(np.array(loss), dtype), k.to_device(grads, dtype), weight)
    ref.guard_step(guard_ref, np.array(loss, dtype=dtype), grads.astype(dtype), weight)
    got = host(backend, guard)
    np.testing.assert_array_equal(got[[GUARD_OK, GUARD_STEPS, GUARD_FAILED]],
                                  guard_ref[[GUARD_OK, GUARD_STEPS, GUARD_FAILED]])
    np.testing.assert_allclose(got[GUARD_LOSS_SUM], guard_ref[GUARD_LOSS_SUM], **tolerance(dtype))
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fail_at", [1, 3])
@pytest.mark.parametrize("failure", GUARD_FAILURES)
def test_guard_step_counts_steps_and_sticks_after_first_failure(backend, small, rng, failure, fail_at, dtype):
    k = backend.kernels
    n = 7 if small else 1000
    guard = k.zeros((GUARD_SIZE,), np.float64)
    guard_ref = np.zeros(GUARD_SIZE)
    total, failed = 0.0, 0
    for step in range(1, 6):
        loss, grads, weight = float(rng.uniform(0.5, 3.0)), rng.normal(size=n), float(rng.uniform(0.1, 2.0))
        if step == fail_at or step == 5:  # the first failure, then a second one that must not move `failed`
            if failure == "nan_grad":
                grads[rng.integers(n)] = np.nan
            elif failure == "inf_grad":
                grads[rng.integers(n)] = -np.inf
            else:
                loss = np.nan if failure == "nan_loss" else np.inf
            failed = failed or step
        ok = not failed
        if ok:
            total += weight * float(np.asarray(loss, dtype=dtype))
        got = _guard_step_both(backend, guard, guard_ref, loss, grads, weight, dtype)
        assert got[GUARD_OK] == (1.0 if ok else 0.0), f"step {step}"
        assert got[GUARD_STEPS] == step
        assert got[GUARD_FAILED] == failed
        np.testing.assert_allclose(got[GUARD_LOSS_SUM], total, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_guard_step_first_finite_step(backend, small, rng, dtype):
    k = backend.kernels
    guard = k.zeros((GUARD_SIZE,), np.float64)
    loss, w = float(rng.uniform(0.5, 3.0)), 0.25
    got = _guard_step_both(backend, guard, np.zeros(GUARD_SIZE), loss, rng.normal(size=(4 if small else 300)), w,
                           dtype)
    expected = [1.0, 1.0, 0.0, w * float(np.asarray(loss, dtype=dtype))]
    np.testing.assert_allclose(got, expected, **tolerance(dtype))
    np.testing.assert_array_equal(got[:3], expected[:3])


# --------------------------------------------------------------------------- array_stats
@pytest.mark.parametrize("dtype", DTYPES)
def test_array_stats_leaves_out_what_is_not_asked(backend, small, rng, dtype):
    """Input checks ask only for finiteness and range: no non-integer count, no row sums."""
    a = rng.normal(size=shapes(small)[:2]) + 0.25
    a[0, 0] = np.nan
    k = backend.kernels
    full = host_copy(k, k.array_stats(k.to_device(a, dtype)))
    lean = host_copy(k, k.array_stats(k.to_device(a, dtype), integers=False, row_sums=False))
    assert full[STAT_NON_INTEGER] > 0 and full[STAT_ROW_SUM_ERROR] != 0
    assert lean[STAT_NON_INTEGER] == 0 and lean[STAT_ROW_SUM_ERROR] == 0
    keep = [STAT_NONFINITE, STAT_FIRST_NONFINITE]
    np.testing.assert_array_equal(lean[keep], full[keep])
    assert lean[STAT_NONFINITE] == 1 and lean[STAT_FIRST_NONFINITE] == 0
    np.testing.assert_array_equal(ref.array_stats(a.astype(dtype), integers=False, row_sums=False)[keep], lean[keep])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "mixed"])
def test_array_stats_counts_nonfinite_and_finds_the_first(backend, small, rng, kind, dtype):
    a = rng.normal(size=(5, 3) if small else (41, 23))
    where = rng.choice(a.size, 3, replace=False)
    values = {"nan": [np.nan] * 3, "inf": [np.inf] * 3, "-inf": [-np.inf] * 3, "mixed": [np.inf, np.nan, -np.inf]}
    a.reshape(-1)[where] = values[kind]
    s = _stats(backend, a, dtype)
    assert s[STAT_NONFINITE] == 3
    assert s[STAT_FIRST_NONFINITE] == where.min()
    r = ref.array_stats(a.astype(dtype))
    np.testing.assert_array_equal(s[[STAT_NONFINITE, STAT_FIRST_NONFINITE]], r[[STAT_NONFINITE, STAT_FIRST_NONFINITE]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_array_stats_of_finite_array(backend, small, rng, dtype):
    a = rng.normal(size=(5, 3) if small else (41, 23)) * 4
    a_d = a.astype(dtype).astype(np.float64)
    s = _stats(backend, a, dtype)
    assert s[STAT_NONFINITE] == 0
    assert s[STAT_FIRST_NONFINITE] == -1
    assert s[STAT_MIN] == a_d.min()
    assert s[STAT_MAX] == a_d.max()
    assert s[STAT_NON_INTEGER] == a.size  # normal samples are never whole numbers
    np.testing.assert_allclose(s[STAT_ROW_SUM_ERROR], np.abs(a_d.sum(axis=1) - 1).max(), **tolerance(dtype))
    np.testing.assert_allclose(s, ref.array_stats(a.astype(dtype)), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_array_stats_counts_non_integer_labels(backend, small, rng, dtype):
    n = 9 if small else 500
    labels = rng.integers(0, 10, n).astype(np.float64)
    halves = rng.choice(n, 3, replace=False)
    labels[halves[:2]] += 0.5
    labels[halves[2]] = -2.5  # floor(-2.5) = -3: still not whole
    s = _stats(backend, labels, dtype)
    np.testing.assert_array_equal(s, [0, -1, labels.min(), labels.max(), 3, 0])
    np.testing.assert_array_equal(s, ref.array_stats(labels.astype(dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_array_stats_row_sum_error_of_probability_rows(backend, small, rng, dtype):
    batch, _, n = shapes(small)
    p = ref.activate(rng.normal(size=(batch, n)), "softmax")
    s = _stats(backend, p, dtype)
    assert s[STAT_ROW_SUM_ERROR] <= tolerance(dtype)["atol"]
    assert s[STAT_NON_INTEGER] == p.size
    row, col = rng.integers(batch), rng.integers(n)
    p[row, col] += 0.25
    s = _stats(backend, p, dtype)
    np.testing.assert_allclose(s[STAT_ROW_SUM_ERROR], 0.25, **tolerance(dtype))
    np.testing.assert_allclose(s, ref.array_stats(p.astype(dtype)), **tolerance(dtype))


def test_array_stats_of_int64_labels(backend, small, rng):
    n, classes = (9, 4) if small else (500, 10)
    labels = rng.integers(0, classes, n)
    s = _stats(backend, labels, np.int64)
    np.testing.assert_array_equal(s, [0, -1, labels.min(), labels.max(), 0, 0])
    np.testing.assert_array_equal(s, ref.array_stats(labels))
    rows = np.eye(classes, dtype=np.int64)[labels]
    np.testing.assert_array_equal(_stats(backend, rows, np.int64), [0, -1, 0, 1, 0, 0])
    rows[rng.integers(n), 0] += 2  # that row sums to 3
    s = _stats(backend, rows, np.int64)
    np.testing.assert_array_equal(s, [0, -1, 0, rows.max(), 0, 2])
    np.testing.assert_array_equal(s, ref.array_stats(rows))


@pytest.mark.parametrize("dtype", DTYPES)
def test_array_stats_of_1d_array_has_zero_row_sum_error(backend, rng, dtype):
    a = rng.uniform(2.0, 3.0, size=6)  # sums far from 1
    s = _stats(backend, a, dtype)
    assert s[STAT_ROW_SUM_ERROR] == 0
    np.testing.assert_allclose(s, ref.array_stats(a.astype(dtype)), **tolerance(dtype))


# --------------------------------------------------------------------------- arrays
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("with_out", [False, True])
def test_one_hot(backend, small, rng, with_out, label_dtype, dtype):
    batch, _, n = shapes(small)
    labels = rng.integers(0, n, batch)
    labels[0], labels[-1] = 0, n - 1  # both ends of the range
    k = backend.kernels
    out = poisoned(k, (batch, n), dtype) if with_out else None
    got = k.one_hot(k.to_device(labels, label_dtype), n, dtype, out=out)
    if with_out:
        assert got is out
    h = host_copy(k, got)
    assert h.dtype == dtype and h.shape == (batch, n)
    np.testing.assert_array_equal(h, np.eye(n)[labels])
    np.testing.assert_array_equal(h, ref.one_hot(labels.astype(label_dtype), n, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", ["argmax", "threshold"])
def test_count_correct_adds_the_matching_rows(backend, small, rng, rule, dtype):
    batch, _, n = shapes(small)
    y = rng.uniform(size=(batch, n))
    t = np.eye(n)[rng.integers(0, n, batch)] if rule == "argmax" else (rng.uniform(size=(batch, n)) > 0.5) * 1.0
    y[0] = t[0] * 0.5 + 0.3  # rows that match, whatever the draw
    y[1] = 1 - t[1]  # ... and one that does not (threshold) or may not (argmax)
    if rule == "argmax":
        expected = int((y.argmax(1) == t.argmax(1)).sum())
    else:
        expected = int(((y > 0.5) == (t > 0.5)).all(axis=1).sum())
    k = backend.kernels
    total = k.to_device(np.array([2.0]), np.float64)  # adds to what is there
    k.count_correct(k.to_device(y, dtype), k.to_device(t, dtype), rule, total)
    assert host_copy(k, total)[0] == 2.0 + expected
    total_ref = np.array([2.0])
    ref.count_correct(y.astype(dtype), t.astype(dtype), rule, total_ref)
    assert total_ref[0] == 2.0 + expected
    with pytest.raises(ValueError, match="unknown rule"):
        k.count_correct(k.to_device(y, dtype), k.to_device(t, dtype), "nearest", total)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_with_repeated_indices(backend, small, rng, dtype):
    n_src, batch, d = (6, 5, 3) if small else (80, 67, 29)
    src = rng.normal(size=(n_src, d))
    idx = rng.integers(0, n_src, batch)
    idx[1] = idx[0]  # a repeat
    k = backend.kernels
    out = poisoned(k, (batch, d), dtype)
    got = k.gather_rows(k.to_device(src, dtype), k.to_device(idx, np.int64), out)
    assert got is out
    np.testing.assert_array_equal(host_copy(k, got), src.astype(dtype)[idx])


def test_owns_its_own_arrays_only(backend):
    k = backend.kernels
    a = k.to_device(np.ones((2, 3)), np.float32)
    assert k.owns(a)
    assert k.owns(k.zeros((3,), np.float64))
    assert not k.owns([1.0, 2.0])
    if not isinstance(a, np.ndarray):  # a backend whose arrays are not NumPy's
        assert not k.owns(np.ones(3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_as_array_returns_matching_arrays_and_converts_others(backend, rng, dtype):
    k = backend.kernels
    x = rng.normal(size=(3, 4))
    a = k.to_device(x, dtype)
    assert k.as_array(a, dtype) is a
    assert k.as_array(a, np.dtype(dtype)) is a
    other = np.float64 if dtype == np.float32 else np.float32
    c = k.as_array(a, other)
    assert k.owns(c)
    h = host_copy(k, c)
    assert h.dtype == other
    np.testing.assert_array_equal(h, x.astype(dtype).astype(other))
    np.testing.assert_array_equal(host_copy(k, a), x.astype(dtype))  # the source is untouched
    if k.xp is not None:  # an array module with strided views
        view = a[:, ::2]
        s = k.as_array(view, dtype)
        assert k.owns(s) and s.flags.c_contiguous
        np.testing.assert_array_equal(host_copy(k, s), x.astype(dtype)[:, ::2])


def test_all_finite(backend):
    k = backend.kernels
    assert k.all_finite(k.to_device(np.ones((3, 2)), np.float32))
    bad = np.ones((3, 2))
    bad[1, 1] = np.nan
    assert not k.all_finite(k.to_device(bad, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_complements_are_formed_in_float64(backend, dtype):
    """From zero moments and a unit gradient, one Adam step leaves m = 1 - beta1 and v = 1 - beta2 exactly as
    float64 rounds them to the dtype (forming 1 - beta2 in float32 gives 0.00100004673, not 0.001)."""
    k = backend.kernels
    p, g, m, v = (k.to_device(a, dtype) for a in (np.zeros(5), np.ones(5), np.zeros(5), np.zeros(5)))
    k.adam_update(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 1)
    dt = np.dtype(dtype).type
    np.testing.assert_array_equal(host_copy(k, m), np.full(5, dt(1 - 0.9)))
    np.testing.assert_array_equal(host_copy(k, v), np.full(5, dt(1 - 0.999)))
