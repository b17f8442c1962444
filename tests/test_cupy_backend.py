"""The CuPy backend beyond the shared suite: unavailability without a GPU (runs anywhere), and on a
GPU (marked ``gpu``, skipped cleanly without one) poisoned outputs at real sizes, CUDA-graph steps
equal to ordinary steps, and the TF32 mode within its documented tolerance."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from contextlib import contextmanager

import numpy as np
import pytest

from backprop.backend import available_backends, resolve_backend
from backprop.kernels import ACTIVATIONS, LOSSES, PRIMITIVES
from backprop.kernels import numpy_ref as ref

HIDDEN = [n for n, s in ACTIVATIONS.items() if s.hidden]
PAIRS = sorted({(o, loss) for loss, s in LOSSES.items() for o in s.outputs})
ALPHA = {"leaky_relu": 0.05, "elu": 0.7}


def _alpha(act: str) -> float:
    return ALPHA.get(act, ACTIVATIONS[act].default_alpha)


def _module():
    from backprop.kernels import cupy_gpu

    return cupy_gpu


# --------------------------------------------------------------------------- anywhere
def test_module_imports_without_cupy():
    """With CuPy missing, the module imports and says so instead of raising."""
    code = textwrap.dedent("""
        import sys
        sys.modules["cupy"] = None  # import cupy -> ImportError
        from backprop.kernels import PRIMITIVES, cupy_gpu as k
        assert k.xp is None and k.IS_GPU is True and k.NAME == "cupy"
        assert not k.is_available()
        assert "not installed" in k.unavailable_reason(), k.unavailable_reason()
        missing = [p for p in PRIMITIVES if not callable(getattr(k, p, None))]
        assert not missing, missing
        assert callable(k.capture_train_step) and callable(k.set_tf32)
        from backprop.backend import available_backends, resolve_backend
        assert "cupy" not in available_backends()
        try:
            resolve_backend("cupy")
        except ValueError as exc:
            assert "not installed" in str(exc)
        else:
            raise AssertionError("resolve_backend('cupy') should fail without CuPy")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_reports_itself_unavailable_without_a_gpu():
    k = _module()
    if k.is_available():
        pytest.skip("a GPU is here: the backend is available")
    reason = k.unavailable_reason()
    assert reason and isinstance(reason, str)
    assert k.IS_GPU is True
    assert "cupy" not in available_backends()
    with pytest.raises(ValueError, match="not available"):
        resolve_backend("cupy")


def test_defines_every_primitive():
    k = _module()
    assert not [p for p in PRIMITIVES if not callable(getattr(k, p, None))]


def test_flop_count():
    k = _module()
    # forward 2*B*(a+b), backward delta 2*B*b (none for the first layer), gradients 2*B*(a+b)
    a, b = 3 * 5, 5 * 2
    assert k.flop_count([3, 5, 2], 7) == 2 * 7 * (3 * (a + b) - a)


def test_graph_refuses_adam():
    from backprop.kernels.cupy_graph import _check_optimizer
    from backprop.optimizers import SGD, Adam

    with pytest.raises(ValueError, match="SGD"):
        _check_optimizer(Adam())
    _check_optimizer(SGD(0.1, momentum=0.9))


def test_tf32_switch_is_a_plain_setting():
    k = _module()
    assert k.tf32_enabled() is False
    k.set_tf32(True)
    try:
        assert k.tf32_enabled() is True
    finally:
        k.set_tf32(False)
    assert 1e-4 < k.TF32_RTOL <= 1e-2


# --------------------------------------------------------------------------- CPU stand-in for CuPy
# A fake ``cupy`` whose arrays are NumPy arrays (new ones filled with NaN, like poisoned memory),
# whose cuBLAS GEMM/GEMV follow ``cupy.cublas``'s signatures and checks, and whose
# ElementwiseKernel and RawModule run the backend's real CUDA sources in the host emulator of
# test_cupy_sources. Stream capture records every device operation instead of running it (and
# refuses host synchronization), graph launch replays them. It checks the Python side of the
# backend on a CPU: argument order and types of every launch, shapes, in-place writes, the graph
# logic. It is a model of CuPy, not CuPy: the GPU tests below are the real thing.
import types as _types

from tests import test_cupy_sources as _src_tests


class _FakeArray(np.ndarray):
    @property
    def data(self):  # cupy's MemoryPointer: only .ptr is used
        return _types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    def get(self):
        _Fake.no_sync("ndarray.get")
        return np.array(self)


def _fa(a) -> _FakeArray:
    return np.asarray(a).view(_FakeArray)


class _Fake:
    capturing: list = []  # the op list being recorded, innermost last
    stream_stack: list = []
    math_mode = 0
    launches: list = []

    @classmethod
    def no_sync(cls, what):
        if any(getattr(s, "_ops", None) is not None for s in cls.stream_stack):
            raise RuntimeError(f"{what} synchronizes the host during stream capture")

    @classmethod
    def run(cls, fn):
        """Run a device operation, or record it when the current stream is capturing."""
        cur = cls.stream_stack[-1] if cls.stream_stack else None
        if cur is not None and cur._ops is not None:
            cur._ops.append(fn)
        else:
            fn()


def _empty(shape, dtype=np.float64):
    return _fa(np.full(shape, np.nan, dtype=dtype))


