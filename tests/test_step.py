"""The one training step: workspaces reused, the guard inside fit, no copies of device data to the host."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest

import backprop as bp
from backprop import step
from backprop.step import Guard

# a float32 net that diverges at lr 10 on targets of size 100 (within a few steps)
DIVERGING = dict(sizes=[3, 8, 1], activation="relu", dtype="float32")


def diverging_data(rng: np.random.Generator, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    return (rng.normal(size=(n, 3)) * 100).astype(np.float32), (rng.normal(size=(n, 1)) * 100).astype(np.float32)


@pytest.mark.parametrize("opt", [lambda: bp.SGD(lr=10.0), lambda: bp.SGD(lr=10.0, momentum=0.9),
                                 lambda: bp.Adam(lr=1e12)], ids=["sgd", "momentum", "adam"])
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_fit_stops_at_the_failing_step_with_parameters_bit_identical(backend, small, request, rng, opt):
    """Inside fit, with one read per epoch, the step that is not finite and every later one are skipped:
    the parameters and the optimizer's state equal those of the same steps run one by one up to it. Under the
    CUDA simulator with Adam (the most state) only: the other optimizers run on every other backend."""
    if small and request.node.callspec.id.split("-")[-1] != "adam":
        pytest.skip("under the CUDA simulator only Adam runs (the most state); the CPU backends run every optimizer")
    X, T = diverging_data(rng)
    batch = 8
    net = bp.MLP(DIVERGING["sizes"], activation="relu", dtype="float32", backend=backend.name, seed=3)
    optimizer = opt()
    with pytest.raises(bp.NonFiniteLossError, match=r"epoch (\d+), step (\d+)") as info:
        net.fit(X, T, epochs=40, batch_size=batch, optimizer=optimizer, shuffle=False)
    epoch, failed = (int(g) for g in re.search(r"epoch (\d+), step (\d+)", str(info.value)).groups())
    per_epoch = len(X) // batch
    applied = (epoch - 1) * per_epoch + failed - 1
    assert optimizer.steps == applied

    replay = bp.MLP(DIVERGING["sizes"], activation="relu", dtype="float32", backend=backend.name, seed=3)
    replay_opt = opt()
    for s in range(applied):
        lo = (s % per_epoch) * batch
        replay.train_step(X[lo:lo + batch], T[lo:lo + batch], replay_opt)
    for (W, b), (W0, b0) in zip(net.get_params(), replay.get_params()):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)
        assert np.isfinite(W).all() and np.isfinite(b).all()
    lo = (applied % per_epoch) * batch
    with pytest.raises(bp.NonFiniteLossError, match="not applied"):
        replay.train_step(X[lo:lo + batch], T[lo:lo + batch], replay_opt)
    assert replay_opt.steps == applied


def test_fit_reads_the_guard_once_per_epoch(monkeypatch, rng):
    reads = []
    original = Guard.read
    monkeypatch.setattr(Guard, "read", lambda self: reads.append(1) or original(self))
    X = rng.normal(size=(100, 4))
    y = rng.integers(0, 3, 100)
    net = bp.MLP([4, 8, 3], head="multiclass", backend="numpy")
    net.fit(X, y, epochs=3, batch_size=10)
    assert len(reads) == 3


def test_fit_loss_is_the_mean_over_the_epochs_steps(rng):
    """The loss summed on the backend equals the mean of the per-step losses."""
    X = rng.normal(size=(30, 4))
    T = rng.normal(size=(30, 2))
    a = bp.MLP([4, 6, 2], dtype="float64", backend="numpy", seed=1)
    b = bp.MLP([4, 6, 2], dtype="float64", backend="numpy", seed=1)
    history = a.fit(X, T, epochs=1, batch_size=8, shuffle=False, optimizer=bp.SGD(0.05))
    opt = bp.SGD(0.05)
    losses = [b.train_step(X[lo:lo + 8], T[lo:lo + 8], opt) * len(X[lo:lo + 8]) for lo in range(0, 30, 8)]
    assert history.loss[0] == pytest.approx(sum(losses) / 30, rel=1e-12)


@pytest.mark.parametrize("head", ["regression", "multiclass", "binary"])
def test_a_weighted_step_equals_a_step_on_repeated_rows(backend, rng, head):
    """Whole-number weights ``c_i`` act as repetitions: a step on the rows with weights ``c_i batch / sum(c)``
    gives the loss and the parameters of a step on the batch in which row ``i`` appears ``c_i`` times."""
    counts = np.array([1, 3, 2, 1, 4, 2])
    n = len(counts)
    X = rng.normal(size=(n, 4))
    T = {"regression": rng.normal(size=(n, 3)), "multiclass": np.eye(3)[rng.integers(0, 3, n)],
         "binary": rng.integers(0, 2, (n, 3)).astype(np.float64)}[head]
    k = backend.kernels
    results = []
    for x, t, weights in ((X, T, counts * n / counts.sum()), (np.repeat(X, counts, 0), np.repeat(T, counts, 0), None)):
        net = bp.MLP([4, 5, 3], head=head, backend=backend.name, dtype="float64", seed=2)
        guard = Guard(k)
        w = None if weights is None else k.to_device(weights, np.float64)
        step.train_step(net, step.workspace(net, len(x)), k.to_device(x, np.float64), k.to_device(t, np.float64),
                        bp.SGD(0.5, momentum=0.9), guard, weights=w)
        state = guard.read()
        assert not state.failed
        results.append((state.loss_sum, net.get_params()))
    (loss, params), (loss_rep, params_rep) = results
    assert loss == pytest.approx(loss_rep, rel=1e-12)
    for (W, b), (W_rep, b_rep) in zip(params, params_rep):
        np.testing.assert_allclose(W, W_rep, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b, b_rep, rtol=1e-12, atol=1e-14)
    unchanged = bp.MLP([4, 5, 3], head=head, backend=backend.name, dtype="float64", seed=2)
    assert any(not np.array_equal(W, W0) for (W, _), (W0, _) in zip(params, unchanged.get_params()))


def test_workspace_is_made_once_per_batch_size(backend, small):
    net = bp.MLP([4, 5, 3], backend=backend.name)
    assert step.workspace(net, 7) is step.workspace(net, 7)
    assert step.workspace(net, 7) is not step.workspace(net, 6)
    for b in range(10, 10 + step.MAX_WORKSPACES + 2):
        step.workspace(net, b)
    assert len(net.workspaces) == step.MAX_WORKSPACES


def test_workspace_make_buffers_leaves_none_to_make_on_first_use():
    """What a CUDA graph's recording needs: after make_buffers no buffer of the workspace is made later."""
    from functools import cached_property

    net = bp.MLP([4, 5, 3], backend="numpy")
    ws = step.workspace(net, 7)
    lazy = {name for name, attr in vars(step.Workspace).items() if isinstance(attr, cached_property)}
    assert {"delta", "reduced", "x", "t"} <= lazy and not lazy & set(vars(ws))
    ws.make_buffers()
    assert lazy <= set(vars(ws))


