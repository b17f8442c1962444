"""Checks specific to the Numba backends (the shared suite covers each primitive against the reference).

* float32 stays float32 through every kernel: the result dtypes, and the compiled code itself
  (LLVM IR of the CPU kernels, PTX of the CUDA kernels where a CUDA toolkit can compile it);
* in-place updates and ``out=`` buffers write every element (NaN-poisoned buffers, odd sizes,
  the parallel path forced on);
* whole training runs on ``numba`` match ``numpy``;
* ``numba-cuda`` under the CUDA simulator works when asked for by name, and ``"auto"`` never
  picks it; without a GPU it says why it is unavailable; importing it imports no Numba.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

import backprop as bp
from backprop.kernels import ACTIVATIONS, numpy_ref as ref

ROOT = Path(__file__).resolve().parents[1]

numba = pytest.importorskip("numba")
from backprop.kernels import numba_cpu  # noqa: E402  (needs numba)

HIDDEN = [n for n, s in ACTIVATIONS.items() if s.hidden]
ALPHA = {"leaky_relu": 0.05, "elu": 0.7}


def _run_python(code: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT))


def _simulator_backend():
    """The numba-cuda backend if it runs here under the simulator, else skip."""
    from backprop.backend import resolve_backend

    try:
        b = resolve_backend("numba-cuda")
    except ValueError as exc:
        pytest.skip(str(exc))
    if not b.is_simulated:
        pytest.skip("a real GPU: the shared suite covers it")
    return b


# --------------------------------------------------------------------------- float32 stays float32
def _every_primitive(k, dtype, rng, batch=7, n_in=5, n_out=4):
    """Run every primitive of kernel module ``k`` once in ``dtype``; return everything it made."""
    x = k.to_device(rng.normal(size=(batch, n_in)), dtype)
    W = k.to_device(rng.normal(size=(n_out, n_in)), dtype)
    b = k.to_device(rng.normal(size=n_out), dtype)
    t = k.to_device(np.eye(n_out)[rng.integers(0, n_out, batch)], dtype)
    made = {}
    for act in HIDDEN + ["softmax"]:
        made[f"y_{act}"], made[f"u_{act}"] = k.layer_forward(x, W, b, act, ALPHA.get(act, 0.0), True)
    W2 = k.to_device(rng.normal(size=(n_out, n_out)), dtype)
    for act in HIDDEN:
        made[f"delta_{act}"] = k.delta_backward(t, W2, made[f"y_{act}"], made[f"u_{act}"], act, ALPHA.get(act, 0.0))
    for loss, out_act in (("mse", "tanh"), ("mae", "sigmoid"), ("huber", "gelu"), ("bce", "sigmoid"),
                          ("cross_entropy", "softmax")):
        yo, uo = made[f"y_{out_act}"], made[f"u_{out_act}"]
        made[f"loss_{loss}"], made[f"dout_{loss}"] = k.output_error(yo, uo, t, out_act, loss, 1.0, 0.0)
    weights = k.to_device(np.linspace(0.5, 2.0, batch), dtype)
    made["loss_weighted"], made["dout_weighted"] = k.output_error(made["y_softmax"], made["u_softmax"], t, "softmax",
                                                                  "cross_entropy", weights=weights)
    made["dW"], made["db"] = k.weight_gradients(t, x)
    # the same primitives into buffers, as a training step calls them
    yb, ub, gb = k.zeros((batch, n_out), dtype), k.zeros((batch, n_out), dtype), k.zeros((batch, n_out), dtype)
    value, dout = k.zeros((), dtype), k.zeros((batch, n_out), dtype)
    k.layer_forward(x, W, b, "tanh", 0.0, False, y=yb)
    k.layer_forward(x, W, b, "gelu", 0.0, True, y=yb, u=ub)
    k.delta_backward(t, W2, yb, ub, "gelu", 0.0, out=gb)
    k.output_error(yb, ub, t, "gelu", "huber", 1.0, 0.0, delta=dout, value=value)
    made["y_buf"], made["u_buf"], made["g_buf"], made["value_buf"], made["dout_buf"] = yb, ub, gb, value, dout
    guard = k.zeros((4,), np.float64)
    k.guard_step(guard, value, made["dW"], 0.5)
    k.sgd_update(W, made["dW"], 0.1, 0.01, guard)
    k.sgd_update(b, made["db"], 0.1)
    made["W_sgd"], made["b_sgd"] = W, b
    v = k.zeros(W.shape, dtype)
    k.momentum_update(W, made["dW"], v, 0.1, 0.9, True, 0.01, guard)
    made["v"] = v
    m2, v2 = k.zeros(W.shape, dtype), k.zeros(W.shape, dtype)
    k.adam_update(W, made["dW"], m2, v2, 0.01, 0.9, 0.999, 1e-8, 3, 0.01, guard)
    made["m_adam"], made["v_adam"], made["W_adam"] = m2, v2, W
    labels = k.to_device(rng.integers(0, n_out, batch), np.int64)
    made["one_hot"] = k.one_hot(labels, n_out, dtype)
    made["gathered"] = k.gather_rows(x, k.to_device(np.arange(batch)[::-1].copy(), np.int64),
                                     k.zeros((batch, n_in), dtype))
    total = k.zeros((1,), np.float64)
    k.add_sum_of_squares(total, W)
    assert k.array_stats(x).dtype == np.float64
    assert k.array_stats(labels)[4] == 0
    assert isinstance(k.all_finite(W), bool)
    return made


def test_float32_results_stay_float32(rng):
    made = _every_primitive(numba_cpu, np.float32, rng)
    wrong = {name: numba_cpu.to_host(a).dtype for name, a in made.items()
             if a is not None and numba_cpu.to_host(a).dtype != np.float32}
    assert not wrong
    for loss in ("mse", "mae", "huber", "bce", "cross_entropy"):
        assert numba_cpu.to_host(made[f"loss_{loss}"]).shape == ()


_IR_CHECK = r"""
import re, numpy as np
from backprop.kernels import numba_cpu as k
from tests.test_numba_backends import _every_primitive
_every_primitive(k, np.float32, np.random.default_rng(0))
bad = {}
arith = re.compile(r"=\s*(fadd|fsub|fmul|fdiv|frem|fneg|fpext|fcmp\s+\w+)\b[^;]*\bdouble\b")
call = re.compile(r"call[^@]*\bdouble\b[^@]*@(\S+?)\(")
for kern in k.KERNELS:
    if kern in k.FLOAT64_KERNELS:  # float64 by design: the guard's tally, statistics of any dtype
        continue
    for sig in kern.signatures:
        if "float32" not in str(sig):
            continue
        for line in kern.inspect_llvm(sig).splitlines():
            m = call.search(line)
            if arith.search(line) or (m and m.group(1) != "PyFloat_AsDouble"):
                bad.setdefault(kern.__name__, []).append(line.strip()[:200])