def _tf32(a: np.ndarray) -> np.ndarray:
    """Round float32 to TF32 (10-bit mantissa), to nearest even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~np.uint64(0x1FFF)
    return bits.astype(np.uint32).view(np.float32).reshape(a.shape)


def _op(a, trans):
    return a.T if trans == "T" else a


def _gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
    assert a.ndim == b.ndim == 2 and a.dtype == b.dtype
    m, k = (a.shape if transa == "N" else a.shape[::-1])
    n = b.shape[1] if transb == "N" else b.shape[0]
    assert (b.shape[0] if transb == "N" else b.shape[1]) == k
    assert out is not None and out.shape == (m, n) and out.dtype == a.dtype

    def fn():
        A, B = np.asarray(_op(a, transa)), np.asarray(_op(b, transb))
        if _Fake.math_mode == _cublas_lib.CUBLAS_TF32_TENSOR_OP_MATH and a.dtype == np.float32:
            A, B = _tf32(A), _tf32(B)
        prod = (A @ B).astype(out.dtype)
        res = alpha * prod if beta == 0 else alpha * prod + beta * np.asarray(out)  # beta 0: out not read
        np.asarray(out)[...] = res
    _Fake.run(fn)
    return out


def _gemv(transa, alpha, a, x, beta, y):
    assert a.ndim == 2 and x.ndim == y.ndim == 1 and a.dtype == x.dtype == y.dtype
    xlen, ylen = (a.shape[1], a.shape[0]) if transa == "N" else a.shape
    assert x.shape[0] == xlen and y.shape[0] == ylen

    def fn():
        prod = (np.asarray(_op(a, transa)) @ np.asarray(x)).astype(y.dtype)
        np.asarray(y)[...] = alpha * prod if beta == 0 else alpha * prod + beta * np.asarray(y)
    _Fake.run(fn)


_cublas_lib = _types.ModuleType("cupy_backends.cuda.libs.cublas")
_cublas_lib.CUBLAS_DEFAULT_MATH = 0
_cublas_lib.CUBLAS_TF32_TENSOR_OP_MATH = 3
_cublas_lib.getMathMode = lambda handle: _Fake.math_mode
_cublas_lib.setMathMode = lambda handle, mode: setattr(_Fake, "math_mode", mode)


class _Stream:
    def __init__(self, non_blocking=False):
        self._ops = None

    def __enter__(self):
        _Fake.stream_stack.append(self)
        return self

    def __exit__(self, *exc):
        _Fake.stream_stack.pop()

    def begin_capture(self):
        assert self._ops is None, "already capturing"
        self._ops = []

    def end_capture(self):
        ops, self._ops = self._ops, None
        return _Graph(ops)


class _Graph:
    def __init__(self, ops):
        self.ops = ops

    def launch(self, stream=None):
        for fn in self.ops:
            _Fake.run(fn)


class _EK:
    def __init__(self, in_params, out_params, operation, name="kernel", preamble="", no_return=False, **kw):
        from backprop.kernels import cupy_sources as S

        assert S.elementwise_kernels()[name] == (in_params, out_params, operation), name
        assert preamble == S.MATH_PREAMBLE
        self.name, self.ins, self.outs = name, _src_tests._split(in_params), _src_tests._split(out_params)

    def __call__(self, *args):
        nin = len(self.ins)
        assert len(args) == nin + len(self.outs), f"{self.name}: {len(args)} arguments"
        outs = args[nin:]
        T = outs[0].dtype
        arrays = [a for a in args if isinstance(a, np.ndarray) and a.ndim > 0]
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
        for (typ, pname), a in zip(self.ins + self.outs, args):
            if isinstance(a, np.ndarray) and a.ndim > 0:
                if typ == "T" and a.dtype != T:
                    raise TypeError(f"{self.name}: {pname} is {a.dtype}, T is {T}")
            else:
                assert np.isscalar(a), f"{self.name}: {pname} must be a scalar"
        for o in outs:
            if o.shape != shape:
                raise ValueError(f"{self.name}: out shape {o.shape} != {shape}")
        n = int(np.prod(shape))

        def fn():
            emu = _src_tests.Emu("float" if T == np.float32 else "double")
            arrs, scal = {}, {"_n": n, "_ncols": n}
            for (_typ, pname), a in zip(self.ins, args):
                if isinstance(a, np.ndarray) and a.ndim > 0:
                    arrs[f"_raw_{pname}"] = np.broadcast_to(np.asarray(a), shape).ravel()
                else:
                    scal[pname] = float(a)
            for (_typ, pname), o in zip(self.outs, outs):
                arrs[f"_raw_{pname}"] = np.asarray(o).ravel()
            got = emu(f"ew_{self.name}", 1, 64, arrs, scal, outputs=tuple(f"_raw_{p}" for _, p in self.outs))
            for (_typ, pname), o in zip(self.outs, outs):
                np.asarray(o)[...] = got[f"_raw_{pname}"].reshape(shape)
        _Fake.launches.append(self.name)
        _Fake.run(fn)


_C_SCALAR = {"long long": np.int64, "int": np.int32}


class _RawKernel:
    def __init__(self, name, ctype, params):
        self.name, self.ctype, self.params = name, ctype, params

    def __call__(self, grid, block, args):
        assert len(grid) == 1 and len(block) == 1 and block[0] % 32 == 0
        assert len(args) == len(self.params), f"{self.name}: {len(args)} arguments for {len(self.params)}"
        T = np.float32 if self.ctype == "float" else np.float64
        arrays, scalars, aliases, outputs, targets = {}, {}, {}, [], {}
        for decl, a in zip(self.params, args):
            pname = decl.replace("*", " ").split()[-1]
            if "*" in decl:
                assert isinstance(a, np.ndarray) and a.dtype == T and a.flags.c_contiguous, (self.name, pname)
                for other, b in targets.items():
                    if np.shares_memory(a, b):
                        aliases[pname] = other
                        break
                else:
                    arrays[pname] = a
                    targets[pname] = a
                    if not decl.startswith("const"):
                        outputs.append(pname)
            else:
                ctype = decl.rsplit(" ", 1)[0].replace("const ", "")
                want = T if ctype == "T" else _C_SCALAR[ctype]
                assert type(a) is want, f"{self.name}: {pname} passed as {type(a).__name__}, the kernel takes {ctype}"
                scalars[pname] = a

        def fn():
            emu = _src_tests.Emu(self.ctype)
            got = emu(self.name, grid[0], block[0], {k: np.asarray(v).ravel() for k, v in arrays.items()},
                      {k: float(v) for k, v in scalars.items()}, aliases, outputs=tuple(outputs))
            for pname in outputs:
                np.asarray(arrays[pname]).reshape(-1)[...] = got[pname]
        _Fake.launches.append(self.name)
        _Fake.run(fn)


class _RawModule:
    def __init__(self, code=None, **kw):
        from backprop.kernels import cupy_sources as S

        self.ctype = next(c for c in ("float", "double") if code == S.raw_module_source(c))
        self.sigs = {n: [" ".join(p.split()) for p in ps.split(",")] for n, ps in _src_tests._SIG.findall(code)}

    def get_function(self, name):
        return _RawKernel(name, self.ctype, self.sigs[name])


def _make_fake_cupy() -> dict:
    cp = _types.ModuleType("cupy")
    cp.ndarray = _FakeArray
    cp.float32, cp.float64 = np.float32, np.float64
    cp.empty = lambda shape, dtype=np.float64: _empty(shape, dtype)
    cp.empty_like = lambda a: _empty(a.shape, a.dtype)

    def _filled(value):
        def make(shape, dtype=np.float64):
            a = _empty(shape, dtype)
            _Fake.run(lambda: np.asarray(a).fill(value))  # a memset: recorded when capturing
            return a
        return make
    cp.zeros, cp.ones = _filled(0), _filled(1)
    cp.array = lambda a, dtype=None, order="C", copy=True: _fa(np.array(np.asarray(a), dtype=dtype, order=order))
    cp.ascontiguousarray = lambda a: _fa(np.ascontiguousarray(a))
    cp.arange = lambda *a, **kw: _fa(np.arange(*a, **kw))
    cp.asarray = lambda a, dtype=None: _fa(np.asarray(a, dtype=dtype))
    cp.__version__ = "fake"

    def copyto(dst, src):
        _Fake.run(lambda: np.copyto(np.asarray(dst), np.asarray(src)))
    cp.copyto = copyto

    def isfinite(a):
        _Fake.no_sync("isfinite().all()")
        return np.isfinite(np.asarray(a))
    cp.isfinite = isfinite
    cp.ElementwiseKernel = _EK
    cp.RawModule = _RawModule

    class _Device:
        id = 0
        compute_capability = "90"

        def synchronize(self):
            _Fake.no_sync("synchronize")

    class _Pool:
        def malloc(self, size):
            raise AssertionError("not used by the fake")

    @__import__("contextlib").contextmanager
    def using_allocator(alloc=None):
        yield

    import time as _time

    class _Event:
        def record(self, stream=None):  # the fake times the host
            self.t = _time.perf_counter()

        def synchronize(self):
            pass

    default_stream = _Stream()
    cuda = _types.SimpleNamespace(
        runtime=_types.SimpleNamespace(
            getDeviceCount=lambda: 1, runtimeGetVersion=lambda: 12090, driverGetVersion=lambda: 12090,
            getDeviceProperties=lambda i: {"name": b"CPU stand-in", "totalGlobalMem": 2**30}),
        Event=_Event, get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3,
        Device=_Device, Stream=_Stream, Graph=_Graph, MemoryPool=_Pool, using_allocator=using_allocator,
        get_current_stream=lambda: _Fake.stream_stack[-1] if _Fake.stream_stack else default_stream,
        device=_types.SimpleNamespace(get_cublas_handle=lambda: 0),
    )
    cp.cuda = cuda
    cublas_mod = _types.ModuleType("cupy.cublas")
    cublas_mod.gemm, cublas_mod.gemv = _gemm, _gemv
    cp.cublas = cublas_mod
    libs = _types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = _cublas_lib
    backends = _types.ModuleType("cupy_backends")
    backends_cuda = _types.ModuleType("cupy_backends.cuda")
    backends.cuda, backends_cuda.libs = backends_cuda, libs
    return {"cupy": cp, "cupy.cublas": cublas_mod, "cupy_backends": backends, "cupy_backends.cuda": backends_cuda,
            "cupy_backends.cuda.libs": libs, "cupy_backends.cuda.libs.cublas": _cublas_lib}


@pytest.fixture
def fake(monkeypatch):
    """The backend module loaded against the fake CuPy, registered as backend "cupy" for the test."""
    import importlib

    import backprop.kernels as pkg
    from backprop import backend as backend_mod
    from backprop.kernels import cupy_graph

    if _src_tests.CXX is None:
        pytest.skip("no C++ compiler for the kernel emulator")
    for name, mod in _make_fake_cupy().items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "backprop.kernels.cupy_gpu", raising=False)
    monkeypatch.delattr(pkg, "cupy_gpu", raising=False)
    module = importlib.import_module("backprop.kernels.cupy_gpu")
    assert module.is_available(), module.unavailable_reason()
    monkeypatch.setitem(backend_mod._loaded, "cupy", backend_mod.Backend("cupy", module))
    monkeypatch.delitem(backend_mod._reasons, "cupy", raising=False)
    _Fake.math_mode, _Fake.stream_stack, _Fake.launches = 0, [], []
    yield module
    cupy_graph.clear()
    sys.modules.pop("backprop.kernels.cupy_gpu", None)


def test_fake_primitives_match_reference(fake, rng):
    """Every primitive through its real launch path (GEMM modelled, kernels emulated) vs the reference."""
    k, dt = fake, np.float32
    x, W, b = rng.normal(size=(9, 6)), rng.normal(size=(5, 6)) / 2, rng.normal(size=5)
    for act in HIDDEN + ["softmax"]:
        a = _alpha(act)
        y, u = k.layer_forward(k.to_device(x, dt), k.to_device(W, dt), k.to_device(b, dt), act, a, True)
        y_ref, u_ref = ref.layer_forward(x, W, b, act, a, True)
        np.testing.assert_allclose(host(k, u), u_ref, **tol(dt))
        np.testing.assert_allclose(host(k, y), y_ref, **tol(dt))
        y2, none = k.layer_forward(k.to_device(x, dt), k.to_device(W, dt), k.to_device(b, dt), act, a, False)
        assert none is None
        np.testing.assert_allclose(host(k, y2), y_ref, **tol(dt))
    delta = rng.normal(size=(9, 5))
    for act in HIDDEN:
        a = _alpha(act)
        u_prev = rng.normal(size=(9, 6))
        y_prev = ref.activate(u_prev, act, a)
        got = k.delta_backward(k.to_device(delta, dt), k.to_device(W, dt), k.to_device(y_prev, dt),
                               k.to_device(u_prev, dt), act, a)
        np.testing.assert_allclose(host(k, got), ref.delta_backward(delta, W, y_prev, u_prev, act, a), **tol(dt))
    dW, db = k.weight_gradients(k.to_device(delta, dt), k.to_device(x, dt))
    rW, rb = ref.weight_gradients(delta, x)
    np.testing.assert_allclose(host(k, dW), rW, **tol(dt))
    np.testing.assert_allclose(host(k, db), rb, **tol(dt))
    Wd, bd = k.to_device(W, dt), k.to_device(b, dt)
    k.sgd_update_from_delta(Wd, bd, k.to_device(delta, dt), k.to_device(x, dt), 0.05, 0.1)
    W1, b1 = W.copy(), b.copy()
    ref.sgd_update_from_delta(W1, b1, delta, x, 0.05, 0.1)
    np.testing.assert_allclose(host(k, Wd), W1, **tol(dt))
    np.testing.assert_allclose(host(k, bd), b1, **tol(dt))
    for output, loss in PAIRS:
        a = _alpha(output)
        u = rng.normal(size=(9, 5)) * 2
        y = ref.activate(u, output, a)
        t = _targets(rng, loss, 9, 5)
        param = 0.5 if loss == "huber" else LOSSES[loss].default_param
        value, d = k.output_error(k.to_device(y, dt), k.to_device(u, dt), k.to_device(t, dt), output, loss, param, a)
        rv, rd = ref.output_error(y, u, t, output, loss, param, a)
        np.testing.assert_allclose(float(host(k, value)), float(rv), **tol(dt))
        np.testing.assert_allclose(host(k, d), rd, **tol(dt))
    p, g, v = (rng.normal(size=(4, 3)) for _ in range(3))
    pd, vd = k.to_device(p, dt), k.to_device(v, dt)
    k.momentum_update(pd, k.to_device(g, dt), vd, 0.1, 0.9, True, 0.01)
    ref.momentum_update(p, g, v, 0.1, 0.9, True, 0.01)
    np.testing.assert_allclose(host(k, pd), p, **tol(dt))
    m, s = rng.normal(size=(4, 3)), rng.uniform(size=(4, 3))
    qd, md, sd = k.to_device(p, dt), k.to_device(m, dt), k.to_device(s, dt)
    k.adam_update(qd, k.to_device(g, dt), md, sd, 1e-2, 0.9, 0.999, 1e-8, 7, 0.01)
    ref.adam_update(p, g, m, s, 1e-2, 0.9, 0.999, 1e-8, 7, 0.01)
    np.testing.assert_allclose(host(k, qd), p, **tol(dt))


def test_fake_one_fused_kernel_per_step(fake, rng):
    """What each primitive launches: one elementwise kernel after each GEMM, none for identity."""
    k, dt = fake, np.float32
    x, W, b = (k.to_device(a, dt) for a in (rng.normal(size=(4, 3)), rng.normal(size=(2, 3)), rng.normal(size=2)))
    _Fake.launches.clear()
    k.layer_forward(x, W, b, "relu", 0.0, False)
    k.layer_forward(x, W, b, "gelu", 0.0, True)
    k.layer_forward(x, W, b, "softmax", 0.0, False)
    assert _Fake.launches == ["bp_fwd_relu", "bp_fwd_keep_gelu", "bp_softmax_forward"]
    _Fake.launches.clear()
    d = k.to_device(rng.normal(size=(4, 2)), dt)
    k.delta_backward(d, W, x, None, "identity", 0.0)
    k.sgd_update_from_delta(W, b, d, x, 0.1)
    assert _Fake.launches == []  # GEMM and GEMV only
    k.output_error(d, d, d, "identity", "mse")
    assert _Fake.launches == ["bp_loss_identity_mse", "bp_sum_scale"]


def _fake_nets(hidden, head, dtype="float32"):
    from backprop import MLP

    return [MLP([6, 7, 3], activation=hidden, head=head, dtype=dtype, seed=5, backend="cupy") for _ in range(2)]


@pytest.mark.parametrize("hidden,head,opt", [
    ("tanh", "multiclass", dict(lr=0.2)),
    ("gelu", "regression", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
])
def test_fake_graph_step_equals_normal_step(fake, rng, hidden, head, opt):
    from backprop import SGD
    from backprop.kernels import cupy_graph

    plain, graphed = _fake_nets(hidden, head)
    op, og = SGD(**opt), SGD(**opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(4):
            X = rng.normal(size=(10, 6))
            T = rng.integers(0, 3, 10) if head == "multiclass" else rng.normal(size=(10, 3))
            if i == 2:
                op.lr = og.lr = opt["lr"] / 2  # a new recording
            lp = plain.train_step(X, T, op)
            lg = graphed.train_step(X, T, og, graph=True)
            np.testing.assert_allclose(lg, lp, rtol=1e-6)
    assert cupy_graph.recorded(graphed) == 2
    assert og.steps == op.steps == 4
    for (Wp, bp), (Wg, bg) in zip(plain.get_params(), graphed.get_params()):
        np.testing.assert_allclose(Wg, Wp, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(bg, bp, rtol=1e-6, atol=1e-7)


def test_fake_graph_non_finite_loss_leaves_parameters(fake, rng):
    from backprop import SGD
    from backprop.network import NonFiniteLossError

    k = fake
    net, _ = _fake_nets("tanh", "regression")
    opt = SGD(lr=0.1)
    X, T = rng.normal(size=(8, 6)), rng.normal(size=(8, 3))
    x, t = k.to_device(X, np.float32), k.to_device(T, np.float32)
    k.capture_train_step(net, x, t, opt)
    k.capture_train_step(net, x, t, opt)
    before, steps = net.get_params(), opt.steps
    X[2, 1] = np.nan
    with pytest.raises(NonFiniteLossError):
        k.capture_train_step(net, k.to_device(X, np.float32), t, opt)
    assert opt.steps == steps
    for (W0, b0), (W1, b1) in zip(before, net.get_params()):
        np.testing.assert_array_equal(W1, W0)
        np.testing.assert_array_equal(b1, b0)


def test_fake_tf32_within_documented_tolerance(fake, rng):
    k = fake
    x, W, b = rng.normal(size=(64, 256)), rng.normal(size=(128, 256)) / 16, rng.normal(size=128)
    u_ref = x @ W.T + b
    xd, Wd, bd = (k.to_device(a, np.float32) for a in (x, W, b))
    _, u32 = k.layer_forward(xd, Wd, bd, "identity", 0.0, True)
    k.set_tf32(True)
    try:
        _, utf = k.layer_forward(xd, Wd, bd, "identity", 0.0, True)
        assert _Fake.math_mode == 0  # the handle's mode is put back after each GEMM
    finally:
        k.set_tf32(False)
    e32, etf = _rel_fro(host(k, u32), u_ref), _rel_fro(host(k, utf), u_ref)
    assert e32 < 1e-5 and 10 * e32 < etf < k.TF32_RTOL, (e32, etf)


def test_fake_benchmark_script_runs(fake, tmp_path, monkeypatch):
    """benchmarks/gpu_vs_torch.py end to end on tiny networks (no PyTorch): its timing, its report."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_vs_torch.py"
    spec = importlib.util.spec_from_file_location("gpu_vs_torch", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_vs_torch", bench)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "CASES", [
        bench.Case("tiny", [6, 7, 3], 8, "tanh", "multiclass", graph=True),
        bench.Case("gemm_bound", [8, 8, 8], 8, "relu", "regression", gemm_bound=True),
    ])
    monkeypatch.setattr(bench, "QUICK", {"tiny": 8, "gemm_bound": 8})
    monkeypatch.setattr(bench, "median_step_ms",
                        lambda step, sync, repeats, min_loop_s=0.2, warmup=3: (float(step() or 1.0), []))
    rc = bench.main(["--out", str(tmp_path), "--repeats", "1", "--no-torch", "--gemm-size", "16", "--quick"])
    assert rc == 0
    report = json.loads((tmp_path / "gpu_vs_torch.json").read_text())
    assert [r["case"] for r in report["results"]] == ["tiny", "gemm_bound"]
    tiny, big = report["results"]
    assert tiny["graph_ms"] is not None and tiny["torch_ms"] is None
    assert big["backprop_fraction_of_gemm"] is not None and "tf32" in report
    md = (tmp_path / "gpu_vs_torch.md").read_text()
    assert "| tiny [6, 7, 3] | 8 |" in md and "PyTorch not measured" in md and "CPU stand-in" in md