def test_gradients_written_to_the_views_land_in_the_flat_buffer(backend, rng):
    net = bp.MLP([4, 5, 3], backend=backend.name, dtype="float64")
    k = backend.kernels
    flat, dW, db = step.gradient_buffers(k, net.dtype, [(L.n_out, L.n_in) for L in net.layers])
    assert [tuple(w.shape) for w in dW] == [(5, 4), (3, 5)] and [tuple(b.shape) for b in db] == [(5,), (3,)]
    weights, biases = [], []
    for i, layer in enumerate(net.layers):
        delta, x = rng.normal(size=(6, layer.n_out)), rng.normal(size=(6, layer.n_in))
        k.weight_gradients(k.to_device(delta, net.dtype), k.to_device(x, net.dtype), dW[i], db[i])
        weights.append((delta.T @ x).ravel())
        biases.append(delta.sum(axis=0))
    # the layout of the parameters: every dE/dW row by row, then every dE/db
    np.testing.assert_allclose(k.to_host(flat), np.concatenate(weights + biases), rtol=1e-12)


def test_layers_are_views_of_the_flat_parameters(backend, rng):
    """Each layer's W and b live in ``net.params`` ([every W | every b]): set_params, an update and an
    in-place change are seen through both, and one optimizer call per piece updates every layer."""
    net = bp.MLP([4, 5, 3], backend=backend.name, dtype="float64")
    k = backend.kernels
    params = [(rng.normal(size=(5, 4)), rng.normal(size=5)), (rng.normal(size=(3, 5)), rng.normal(size=3))]
    net.set_params(params)
    flat = np.concatenate([W.ravel() for W, _ in params] + [b for _, b in params])
    np.testing.assert_array_equal(k.to_host(net.params), flat)
    assert net.n_weights == 35 and net.n_params == 43
    for layer, (W, b) in zip(net.layers, params):
        np.testing.assert_array_equal(k.to_host(layer.W), W)
        np.testing.assert_array_equal(k.to_host(layer.b), b)
    with pytest.raises(AttributeError):
        net.layers[0].W = k.to_device(params[0][0], net.dtype)
    X, T = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))
    _, grads = net.loss_and_grads(X, T)
    net.train_step(X, T, bp.SGD(lr=0.1))
    after = np.concatenate([(W - 0.1 * k.to_host(dW)).ravel() for (W, _), (dW, _) in zip(params, grads)]
                           + [b - 0.1 * k.to_host(db) for (_, b), (_, db) in zip(params, grads)])
    np.testing.assert_allclose(k.to_host(net.params), after, rtol=1e-12)
    np.testing.assert_allclose(k.to_host(net.layers[1].b), after[-3:], rtol=1e-12)



def _step_peak_bytes(net: bp.MLP, batch: int, optimizer: bp.Optimizer, rng: np.random.Generator) -> int:
    """Peak of the memory traced during three steady-state steps at ``batch`` rows."""
    k = net.backend.kernels
    x = k.to_device(rng.normal(size=(batch, net.sizes[0])), net.dtype)
    t = k.to_device(np.eye(net.sizes[-1])[rng.integers(0, net.sizes[-1], batch)], net.dtype)
    ws = step.workspace(net, batch)
    guard = Guard(k)
    for _ in range(3):  # warm-up: workspace, optimizer state, scratch, compiled kernels
        step.train_step(net, ws, x, t, optimizer, guard)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            step.train_step(net, ws, x, t, optimizer, guard)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert not guard.read().failed
    return peak


