"""cuBLASLt epilogues (kernels/epilogues.py and the cupy backend's use of them).

On the CPU:
* the choice of epilogue for each activation, dtype and shape, and the column-major operands of each GEMM,
  checked against NumPy;
* the backend's calls through a model of cuBLASLt on the fake CuPy of test_cupy_backend, against numpy_ref,
  and the fallbacks.
On a GPU (``gpu``): each epilogue against numpy_ref in float64, on poisoned memory.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from backprop.kernels import epilogues as E
from backprop.kernels import numpy_ref as ref
from tests import test_graph as colmajor_ref
from tests.test_cupy_backend import (  # noqa: F401 - fixtures
    _Fake,
    _fake_batch,
    _load_fake,
    _unload_fake,
    host,
    k,
    poisoned_memory,
    sum_tol,
    tol,
)

DTYPES = [np.float32, np.float64]


# --------------------------------------------------------------------------- the choices
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_epilogue_per_activation(dtype):
    assert E.forward_epilogue("identity", False, 7, dtype) == ("BIAS", "")
    assert E.forward_epilogue("relu", False, 7, dtype) == ("RELU_BIAS", "")
    assert E.forward_epilogue("relu", False, 7, dtype, mask=True) == ("RELU_AUX_BIAS", "")
    assert E.forward_epilogue("gelu_tanh", False, 7, dtype) == ("GELU_BIAS", "")
    assert E.forward_epilogue("gelu_tanh", True, 16, dtype) == ("GELU_AUX_BIAS", "")
    for act, keep, n, why in [("identity", True, 8, "kept"), ("relu", True, 8, "bit mask"),
                              ("gelu_tanh", True, 12, "multiple of 8"), ("gelu", False, 8, "exact"),
                              ("tanh", False, 8, "no cuBLASLt epilogue computes tanh")]:
        choice = E.forward_epilogue(act, keep, n, dtype)
        assert choice.epilogue is None and why in choice.reason, (act, choice)


def test_no_epilogue_for_other_dtypes():
    for choice in (E.forward_epilogue("relu", False, 8, np.float16), E.gradient_epilogue(64, np.float16),
                   E.backward_epilogue("relu", 8, 8, np.float16, True)):
        assert choice.epilogue is None and "float16" in choice.reason


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_and_gradient_epilogues(dtype):
    assert E.backward_epilogue("relu", 4, 5, dtype, mask=True) == ("DRELU", "")
    assert "no ReLU mask" in E.backward_epilogue("relu", 4, 5, dtype).reason
    assert E.backward_epilogue("gelu_tanh", 4, 16, dtype) == ("DGELU", "")
    assert "multiple of 8" in E.backward_epilogue("gelu_tanh", 4, 12, dtype).reason
    assert "k = n_out > 1" in E.backward_epilogue("relu", 1, 5, dtype, mask=True).reason
    assert E.backward_epilogue("identity", 4, 5, dtype).epilogue is None
    assert E.backward_epilogue("gelu", 4, 16, dtype).epilogue is None
    assert E.gradient_epilogue(2, dtype) == ("BGRADB", "")
    assert "batch > 1" in E.gradient_epilogue(1, dtype).reason


def test_epilogue_codes_are_cublaslt_values():
    # cublasLt.h: the activation bits (RELU 2, GELU 32), BIAS 4, AUX 128, the gradient forms and BGRAD's
    assert E.EPILOGUE["RELU_AUX_BIAS"] == 2 | 4 | 128 and E.EPILOGUE["GELU_AUX_BIAS"] == 32 | 4 | 128
    assert E.EPILOGUE["DRELU"] == 8 | 128 and E.EPILOGUE["DGELU"] == 64 | 128 and E.EPILOGUE["BGRADB"] == 512


@pytest.mark.parametrize("n,batch", [(1, 1), (64, 3), (128, 5), (129, 2), (1000, 7)])
def test_relu_mask_layout(n, batch):
    ld, nbytes = E.relu_mask_layout(n, batch)
    assert ld % 128 == 0 and ld >= n and ld - n < 128
    assert nbytes == ld // 8 * batch


def _run(ops: E.Operands, arrays: dict) -> np.ndarray:
    """``op(A) op(B)`` read column-major from the row-major arrays the operands name."""
    a = colmajor_ref.colmajor(arrays[ops.a].ravel(), *ops.a_shape(), ops.lda)
    b = colmajor_ref.colmajor(arrays[ops.b].ravel(), *ops.b_shape(), ops.ldb)
    return (a.T if ops.trans_a else a) @ (b.T if ops.trans_b else b)


@pytest.mark.parametrize("batch,n_in,n_out", [(5, 3, 4), (1, 7, 2), (9, 1, 1)])
def test_operands_compute_the_row_major_results(rng, batch, n_in, n_out):
    """Each call's column-major D, stored with its ldd, is the row-major result the primitive wants."""
    x, W, delta = rng.normal(size=(batch, n_in)), rng.normal(size=(n_out, n_in)), rng.normal(size=(batch, n_out))
    arrays = {"x": x, "x_prev": x, "W": W, "delta": delta}
    for ops, want in [(E.forward_operands(batch, n_in, n_out), x @ W.T), (E.backward_operands(batch, n_out, n_in),
                                                                          delta @ W),
                      (E.gradient_operands(batch, n_out, n_in), delta.T @ x)]:
        d = np.empty(want.size)
        colmajor_ref.colmajor(d, ops.m, ops.n, ops.ldd)[...] = _run(ops, arrays)
        np.testing.assert_allclose(d.reshape(want.shape), want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- through a model of cuBLASLt
@pytest.fixture
def lt(monkeypatch):
    """The cupy backend on the fake CuPy and fake nvmath-python (cuBLAS and cuBLASLt), epilogues on."""
    module = _load_fake(monkeypatch, nvmath=True)
    module.set_epilogues(True)
    yield module
    _unload_fake()


def _dev(mod, dt, *arrays):
    return [mod.to_device(a, dt) for a in arrays]


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_epilogues_match_reference(lt, rng, dtype):
    x, W, b = rng.normal(size=(9, 6)), rng.normal(size=(16, 6)) / 2, rng.normal(size=16)
    for act, keep, epilogue in [("identity", False, "BIAS"), ("relu", False, "RELU_BIAS"),
                                ("gelu_tanh", False, "GELU_BIAS"), ("gelu_tanh", True, "GELU_AUX_BIAS")]:
        _Fake.lt_calls.clear()
        _Fake.launches.clear()
        y, u = lt.layer_forward(*_dev(lt, dtype, x, W, b), act, 0.0, keep)
        y_ref, u_ref = ref.layer_forward(x, W, b, act, 0.0, keep)
        assert [c[0] for c in _Fake.lt_calls] == [epilogue] and not _Fake.launches, act
        np.testing.assert_allclose(host(lt, y), y_ref, **tol(dtype))
        if keep:
            np.testing.assert_allclose(host(lt, u), u_ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_mask_carries_the_slope_to_the_backward_gemm(lt, rng, dtype):
    """RELU_AUX_BIAS writes the mask, DRELU reads it for that y only; another y takes the slope kernel."""
    batch, n_in, n_mid, n_out = 11, 5, 130, 3
    x, W1, b1 = rng.normal(size=(batch, n_in)), rng.normal(size=(n_mid, n_in)), rng.normal(size=n_mid)
    W2, delta = rng.normal(size=(n_out, n_mid)), rng.normal(size=(batch, n_out))
    mask = lt.layer_aux("relu", batch, n_mid, dtype)
    assert isinstance(mask, lt.ReluMask) and mask.bits.nbytes == E.relu_mask_layout(n_mid, batch)[1]
    y, _ = lt.layer_forward(*_dev(lt, dtype, x, W1, b1), "relu", aux=mask)
    assert [c[0] for c in _Fake.lt_calls] == ["RELU_AUX_BIAS"] and mask.source is not None
    y_ref, _ = ref.layer_forward(x, W1, b1, "relu")
    _Fake.lt_calls.clear()
    _Fake.launches.clear()
    g = lt.delta_backward(*_dev(lt, dtype, delta, W2), y, None, "relu", aux_prev=mask)
    assert [c[0] for c in _Fake.lt_calls] == ["DRELU"] and not _Fake.launches
    want = ref.delta_backward(delta, W2, y_ref, None, "relu")
    np.testing.assert_allclose(host(lt, g), want, **sum_tol(dtype, n_out, 1.0))
    # a y the mask was not written with: the GEMM and the slope kernel, from y itself
    _Fake.lt_calls.clear()
    other = lt.to_device(y_ref[::-1].copy(), dtype)
    g2 = lt.delta_backward(*_dev(lt, dtype, delta, W2), other, None, "relu", aux_prev=mask)
    assert not _Fake.lt_calls and "bp_slope_relu" in _Fake.launches
    np.testing.assert_allclose(host(lt, g2), ref.delta_backward(delta, W2, y_ref[::-1], None, "relu"),
                               **sum_tol(dtype, n_out, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dgelu_and_bgradb_match_reference(lt, rng, dtype):
    batch, n_prev, n_out = 10, 16, 4
    delta, W = rng.normal(size=(batch, n_out)), rng.normal(size=(n_out, n_prev))
    u_prev = rng.normal(size=(batch, n_prev))
    y_prev = ref.activate(u_prev, "gelu_tanh", 0.0)
    g = lt.delta_backward(*_dev(lt, dtype, delta, W, y_prev, u_prev), "gelu_tanh")
    np.testing.assert_allclose(host(lt, g), ref.delta_backward(delta, W, y_prev, u_prev, "gelu_tanh"),
                               **sum_tol(dtype, n_out, 1.0))
    dW, db = lt.weight_gradients(*_dev(lt, dtype, delta, y_prev))
    rW, rb = ref.weight_gradients(delta, y_prev)
    assert [c[0] for c in _Fake.lt_calls] == ["DGELU", "BGRADB"] and not _Fake.launches
    assert not _Fake.blas_calls  # no GEMV for db
    np.testing.assert_allclose(host(lt, dW), rW, **sum_tol(dtype, batch, 1.0))
    np.testing.assert_allclose(host(lt, db), rb, **sum_tol(dtype, batch, 1.0))


def test_what_no_epilogue_serves_takes_the_kernels(lt, rng):
    """Exact GELU, a GELU aux whose width is not a multiple of 8, k = 1, batch 1, and an epilogue the
    heuristic refuses: the GEMM and kernel path, with the same results, and epilogue_paths says why."""
    dt = np.float32
    x, W, b = rng.normal(size=(6, 5)), rng.normal(size=(12, 5)), rng.normal(size=12)
    _Fake.lt_refused.add(("BIAS", np.dtype(np.float64)))
    cases = [((x, W, b), "gelu", True, dt), ((x, W, b), "gelu_tanh", True, dt), ((x, W, b), "identity", False,
                                                                                 np.float64)]
    for arrays, act, keep, dtype in cases:
        _Fake.lt_calls.clear()
        y, u = lt.layer_forward(*_dev(lt, dtype, *arrays), act, 0.0, keep)
        assert not _Fake.lt_calls, act
        np.testing.assert_allclose(host(lt, y), ref.layer_forward(*arrays, act, 0.0, keep)[0], **tol(dtype))
    paths = lt.epilogue_paths()
    assert "exact" in paths[("forward", "gelu", 12, 6, 5, "f")]
    assert "multiple of 8" in paths[("forward", "gelu_tanh", 12, 6, 5, "f")]
    assert "NOT_SUPPORTED" in paths[("forward", "identity", 12, 6, 5, "d")]
    # batch 1: no BGRADB; the GEMM and the GEMV
    d1, x1 = rng.normal(size=(1, 3)), rng.normal(size=(1, 4))
    _Fake.lt_calls.clear()
    dW, db = lt.weight_gradients(*_dev(lt, dt, d1, x1))
    assert not _Fake.lt_calls
    np.testing.assert_allclose(host(lt, db), d1[0], **tol(dt))


def test_a_misaligned_bias_takes_the_kernels(lt, rng):
    dt = np.float32
    x, W, b = rng.normal(size=(4, 3)), rng.normal(size=(8, 3)), rng.normal(size=9)
    bd = lt.to_device(b, dt)[1:]  # 4 bytes past a 16-byte boundary
    y, _ = lt.layer_forward(*_dev(lt, dt, x, W), bd, "relu")
    assert not _Fake.lt_calls
    np.testing.assert_allclose(host(lt, y), ref.layer_forward(x, W, b[1:], "relu")[0], **tol(dt))
    assert "aligned" in lt.epilogue_paths()[("forward", "relu", 8, 4, 3, "f")]


def test_a_bias_less_aligned_than_its_plans_gets_a_plan_of_its_own(lt, rng):
    """The heuristic chooses for the bias pointer it sees: a later bias that is less aligned (still 16 bytes)
    must not reuse that algorithm (the model of cuBLASLt refuses it), so it gets its own plan."""
    dt = np.float32
    x, W, b = rng.normal(size=(4, 3)), rng.normal(size=(8, 3)), rng.normal(size=72)
    flat = lt.to_device(b, dt)

    def alignment(o: int) -> int:
        ptr = flat.data.ptr + 4 * o
        return ptr & -ptr

    high = next(o for o in range(64) if alignment(o) >= 64)
    low = next(o for o in range(64) if alignment(o) == 16)
    xd, Wd, y = *_dev(lt, dt, x, W), lt.zeros((4, 8), dt)  # the same A, B and D every call: only the bias moves
    for offset in (high, low, high):  # the first plan's bias is better aligned than the second call's
        _Fake.lt_calls.clear()
        lt.layer_forward(xd, Wd, flat[offset:offset + 8], "relu", y=y)
        assert [c[0] for c in _Fake.lt_calls] == ["RELU_BIAS"], offset
        np.testing.assert_allclose(host(lt, y), ref.layer_forward(x, W, b[offset:offset + 8], "relu")[0], **tol(dt))


def test_a_call_cublaslt_refuses_takes_the_kernels(lt, rng, monkeypatch):
    dt = np.float32
    x, W, b = rng.normal(size=(4, 3)), rng.normal(size=(8, 3)), rng.normal(size=8)
    lib = sys.modules["nvmath.bindings.cublasLt"]

    def refuse(*args):
        raise lib.cuBLASLtError("CUBLAS_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(lib, "matmul", refuse)
    y, _ = lt.layer_forward(*_dev(lt, dt, x, W, b), "relu")
    np.testing.assert_allclose(host(lt, y), ref.layer_forward(x, W, b, "relu")[0], **tol(dt))
    assert "refused the call" in lt.epilogue_paths()[("forward", "relu", 8, 4, 3, "f")]
    y2, _ = lt.layer_forward(*_dev(lt, dt, x, W, b), "relu")  # the plan is marked: no second try
    assert "bp_fwd_relu" in _Fake.launches


@pytest.mark.parametrize("hidden,head,dtype", [("relu", "multiclass", "float32"),
                                               ("gelu_tanh", "regression", "float64"), ("relu", "binary", "float64")])
def test_fit_with_epilogues_equals_fit_without(monkeypatch, rng, hidden, head, dtype):
    """fit() with the epilogues reaches the parameters and losses of the GEMM and kernel path to rounding
    (Adam, shuffled minibatches, a short last batch), and predict agrees."""
    from backprop import MLP, Adam

    mod = _load_fake(monkeypatch, nvmath=True)
    try:
        n_out = 1 if head == "binary" else 3
        X, y = _fake_batch(rng, head, batch=37, n_in=6, n_out=n_out)
        results = []
        for on in (False, True):
            mod.set_epilogues(on)
            _Fake.lt_calls.clear()
            net = MLP([6, 16, 24, n_out], activation=hidden, head=head, dtype=dtype, seed=4, backend="cupy")
            hist = net.fit(X, y, epochs=2, batch_size=16, optimizer=Adam(1e-2))
            results.append((hist.loss, host(mod, net.params), net.predict(X)))
            seen = {c[0] for c in _Fake.lt_calls}
            if on:
                fwd, bwd = ("RELU_AUX_BIAS", "DRELU") if hidden == "relu" else ("GELU_AUX_BIAS", "DGELU")
                assert {fwd, bwd, "BGRADB"} <= seen, seen
                assert ("RELU_BIAS" if hidden == "relu" else "GELU_BIAS") in seen  # predict: no aux
            else:
                assert not seen
    finally:
        mod.set_epilogues(False)
        _unload_fake()
    close = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0], results[1]):
        np.testing.assert_allclose(b, a, **close)


def test_graph_records_the_epilogue_calls(lt, rng):
    """fit(graph=True) with the epilogues: the cuBLASLt calls are recorded on the capturing stream and the
    replays give fit()'s parameters, bit for bit."""
    from backprop import MLP, SGD
    from backprop import graph as graphs

    X, y = rng.normal(size=(29, 5)), rng.integers(0, 3, 29)
    nets = [MLP([5, 16, 3], activation="relu", head="multiclass", seed=2, backend="cupy") for _ in range(2)]
    hist = [net.fit(X, y, epochs=2, batch_size=8, optimizer=SGD(0.1, momentum=0.9), graph=g)
            for net, g in zip(nets, (False, True))]
    assert graphs.recorded(nets[1]) == 2
    assert any(capturing for _ep, _s, capturing in _Fake.lt_calls)
    assert hist[0].loss == hist[1].loss
    np.testing.assert_array_equal(host(lt, nets[1].params), host(lt, nets[0].params))


def test_without_nvmath_the_switch_warns_once_and_keeps_the_kernels(monkeypatch, rng):
    mod = _load_fake(monkeypatch, nvmath=False)
    try:
        mod.set_epilogues(True)
        x, W, b = rng.normal(size=(4, 3)), rng.normal(size=(8, 3)), rng.normal(size=8)
        with pytest.warns(RuntimeWarning, match="nvmath-python"):
            y, _ = mod.layer_forward(*_dev(mod, np.float32, x, W, b), "relu")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mod.layer_forward(*_dev(mod, np.float32, x, W, b), "relu")
        np.testing.assert_allclose(host(mod, y), ref.layer_forward(x, W, b, "relu")[0], **tol(np.float32))
    finally:
        mod.set_epilogues(False)
        _unload_fake()


# --------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_epilogues_match_reference(k, rng, poisoned_memory, dtype):  # noqa: F811 - the fixtures imported above
    """Each epilogue path against numpy_ref in float64, on fresh random inputs and poisoned outputs. An
    epilogue cuBLASLt refuses here (float64 ones may be) must fall back, with the same results."""
    batch, n_in, n_mid, n_out = 300, 37, 64, 24
    x, W1, b1 = rng.normal(size=(batch, n_in)), rng.normal(size=(n_mid, n_in)) / 4, rng.normal(size=n_mid)
    W2, delta = rng.normal(size=(n_out, n_mid)) / 4, rng.normal(size=(batch, n_out))
    k.set_epilogues(True)
    try:
        with poisoned_memory():
            for act in ("identity", "relu", "gelu_tanh"):
                keep = act == "gelu_tanh"
                mask = k.layer_aux(act, batch, n_mid, dtype)
                y, u = k.layer_forward(*_dev(k, dtype, x, W1, b1), act, 0.0, keep, aux=mask)
                y_ref, u_ref = ref.layer_forward(x, W1, b1, act, 0.0, keep)
                np.testing.assert_allclose(host(k, y), y_ref, **sum_tol(dtype, n_in, 1.0))
                if act == "identity":
                    continue
                g = k.delta_backward(*_dev(k, dtype, delta, W2), y, u, act, aux_prev=mask)
                np.testing.assert_allclose(host(k, g), ref.delta_backward(delta, W2, y_ref, u_ref, act),
                                           **sum_tol(dtype, n_out, 1.0))
            dW, db = k.weight_gradients(*_dev(k, dtype, delta, x))
            rW, rb = ref.weight_gradients(delta, x)
            np.testing.assert_allclose(host(k, dW), rW, **sum_tol(dtype, batch, 1.0))
            np.testing.assert_allclose(host(k, db), rb, **sum_tol(dtype, batch, 1.0))
        print({key: path for key, path in k.epilogue_paths().items() if key[-1] == np.dtype(dtype).char})
    finally:
        k.set_epilogues(False)


def test_describe_names_each_layers_path(lt, rng):
    """MLP.describe() reads the backend's layer_paths: the epilogue of each GEMM, or why not."""
    from backprop import MLP, SGD

    net = MLP([5, 16, 12, 3], activation=["relu", "gelu"], head="multiclass", seed=1, backend="cupy")
    assert "not run yet" in net.describe()
    net.train_step(rng.normal(size=(8, 5)), rng.integers(0, 3, 8), SGD(0.1))
    lines = net.describe().splitlines()
    assert lines[0] == repr(net) and len(lines) == 4
    assert "forward cuBLASLt RELU_AUX_BIAS" in lines[1] and "gradients cuBLASLt BGRADB" in lines[1]
    assert "backward" not in lines[1]  # nothing below the first layer
    assert "forward GEMM + kernel ('gelu' is exact" in lines[2] and "backward cuBLASLt DRELU" in lines[2]
    assert "backward GEMM + kernel (no cuBLASLt epilogue computes the slope of gelu)" in lines[3]
    assert "(batch 8)" in lines[1]


@gpu
@pytest.mark.parametrize("hidden,dtype", [("relu", "float32"), ("gelu_tanh", "float32"), ("relu", "float64")])
def test_gpu_fit_with_epilogues_equals_fit_without(k, rng, hidden, dtype):  # noqa: F811 - the fixture imported above
    """On the GPU: fit() with the epilogues against fit() without, then the same with graph=True (the cuBLASLt
    calls recorded into the step's graph), to rounding; describe() names the epilogues."""
    from backprop import MLP, SGD

    X, y = rng.normal(size=(300, 24)), rng.integers(0, 4, 300)
    results = []
    for on, graph in ((False, False), (True, False), (True, True)):
        k.set_epilogues(on)
        try:
            net = MLP([24, 64, 32, 4], activation=hidden, head="multiclass", dtype=dtype, seed=3, backend="cupy")
            hist = net.fit(X, y, epochs=2, batch_size=64, optimizer=SGD(0.05, momentum=0.9), graph=graph)
            results.append((hist.loss, host(k, net.params)))
            if on and not graph:
                print(net.describe())
        finally:
            k.set_epilogues(False)
    close = dict(rtol=2e-4, atol=2e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    for other in results[1:]:
        np.testing.assert_allclose(other[0], results[0][0], **close)
        np.testing.assert_allclose(other[1], results[0][1], **close)