def test_benchmark_script_help_without_a_gpu():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_vs_torch.py"
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--no-torch" in proc.stdout


def test_fake_fit_trains(fake, rng):
    """A few epochs of fit() on the backend (forward, loss, backward, momentum) lower the loss."""
    from backprop import MLP, SGD

    X = rng.normal(size=(24, 4))
    T = (X[:, :1] > 0).astype(int).ravel()
    net = MLP([4, 8, 2], activation="tanh", head="multiclass", seed=0, backend="cupy")
    before = net.loss(X, T)
    for _ in range(15):
        net.train_step(X, T, SGD(lr=0.5), graph=False)
    assert net.loss(X, T) < before


# --------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


@pytest.fixture
def k():
    try:
        backend = resolve_backend("cupy")
    except ValueError as exc:
        pytest.skip(str(exc))
    return backend.kernels


@pytest.fixture
def rng(request) -> np.random.Generator:
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


_POOLS: list = []  # CuPy frees a pool's memory with the pool: keep them for the session


@pytest.fixture
def poisoned_memory(k):
    """A context in which every new device buffer starts as NaN (all bytes 0xFF), so an element a
    kernel forgets to write shows up in the comparison with the reference."""
    import cupy

    pool = cupy.cuda.MemoryPool()
    _POOLS.append(pool)

    def malloc(size):
        mem = pool.malloc(size)
        mem.memset_async(0xFF, size)
        return mem

    @contextmanager
    def poisoned():
        with cupy.cuda.using_allocator(malloc):
            yield
        cupy.cuda.Device().synchronize()

    yield poisoned
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()  # the blocks no array uses any more


