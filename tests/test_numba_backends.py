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
    made["dW"], made["db"] = k.weight_gradients(t, x)
    k.sgd_update_from_delta(W, b, t, x, 0.1, 0.01)
    made["W_sgd"], made["b_sgd"] = W, b
    v = k.zeros(W.shape, dtype)
    k.momentum_update(W, made["dW"], v, 0.1, 0.9, True, 0.01)
    made["v"] = v
    m2, v2 = k.zeros(W.shape, dtype), k.zeros(W.shape, dtype)
    k.adam_update(W, made["dW"], m2, v2, 0.01, 0.9, 0.999, 1e-8, 3, 0.01)
    made["m_adam"], made["v_adam"], made["W_adam"] = m2, v2, W
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
    for sig in kern.signatures:
        if "float32" not in str(sig):
            continue
        for line in kern.inspect_llvm(sig).splitlines():
            m = call.search(line)
            if arith.search(line) or (m and m.group(1) != "PyFloat_AsDouble"):
                bad.setdefault(kern.__name__, []).append(line.strip()[:200])
print("RESULT", __import__("json").dumps({n: v[:3] for n, v in bad.items()}))
"""


def test_float32_cpu_kernels_do_no_float64_arithmetic():
    """No double arithmetic, no fpext, no double-returning math call in the float32 LLVM IR
    (only the unboxing of Python float arguments, ``PyFloat_AsDouble``, which are then cast)."""
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
f32 = types.float32
A2, A1, I, B = f32[:, ::1], f32[::1], types.int64, types.boolean
ks = K.kernels_for("float32")
sigs = {
    "bias_act": (K.bias_act, (A2, A1, A2, I, f32, B)), "bias_softmax": (K.bias_softmax, (A2, A1, A2, B)),
    "slope_mul": (K.slope_mul, (A2, A2, A2, I, f32)), "loss_rows": (K.loss_rows, (A2, A2, A2, A2, A1, I, I, f32, f32)),
    "scale_add": (K.scale_add, (A1, A1, f32, f32)), "momentum": (K.momentum, (A1, A1, A1, f32, f32, B, f32)),
    "adam": (K.adam, (A1, A1, A1, A1, f32, f32, f32, f32, f32, f32)),
    "count_nonfinite": (K.count_nonfinite, (A1, types.int32[::1])),
    "gemm": (ks.gemm, (A2, A2, A2, B, B, f32, f32, B)), "colsum": (ks.colsum, (A2, A1, f32, B)),
    "mean": (ks.mean, (A1, A1)),
}
bad = {}
for name, (kern, sig) in sigs.items():
    try:
        ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    except Exception as exc:
        if name == "bias_act":
            print("SKIP", repr(exc)[:300]); sys.exit(0)
        raise
    f64 = [l.strip() for l in ptx.splitlines() if re.search(r"\.f64\b", l)]
    if f64:
        bad[name] = f64[:3]
print("RESULT", __import__("json").dumps(bad))
"""


def test_float32_cuda_kernels_compile_to_ptx_without_f64():
    """Every CUDA kernel compiles for a real GPU (sm_90) in float32 with no f64 instruction.

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
    Wk, bk, Wr, br = W.copy(), b.copy(), W.copy(), b.copy()
    k.sgd_update_from_delta(Wk, bk, delta, x, 0.05, 0.1)
    ref.sgd_update_from_delta(Wr, br, delta, x, 0.05, 0.1)
    np.testing.assert_allclose(Wk, Wr, **tol)
    np.testing.assert_allclose(bk, br, **tol)


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
                      "print([n for n in ('numba', 'cupy') if n in sys.modules]); print(m.IS_GPU)")
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