print("RESULT", __import__("json").dumps({n: v[:3] for n, v in bad.items()}))
"""


@pytest.mark.exhaustive
def test_float32_cpu_kernels_do_no_float64_arithmetic():
    """No double arithmetic, no fpext, no double-returning math call in the float32 LLVM IR
    (only the unboxing of Python float arguments, ``PyFloat_AsDouble``, which are then cast).

    ``numba_cpu.FLOAT64_KERNELS`` are left out: ``_guard_step`` keeps the float64 guard (its tally
    widens the loss), the sum of squares is float64 by contract, and the statistics read arrays
    of any dtype as float64."""
    with tempfile.TemporaryDirectory() as cache:  # fresh cache: cached code cannot be inspected
        out = _run_python(_IR_CHECK, {"NUMBA_CACHE_DIR": cache, "NUMBA_ENABLE_CUDASIM": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    bad = json.loads(out.stdout.split("RESULT", 1)[1])
    assert not bad, bad


_PTX_CHECK = r"""
import re, sys
from types import SimpleNamespace
try:  # compile PTX without a GPU: name the target instead of asking the (absent) driver
    from numba import types
    from numba.cuda import cuda_paths
    from numba.cuda.cudadrv import nvrtc, nvvm
    import numba.cuda.dispatcher as disp
    nvrtc.get_supported_ccs = lambda: ((7, 5), (8, 0), (8, 6), (8, 9), (9, 0))
    cuda_paths._get_nvrtc_path = lambda: ("patched", None)
    disp.get_current_device = lambda: SimpleNamespace(compute_capability=(9, 0))
    nvvm.NVVM()
    from numba import cuda
    from backprop.kernels import numba_cuda_kernels as K
except Exception as exc:
    print("SKIP", repr(exc)[:300]); sys.exit(0)