def tol(dtype) -> dict:
    return {"rtol": 2e-4, "atol": 2e-5} if np.dtype(dtype) == np.float32 else {"rtol": 1e-10, "atol": 1e-12}


def host(k, a) -> np.ndarray:
    return np.asarray(k.to_host(a), dtype=np.float64)


def _rel_fro(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


BATCH, N_IN, N_OUT = 512, 1031, 1029  # real sizes, none a multiple of a tile or warp


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", HIDDEN + ["softmax"])
def test_poisoned_forward(k, rng, act, dtype, poisoned_memory):
    x, W, b = rng.normal(size=(BATCH, N_IN)), rng.normal(size=(N_OUT, N_IN)) / 32, rng.normal(size=N_OUT)
    a = _alpha(act)
    y_ref, u_ref = ref.layer_forward(x, W, b, act, a, True)
    with poisoned_memory():
        xd, Wd, bd = k.to_device(x, dtype), k.to_device(W, dtype), k.to_device(b, dtype)
        y, u = k.layer_forward(xd, Wd, bd, act, a, True)
        y2, u2 = k.layer_forward(xd, Wd, bd, act, a, False)
    assert u2 is None
    np.testing.assert_allclose(host(k, u), u_ref, **tol(dtype))
    np.testing.assert_allclose(host(k, y), y_ref, **tol(dtype))
    np.testing.assert_allclose(host(k, y2), y_ref, **tol(dtype))
    assert k.to_host(y).dtype == dtype


@gpu
@pytest.mark.parametrize("cols", [2, 31, 33, 3000])
def test_poisoned_softmax_widths(k, rng, cols, poisoned_memory):
    """One warp per row: rows narrower than a warp, just around it, and far wider."""
    rows = 517
    x, W, b = rng.normal(size=(rows, 40)), rng.normal(size=(cols, 40)) / 4, rng.normal(size=cols)
    with poisoned_memory():
        y, u = k.layer_forward(k.to_device(x, np.float32), k.to_device(W, np.float32), k.to_device(b, np.float32),
                               "softmax", 0.0, True)
    y_ref, u_ref = ref.layer_forward(x, W, b, "softmax", 0.0, True)
    np.testing.assert_allclose(host(k, y), y_ref, **tol(np.float32))
    np.testing.assert_allclose(host(k, y).sum(axis=1), 1.0, rtol=1e-5)


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", HIDDEN)
def test_poisoned_delta_backward(k, rng, act, dtype, poisoned_memory):
    a = _alpha(act)
    delta, W = rng.normal(size=(BATCH, N_OUT)), rng.normal(size=(N_OUT, N_IN)) / 32
    u_prev = rng.normal(size=(BATCH, N_IN)) * 2
    y_prev = ref.activate(u_prev, act, a)
    with poisoned_memory():
        got = k.delta_backward(k.to_device(delta, dtype), k.to_device(W, dtype), k.to_device(y_prev, dtype),
                               k.to_device(u_prev, dtype), act, a)
    np.testing.assert_allclose(host(k, got), ref.delta_backward(delta, W, y_prev, u_prev, act, a), **tol(dtype))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_poisoned_weight_gradients(k, rng, dtype, poisoned_memory):
    delta, x = rng.normal(size=(BATCH, N_OUT)), rng.normal(size=(BATCH, N_IN))
    rW, rb = ref.weight_gradients(delta, x)
    with poisoned_memory():
        dd, xd = k.to_device(delta, dtype), k.to_device(x, dtype)
        dW = k.to_device(np.full((N_OUT, N_IN), np.nan), dtype)
        db = k.to_device(np.full(N_OUT, np.nan), dtype)
        k.weight_gradients(dd, xd, dW, db)
        fW, fb = k.weight_gradients(dd, xd)
    for got, want in ((dW, rW), (db, rb), (fW, rW), (fb, rb)):
        np.testing.assert_allclose(host(k, got), want, **tol(dtype))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_poisoned_sgd_update(k, rng, dtype, weight_decay, poisoned_memory):
    delta, x = rng.normal(size=(BATCH, N_OUT)), rng.normal(size=(BATCH, N_IN))
    W, b = rng.normal(size=(N_OUT, N_IN)), rng.normal(size=N_OUT)
    with poisoned_memory():
        Wd, bd = k.to_device(W, dtype), k.to_device(b, dtype)
        k.sgd_update_from_delta(Wd, bd, k.to_device(delta, dtype), k.to_device(x, dtype), 0.01, weight_decay)
    ref.sgd_update_from_delta(W, b, delta, x, 0.01, weight_decay)
    np.testing.assert_allclose(host(k, Wd), W, **tol(dtype))
    np.testing.assert_allclose(host(k, bd), b, **tol(dtype))


def _targets(rng, loss, batch, n):
    if loss == "cross_entropy":
        return np.eye(n)[rng.integers(0, n, batch)]
    if loss == "bce":
        return rng.uniform(size=(batch, n))
    return rng.normal(size=(batch, n))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("output,loss", PAIRS)
def test_poisoned_output_error(k, rng, output, loss, dtype, poisoned_memory):
    batch, n = BATCH, 1000
    a = _alpha(output)
    u = rng.normal(size=(batch, n)) * 2
    y = ref.activate(u, output, a)
    t = _targets(rng, loss, batch, n)
    param = 0.5 if loss == "huber" else LOSSES[loss].default_param
    with poisoned_memory():
        value, delta = k.output_error(k.to_device(y, dtype), k.to_device(u, dtype), k.to_device(t, dtype),
                                      output, loss, param, a)
    rv, rd = ref.output_error(y, u, t, output, loss, param, a)
    np.testing.assert_allclose(float(host(k, value)), float(rv), **tol(dtype))
    np.testing.assert_allclose(host(k, delta), rd, **tol(dtype))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_poisoned_optimizers_at_size(k, rng, dtype, poisoned_memory):
    shape = (N_OUT, N_IN)
    p, g, v = (rng.normal(size=shape) for _ in range(3))
    m, s = rng.normal(size=shape), rng.uniform(size=shape)
    with poisoned_memory():
        pd, gd, vd = k.to_device(p, dtype), k.to_device(g, dtype), k.to_device(v, dtype)
        k.momentum_update(pd, gd, vd, 0.1, 0.9, True, 0.01)
        qd, md, sd = k.to_device(p, dtype), k.to_device(m, dtype), k.to_device(s, dtype)
        k.adam_update(qd, gd, md, sd, 1e-3, 0.9, 0.999, 1e-8, 3, 0.01)
    p1, v1 = p.copy(), v.copy()
    ref.momentum_update(p1, g, v1, 0.1, 0.9, True, 0.01)
    p2, m2, s2 = p.copy(), m.copy(), s.copy()
    ref.adam_update(p2, g, m2, s2, 1e-3, 0.9, 0.999, 1e-8, 3, 0.01)
    for got, want in ((pd, p1), (vd, v1), (qd, p2), (md, m2), (sd, s2)):
        np.testing.assert_allclose(host(k, got), want, **tol(dtype))


@gpu
def test_large_batch_loss_reduction(k, rng):
    """More elements than the loss kernel's threads: the grid-stride loop and the partial sums."""
    batch, n = 2**16, 64
    u = rng.normal(size=(batch, n)).astype(np.float32)
    t = rng.normal(size=(batch, n)).astype(np.float32)
    value, delta = k.output_error(k.to_device(u, np.float32), k.to_device(u, np.float32), k.to_device(t, np.float32),
                                  "identity", "mse")
    rv, rd = ref.output_error(u.astype(np.float64), u.astype(np.float64), t.astype(np.float64), "identity", "mse")
    np.testing.assert_allclose(float(host(k, value)), float(rv), rtol=1e-4)
    np.testing.assert_allclose(host(k, delta), rd, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- CUDA graphs
def _nets(hidden: str, head: str, dtype: str):
    from backprop import MLP

    sizes = [37, 96, 80, 5]
    return [MLP(sizes, activation=hidden, head=head, dtype=dtype, seed=3, backend="cupy") for _ in range(2)]


def _batches(rng, head: str, n: int, batch: int = 128):
    out = []
    for _ in range(n):
        X = rng.normal(size=(batch, 37))
        if head == "multiclass":
            T = rng.integers(0, 5, batch)
        else:
            T = rng.normal(size=(batch, 5))
        out.append((X, T))
    return out


GRAPH_CASES = [
    ("tanh", "multiclass", dict(lr=0.1)),
    ("relu", "regression", dict(lr=0.05, momentum=0.9)),
    ("gelu", "regression", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("silu", "multiclass", dict(lr=0.1, weight_decay=1e-2)),
]


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hidden,head,opt", GRAPH_CASES)
def test_graph_step_equals_normal_step(k, rng, hidden, head, opt, dtype):
    from backprop import SGD
    from backprop.kernels import cupy_graph

    plain, graphed = _nets(hidden, head, dtype)
    opt_plain, opt_graph = SGD(**opt), SGD(**opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed recording warns: make it fail here
        for X, T in _batches(rng, head, 5):
            lp = plain.train_step(X, T, opt_plain)
            lg = graphed.train_step(X, T, opt_graph, graph=True)
            np.testing.assert_allclose(lg, lp, **tol(dtype))
    assert cupy_graph.recorded(graphed) == 1
    assert opt_graph.steps == opt_plain.steps == 5
    for (Wp, bp), (Wg, bg) in zip(plain.get_params(), graphed.get_params()):
        np.testing.assert_allclose(Wg, Wp, **tol(dtype))
        np.testing.assert_allclose(bg, bp, **tol(dtype))


@gpu
def test_graph_follows_new_settings_and_parameters(k, rng):
    from backprop import SGD
    from backprop.kernels import cupy_graph

    plain, graphed = _nets("relu", "multiclass", "float32")
    opt_plain, opt_graph = SGD(lr=0.1, momentum=0.5), SGD(lr=0.1, momentum=0.5)
    batches = _batches(rng, "multiclass", 8)
    for i, (X, T) in enumerate(batches):
        if i == 3:  # a schedule changes the rate: a new recording
            opt_plain.lr = opt_graph.lr = 0.03
        if i == 5:  # new parameter arrays: a new recording
            params = plain.get_params()
            plain.set_params(params)
            graphed.set_params(params)
        if i == 6:  # a smaller last batch: its own recording
            X, T = X[:50], T[:50]
        lp = plain.train_step(X, T, opt_plain)
        lg = graphed.train_step(X, T, opt_graph, graph=True)
        np.testing.assert_allclose(lg, lp, rtol=1e-4, atol=1e-6)
    assert 1 <= cupy_graph.recorded(graphed) <= cupy_graph.MAX_GRAPHS_PER_NET
    for (Wp, bp), (Wg, bg) in zip(plain.get_params(), graphed.get_params()):
        np.testing.assert_allclose(Wg, Wp, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(bg, bp, rtol=1e-4, atol=1e-6)


@gpu
def test_graph_non_finite_loss_leaves_parameters(k, rng):
    from backprop import SGD
    from backprop.network import NonFiniteLossError

    (net, _) = _nets("tanh", "regression", "float32")
    opt = SGD(lr=0.1)
    (X, T), = _batches(rng, "regression", 1)
    x, t = k.to_device(X, np.float32), k.to_device(T, np.float32)
    k.capture_train_step(net, x, t, opt)  # ordinary step, then recorded
    k.capture_train_step(net, x, t, opt)  # replayed
    before = net.get_params()
    steps = opt.steps
    bad = X.copy()
    bad[3, 4] = np.nan
    with pytest.raises(NonFiniteLossError):
        k.capture_train_step(net, k.to_device(bad, np.float32), t, opt)
    assert opt.steps == steps
    for (W0, b0), (W1, b1) in zip(before, net.get_params()):
        np.testing.assert_array_equal(W1, W0)
        np.testing.assert_array_equal(b1, b0)


@gpu
def test_graph_refuses_adam_on_a_network(k, rng):
    from backprop import Adam

    (net, _) = _nets("tanh", "regression", "float32")
    (X, T), = _batches(rng, "regression", 1)
    with pytest.raises(ValueError, match="graph=True supports SGD"):
        net.train_step(X, T, Adam(), graph=True)


# --------------------------------------------------------------------------- TF32
@gpu
def test_tf32_within_documented_tolerance(k, rng):
    import cupy

    x, W, b = rng.normal(size=(BATCH, 1024)), rng.normal(size=(1024, 1024)) / 32, rng.normal(size=1024)
    u_ref = x @ W.T + b
    xd, Wd, bd = (k.to_device(a, np.float32) for a in (x, W, b))
    _, u32 = k.layer_forward(xd, Wd, bd, "identity", 0.0, True)
    k.set_tf32(True)
    try:
        _, utf = k.layer_forward(xd, Wd, bd, "identity", 0.0, True)
        delta = k.to_device(rng.normal(size=(BATCH, 1024)), np.float32)
        dW, _ = k.weight_gradients(delta, xd)
    finally:
        k.set_tf32(False)
    err32, errtf = _rel_fro(host(k, u32), u_ref), _rel_fro(host(k, utf), u_ref)
    assert err32 < 1e-5, err32
    assert errtf < k.TF32_RTOL, errtf
    dW_ref = host(k, delta).T @ x
    assert _rel_fro(host(k, dW), dW_ref) < k.TF32_RTOL
    major = int(cupy.cuda.Device().compute_capability) // 10
    if major >= 8:  # TF32 tensor cores exist: the mode must have taken effect
        assert errtf > 10 * err32, (errtf, err32)
