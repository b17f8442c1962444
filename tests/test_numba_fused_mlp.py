"""The fused narrow-network kernels of the Numba CPU backend (``backprop.kernels.numba_cpu.fused_mlp`` and its
compiled ``tiles``), against the NumPy reference in float64 on fresh random inputs, in float32 and float64.

1. ``mlp_forward``: every hidden activation, each layer's ``y`` and kept ``u``; the output activations.
2. ``mlp_forward_error``: every (output, loss) pair, with and without row weights: ``delta`` and the mean loss of
   the reference's ``output_error``.
3. ``mlp_backward``: the reference's chain of ``weight_gradients`` and ``delta_backward``, every hidden activation.
4. Batch shapes: tiles made small (``TILE_BYTES``) so that small batches take many tiles and a partial last one;
   one row; no rows.
5. Threads: one and two Numba threads agree to rounding; a thread count gives the same gradient bits every time.
6. Bad input: a ``ValueError`` naming the problem; the networks the kernels do not serve, and why.
7. Through the API: ``MLP.train_step`` with the switch on equals the layer-by-layer step; ``step.passes`` picks
   ``FusedPasses`` only when it is on.
8. SciPy's BLAS is held at one thread while a pass runs on several, and gets its thread count back after.

Every output buffer starts as NaN, so that an element a kernel does not write shows.
"""

from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop import step
from backprop.kernels import numpy_ref as ref
from backprop.kernels.registry import ACTIVATIONS, LOSSES, loss_outputs

from .conftest import targets_for, tolerance
from .reference_net import Net

numba = pytest.importorskip("numba")
pytest.importorskip("scipy")
from backprop.kernels import numba_cpu as K  # noqa: E402  (needs numba)
from backprop.kernels.numba_cpu import fused_mlp  # noqa: E402

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
HIDDEN = [n for n, a in ACTIVATIONS.items() if a.hidden and n != "softmax"]
#: Every (output, loss) pair the backend's output_error accepts.
PAIRS = sorted((o, loss) for loss in LOSSES for o in loss_outputs(loss))
#: Rows of a tile under the ``small_tiles`` fixture.
TILE = 16
two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba has one thread here")


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of :data:`TILE` rows whatever the widths, so that a batch of tens of rows takes several tiles; what
    the passes then ran on: ``{"tiles": [...], "chunks": [...]}``, one entry per call."""
    ran: dict[str, list[int]] = {"tiles": [], "chunks": []}
    checked, chunks = fused_mlp._checked, fused_mlp._chunks

    def spy_checked(*args):
        got = checked(*args)
        ran["tiles"].append(got[3])
        return got

    def spy_chunks(*args):
        got = chunks(*args)
        ran["chunks"].append(got)
        return got

    monkeypatch.setattr(fused_mlp, "TILE_BYTES", 1)
    monkeypatch.setattr(fused_mlp, "_checked", spy_checked)
    monkeypatch.setattr(fused_mlp, "_chunks", spy_chunks)
    return ran


@pytest.fixture
def numba_threads():
    """Numba's thread count, put back after the test."""
    before = numba.get_num_threads()
    yield numba.set_num_threads
    numba.set_num_threads(before)


def _spec(net):
    return net.sizes, net.acts, net.alphas, net.keep_u


def _buffers(net, rows, fill=np.nan):
    """``y_flat`` and ``u_flat`` for ``rows`` (the workspace's layout: a ``(rows, n)`` block per layer, layer after
    layer; ``u`` only of the layers that keep it), filled with ``fill``."""
    widths = net.sizes[1:]
    ny = rows * sum(widths)
    nu = rows * sum(n for n, keep in zip(widths, net.keep_u) if keep)
    return np.full(ny, fill, net.dtype), np.full(max(nu, 1), fill, net.dtype)