f32, f64 = types.float32, types.float64
A2, A1, I, B = f32[:, ::1], f32[::1], types.int64, types.boolean
G, FLAG = f64[::1], types.int32[::1]
ks = K.kernels_for("float32")
sigs = {
    "bias_act": (K.bias_act, (A2, A1, A2, I, f32, B)), "bias_softmax": (K.bias_softmax, (A2, A1, A2, B)),
    "slope_mul": (K.slope_mul, (A2, A2, A2, I, f32)),
    "loss_rows": (K.loss_rows, (A2, A2, A2, A1, B, A2, A1, I, I, B, f32, f32)),
    "sgd": (K.sgd, (A1, A1, f32, f32, G)), "momentum": (K.momentum, (A1, A1, A1, f32, f32, B, f32, G)),
    "adam": (K.adam, (A1, A1, A1, A1, f32, f32, f32, f32, f32, f32, f32, f32, G)),
    "adam_dev": (K.adam_dev, (A1, A1, A1, A1, A1, f32, f32, f32, f32, f32, f32, G)),
    "sgd_probe": (K.sgd_probe, (A1, A1, f32, f32, G)),
    "momentum_probe": (K.momentum_probe, (A1, A1, A1, f32, f32, B, f32, G)),
    "adam_probe": (K.adam_probe, (A1, A1, A1, A1, f32, f32, f32, f32, f32, f32, f32, f32, G)),
    "adam_dev_probe": (K.adam_dev_probe, (A1, A1, A1, A1, A1, f32, f32, f32, f32, f32, f32, G)),
    "count_nonfinite": (K.count_nonfinite, (A1, FLAG)), "guard_scan": (K.guard_scan, (A1, G, FLAG)),
    "one_hot": (K.one_hot, (types.int64[::1], A2)), "gather_rows": (K.gather_rows, (A2, types.int64[::1], A2)),
    "gemm": (ks.gemm, (A2, A2, A2, B, B)), "colsum": (ks.colsum, (A2, A1, f32, B)),
    "mean": (ks.mean, (A1, A1)),
}
# compiled too, but float64 by design: the guard's tally, the sum of squares, the statistics (any
# dtype read as float64), conversions between dtypes
f64_sigs = {
    "guard_update": (K.guard_update, (G, A1, FLAG, f64)), "stats_init": (K.stats_init, (G, I)),
    "stats_flat": (K.stats_flat, (A1, G)), "stats_rows": (K.stats_rows, (A2, G)),
    "cast_flat": (K.cast_flat, (f64[:], A1)), "cast_2d": (K.cast_2d, (f64[:, :], A2)),
    "sum_squares": (K.sum_squares, (A1, G)), "add_to_total": (K.add_to_total, (G, G)),
    "count_correct": (K.count_correct, (A2, A2, B, f32, G)),  # its float64 tally
    "adam_corrections": (K.adam_corrections, (G, A1, f64, f64, f64)),  # one thread's float64 corrections
    "count_step": (K.count_step, (G, G)),  # one thread's float64 count
}
# the updates read the float64 guard once per thread (a load and a compare), and the probes write their
# verdict into it (stores, and the copy of guard[1] into guard[2]); nothing else in f64
GUARD_READ = re.compile(r"^(\.reg \.f64\b|ld\.global(\.nc)?\.f64\b|setp\.\w+\.f64\b|st\.global\.f64\b|"
                        r"mov\.f64\b)")
guarded = ("sgd", "momentum", "adam", "adam_dev", "guard_scan", "sgd_probe", "momentum_probe", "adam_probe",
           "adam_dev_probe")
bad = {}
for name, (kern, sig) in {**sigs, **f64_sigs}.items():
    try:
        ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    except Exception as exc:
        if name == "bias_act":
            print("SKIP", repr(exc)[:300]); sys.exit(0)
        raise
    if name in f64_sigs:
        continue
    f64 = [l.strip() for l in ptx.splitlines() if re.search(r"\.f64\b", l)]
    if name in guarded:
        f64 = [l for l in f64 if not GUARD_READ.match(l)]
    if f64:
        bad[name] = f64[:3]
