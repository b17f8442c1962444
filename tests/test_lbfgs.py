"""Full-batch L-BFGS in the core API: ``MLP.fit(..., optimizer=LBFGS())``."""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop.lbfgs import FullBatchObjective
from backprop.staging import Batches

pytest.importorskip("scipy")


def _data(rng, n=120):
    X = rng.normal(size=(n, 4))
    return X, (X[:, 0] * X[:, 1] > 0).astype(int)


def _net(backend="numpy", dtype="float64", seed=0):
    return bp.MLP([4, 8, 2], activation="tanh", head="multiclass", dtype=dtype, seed=seed, backend=backend)


def _objective(net, X, y, chunk=65536, weight_decay=0.0):
    k = net.backend.kernels
    T = np.eye(2)[y]
    return FullBatchObjective.over(net, Batches(k, X, T, net.dtype), chunk, weight_decay)


def test_objective_is_the_mean_loss_plus_decay_and_its_gradient(rng):
    """E(theta) and its gradient against the network's own loss and central differences (float64)."""
    X, y = _data(rng, 50)
    net = _net()
    f = _objective(net, X, y, weight_decay=0.3)
    theta = np.array(net.params, dtype=np.float64) + rng.normal(size=net.n_params) * 0.1
    value, grad = f(theta)
    W = theta[:net.n_weights]
    assert value == pytest.approx(net.loss(X, y) + 0.15 * W @ W, rel=1e-12)
    h = 1e-6
    for i in rng.choice(net.n_params, 12, replace=False):
        bump = np.zeros(net.n_params)
        bump[i] = h
        numeric = (f(theta + bump)[0] - f(theta - bump)[0]) / (2 * h)
        assert numeric == pytest.approx(grad[i], rel=1e-6, abs=1e-9)


def test_chunks_give_the_whole_batch_result(rng):
    X, y = _data(rng, 50)
    net = _net()
    theta = np.array(net.params, dtype=np.float64)
    whole = _objective(net, X, y)(theta)
    chunked = _objective(net, X, y, chunk=7)(theta)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-13)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-12, atol=1e-15)


def test_fit_follows_scipy_on_the_same_objective(rng):
    """fit with LBFGS takes the iterates SciPy takes on the same objective: one History epoch per iteration."""
    from scipy.optimize import minimize

    X, y = _data(rng)
    net, twin = _net(), _net()
    opt = bp.LBFGS(tol=0.0, weight_decay=1e-3)
    history = net.fit(X, y, optimizer=opt, epochs=25)
    f = _objective(twin, X, y, weight_decay=1e-3)
    seen = []
    result = minimize(f, np.array(twin.params, dtype=np.float64), method="L-BFGS-B", jac=True,
                      callback=lambda xk: seen.append(f.value_at(xk)), options={"maxiter": 25, "gtol": 0.0})
    assert len(history.loss) == opt.steps == result.nit == 25
    np.testing.assert_allclose(history.loss, seen, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(net.params), result.x, rtol=1e-9, atol=1e-12)
    assert history.loss[-1] < history.loss[0] and opt.evaluations >= 25


def test_callbacks_and_early_stopping_end_the_iterations(rng):
    X, y = _data(rng)
    net = _net()
    history = net.fit(X, y, optimizer=bp.LBFGS(), epochs=100, callbacks=[lambda net, epoch, h: epoch == 4])
    assert len(history.loss) == 4 and history.stopped_epoch == 4
    net = _net()
    history = net.fit(X, y, optimizer=bp.LBFGS(tol=0.0), epochs=200, validation_split=0.3, early_stopping=True,
                      patience=2)
    assert history.stopped_epoch is not None and history.restored_epoch is not None
    assert len(history.val_loss) == len(history.loss) == history.stopped_epoch


def test_convergence_ends_before_the_epochs_with_a_reason(rng):
    X, y = _data(rng, 40)
    history = _net().fit(X, y, optimizer=bp.LBFGS(tol=1e-2), epochs=500)
    assert len(history.loss) < 500 and history.stop_reason.startswith("L-BFGS stopped:")


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # on purpose
def test_a_loss_that_is_not_finite_stops_with_the_last_iterate(rng):
    X, y = _data(rng)
    net = bp.MLP([4, 8, 1], activation="relu", dtype="float32", backend="numpy")
    before = np.array(net.params, copy=True)
    with pytest.raises(bp.NonFiniteLossError, match="L-BFGS stopped in iteration 1"):
        net.fit(X * 1e30, y * 1e30, optimizer=bp.LBFGS(), epochs=5)
    assert np.isfinite(np.asarray(net.params)).all()
    np.testing.assert_array_equal(np.asarray(net.params), before)


@pytest.mark.parametrize("setting,value,error", [
    ("tol", -1.0, ValueError), ("max_fun", 0, ValueError), ("memory", 2.5, TypeError),
    ("weight_decay", float("nan"), ValueError), ("chunk", 0, ValueError),
])
def test_bad_settings_are_refused(setting, value, error):
    with pytest.raises(error, match=setting):
        bp.LBFGS(**{setting: value})


def test_minibatch_options_that_make_no_sense_are_refused(rng):
    X, y = _data(rng, 20)
    net = _net()
    before = np.array(net.params, copy=True)
    with pytest.raises(ValueError, match="schedule"):
        net.fit(X, y, optimizer=bp.LBFGS(), schedule=lambda e: 0.1)
    with pytest.raises(ValueError, match="graph"):
        net.fit(X, y, optimizer=bp.LBFGS(), graph=True)
    np.testing.assert_array_equal(np.asarray(net.params), before)


def test_every_backend(backend, rng):
    X, y = _data(rng, 30)
    net = bp.MLP([4, 5, 2], activation="tanh", head="multiclass", dtype="float32", backend=backend.name)
    history = net.fit(X, y, optimizer=bp.LBFGS(), epochs=3)
    assert len(history.loss) == 3 and history.loss[-1] < history.loss[0]