def _blocks(flat, rows, widths, kept):
    """Each layer's ``(rows, n)`` block of a flat buffer (``None`` for a layer not ``kept`` there)."""
    out, off = [], 0
    for n, keep in zip(widths, kept):
        out.append(flat[off:off + rows * n].reshape(rows, n) if keep else None)
        off += rows * n if keep else 0
    return out


def _data(rng, net, rows):
    """Inputs in the network's dtype."""
    return rng.normal(size=(rows, net.sizes[0])).astype(net.dtype)


def _forward(net, x):
    """The fused forward pass into NaN-filled buffers: each layer's ``y`` and ``u`` (``None`` where not kept),
    and the flat buffers."""
    rows = x.shape[0]
    y_flat, u_flat = _buffers(net, rows)
    K.mlp_forward(x, net.params.astype(net.dtype), *_spec(net), y_flat, u_flat)
    widths = net.sizes[1:]
    return _blocks(y_flat, rows, widths, [True] * len(widths)), _blocks(u_flat, rows, widths, net.keep_u), (
        y_flat, u_flat)


def _reference_buffers(net, x):
    """The reference's forward pass, rounded to the network's dtype: each layer's ``y`` and ``u`` in float64, and
    the same in the flat buffers the backward pass reads."""
    ys, us = net.forward(x.astype(np.float64))
    ys = [y.astype(net.dtype).astype(np.float64) for y in ys]
    us = [u.astype(net.dtype).astype(np.float64) for u in us]
    rows = x.shape[0]
    y_flat, u_flat = _buffers(net, rows)
    widths = net.sizes[1:]
    for block, y in zip(_blocks(y_flat, rows, widths, [True] * len(widths)), ys):
        block[...] = y
    for block, u in zip(_blocks(u_flat, rows, widths, net.keep_u), us):
        if block is not None:
            block[...] = u
    return ys, us, y_flat, u_flat


def _backward(net, x, y_flat, u_flat, delta):
    """The fused backward pass into a NaN-filled gradient buffer."""
    grads = np.full(net.params.size, np.nan, net.dtype)
    K.mlp_backward(x, net.params.astype(net.dtype), *_spec(net), y_flat, u_flat, delta.astype(net.dtype), grads)
    return grads


def _check_forward(net, x):
    ys, us, (y_flat, u_flat) = _forward(net, x)
    want_y, want_u = net.forward(x.astype(np.float64))
    tol = tolerance(net.dtype)
    for i, (y, u, wy, wu) in enumerate(zip(ys, us, want_y, want_u)):
        np.testing.assert_allclose(y, wy, **tol, err_msg=f"y of layer {i + 1}")
        if net.keep_u[i]:
            np.testing.assert_allclose(u, wu, **tol, err_msg=f"u of layer {i + 1}")
    assert not np.isnan(y_flat).any() and (x.shape[0] == 0 or not np.isnan(u_flat).any())


def _check_backward(net, rng, x):
    ys, us, y_flat, u_flat = _reference_buffers(net, x)
    rows = x.shape[0]
    delta = rng.normal(size=(rows, net.sizes[-1])).astype(net.dtype).astype(np.float64) / max(rows, 1)
    got = _backward(net, x, y_flat, u_flat, delta)
    want = net.backward(x.astype(np.float64), ys, us, delta)
    _assert_gradients_close(got, want, net.dtype)
    return got


def _assert_gradients_close(got, want, dtype):
    """Within the dtype's tolerance, relative to the largest gradient (a sum over the batch cancels)."""
    tol = tolerance(dtype)
    scale = np.max(np.abs(want)) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale)


# --------------------------------------------------------------------------- 1. forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", HIDDEN)
def test_forward_every_hidden_activation(rng, small_tiles, act, dtype):
    """Each layer's y and kept u (GELU and SiLU keep u), 45 rows in tiles of 16: three tiles, the last short."""
    net = Net(rng, [7, 24, 16, 3], [act, act, "identity"], dtype)
    _check_forward(net, _data(rng, net, 45))
    assert small_tiles["tiles"] == [TILE]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output", ["identity", "sigmoid", "softmax", "tanh", "exp"])