print("RESULT", __import__("json").dumps(bad))
"""


@pytest.mark.exhaustive
def test_float32_cuda_kernels_compile_to_ptx_without_f64():
    """Every CUDA kernel compiles for a real GPU (sm_90), in float32 with no f64 instruction but the
    read of the float64 guard (the guard's own kernel, the sum of squares, the statistics, the
    dtype conversions and Adam's bias corrections are float64 by design).

    Needs no GPU, only NVVM (a CUDA toolkit); skipped where none is found."""
    pytest.importorskip("numba.cuda")
    out = _run_python(_PTX_CHECK, {"NUMBA_ENABLE_CUDASIM": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"cannot compile PTX here: {out.stdout[5:].strip()}")
    bad = json.loads(out.stdout.split("RESULT", 1)[1])
    assert not bad, bad


# --------------------------------------------------------------------------- every element written
@pytest.fixture(params=["serial", "parallel"])
def threads(request, monkeypatch):
    """Run the CPU kernels on the calling thread only, or force the parallel path on tiny arrays."""
    monkeypatch.setattr(numba_cpu, "PARALLEL_GRAIN", 1 if request.param == "parallel" else 1 << 40)
    return request.param


@pytest.mark.parametrize("batch,n_in,n_out", [(1, 1, 1), (3, 7, 9), (131, 17, 13), (300, 2, 33)])
def test_cpu_kernels_write_every_element(threads, rng, batch, n_in, n_out):
    k = numba_cpu
    tol = {"rtol": 1e-10, "atol": 1e-12}
    x, W, b = rng.normal(size=(batch, n_in)), rng.normal(size=(n_out, n_in)), rng.normal(size=n_out)
    delta = rng.normal(size=(batch, n_out))
    dW, db = np.full((n_out, n_in), np.nan), np.full(n_out, np.nan)
    k.weight_gradients(delta, x, dW, db)
    rW, rb = ref.weight_gradients(delta, x)
    np.testing.assert_allclose(dW, rW, **tol)
    np.testing.assert_allclose(db, rb, **tol)
    for act in ("relu", "tanh", "gelu", "softmax") if n_out > 1 else ("relu", "sigmoid"):
        y, u = k.layer_forward(x, W, b, act, 0.0, True)
        y_ref, u_ref = ref.layer_forward(x, W, b, act, 0.0, True)
        np.testing.assert_allclose(y, y_ref, **tol)
        np.testing.assert_allclose(u, u_ref, **tol)
    p, g, v, m = (rng.normal(size=(n_out, n_in)) for _ in range(4))
    v2 = np.abs(v)
    pr, vr, mr, v2r = p.copy(), v.copy(), m.copy(), v2.copy()
    k.momentum_update(p, g, v, 0.1, 0.9, True, 0.01)
    ref.momentum_update(pr, g, vr, 0.1, 0.9, True, 0.01)
    np.testing.assert_allclose(p, pr, **tol)
    np.testing.assert_allclose(v, vr, **tol)
    k.adam_update(p, g, m, v2, 0.01, 0.9, 0.999, 1e-8, 2, 0.0)
    ref.adam_update(pr, g, mr, v2r, 0.01, 0.9, 0.999, 1e-8, 2, 0.0)
    for got, want in ((p, pr), (m, mr), (v2, v2r)):
        np.testing.assert_allclose(got, want, **tol)
    for wd in (0.0, 0.1):
        Wk, Wr = W.copy(), W.copy()
        k.sgd_update(Wk, g, 0.05, wd)
        ref.sgd_update(Wr, g, 0.05, wd)
        np.testing.assert_allclose(Wk, Wr, **tol)
    # the buffered forms write every element of NaN-poisoned buffers
    y_buf, u_buf = np.full((batch, n_out), np.nan), np.full((batch, n_out), np.nan)
    y, u = k.layer_forward(x, W, b, "tanh", 0.0, True, y=y_buf, u=u_buf)
    assert y is y_buf and u is u_buf
    y_ref, u_ref = ref.layer_forward(x, W, b, "tanh", 0.0, True)
    np.testing.assert_allclose(y_buf, y_ref, **tol)
    np.testing.assert_allclose(u_buf, u_ref, **tol)
    g_buf = np.full((batch, n_in), np.nan)
    assert k.delta_backward(delta, W, x, None, "identity", out=g_buf) is g_buf
    np.testing.assert_allclose(g_buf, delta @ W, **tol)
    t = rng.normal(size=(batch, n_out))
    value, d_buf = np.full((), np.nan), np.full((batch, n_out), np.nan)
    got_value, got_delta = k.output_error(y_buf, u_buf, t, "tanh", "mse", value=value, delta=d_buf)
    assert got_value is value and got_delta is d_buf
    rv, rd = ref.output_error(y_ref, u_ref, t, "tanh", "mse")
    np.testing.assert_allclose(value, rv, **tol)
    np.testing.assert_allclose(d_buf, rd, **tol)
    idx = rng.integers(-batch, batch, batch)
    out = np.full((batch, n_in), np.nan)
    assert k.gather_rows(x, idx, out) is out
    np.testing.assert_array_equal(out, x[idx])
    onehot = np.full((batch, n_out), np.nan)
    k.one_hot(idx % n_out, n_out, np.float64, out=onehot)
    np.testing.assert_array_equal(onehot, np.eye(n_out)[idx % n_out])
    a = rng.normal(size=(batch, n_in))
    a.reshape(-1)[a.size // 2] = np.inf
    np.testing.assert_allclose(k.array_stats(a), ref.array_stats(a), rtol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 7, 8, 9, 16, 17, 64])
def test_row_reductions_for_every_row_length(rng, n):
    """Softmax and cross-entropy use 8-way row reductions: every tail length must be right."""
    u = rng.normal(size=(5, n)) * 3
    t = np.eye(n)[rng.integers(0, n, 5)]
    y, _ = numba_cpu.layer_forward(u, np.eye(n), np.zeros(n), "softmax", 0.0, False)
    np.testing.assert_allclose(y, ref.activate(u, "softmax"), rtol=1e-12)
    value, delta = numba_cpu.output_error(y, u, t, "softmax", "cross_entropy")
    rv, rd = ref.output_error(ref.activate(u, "softmax"), u, t, "softmax", "cross_entropy")
    np.testing.assert_allclose(float(value), float(rv), rtol=1e-12)
    np.testing.assert_allclose(delta, rd, rtol=1e-12, atol=1e-15)


def test_float32_math_accuracy_over_wide_ranges():
    """The vectorizable float32 exp/tanh/expm1/log1p agree with float64 NumPy to a few ulp."""
    u = np.concatenate([np.linspace(-120, 100, 20001), np.geomspace(1e-30, 1, 200), -np.geomspace(1e-30, 1, 200),
                        [0.0, -0.0, np.inf, -np.inf]]).astype(np.float32)
    u64 = u.astype(np.float64)
    with np.errstate(all="ignore"):
        for act in ("sigmoid", "tanh", "elu", "selu", "softplus", "silu"):
            y, _ = numba_cpu.layer_forward(u[:, None], np.ones((1, 1), np.float32), np.zeros(1, np.float32), act,
                                           1.0, False)
            want = ref.activate(u64[:, None], act, 1.0)
            np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-37, err_msg=act)
    nan, _ = numba_cpu.layer_forward(np.full((1, 3), np.nan, np.float32), np.eye(3, dtype=np.float32),
                                     np.zeros(3, np.float32), "softmax", 0.0, False)
    assert np.isnan(nan).all()


# --------------------------------------------------------------------------- training runs
def _data(rng, n=96, d=6, classes=3):
    X = rng.normal(size=(n, d))
    T = np.eye(classes)[rng.integers(0, classes, n)]
    return X, T


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-9), ("float32", 2e-3)])
@pytest.mark.parametrize("setup", [
    dict(activation="relu", head="multiclass", optimizer=("SGD", dict(lr=0.05))),
    dict(activation="tanh", head="binary", optimizer=("SGD", dict(lr=0.05, momentum=0.9, nesterov=True,
                                                                  weight_decay=1e-3))),
    dict(activation=["gelu", "silu"], output="identity", loss="huber", optimizer=("Adam", dict(lr=1e-2))),
    dict(activation="elu", output="sigmoid", loss="mse", optimizer=("Adam", dict(lr=1e-2, weight_decay=1e-2))),
], ids=["relu-ce-sgd", "tanh-bce-nesterov", "gelu-silu-huber-adam", "elu-mse-adam"])
def test_training_on_numba_matches_numpy(rng, setup, dtype, rtol):
    X, T = _data(rng)
    if setup.get("head") == "binary":
        T = T[:, :1]
    sizes = [X.shape[1], 8, 7, T.shape[1]] if isinstance(setup["activation"], list) else [X.shape[1], 9, T.shape[1]]
    kw = {k: v for k, v in setup.items() if k in ("activation", "head", "output", "loss")}
    name, okw = setup["optimizer"]
    params, losses = [], []
    for backend in ("numpy", "numba"):
        net = bp.MLP(sizes, dtype=dtype, seed=3, backend=backend, **kw)
        hist = net.fit(X, T, epochs=4, batch_size=16, optimizer=getattr(bp, name)(**okw))
        params.append(net.get_params())
        losses.append(hist.loss)
        assert net.predict(X).dtype == np.dtype(dtype)
    np.testing.assert_allclose(losses[1], losses[0], rtol=rtol)
    for (Wn, bn), (Wb, bb) in zip(*params):
        np.testing.assert_allclose(Wb, Wn, rtol=rtol, atol=rtol * 1e-2)
        np.testing.assert_allclose(bb, bn, rtol=rtol, atol=rtol * 1e-2)


def test_mlp_api_on_numba(rng):
    X, T = _data(rng, n=40)
    net = bp.MLP([6, 5, 3], head="multiclass", seed=1, backend="numba")
    twin = bp.MLP([6, 5, 3], head="multiclass", seed=1, backend="numpy")
    assert net.backend.name == "numba" and not net.backend.is_gpu
    lv, grads = net.loss_and_grads(X, T)
    lr_, grads_r = twin.loss_and_grads(X, T)
    np.testing.assert_allclose(lv, lr_, rtol=1e-5)
    for (gW, gb), (rW, rb) in zip(grads, grads_r):
        assert gW.dtype == np.float32 and gb.dtype == np.float32
        np.testing.assert_allclose(gW, rW, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gb, rb, rtol=1e-4, atol=1e-6)
    step = net.train_step(X, T, bp.SGD(lr=0.1))
    assert np.isclose(step, lv, rtol=1e-6)
    assert net.loss(X, T) < lv
    assert net.predict(X).shape == (40, 3)


# --------------------------------------------------------------------------- numba-cuda
def test_numba_cuda_import_is_lazy():
    out = _run_python("import sys; import backprop.kernels.numba_cuda as m; "
                      "print([n for n in ('numba', 'cupy') if n in sys.modules]); print(m.CAPABILITIES.gpu)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "True"]


def test_numba_cuda_without_gpu_says_so():
    """Outside the simulator and without a GPU: unavailable, with the reason."""
    pytest.importorskip("numba.cuda")
    code = """
    import backprop as bp
    from backprop.kernels import numba_cuda as nc
    if nc.is_available():
        print("GPU")
    else:
        print(repr(nc.unavailable_reason()))
        try:
            bp.set_backend("numba-cuda")
        except ValueError as exc:
            print("REFUSED", "no CUDA GPU found" in str(exc))
        print("AUTO", bp.set_backend("auto").name)
    """
    out = _run_python(code, {"NUMBA_ENABLE_CUDASIM": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("GPU"):
        pytest.skip("a CUDA GPU is present")
    lines = out.stdout.splitlines()
    assert lines[0] == "'no CUDA GPU found'"
    assert lines[1] == "REFUSED True"
    assert lines[2] != "AUTO numba-cuda"


_SIMULATOR_RUN = r"""
import json, numpy as np
import backprop as bp
from backprop.kernels import numba_cuda as nc
out = {"auto": bp.set_backend("auto").name, "available": bp.available_backends()}
b = bp.set_backend("numba-cuda")
out["simulated"] = b.is_simulated
out["is_gpu"] = b.is_gpu
out["xp"] = repr(b.xp)
rng = np.random.default_rng(0)
X, T = rng.normal(size=(6, 3)), np.eye(2)[rng.integers(0, 2, 6)]
nets = {name: bp.MLP([3, 4, 2], activation="tanh", head="multiclass", seed=2, backend=name)
        for name in ("numpy", "numba-cuda")}
for name, net in nets.items():
    net.fit(X, T, epochs=2, batch_size=3, optimizer=bp.Adam(lr=0.05), shuffle=False)
    out["loss_" + name] = net.loss(X, T)
    out["pred_dtype_" + name] = str(net.predict(X).dtype)
pairs = zip(nets["numpy"].get_params(), nets["numba-cuda"].get_params())
out["max_param_diff"] = max(float(np.abs(a - c).max()) for (Wa, ba), (Wc, bc) in pairs for a, c in ((Wa, Wc), (ba, bc)))
print("RESULT", json.dumps(out))
"""


def test_simulated_numba_cuda_is_explicit_only_and_trains():
    pytest.importorskip("numba.cuda")
    out = _run_python(_SIMULATOR_RUN, {"NUMBA_ENABLE_CUDASIM": "1", "BACKPROP_BACKEND": "auto"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.split("RESULT", 1)[1])
    assert "numba-cuda" in res["available"]
    assert res["auto"] != "numba-cuda"
    assert res["simulated"] is True and res["is_gpu"] is True
    assert res["xp"] == "None"
    assert res["pred_dtype_numba-cuda"] == "float32"
    assert np.isclose(res["loss_numba-cuda"], res["loss_numpy"], rtol=1e-4)
    assert res["max_param_diff"] < 1e-4


def test_numba_cuda_float32_and_poisoned_buffers_under_simulator():
    """In-process when this run is itself under the simulator (the shapes stay tiny)."""
    b = _simulator_backend()
    k = b.kernels
    rng = np.random.default_rng(5)
    made = _every_primitive(k, np.float32, rng, batch=3, n_in=2, n_out=2)
    wrong = {n: k.to_host(a).dtype for n, a in made.items() if a is not None and k.to_host(a).dtype != np.float32}
    assert not wrong
    delta, x = rng.normal(size=(5, 3)), rng.normal(size=(5, 6))
    dW = k.to_device(np.full((3, 6), np.nan), np.float64)
    db = k.to_device(np.full(3, np.nan), np.float64)
    k.weight_gradients(k.to_device(delta, np.float64), k.to_device(x, np.float64), dW, db)
    rW, rb = ref.weight_gradients(delta, x)
    np.testing.assert_allclose(k.to_host(dW), rW, rtol=1e-12)
    np.testing.assert_allclose(k.to_host(db), rb, rtol=1e-12)


# --------------------------------------------------------------------------- the contract's extras
def test_sgd_update_from_delta_is_gone():
    """The training step updates from the flat gradient buffer (``sgd_update``) now."""
    from backprop.kernels import numba_cuda

    assert not hasattr(numba_cpu, "sgd_update_from_delta")
    assert not hasattr(numba_cuda, "sgd_update_from_delta")


def test_numpy_compat_sets_row_stack_only_where_numpy_lacks_it(monkeypatch):
    """NumPy 2.5 removed ``np.row_stack``, which numba-cuda 0.30 names when it compiles."""
    from backprop.kernels import numba_cuda

    monkeypatch.setattr(np, "row_stack", np.vstack, raising=False)  # restored (or removed) afterwards
    monkeypatch.delattr(np, "row_stack")
    numba_cuda.numpy_compat()
    assert np.row_stack is np.vstack
    present = object()
    monkeypatch.setattr(np, "row_stack", present)
    numba_cuda.numpy_compat()
    assert np.row_stack is present


def test_cpu_guard_skips_leave_state_bit_identical(rng):
    k = numba_cpu
    guard = k.zeros((4,), np.float64)
    grads = rng.normal(size=10).astype(np.float32)
    grads[3] = np.inf
    k.guard_step(guard, np.array(1.5, np.float32), grads, 2.0)
    np.testing.assert_array_equal(guard, [0.0, 1.0, 1.0, 0.0])
    p, v, m = (rng.normal(size=10).astype(np.float32) for _ in range(3))
    v2 = np.abs(v)
    before = [a.copy() for a in (p, v, m, v2)]
    k.sgd_update(p, grads, 0.1, 0.1, guard)
    k.momentum_update(p, grads, v, 0.1, 0.9, True, 0.1, guard)
    k.adam_update(p, grads, m, v2, 0.1, 0.9, 0.99, 1e-8, 1, 0.1, guard)
    for a, b in zip((p, v, m, v2), before):
        assert a.tobytes() == b.tobytes()
    grads[3] = 0.0
    k.guard_step(guard, np.array(1.5, np.float32), grads, 2.0)  # sticky: a finite step after a failure
    np.testing.assert_array_equal(guard, [0.0, 2.0, 1.0, 0.0])


def _fake_array_class():
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    return FakeCUDAArray


def test_numba_cuda_guard_is_read_on_the_device_only():
    """Under the simulator each GPU thread is a Python thread: a read of the guard or of the loss
    on the main thread is a host read, which guard_step and the updates must not make."""
    import threading

    b = _simulator_backend()
    k = b.kernels
    reads = []

    class Spy(_fake_array_class()):
        def __getitem__(self, idx):
            if threading.current_thread() is threading.main_thread():
                reads.append(idx)
            return super().__getitem__(idx)

        def copy_to_host(self, *args, **kwargs):
            reads.append("copy_to_host")
            return super().copy_to_host(*args, **kwargs)

    rng = np.random.default_rng(3)
    guard = Spy(np.zeros(4))
    loss = Spy(np.array(0.75, np.float32))
    p, g = k.to_device(rng.normal(size=(3, 2)), np.float32), k.to_device(rng.normal(size=(3, 2)), np.float32)
    p0 = k.to_host(p)
    k.guard_step(guard, loss, g, 2.0)
    np.testing.assert_array_equal(guard._ary, [1.0, 1.0, 0.0, 1.5])
    k.sgd_update(p, g, 0.1, 0.0, guard)
    assert not np.array_equal(k.to_host(p), p0)
    bad = k.to_device(np.where(np.arange(6).reshape(3, 2) == 4, np.nan, rng.normal(size=(3, 2))), np.float32)
    k.guard_step(guard, loss, bad, 2.0)
    np.testing.assert_array_equal(guard._ary, [0.0, 2.0, 2.0, 1.5])
    v, m = k.to_device(rng.normal(size=(3, 2)), np.float32), k.to_device(rng.uniform(size=(3, 2)), np.float32)
    before = [k.to_host(a).tobytes() for a in (p, v, m)]
    k.sgd_update(p, bad, 0.1, 0.1, guard)
    k.momentum_update(p, bad, v, 0.1, 0.9, False, 0.1, guard)
    k.adam_update(p, bad, v, m, 0.1, 0.9, 0.99, 1e-8, 2, 0.1, guard)
    assert [k.to_host(a).tobytes() for a in (p, v, m)] == before
    k.guard_step(guard, loss, g, 2.0)  # the first failure sticks
    np.testing.assert_array_equal(guard._ary, [0.0, 3.0, 2.0, 1.5])
    assert reads == []


def test_numba_cuda_buffered_step_allocates_no_device_array(monkeypatch):
    b = _simulator_backend()
    k = b.kernels
    rng = np.random.default_rng(4)
    dt = np.float32
    x, W, bias = (k.to_device(rng.normal(size=s), dt) for s in ((4, 3), (2, 3), (2,)))
    t = k.to_device(np.eye(2)[[0, 1, 1, 0]], dt)
    y, u, delta, gx = (k.zeros(s, dt) for s in ((4, 2), (4, 2), (4, 2), (4, 3)))
    value, dW, db = k.zeros((), dt), k.zeros((2, 3), dt), k.zeros((2,), dt)
    guard, v = k.zeros((4,), np.float64), k.zeros((2, 3), dt)

    def same(got, *want):
        return len(got) == len(want) and all(a is b for a, b in zip(got, want))

    def step():
        assert same(k.layer_forward(x, W, bias, "gelu", 0.0, True, y=y, u=u), y, u)
        assert same(k.layer_forward(x, W, bias, "tanh", 0.0, False, y=y, u=u), y, None)
        assert same(k.output_error(y, u, t, "tanh", "mse", delta=delta, value=value), value, delta)
        assert k.delta_backward(delta, W, x, None, "identity", out=gx) is gx
        assert same(k.weight_gradients(delta, x, dW, db), dW, db)
        k.guard_step(guard, value, dW)
        k.sgd_update(W, dW, 0.1, 0.01, guard)
        k.sgd_update(bias, db, 0.1)
        k.momentum_update(W, dW, v, 0.1, 0.9, False, 0.0, guard)

    step()  # makes the cached temporaries
    made = []
    for name in ("_empty", "zeros", "to_device"):
        real = getattr(k, name)
        monkeypatch.setattr(k, name, lambda *a, _real=real, _name=name, **kw: made.append(_name) or _real(*a, **kw))
    step()
    assert made == []
    assert k.to_host(guard)[1] == 2.0


def test_numba_cuda_array_stats_reads_back_once(monkeypatch):
    b = _simulator_backend()
    k = b.kernels
    a = np.array([[0.25, 0.75, 0.0], [np.inf, 2.0, -1.5], [np.nan, 1.0, 3.0]])
    cases = [a, a[:2], np.array([[0.5, 0.5], [1.0, 0.0]]), np.arange(6).reshape(2, 3), np.arange(5) - 2]
    copies = []
    cls = _fake_array_class()
    real = cls.copy_to_host
    monkeypatch.setattr(cls, "copy_to_host", lambda self, *x, **kw: copies.append(1) or real(self, *x, **kw))
    for host in cases:
        dt = np.float32 if host.dtype.kind == "f" else np.int64
        dev = b.kernels.to_device(host, dt)
        del copies[:]
        got = k.array_stats(dev)
        assert len(copies) == 1
        np.testing.assert_allclose(got, ref.array_stats(host.astype(dt)), rtol=1e-6, equal_nan=True)


def test_numba_cuda_arrays_owns_and_as_array_on_the_device(monkeypatch):
    b = _simulator_backend()
    k = b.kernels
    assert k.device_memory_free() is None  # simulator
    host = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    d = k.to_device(host, np.float64)
    assert k.owns(d) and not k.owns(host) and not k.owns([1.0])
    assert k.as_array(d, np.float64) is d

    def no_host(*args, **kwargs):
        raise AssertionError("as_array went through the host")

    monkeypatch.setattr(_fake_array_class(), "copy_to_host", no_host)
    monkeypatch.setattr(k, "to_device", no_host)
    for view, want in ((d, host), (d[:, :, ::2], host[:, :, ::2]), (d[1, :, 1:], host[1, :, 1:]),
                       (d[0, 1, ::3], host[0, 1, ::3])):
        got = k.as_array(view, np.float32)
        assert k.owns(got) and got.dtype == np.float32 and got.is_c_contiguous() and got.shape == want.shape
        np.testing.assert_array_equal(got._ary, want.astype(np.float32))


def test_unknown_codes_give_nan_never_a_formula():
    """An activation or loss code outside the tables computes NaN (which the step's guard refuses), in the
    scalar helpers both Numba backends compile and in the CPU kernels' row ladders: never the identity,
    nor Huber, as a forgotten branch used to."""
    from backprop.kernels import numba_cpu
    from backprop.kernels import numba_math as nm

    plain = nm.build(lambda f: f)  # the same source, run as Python
    for dtype in (np.float32, np.float64):
        c = plain.consts(np.zeros(1, dtype))
        bad = max(nm.ACT_CODES.values()) + 1
        assert np.isnan(plain.activate(dtype(0.5), bad, dtype(0.0), c))
        assert np.isnan(plain.slope(dtype(0.5), dtype(0.5), bad, dtype(0.0), c))
        bad_loss = max(nm.LOSS_CODES.values()) + 1
        assert np.isnan(plain.elementwise_loss(dtype(0.5), dtype(0.5), dtype(0.0), bad_loss, dtype(1.0), c))
        assert np.isnan(plain.loss_grad(dtype(0.5), bad_loss, dtype(1.0), c))
        u, b, y = np.ones((2, 3), dtype), np.zeros(3, dtype), np.empty((2, 3), dtype)
        numba_cpu._bias_act(u, b, y, bad, dtype(0.0), True)
        assert np.isnan(y).all()
        g = np.ones((2, 3), dtype)
        numba_cpu._slope_mul(g, np.ones((2, 3), dtype), np.ones((2, 3), dtype), bad, dtype(0.0))
        assert np.isnan(g).all()
        d, mean = np.empty((2, 3), dtype), np.empty(1, dtype)
        for weighted in (False, True):
            numba_cpu._output_error(np.ones((2, 3), dtype), np.ones((2, 3), dtype), np.zeros((2, 3), dtype),
                                    np.ones(2, dtype), weighted, d, bad_loss, nm.ACT_CODES["identity"], False,
                                    dtype(1.0), dtype(0.0), mean)
            assert np.isnan(mean[0]) and np.isnan(d).all()



def test_generated_helpers_have_names_of_their_own():
    """Numba names a compiled function after its qualified name and a counter local to the process, and the
    on-disk cache keeps those names: two different helpers under one name, compiled into two kernels by two
    processes, can be linked into each other's kernel once both load from the cache (a silu output error then
    ran another activation's slope). So every loop the CPU backend generates from the registry has a name of
    its own, made from its record's name."""
    from backprop.kernels.numba_cpu import rows

    names = []
    for ladder in (rows._bias_act_rows, rows._slope_rows, rows._loss_values_row, rows._loss_grad_row):
        cases = [v for key, v in ladder.py_func.__globals__.items() if key.startswith("_case")]
        assert cases
        names += [case.py_func.__qualname__ for case in cases]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert "slope_loop_silu" in names and "loss_loop_huber" in names