@pytest.mark.parametrize("opt", [lambda: bp.SGD(0.01), lambda: bp.SGD(0.01, momentum=0.9, weight_decay=1e-4),
                                 lambda: bp.Adam(1e-3, weight_decay=1e-4)], ids=["sgd", "momentum", "adam"])
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "leaky_relu", "softplus"])
@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_a_steady_state_step_allocates_no_arrays(name, act, opt, rng):
    """After warm-up a step allocates no array: what is traced is NumPy's bounded ufunc iteration buffers
    (at most 8192 elements each) and a few Python objects, the same at 256 rows as at 4096, where a
    single (batch, 10) temporary would add 160 KB."""
    try:
        small = bp.MLP([64, 128, 128, 10], activation=act, head="multiclass", backend=name)
        large = bp.MLP([64, 128, 128, 10], activation=act, head="multiclass", backend=name)
    except ValueError as exc:
        pytest.skip(str(exc))
    peak_small = _step_peak_bytes(small, 256, opt(), rng)
    peak_large = _step_peak_bytes(large, 4096, opt(), rng)
    assert peak_large < 128 * 1024, f"a steady-state step at 4096 rows allocated {peak_large} bytes"
    assert peak_large - peak_small < 64 * 1024, (
        f"what a step allocates grows with the batch: {peak_small} bytes at 256 rows, {peak_large} at 4096")


# --------------------------------------------------------------------------- no copies to the host
@pytest.fixture
def host_copies(monkeypatch):
    """Sizes (in elements) of every array the numba-cuda simulator copies from the device to the host."""
    pytest.importorskip("numba")
    from numba import config

    if not config.ENABLE_CUDASIM:
        pytest.skip("checks the copies of the CUDA simulator")
    from numba.cuda.simulator.cudadrv import devicearray

    sizes: list[int] = []
    original = devicearray.FakeCUDAArray.copy_to_host

    def spy(self, *args, **kwargs):
        sizes.append(int(np.prod(self.shape)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(devicearray.FakeCUDAArray, "copy_to_host", spy)
    return sizes


def test_public_methods_on_device_arrays_copy_no_array_to_the_host(host_copies, rng):
    """forward, loss, loss_and_grads, train_step and fit on device arrays read back scalars and the few
    numbers of a check (the guard, array_stats), never the data."""
    try:
        net = bp.MLP([5, 4, 3], head="multiclass", backend="numba-cuda", dtype="float32")
    except ValueError as exc:
        pytest.skip(str(exc))
    k = net.backend.kernels
    X = k.to_device(rng.normal(size=(12, 5)), np.float32)
    labels = k.to_device(rng.integers(0, 3, 12).astype(np.float32), np.float32)
    T = k.to_device(np.eye(3)[rng.integers(0, 3, 12)], np.float32)
    host_copies.clear()
    y = net.forward(X)
    assert k.owns(y)
    net.loss(X, labels)
    net.loss_and_grads(X, T)
    net.train_step(X, T, bp.SGD(0.1))
    net.fit(X, labels, epochs=2, batch_size=4, optimizer=bp.SGD(0.1, momentum=0.9))
    assert host_copies, "the spy saw no copy at all: it is not watching the right method"
    assert max(host_copies) <= 8, f"copied arrays of {sorted(set(host_copies))} elements to the host"


@pytest.mark.cuda
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in_order"])
def test_fit_streams_data_that_does_not_fit_the_device_and_trains_the_same(monkeypatch, rng, shuffle):
    """Over the memory budget the training set stays on the host and goes over in chunks of whole
    minibatches: the same minibatches, so the same parameters, as when it is kept on the device."""
    from backprop import staging

    X = rng.normal(size=(23, 4))
    y = rng.integers(0, 3, 23)
    try:
        nets = [bp.MLP([4, 5, 3], head="multiclass", backend="numba-cuda", seed=1) for _ in range(2)]
    except ValueError as exc:
        pytest.skip(str(exc))
    kept = nets[0].fit(X, y, epochs=1, batch_size=6, shuffle=shuffle, optimizer=bp.SGD(0.1, momentum=0.9))
    made = []
    monkeypatch.setattr(staging, "fits_on_device", lambda kernels, nbytes: False)
    monkeypatch.setattr(staging, "STREAM_CHUNK_BYTES", 2 * 6 * (4 + 3) * 4)  # two minibatches a chunk
    original = staging.Batches.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(staging.Batches, "__init__", spy)
    streamed = nets[1].fit(X, y, epochs=1, batch_size=6, shuffle=shuffle, optimizer=bp.SGD(0.1, momentum=0.9))
    assert made and not made[0].resident
    assert streamed.loss == kept.loss
    for (W, b), (W0, b0) in zip(nets[1].get_params(), nets[0].get_params()):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)