def test_forward_outputs(rng, small_tiles, output, dtype):
    net = Net(rng, [6, 16, 10], ["gelu", output], dtype)
    _check_forward(net, _data(rng, net, 37))


# --------------------------------------------------------------------------- 2. forward with the error
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("output,loss", PAIRS)
def test_forward_with_the_error_at_the_output(rng, small_tiles, output, loss, weighted, dtype):
    """``delta^L`` and the mean loss of the reference's ``output_error`` on the reference's forward pass, 70 rows
    in tiles of 16 (the loss summed per chunk, then over the chunks), and the forward pass itself."""
    rows, n_out = 70, 4
    net = Net(rng, [5, 16, n_out], ["tanh", output], dtype)
    x = _data(rng, net, rows)
    t = targets_for(rng, loss, rows, n_out).astype(dtype)
    weights = rng.uniform(0.2, 2.0, rows).astype(dtype) if weighted else None
    param = 0.7 if loss == "huber" else 0.0
    y_flat, u_flat = _buffers(net, rows)
    delta, value = np.full((rows, n_out), np.nan, dtype), np.full((), np.nan, dtype)
    K.mlp_forward_error(x, net.params.astype(dtype), *_spec(net), y_flat, u_flat, t, loss, param, delta=delta,
                        value=value, weights=weights)
    ys, us = net.forward(x.astype(np.float64))
    w64 = None if weights is None else weights.astype(np.float64)
    want_value, want_delta = ref.output_error(ys[-1], us[-1], t.astype(np.float64), output, loss, param,
                                              net.alphas[-1], weights=w64)
    tol = tolerance(dtype)
    np.testing.assert_allclose(_blocks(y_flat, rows, net.sizes[1:], [True, True])[-1], ys[-1], **tol)
    np.testing.assert_allclose(delta, want_delta, rtol=tol["rtol"], atol=tol["atol"] / rows)
    np.testing.assert_allclose(value, float(want_value), **tol)
    assert small_tiles["chunks"][-1] == min(numba.get_num_threads(), -(-rows // TILE))


# --------------------------------------------------------------------------- 3. backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", HIDDEN)
def test_backward_every_hidden_activation(rng, small_tiles, act, dtype):
    """The gradients of every layer from a random ``delta^L``, on the reference's y and u (GELU's and SiLU's
    slopes read the kept u), 45 rows in tiles of 16."""
    net = Net(rng, [7, 24, 16, 3], [act, act, "identity"], dtype)
    _check_backward(net, rng, _data(rng, net, 45))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_error_backward_chain(rng, small_tiles, dtype):
    """The three passes as a step runs them: the fused forward pass with the error, then the backward pass on
    what it wrote; the reference's gradients of the loss."""
    rows = 50
    net = Net(rng, [6, 20, 12, 4], ["silu", "leaky_relu", "softmax"], dtype)
    x = _data(rng, net, rows)
    t = targets_for(rng, "cross_entropy", rows, 4).astype(dtype)
    y_flat, u_flat = _buffers(net, rows)
    delta, value = np.full((rows, 4), np.nan, dtype), np.full((), np.nan, dtype)
    p = net.params.astype(dtype)
    K.mlp_forward_error(x, p, *_spec(net), y_flat, u_flat, t, "cross_entropy", delta=delta, value=value)
    grads = np.full(p.size, np.nan, dtype)
    K.mlp_backward(x, p, *_spec(net), y_flat, u_flat, delta, grads)
    ys, us = net.forward(x.astype(np.float64))
    _, want_delta = ref.output_error(ys[-1], us[-1], t.astype(np.float64), "softmax", "cross_entropy")
    _assert_gradients_close(grads, net.backward(x.astype(np.float64), ys, us, want_delta), dtype)


# --------------------------------------------------------------------------- 4. batch shapes
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 33, 100])
def test_batch_shapes(rng, small_tiles, rows, dtype):
    """Batches of one tile or less, a whole number of tiles, and many tiles with a short last one."""
    net = Net(rng, [9, 40, 8, 5], ["tanh", "gelu", "sigmoid"], dtype)
    x = _data(rng, net, rows)
    _check_forward(net, x)
    _check_backward(net, rng, x)
    assert small_tiles["tiles"] == [TILE, TILE]
    assert small_tiles["chunks"] == [min(numba.get_num_threads(), -(-rows // TILE))] * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_tiles_one_tile(rng, dtype):
    """At the default tile size a small batch is one tile on one thread."""
    net = Net(rng, [9, 40, 8, 5], ["relu", "selu", "identity"], dtype)
    assert fused_mlp.tile_rows(net.sizes, dtype) >= 128
    x = _data(rng, net, 45)
    _check_forward(net, x)
    _check_backward(net, rng, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_rows(rng, dtype):
    """An empty batch: the passes write nothing but zero gradients, and the mean loss of no rows is NaN, as the
    layer-by-layer ``output_error`` and the reference give (a network refuses empty batches before)."""
    net = Net(rng, [5, 16, 3], ["tanh", "softmax"], dtype)
    x = np.zeros((0, 5), dtype)
    p = net.params.astype(dtype)
    y_flat, u_flat = _buffers(net, 0)
    K.mlp_forward(x, p, *_spec(net), y_flat, u_flat)
    delta, value = np.zeros((0, 3), dtype), np.full((), np.nan, dtype)
    K.mlp_forward_error(x, p, *_spec(net), y_flat, u_flat, np.zeros((0, 3), dtype), "cross_entropy",
                        delta=delta, value=value)
    assert np.isnan(value)
    grads = np.full(p.size, np.nan, dtype)
    K.mlp_backward(x, p, *_spec(net), y_flat, u_flat, delta, grads)
    assert np.array_equal(grads, np.zeros_like(grads))


# --------------------------------------------------------------------------- 5. threads
@two_threads
@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_agree_and_gradients_are_deterministic(rng, small_tiles, numba_threads, dtype):
    """100 rows in 7 tiles: on one thread one chunk, on two threads two chunks summed in a fixed order. The
    passes agree to rounding, and each thread count gives the same gradient bits on every call."""
    rows = 100
    net = Net(rng, [8, 32, 24, 5], ["tanh", "silu", "identity"], dtype)
    x = _data(rng, net, rows)
    _, _, y_ref, u_ref = _reference_buffers(net, x)
    delta = rng.normal(size=(rows, 5)) / rows
    got = {}
    for threads in (1, 2):
        numba_threads(threads)
        fwd = _forward(net, x)[2]
        grads = [_backward(net, x, y_ref, u_ref, delta) for _ in range(2)]
        assert np.array_equal(grads[0], grads[1]), f"two calls on {threads} threads differ"
        got[threads] = fwd, grads[0]
    assert small_tiles["chunks"][0] == 1 and small_tiles["chunks"][-1] == 2
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-13, "atol": 1e-14}
    for a, b in zip(got[1][0], got[2][0]):
        np.testing.assert_allclose(a, b, **tol)
    scale = np.max(np.abs(got[1][1]))
    np.testing.assert_allclose(got[1][1], got[2][1], rtol=tol["rtol"], atol=tol["atol"] * scale)


# --------------------------------------------------------------------------- 6. bad input
def test_reasons():
    reason = fused_mlp.fused_mlp_reason
    assert reason([64] * 7, ["relu"] * 5 + ["identity"], np.float32) == ""
    assert reason([32, 128, 128, 1], ["tanh"] * 2 + ["sigmoid"], np.float64) == ""
    assert reason([4, 16, 3], ["gelu", "softmax"], np.float32) == ""
    assert "width 129" in reason([4, 129, 3], ["relu", "identity"], np.float32)
    assert "width 256" in reason([256, 16, 3], ["relu", "identity"], np.float32)
    assert "float16" in reason([4, 16, 3], ["relu", "identity"], np.float16)
    assert "'softmax' in layer 1" in reason([4, 16, 3], ["softmax", "identity"], np.float32)
    assert K.fused_mlp_reason is reason and K.CAPABILITIES.fused_mlp


@pytest.mark.parametrize("sizes,acts,dtype,match", [
    ([4, 129, 3], ["relu", "identity"], np.float32, "width 129"),
    ([4, 16, 3], ["softmax", "identity"], np.float64, "'softmax' in layer 1"),
    ([4, 16, 3], ["relu", "identity"], np.float16, "float16"),
])
def test_networks_not_served(rng, sizes, acts, dtype, match):
    net = Net(rng, sizes, acts, dtype)
    x = _data(rng, net, 3)
    y_flat, u_flat = _buffers(net, 3)
    with pytest.raises(ValueError, match=f"do not serve this network: .*{match}"):
        K.mlp_forward(x, net.params.astype(dtype), *_spec(net), y_flat, u_flat)
    with pytest.raises(ValueError, match=match):
        K.mlp_backward(x, net.params.astype(dtype), *_spec(net), y_flat, u_flat, np.zeros((3, 3), dtype),
                       np.zeros(net.params.size, dtype))
    assert np.isnan(y_flat).all()


def _bad_forward_cases(net, rows):
    """(what changes, the error's words): each breaks one argument of mlp_forward."""
    dt = net.dtype
    y_flat, u_flat = _buffers(net, rows)
    x = np.zeros((rows, net.sizes[0]), dt)
    return [
        (dict(x=np.zeros((rows, net.sizes[0] + 1), dt)), "x must be"),
        (dict(x=x.astype(np.float64)), "x must be"),
        (dict(x=np.asfortranarray(np.zeros((rows, net.sizes[0]), dt))), "x must be"),
        (dict(x=x.tolist()), "x must be"),
        (dict(y_flat=y_flat[:-1]), "y_flat must be .* at least"),
        (dict(y_flat=y_flat.astype(np.float64)), "y_flat must be"),
        (dict(u_flat=u_flat[:-1]), "u_flat must be .* at least"),
        (dict(params=net.params.astype(dt)[:-1]), "params must be"),
        (dict(acts=net.acts[:-1]), "as many activations"),
    ]


def test_bad_input_forward(rng):
    net = Net(rng, [5, 8, 3], ["gelu", "identity"], np.float32)
    rows = 20
    for change, match in _bad_forward_cases(net, rows):
        args = dict(x=np.zeros((rows, 5), np.float32), params=net.params.astype(np.float32), sizes=net.sizes,
                    acts=net.acts, alphas=net.alphas, keep_u=net.keep_u)
        args["y_flat"], args["u_flat"] = _buffers(net, rows)
        args.update(change)
        with pytest.raises(ValueError, match=match):
            K.mlp_forward(**args)
        with pytest.raises(ValueError, match=match):
            K.mlp_backward(**args, delta=np.zeros((rows, 3), np.float32), grads=np.zeros(net.params.size, np.float32))
    with pytest.raises(TypeError, match="params must be a NumPy array"):
        K.mlp_forward(np.zeros((rows, 5), np.float32), list(net.params), *_spec(net), *_buffers(net, rows))


def test_bad_input_backward(rng):
    net = Net(rng, [5, 8, 3], ["tanh", "identity"], np.float64)
    rows = 20
    x, p = np.zeros((rows, 5)), net.params
    y_flat, u_flat = _buffers(net, rows, 0.0)
    good_delta, good_grads = np.zeros((rows, 3)), np.zeros(p.size)
    for delta, grads, match in [(np.zeros((rows, 4)), good_grads, "delta must be"),
                                (np.zeros((rows + 1, 3)), good_grads, "delta must be"),
                                (np.zeros((rows, 3), np.float32), good_grads, "delta must be"),
                                (good_delta, np.zeros(p.size - 1), "grads must be .* at least"),
                                (good_delta, np.zeros(p.size, np.float32), "grads must be"),
                                (good_delta, np.zeros((p.size, 1)), "grads must be")]:
        with pytest.raises(ValueError, match=match):
            K.mlp_backward(x, p, *_spec(net), y_flat, u_flat, delta, grads)
    K.mlp_backward(x, p, *_spec(net), y_flat, u_flat, good_delta, np.full(p.size + 1, np.nan))  # a larger one: fine


def test_bad_input_forward_error(rng):
    net = Net(rng, [5, 8, 3], ["tanh", "sigmoid"], np.float32)
    rows, dt = 20, np.float32
    x, p = np.zeros((rows, 5), dt), net.params.astype(dt)
    good = dict(t=np.zeros((rows, 3), dt), loss="bce", delta=np.zeros((rows, 3), dt), value=np.zeros((), dt),
                weights=None)
    for change, match in [(dict(t=np.zeros((rows, 2), dt)), "t must be"),
                          (dict(t=np.zeros((rows, 3))), "t must be"),
                          (dict(delta=np.zeros((rows - 1, 3), dt)), "delta must be"),
                          (dict(value=np.zeros(1, dt)), "value must be a 0-d"),
                          (dict(value=np.zeros((), np.float64)), "value must be a 0-d"),
                          (dict(weights=np.ones(rows - 1, dt)), "weights must be"),
                          (dict(weights=np.ones(rows)), "weights must be"),
                          (dict(loss="cross_entropy"), "does not go with loss 'cross_entropy'"),
                          (dict(loss="poisson"), "does not go with loss 'poisson'"),
                          (dict(loss="nope"), "unknown loss 'nope'")]:
        args = {**good, **change}
        t = args.pop("t")
        loss = args.pop("loss")
        with pytest.raises(ValueError, match=match):
            K.mlp_forward_error(x, p, *_spec(net), *_buffers(net, rows), t, loss, **args)


# --------------------------------------------------------------------------- 7. through the API
@pytest.fixture
def fused_switch():
    """``set_fused_mlp``, the switch put back as it was after the test (``None``, automatic, included)."""
    before = fused_mlp._fused_on
    try:
        yield K.set_fused_mlp
    finally:
        K.set_fused_mlp(before)


def _two_nets(layers, kwargs, dtype):
    return [bp.MLP(layers, backend="numba", dtype=dtype, seed=3, **kwargs) for _ in range(2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", [lambda: bp.SGD(0.1, momentum=0.9), lambda: bp.Adam(1e-2)],
                         ids=["sgd", "adam"])
@pytest.mark.parametrize("layers,kwargs,targets", [
    ([6, 24, 16, 4], dict(activation="gelu", head="multiclass"), "labels"),
    ([5, 32, 3], dict(activation="tanh", output="identity", loss="huber"), "values"),
], ids=["gelu-softmax", "tanh-huber"])
def test_train_steps_equal_the_layer_by_layer_steps(rng, monkeypatch, fused_switch, layers, kwargs, targets,
                                                    optimizer, dtype):
    """Three steps of the same network from the same parameters, the switch off then on: the losses and the
    parameters agree to rounding, and the fused passes did run (and only with the switch on)."""
    calls: list[str] = []
    for name in ("mlp_forward_error", "mlp_backward"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw)))
    nets = _two_nets(layers, kwargs, dtype)
    assert nets[0].backend.kernels is K
    rows = 45
    batches = [(rng.normal(size=(rows, layers[0])),
                rng.integers(0, layers[-1], rows) if targets == "labels" else rng.normal(size=(rows, layers[-1])))
               for _ in range(3)]
    losses = []
    for net, on in zip(nets, (False, True)):
        fused_switch(on)
        assert isinstance(step.passes(net), step.FusedPasses) == on
        opt = optimizer()
        losses.append([net.train_step(X, T, opt) for X, T in batches])
        assert calls == (["mlp_forward_error", "mlp_backward"] * 3 if on else [])
    tol = tolerance(dtype)
    np.testing.assert_allclose(losses[1], losses[0], **tol)
    np.testing.assert_allclose(nets[1].params, nets[0].params, rtol=tol["rtol"], atol=10 * tol["atol"])


def test_passes_and_describe(fused_switch):
    narrow = bp.MLP([4, 16, 3], head="multiclass", backend="numba")
    wide = bp.MLP([4, 129, 3], head="multiclass", backend="numba")
    fused_switch(False)
    assert not step.fused(narrow) and not step.fused(wide)
    assert "fused narrow-network" not in narrow.describe()
    fused_switch(True)
    assert K.fused_mlp_enabled()
    assert isinstance(step.passes(narrow), step.FusedPasses)
    assert step.passes(narrow).spec == ((4, 16, 3), ("relu", "softmax"), (0.0, 0.0))
    assert not isinstance(step.passes(wide), step.FusedPasses)
    text = narrow.describe()
    assert "fused narrow-network kernels" in text and K.fused_mlp_path(narrow.dtype) in text
    assert "fused narrow-network" not in wide.describe()
    assert K.fused_mlp_path(np.float64) == f"CPU cores, float64 tiles of {fused_mlp.TILE_BYTES >> 10} KiB (SciPy's BLAS inside)"


@two_threads
def test_by_default_on_exactly_at_one_thread(fused_switch, numba_threads):
    """The default (``None``) follows Numba's thread count: fused on one thread, layer by layer on two; an explicit
    ``True`` or ``False`` holds at any count."""
    net = bp.MLP([4, 16, 3], head="multiclass", backend="numba")
    fused_switch(None)
    for n, want in ((1, True), (2, False), (1, True)):
        numba.set_num_threads(n)
        assert K.fused_mlp_enabled() is want and step.fused(net) is want
    for setting in (True, False):
        fused_switch(setting)
        for n in (1, 2):
            numba.set_num_threads(n)
            assert K.fused_mlp_enabled() is setting


# --------------------------------------------------------------------------- 8. SciPy's BLAS threads
@two_threads
def test_scipy_blas_held_at_one_thread_and_given_back(rng, monkeypatch, small_tiles, numba_threads):
    """While a pass runs on two Numba threads SciPy's BLAS (what the compiled code calls) runs on one; after it,
    on as many as before."""
    libs = fused_mlp.COMPILED_BLAS._find()
    if not libs:
        pytest.skip("threadpoolctl does not see SciPy's BLAS here")
    before = [lib.num_threads for lib in libs]
    seen: list[list[int]] = []
    for name in ("_mlp_forward_tiles", "_mlp_backward_tiles", "_sum_chunks"):
        real = getattr(fused_mlp, name)
        monkeypatch.setattr(fused_mlp, name, lambda *a, _real=real: (
            seen.append([lib.num_threads for lib in libs]), _real(*a))[1])
    try:
        for lib in libs:
            lib.set_num_threads(2)
        if any(lib.num_threads != 2 for lib in libs):
            pytest.skip("SciPy's BLAS does not take two threads here")
        numba_threads(2)
        net = Net(rng, [8, 16, 4], ["tanh", "identity"], np.float64)
        x = _data(rng, net, 60)
        _, _, (y_flat, u_flat) = _forward(net, x)
        _backward(net, x, y_flat, u_flat, np.ones((60, 4)))
        assert small_tiles["chunks"] == [2, 2]
        assert seen == [[1] * len(libs)] * 3
        assert [lib.num_threads for lib in libs] == [2] * len(libs)
    finally:
        for lib, n in zip(libs, before):
            lib.set_num_threads(n)
