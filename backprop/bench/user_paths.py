"""Benchmarks on the user's paths, against PyTorch: ``python benchmarks/gpu_vs_torch.py``.

Eight sections (:data:`SECTIONS`, run in the order ``--sections`` gives), each written out (JSON + Markdown,
with the machine, the command and the date) as soon as it ends, by
:class:`~backprop.bench.sections.SectionWriter`; a section that fails records its error and the next one runs.
Sections 1 to 7 run on the device backend (``--backend``, default: the first GPU backend that works here) and
are skipped, with the reason, where there is none; section 8 runs on the CPU backends. Every time comes from
:func:`~backprop.bench.timing.time_ops` (interleaved samples, each bracketed by the device's synchronisation,
median of the repeats) or, for whole epochs, one epoch a sample after a warm-up epoch. Float32 throughout.
1. ``fit`` (``fit_vs_torch``): one epoch of ``net.fit(X, y, epochs=1, batch_size=256,
   optimizer=SGD(0.01, momentum=0.9))`` on 60000 x 784 random data, 10 classes, ``[784, 1024, 1024, 10]``,
   from host arrays (NumPy ``X``, integer labels ``y``) and from device arrays, against a PyTorch eager loop
   with the data on the GPU (``torch.randperm`` there, the loss summed there and read once per epoch).
   Target: backprop at least 1.3x faster.
2. ``api`` (``api_overhead``): the public methods on device arrays against the device-level ones:
   ``train_step`` vs ``train_step_device``, ``forward`` vs ``forward_device``, on ``[64]*6+[1]`` @ 262144
   and ``[784, 1024, 1024, 10]`` @ 4096. Target: within 10%.
3. ``step`` (``step_vs_torch``): ``train_step_device`` (plain SGD, loss read every step) against PyTorch
   eager and the same model under ``torch.compile`` (skipped, with the reason, where compiling fails), on
   the nets of the H200 findings; the rate of one large GEMM through the backend's own layer call, and the
   fraction of it the GEMM-bound net reaches.
4. ``graph`` (``graph_step``): ``train_step(..., graph=True)`` against the plain step on ``[64, 64, 10]``
   @ 256 (tanh, softmax). Target: 1.5x. Skipped, with the reason, where the backend cannot record a step
   (``graph=True`` raises ``ValueError``) or the recording falls back to plain steps (``RuntimeWarning``).
5. ``tf32`` (``tf32``): the GEMM-bound net and the GEMM with TF32 off and on (both frameworks), where the
   backend has ``set_tf32``.
6. ``fused`` (``fused_narrow``): a narrow net's step and inference with the cupy backend's fused kernels off
   and on (CUDA cores, and TF32 tensor cores with TF32 on in both frameworks), against PyTorch, with each fused
   pass's TFLOP/s and GB/s against the SGEMM rate and the copy bandwidth measured in the same run.
7. ``epilogues`` (``epilogues``): the step with cuBLASLt epilogues off and on, against PyTorch.
8. ``cpu`` (``cpu_step_vs_torch``): the training step of the CPU backends (numpy, numba) against PyTorch
   on the CPU, ``[784, 256, 256, 10]`` @ 256 and ``[64]*6+[1]`` @ 8192, interleaved rounds, median; the
   public ``train_step`` (what a user calls) and ``train_step_device``. Target: at least 1.2x faster.

``--quick`` shrinks every net, batch and data set to a smoke test of a few seconds.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import step
from ..backend import Backend, resolve_backend
from ..kernels import BACKEND_MODULES
from ..kernels import fused_mlp_sources as fused_sources
from ..network import MLP
from ..optimizers import SGD, Adam
from .cli import (
    doc_parser,
    non_negative_float,
    out_dir,
    positive_float,
    positive_int,
    sample_time_float,
    threads_int,
)
from .cli import out_problem as _out_problem
from .machine import machine_info, restore_threads, set_threads
from .nets import flop_counts
from .torch_peer import TorchPeer
from .sections import SectionWriter, SkipSection
from .timing import Timing, paired_ratio, time_ops

__all__ = ["API_CASES", "CPU_CASES", "FIT", "GRAPH_CASE", "SECTIONS", "STEP_CASES", "TF32_CASE", "Case", "FitCase",
           "build_parser", "check_args", "main", "out_problem"]

DTYPE = np.float32
SUMMARY = "gpu_vs_torch"


@dataclass(frozen=True)
class Case:
    """A net and batch of a section, with the small stand-ins of ``--quick``."""

    name: str
    sizes: tuple[int, ...]
    batch: int
    activation: str
    head: str  # "multiclass" (softmax + cross-entropy) or "regression" (identity + MSE)
    quick_sizes: tuple[int, ...]
    quick_batch: int
    gemm_bound: bool = False

    def at(self, quick: bool) -> tuple[list[int], int]:
        return (list(self.quick_sizes), self.quick_batch) if quick else (list(self.sizes), self.batch)


@dataclass(frozen=True)
class FitCase:
    """Section 1's net, data and training settings, with the small stand-ins of ``--quick``."""

    sizes: tuple[int, ...]
    rows: int
    batch: int
    quick_sizes: tuple[int, ...]
    quick_rows: int
    quick_batch: int
    lr: float = 0.01
    momentum: float = 0.9
    target: float = 1.3

    def at(self, quick: bool) -> tuple[list[int], int, int]:
        if quick:
            return list(self.quick_sizes), self.quick_rows, self.quick_batch
        return list(self.sizes), self.rows, self.batch


FIT = FitCase((784, 1024, 1024, 10), 60000, 256, (32, 64, 64, 4), 1024, 64)
API_CASES = [
    Case("narrow_deep", (64,) * 6 + (1,), 262144, "relu", "regression", (16,) * 4 + (1,), 256),
    Case("mnist_like", (784, 1024, 1024, 10), 4096, "relu", "multiclass", (32, 64, 64, 4), 64),
]
STEP_CASES = [
    Case("mnist_like", (784, 1024, 1024, 10), 4096, "relu", "multiclass", (32, 64, 64, 4), 64),
    Case("narrow_deep", (64,) * 6, 262144, "relu", "regression", (16,) * 4, 256),
    Case("gemm_bound", (4096,) * 4, 4096, "relu", "regression", (64,) * 4, 64, gemm_bound=True),
    Case("tiny", (64, 64, 10), 256, "tanh", "multiclass", (8, 8, 4), 16),
]
GRAPH_CASE = Case("tiny", (64, 64, 10), 256, "tanh", "multiclass", (8, 8, 4), 16)
TF32_CASE = STEP_CASES[2]
CPU_CASES = [
    Case("mnist_like", (784, 256, 256, 10), 256, "relu", "multiclass", (32, 64, 64, 4), 32),
    Case("narrow_deep", (64,) * 6 + (1,), 8192, "relu", "regression", (16,) * 4 + (1,), 128),
]
API_TARGET, GRAPH_TARGET, CPU_TARGET = 1.10, 1.5, 1.2


# --------------------------------------------------------------------------- helpers
def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or not np.isfinite(seconds) else f"{seconds * 1e3:.4g}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None or not np.isfinite(ratio) else f"{ratio:.3g}"


def _data(sizes: list[int], batch: int, head: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((batch, sizes[0])).astype(DTYPE)
    if head == "multiclass":
        t = np.eye(sizes[-1], dtype=DTYPE)[rng.integers(0, sizes[-1], batch)]
    else:
        t = rng.standard_normal((batch, sizes[-1])).astype(DTYPE)
    return x, t


def _net(sizes: list[int], activation: str, head: str, backend: Backend) -> MLP:
    return MLP(sizes, activation=activation, head=head, dtype="float32", seed=0, backend=backend.name)


def _release(backend: Backend) -> None:
    gc.collect()
    release = getattr(backend.kernels, "release_memory", None)
    if callable(release):
        release()


def _step_flops(sizes: list[int], batch: int) -> int:
    f = flop_counts(sizes, batch)
    return f["forward"] + f["weight_gradients"] + f["input_deltas"]


def _timing(t: Timing) -> dict[str, Any]:
    return t.to_dict()


class Context:
    """What every section needs: the options, the device backend (or why none), PyTorch (or why not)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = bool(args.quick)
        self.repeats = args.repeats if args.repeats is not None else (2 if self.quick else 7)
        self.min_sample_time = args.min_sample_time if args.min_sample_time is not None else \
            (0.002 if self.quick else 0.05)
        self.device, self.device_reason = self._device_backend(args.backend)
        self.peer: TorchPeer | None = None
        self.peer_reason = "--no-torch"
        if not args.no_torch:
            peer = TorchPeer(args.threads)
            if peer.available:
                self.peer = peer
                peer.set_tf32(False)  # PyTorch's default for matrix products; TF32 is section 5's business
            else:
                self.peer_reason = peer.reason
        self.compile_budget = args.compile_budget
        self.compile_spent = 0.0

    @staticmethod
    def _device_backend(spec: str) -> tuple[Backend | None, str]:
        if spec != "auto":
            try:
                return resolve_backend(spec), ""
            except ValueError as exc:
                return None, str(exc)
        reasons = []
        for name in BACKEND_MODULES:
            try:
                backend = resolve_backend(name)
            except ValueError as exc:
                reasons.append(f"{name}: {str(exc).split('; available here')[0]}")
                continue
            if backend.is_gpu and not backend.is_simulated:
                return backend, ""
            if backend.is_gpu:
                reasons.append(f"{name}: runs on the CUDA simulator, whose timings say nothing about a GPU")
        return None, "no GPU backend works here (" + "; ".join(reasons) + ")"

    def require_device(self) -> Backend:
        if self.device is None:
            raise SkipSection(self.device_reason)
        return self.device

    def torch_device(self, backend: Backend) -> tuple[str | None, str]:
        """PyTorch's device for ``backend`` (``cuda`` for a GPU backend), or ``None`` and why."""
        if self.peer is None:
            return None, f"PyTorch not measured: {self.peer_reason}"
        device, why = self.peer.device_for(backend)
        return device, ("" if device else f"PyTorch not measured: {why}")

    def sync(self, backend: Backend, device: str | None) -> Callable[[], None]:
        if device is None or self.peer is None:
            return backend.synchronize
        torch_sync = self.peer.synchronizer(device)

        def both() -> None:
            backend.synchronize()
            torch_sync()

        return both

    def time(self, ops: dict[str, Callable[[], Any]], sync: Callable[[], None], *, repeats: int | None = None,
             warmup: int = 2, min_sample_time: float | None = None) -> dict[str, Timing]:
        return time_ops(ops, repeats=repeats or self.repeats, warmup=warmup,
                        min_sample_time=self.min_sample_time if min_sample_time is None else min_sample_time,
                        sync=sync)


# --------------------------------------------------------------------------- 1. fit
def section_fit(ctx: Context) -> dict[str, Any]:
    b = ctx.require_device()
    sizes, n, bs = FIT.at(ctx.quick)
    lr, momentum = FIT.lr, FIT.momentum
    repeats = ctx.args.fit_repeats if ctx.args.fit_repeats is not None else (1 if ctx.quick else 3)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, sizes[0]), dtype=np.float32)
    y = rng.integers(0, sizes[-1], n)
    k = b.kernels
    notes: list[str] = []
    device, why = ctx.torch_device(b)
    ops: dict[str, Callable[[], Any]] = {}
    losses: dict[str, float] = {}
    if device is not None:
        assert ctx.peer is not None
        torch_epoch = ctx.peer.epoch_fn(_net(sizes, "relu", "multiclass", b), X, y, device, batch_size=bs, lr=lr,
                                        momentum=momentum)
        ops["torch"] = lambda: losses.__setitem__("torch", torch_epoch())
    else:
        notes.append(why)
    nets = {"host": _net(sizes, "relu", "multiclass", b), "device": _net(sizes, "relu", "multiclass", b)}
    opts = {name: SGD(lr, momentum=momentum) for name in nets}
    Xd = k.to_device(X, DTYPE)
    Td = k.to_device(np.eye(sizes[-1], dtype=DTYPE)[y], DTYPE)
    args = {"host": (X, y), "device": (Xd, Td)}

    def fit_op(name: str) -> Callable[[], Any]:
        def run() -> None:
            h = nets[name].fit(*args[name], epochs=1, batch_size=bs, optimizer=opts[name], progress=False)
            losses[name] = h.loss[-1]
        return run

    ops = {"host": fit_op("host"), "device": fit_op("device"), **ops}
    tm = ctx.time(ops, ctx.sync(b, device), repeats=repeats, warmup=0, min_sample_time=0.0)
    labels = {"host": "backprop `net.fit(X, y)`, NumPy X and integer labels y",
              "device": "backprop `net.fit(X, T)`, X and one-hot T already on the device",
              "torch": "PyTorch eager loop, data on the device"}
    rows, targets = [], []
    t_torch = tm.get("torch")
    for name, t in tm.items():
        ratio = t_torch.median / t.median if t_torch is not None and name != "torch" else None
        best = t_torch.min / t.min if t_torch is not None and name != "torch" else None
        rows.append([labels[name], f"{t.first_call:.4g}", f"{t.min:.4g}", f"{t.median:.4g}", _x(ratio), _x(best),
                     f"{losses.get(name, float('nan')):.4g}"])
        if name != "torch":
            targets.append({"what": f"PyTorch epoch / backprop epoch, {name} arrays (median)",
                            "target": f">= {FIT.target}", "measured": ratio,
                            "met": None if ratio is None else bool(ratio >= FIT.target)})
    return {
        "description": (f"One epoch, {n} x {sizes[0]} random float32 data, {sizes[-1]} classes, {sizes}, ReLU, softmax "
                        f"+ cross-entropy, batch {bs}, SGD(lr={lr}, momentum={momentum}); the first epoch of each "
                        f"is the warm-up (its time in the first column), then {repeats} epoch(s) each, interleaved. "
                        "backprop reads its loss once per epoch; so does the PyTorch loop (`torch.randperm` on the "
                        "device, minibatches gathered there, the loss summed there)."),
        "tables": [{"header": ["variant", "warm-up epoch s", "best s", "median s", "torch / this (median)",
                               "torch / this (best)", "epoch loss"], "rows": rows}],
        "targets": targets, "notes": notes,
        "settings": {"sizes": sizes, "rows": n, "batch_size": bs, "lr": lr, "momentum": momentum,
                     "repeats": repeats, "backend": b.name, "torch_device": device},
        "timings": {name: _timing(t) for name, t in tm.items()}, "epoch_loss": losses,
    }


# --------------------------------------------------------------------------- 2. the public API
def _api_case(ctx: Context, b: Backend, case: Case, sizes: list[int], batch: int,
              rng: np.random.Generator) -> dict[str, Timing]:
    k = b.kernels
    net = _net(sizes, case.activation, case.head, b)
    x_h, t_h = _data(sizes, batch, case.head, rng)
    x, t = k.to_device(x_h, DTYPE), k.to_device(t_h, DTYPE)
    opt = SGD(lr=1e-3)
    ops = {"train_step": lambda: net.train_step(x, t, opt),
           "train_step_device": lambda: net.train_step_device(x, t, opt),
           "forward": lambda: net.forward(x),
           "forward_device": lambda: net.forward_device(x)}
    return ctx.time(ops, b.synchronize)


def section_api(ctx: Context) -> dict[str, Any]:
    b = ctx.require_device()
    rng = np.random.default_rng(1)
    rows, targets, raw = [], [], {}
    for case in API_CASES:
        sizes, batch = case.at(ctx.quick)
        tm = _api_case(ctx, b, case, sizes, batch, rng)
        _release(b)
        step_ratio = tm["train_step"].median / tm["train_step_device"].median
        fwd_ratio = tm["forward"].median / tm["forward_device"].median
        rows.append([case.name, str(sizes), str(batch), _ms(tm["train_step"].median),
                     _ms(tm["train_step_device"].median), _x(step_ratio), _ms(tm["forward"].median),
                     _ms(tm["forward_device"].median), _x(fwd_ratio)])
        for what, r in (("train_step / train_step_device", step_ratio), ("forward / forward_device", fwd_ratio)):
            targets.append({"what": f"{case.name}: {what}", "target": f"<= {API_TARGET}", "measured": r,
                            "met": bool(r <= API_TARGET)})
        raw[case.name] = {"sizes": sizes, "batch": batch, "timings": {op: _timing(v) for op, v in tm.items()}}
    return {
        "description": ("The public methods called with arrays of the backend (x, t made by `to_device`) against "
                        "the device-level methods on the same arrays: `net.train_step(x, t, opt)` vs "
                        "`net.train_step_device(x, t, opt)` (SGD, lr 1e-3) and `net.forward(x)` vs "
                        f"`net.forward_device(x)`; median of {ctx.repeats} interleaved samples, ms per call."),
        "tables": [{"header": ["net", "sizes", "batch", "train_step ms", "train_step_device ms", "ratio",
                               "forward ms", "forward_device ms", "ratio"], "rows": rows}],
        "targets": targets, "settings": {"backend": b.name, "repeats": ctx.repeats}, "cases": raw,
    }


# --------------------------------------------------------------------------- 3. the step against PyTorch
def gemm_rate(backend: Backend, n: int, ctx: Context) -> float:
    """FLOP/s of one ``n x n x n`` float32 GEMM through the backend's own layer call
    (``layer_forward`` with the identity: the GEMM and a bias add), with the backend's current settings."""
    k = backend.kernels
    rng = np.random.default_rng(2)
    x = k.to_device(rng.standard_normal((n, n), dtype=np.float32), DTYPE)
    W = k.to_device(rng.standard_normal((n, n), dtype=np.float32), DTYPE)
    bias = k.zeros((n,), DTYPE)
    y = k.zeros((n, n), DTYPE)
    tm = ctx.time({"gemm": lambda: k.layer_forward(x, W, bias, "identity", 0.0, False, y=y)}, backend.synchronize)
    return 2.0 * n**3 / tm["gemm"].median


def _compiled_step(ctx: Context, net: MLP, x_h: np.ndarray, t_h: np.ndarray, device: str,
                   lr: float) -> tuple[Callable[[], Any] | None, str, float]:
    """A warmed-up ``torch.compile`` step, or ``None`` and why; and the seconds the first call took."""
    assert ctx.peer is not None
    if ctx.args.no_compile:
        return None, "--no-compile", 0.0
    reason = ctx.peer.compile_reason()
    if reason:
        return None, reason, 0.0
    if ctx.compile_spent > ctx.compile_budget:
        return None, (f"compiling the earlier nets took {ctx.compile_spent:.0f} s, over --compile-budget "
                      f"{ctx.compile_budget:g} s"), 0.0
    t0 = time.perf_counter()
    try:
        fn = ctx.peer.step_fn(net, x_h, t_h, device, lr=lr, compiled=True)
        fn()
        ctx.peer.synchronizer(device)()
    except Exception as exc:  # noqa: BLE001 - no compiler here, or a compiler error: skip the column
        return None, ctx.peer.compile_failed(exc), time.perf_counter() - t0
    finally:
        ctx.compile_spent += time.perf_counter() - t0
    return fn, "", time.perf_counter() - t0


def _step_case(ctx: Context, b: Backend, case: Case, sizes: list[int], batch: int, rng: np.random.Generator,
               device: str | None, notes: list[str]) -> tuple[dict[str, Timing], float | None]:
    """Time backprop's step, PyTorch eager and compiled (where they run) on one net; notes why not."""
    k = b.kernels
    lr = 1e-3
    net = _net(sizes, case.activation, case.head, b)
    x_h, t_h = _data(sizes, batch, case.head, rng)
    x, t = k.to_device(x_h, DTYPE), k.to_device(t_h, DTYPE)
    opt = SGD(lr=lr)
    ops: dict[str, Callable[[], Any]] = {"backprop": lambda: net.train_step_device(x, t, opt)}
    compile_s = None
    if device is not None:
        assert ctx.peer is not None
        ops["torch"] = ctx.peer.step_fn(net, x_h, t_h, device, lr=lr)
        fn, reason, compile_s = _compiled_step(ctx, net, x_h, t_h, device, lr)
        if fn is not None:
            ops["torch_compile"] = fn
        elif f"torch.compile not measured: {reason}" not in notes:
            notes.append(f"torch.compile not measured: {reason}")
    return ctx.time(ops, ctx.sync(b, device)), compile_s


def section_step(ctx: Context) -> dict[str, Any]:
    b = ctx.require_device()
    rng = np.random.default_rng(3)
    device, why = ctx.torch_device(b)
    notes = [why] if why else []
    gemm_n = ctx.args.gemm_size if ctx.args.gemm_size is not None else (64 if ctx.quick else 4096)
    gemm = gemm_rate(b, gemm_n, ctx)
    notes.append(f"float32 GEMM {gemm_n}^3 through the backend's layer call: {gemm / 1e12:.3g} TFLOP/s")
    rows, raw = [], {}
    for case in STEP_CASES:
        sizes, batch = case.at(ctx.quick)
        tm, compile_s = _step_case(ctx, b, case, sizes, batch, rng, device, notes)
        if device is not None and ctx.peer is not None:
            ctx.peer.release(device)
        _release(b)
        flops = _step_flops(sizes, batch)
        bp = tm["backprop"].median
        tt, tc = tm.get("torch"), tm.get("torch_compile")
        rows.append([case.name, str(sizes), str(batch), f"{flops / 1e9:.3g}", _ms(bp),
                     _ms(tt.median if tt else None), _x(tt.median / bp if tt else None),
                     _ms(tc.median if tc else None), _x(tc.median / bp if tc else None),
                     f"{flops / bp / 1e12:.3g}"])
        raw[case.name] = {"sizes": sizes, "batch": batch, "flops": flops, "compile_first_call_s": compile_s,
                          "timings": {op: _timing(v) for op, v in tm.items()}}
        if case.gemm_bound:
            frac = flops / bp / gemm
            raw[case.name]["fraction_of_gemm"] = frac
            line = f"{case.name}: backprop reaches {flops / bp / 1e12:.3g} TFLOP/s, {100 * frac:.0f}% of that GEMM rate"
            if tt:
                line += f"; torch eager {flops / tt.median / 1e12:.3g} TFLOP/s, {100 * flops / tt.median / gemm:.0f}%"
            notes.append(line)
    return {
        "description": ("One training step on a fixed batch, the loss read back every step on both sides: backprop "
                        "`net.train_step_device(x, t, SGD(lr=1e-3))`; PyTorch `zero_grad`, forward, loss, `backward`, "
                        "`SGD.step`, `loss.item()`, eager and with the model under `torch.compile` (first call, the "
                        "compilation, excluded). TF32 as each library defaults on the backend (off in backprop). "
                        f"Median of {ctx.repeats} interleaved samples; ratio = other / backprop (above 1: backprop "
                        "faster)."),
        "tables": [{"header": ["net", "sizes", "batch", "GFLOP/step", "backprop ms", "torch eager ms",
                               "eager / backprop", "torch.compile ms", "compile / backprop", "backprop TFLOP/s"],
                    "rows": rows}],
        "notes": notes, "gemm": {"n": gemm_n, "flops_per_s": gemm}, "cases": raw,
        "settings": {"backend": b.name, "torch_device": device, "repeats": ctx.repeats},
    }


# --------------------------------------------------------------------------- 4. CUDA graphs
def section_graph(ctx: Context) -> dict[str, Any]:
    b = ctx.require_device()
    k = b.kernels
    sizes, batch = GRAPH_CASE.at(ctx.quick)
    net = _net(sizes, GRAPH_CASE.activation, GRAPH_CASE.head, b)
    x_h, t_h = _data(sizes, batch, GRAPH_CASE.head, np.random.default_rng(4))
    x, t = k.to_device(x_h, DTYPE), k.to_device(t_h, DTYPE)
    opt = SGD(lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # the first call runs a plain step and records the graph
            net.train_step(x, t, opt, graph=True)
        except (ValueError, NotImplementedError) as exc:  # the backend cannot record a step: says why
            raise SkipSection(str(exc)) from None
    fallback = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if fallback:
        raise SkipSection(f"the recording fell back to plain steps on backend {b.name!r}: {fallback[0]}")
    ops = {"plain": lambda: net.train_step(x, t, opt), "graph": lambda: net.train_step(x, t, opt, graph=True),
           "plain_device": lambda: net.train_step_device(x, t, opt)}
    tm = ctx.time(ops, b.synchronize)
    ratio = tm["plain"].median / tm["graph"].median
    return {
        "description": (f"`net.train_step(x, t, opt)` against `net.train_step(x, t, opt, graph=True)` on {sizes} "
                        f"@ {batch} ({GRAPH_CASE.activation}, softmax + cross-entropy, SGD), device arrays; "
                        f"`train_step_device` for reference; median of {ctx.repeats} interleaved samples."),
        "tables": [{"header": ["sizes", "batch", "plain ms", "graph ms", "plain / graph", "train_step_device ms"],
                    "rows": [[str(sizes), str(batch), _ms(tm["plain"].median), _ms(tm["graph"].median), _x(ratio),
                              _ms(tm["plain_device"].median)]]}],
        "targets": [{"what": "plain step / graph step", "target": f">= {GRAPH_TARGET}", "measured": ratio,
                     "met": bool(ratio >= GRAPH_TARGET)}],
        "timings": {op: _timing(v) for op, v in tm.items()},
        "settings": {"backend": b.name, "sizes": sizes, "batch": batch},
    }


# --------------------------------------------------------------------------- 5. TF32
def section_tf32(ctx: Context) -> dict[str, Any]:
    if ctx.args.no_tf32:
        raise SkipSection("--no-tf32")
    b = ctx.require_device()
    k = b.kernels
    set_tf32 = getattr(k, "set_tf32", None)
    if not callable(set_tf32):
        raise SkipSection(f"backend {b.name!r} has no set_tf32")
    enabled = getattr(k, "tf32_enabled", None)
    before = bool(enabled()) if callable(enabled) else False
    sizes, batch = TF32_CASE.at(ctx.quick)
    device, why = ctx.torch_device(b)
    net = _net(sizes, TF32_CASE.activation, TF32_CASE.head, b)
    x_h, t_h = _data(sizes, batch, TF32_CASE.head, np.random.default_rng(5))
    x, t = k.to_device(x_h, DTYPE), k.to_device(t_h, DTYPE)
    opt = SGD(lr=1e-3)
    peer = ctx.peer if device is not None else None
    torch_step = peer.step_fn(net, x_h, t_h, device, lr=1e-3) if peer is not None and device else None

    def mode(on: bool, fn: Callable[[], Any], torch_side: bool = False) -> Callable[[], Any]:
        def run() -> Any:
            if torch_side:
                assert peer is not None
                peer.set_tf32(on)
            else:
                set_tf32(on)
            return fn()
        return run

    def backprop_step() -> Any:
        return net.train_step_device(x, t, opt)

    ops: dict[str, Callable[[], Any]] = {"backprop_off": mode(False, backprop_step),
                                         "backprop_on": mode(True, backprop_step)}
    if torch_step is not None:
        ops.update(torch_off=mode(False, torch_step, True), torch_on=mode(True, torch_step, True))
    try:
        tm = ctx.time(ops, ctx.sync(b, device))
        gemm_n = ctx.args.gemm_size if ctx.args.gemm_size is not None else (64 if ctx.quick else 4096)
        set_tf32(False)
        gemm_off = gemm_rate(b, gemm_n, ctx)
        set_tf32(True)
        gemm_on = gemm_rate(b, gemm_n, ctx)
    finally:
        set_tf32(before)
        if peer is not None:
            peer.set_tf32(False)
    flops = _step_flops(sizes, batch)
    rows = []
    for side in ("backprop", "torch"):
        if f"{side}_off" not in tm:
            continue
        off, on = tm[f"{side}_off"].median, tm[f"{side}_on"].median
        rows.append([side, _ms(off), _ms(on), _x(off / on), f"{flops / off / 1e12:.3g}", f"{flops / on / 1e12:.3g}"])
    rows.append([f"GEMM {gemm_n}^3 (backend)", _ms(2 * gemm_n**3 / gemm_off), _ms(2 * gemm_n**3 / gemm_on),
                 _x(gemm_on / gemm_off), f"{gemm_off / 1e12:.3g}", f"{gemm_on / 1e12:.3g}"])
    return {
        "description": (f"The GEMM-bound net {sizes} @ {batch} (ReLU, MSE, SGD), `train_step_device` and the PyTorch "
                        "eager step, with TF32 off and on (set before each call: `set_tf32` on the backend, "
                        "`allow_tf32` in PyTorch), interleaved; and one GEMM through the backend's layer call."),
        "tables": [{"header": ["", "TF32 off ms", "TF32 on ms", "off / on", "TFLOP/s off", "TFLOP/s on"],
                    "rows": rows}],
        "notes": [why] if why else [],
        "timings": {op: _timing(v) for op, v in tm.items()},
        "gemm": {"n": gemm_n, "off": gemm_off, "on": gemm_on},
        "settings": {"backend": b.name, "sizes": sizes, "batch": batch, "tf32_before": before},
    }


# --------------------------------------------------------------------------- 6. fused narrow networks
FUSED_CASE = Case("narrow_deep", (64,) * 6, 262144, "relu", "regression", (16,) * 4, 256)
FUSED_TARGET = 3.0


def _switch_of(backend: Backend, name: str, what: str) -> Callable[[bool], None]:
    """The backend's switch ``name`` (``set_fused_mlp``, ``set_epilogues``), or a skipped section naming ``what``."""
    switch = getattr(backend.kernels, name, None)
    if not callable(switch):
        raise SkipSection(f"backend {backend.name!r} has no {what} ({name})")
    return switch


def _switched(switch: Callable[[bool], None], on: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with a backend switch (``set_epilogues``) set to ``on`` first: the timed
    sides of an off/on comparison, interleaved by ``Context.time``."""
    def run() -> Any:
        switch(on)
        return fn()
    return run


def _tf32_variant(b: Backend, peer: Any) -> tuple[Callable[[bool], None] | None, Callable[[bool], None], str]:
    """The switches of the fused section's TF32 rows: the backend's ``set_tf32`` (``None``, with the reason,
    where the fused kernels would not take the tensor cores) and the peer's (a no-op without one)."""
    set_tf32 = getattr(b.kernels, "set_tf32", None)
    where = getattr(b.kernels, "fused_mlp_path", None)
    if not callable(set_tf32) or not callable(where):
        return None, lambda on: None, f"backend {b.name!r} has no TF32 fused kernels"
    before = bool(b.kernels.tf32_enabled())
    set_tf32(True)
    try:
        path = where(DTYPE)
    finally:
        set_tf32(before)
    if path != "TF32 tensor cores":
        return None, lambda on: None, f"no TF32 rows: the fused kernels would run on the {path}"
    return set_tf32, (peer.set_tf32 if peer is not None else (lambda on: None)), ""


def section_fused(ctx: Context) -> dict[str, Any]:
    """The narrow net's training step (SGD, Adam) and inference, layer by layer and fused (one launch per pass,
    ``set_fused_mlp``), against PyTorch eager on the same device; in float32, then (where the fused kernels take the
    tensor cores) with TF32 on in both frameworks."""
    b = ctx.require_device()
    k = b.kernels
    set_fused = _switch_of(b, "set_fused_mlp", "fused kernels")
    before = bool(k.fused_mlp_enabled())
    tf32_before = bool(k.tf32_enabled()) if callable(getattr(k, "tf32_enabled", None)) else False
    sizes, batch = FUSED_CASE.at(ctx.quick)
    device, why = ctx.torch_device(b)
    net = _net(sizes, FUSED_CASE.activation, FUSED_CASE.head, b)
    reason = k.fused_mlp_reason(net.sizes, [L.activation.name for L in net.layers], net.dtype)
    if reason:
        raise SkipSection(f"the fused kernels do not serve {sizes}: {reason}")
    x_h, t_h = _data(sizes, batch, FUSED_CASE.head, np.random.default_rng(6))
    x, t = k.to_device(x_h, DTYPE), k.to_device(t_h, DTYPE)
    sgd, adam = SGD(lr=1e-3), Adam(1e-3)
    peer = ctx.peer if device is not None else None
    set_tf32, peer_tf32, tf32_why = _tf32_variant(b, peer)
    variants = {"": False} | ({"_tf32": True} if set_tf32 is not None else {})

    def mode(fused_on: bool, tf32: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:  # every side sets every switch: the sides are interleaved
            set_fused(fused_on)
            if set_tf32 is not None:
                set_tf32(tf32)
            peer_tf32(tf32)
            return fn()
        return run

    ops: dict[str, Callable[[], Any]] = {}
    for v, tf32 in variants.items():
        for on, tag in ((False, "layers"), (True, "fused")):
            ops[f"sgd_{tag}{v}"] = mode(on, tf32, lambda: net.train_step_device(x, t, sgd))
            ops[f"adam_{tag}{v}"] = mode(on, tf32, lambda: net.train_step_device(x, t, adam))
            ops[f"infer_{tag}{v}"] = mode(on, tf32, lambda: net.forward_device(x))
        if peer is not None:
            ops[f"sgd_torch{v}"] = mode(False, tf32, peer.step_fn(net, x_h, t_h, device, lr=1e-3))
            ops[f"infer_torch{v}"] = mode(False, tf32, peer.forward_fn(net, x_h, device))
    try:
        tm = ctx.time(ops, ctx.sync(b, device))
    finally:
        set_fused(before)
        if set_tf32 is not None:
            set_tf32(tf32_before)
        peer_tf32(False)
    flops = _step_flops(sizes, batch)
    rates = _achieved(ctx, b, net, sizes, batch, {f"{w}_fused{v}": tm[f"{w}_fused{v}"].median
                                                  for v in variants for w in ("sgd", "adam", "infer")}, set_tf32)
    rows, targets = [], []
    for v in variants:
        for what in ("sgd", "adam", "infer"):
            layers, fused_t = tm[f"{what}_layers{v}"].median, tm[f"{what}_fused{v}"].median
            peer_t = tm.get(f"{what}_torch{v}")
            label = f"{what}{' TF32' if v else ''}"
            rows.append([label, _ms(layers), _ms(fused_t), _x(layers / fused_t),
                         _ms(peer_t.median if peer_t else None), _x(peer_t.median / fused_t if peer_t else None)])
            if peer_t is not None:
                ratio = peer_t.median / fused_t
                targets.append({"what": f"{label}: torch eager / fused", "target": f">= {FUSED_TARGET}",
                                "measured": ratio, "met": bool(ratio >= FUSED_TARGET)})
    return {
        "description": (f"The narrow net {sizes} @ {batch} ({FUSED_CASE.activation}, MSE) in float32: "
                        "`train_step_device` with SGD and Adam, and `forward_device`, with the fused kernels off "
                        "(a GEMM and an elementwise kernel per layer) and on (one launch per pass), against the "
                        f"PyTorch eager step (SGD) and inference; median of {ctx.repeats} interleaved samples. "
                        "The TF32 rows set TF32 on in both frameworks (`set_tf32`, `allow_tf32`): the fused kernels "
                        f"then run on the tensor cores. Training step: {flops / 1e9:.3g} GFLOP."),
        "tables": [{"header": ["", "layers ms", "fused ms", "layers / fused", "torch eager ms", "torch / fused"],
                    "rows": rows}, rates["table"]],
        "targets": targets, "notes": ([why] if why else []) + ([tf32_why] if tf32_why else []) + [rates["note"]],
        "timings": {op: _timing(v) for op, v in tm.items()}, "achieved": rates["values"],
        "settings": {"backend": b.name, "sizes": sizes, "batch": batch, "fused_before": before,
                     "tf32_rows": set_tf32 is not None},
    }


def _achieved(ctx: Context, b: Backend, net: MLP, sizes: list[int], batch: int, seconds: dict[str, float],
              set_tf32: Callable[[bool], None] | None = None) -> dict[str, Any]:
    """The fused passes' achieved TFLOP/s and GB/s (activations' traffic, ``fused_mlp_sources.traffic_bytes``)
    against the measured SGEMM rate (the TF32 GEMM rate for ``*_tf32`` passes, measured with ``set_tf32``) and the
    device's copy bandwidth, all measured here."""
    k = b.kernels
    gemm_n = ctx.args.gemm_size if ctx.args.gemm_size is not None else (64 if ctx.quick else 4096)
    sgemm = gemm_rate(b, gemm_n, ctx)
    tf32_gemm = None
    if set_tf32 is not None:
        before = bool(k.tf32_enabled())
        set_tf32(True)
        try:
            tf32_gemm = gemm_rate(b, gemm_n, ctx)
        finally:
            set_tf32(before)
    n_copy = 2**16 if ctx.quick else 2**26  # 256 MB of float32 in full runs
    src, dst = k.zeros((n_copy,), DTYPE), k.zeros((n_copy,), DTYPE)
    copy_s = ctx.time({"copy": lambda: k.copy_into(dst, src)}, b.synchronize)["copy"].median
    copy_bw = 2 * n_copy * np.dtype(DTYPE).itemsize / copy_s  # read and write
    keep_u = step.workspace(net, batch).keep_u
    traffic = fused_sources.traffic_bytes(sizes, keep_u, batch, np.dtype(DTYPE).itemsize)
    fwd_flops = flop_counts(sizes, batch)["forward"]
    work = {"sgd": (_step_flops(sizes, batch), traffic["forward"] + traffic["backward"]),
            "adam": (_step_flops(sizes, batch), traffic["forward"] + traffic["backward"]),
            "infer": (fwd_flops, traffic["inference"])}
    rows, values = [], {}
    for op, secs in seconds.items():
        flop, nbytes = work[op.split("_")[0]]
        gemm = tf32_gemm if op.endswith("_tf32") and tf32_gemm else sgemm
        tflops, gbs = flop / secs / 1e12, nbytes / secs / 1e9
        values[op] = {"tflops": tflops, "gb_per_s": gbs, "of_sgemm": flop / secs / gemm,
                      "of_copy": nbytes / secs / copy_bw, "flop": flop, "bytes": nbytes}
        label = op.split("_")[0] + (" TF32" if op.endswith("_tf32") else "")
        rows.append([label, f"{tflops:.2f}", f"{values[op]['of_sgemm']:.2f}", f"{gbs:.0f}",
                     f"{values[op]['of_copy']:.2f}"])
    values["sgemm_tflops"], values["copy_gb_per_s"] = sgemm / 1e12, copy_bw / 1e9
    tf32_note = ""
    if tf32_gemm:
        values["tf32_gemm_tflops"] = tf32_gemm / 1e12
        tf32_note = f", the same GEMM in TF32 {tf32_gemm / 1e12:.2f} TFLOP/s (the TF32 rows' reference)"
    return {"table": {"header": ["fused", "TFLOP/s", "of SGEMM", "GB/s", "of copy bandwidth"], "rows": rows},
            "values": values,
            "note": (f"Measured here: SGEMM {sgemm / 1e12:.2f} TFLOP/s ({gemm_n}^3 through layer_forward){tf32_note}, "
                     f"device copy {copy_bw / 1e9:.0f} GB/s ({n_copy * 4 / 1e6:.0f} MB copied); GB/s counts the "
                     "activations the fused passes read and write (kernels.fused_mlp_sources.traffic_bytes).")}


# --------------------------------------------------------------------------- 7. cuBLASLt epilogues
EPILOGUE_CASES = [
    (Case("narrow_deep", (64,) * 6, 262144, "relu", "regression", (16,) * 4, 256), 1.5),
    (Case("mnist_like", (784, 1024, 1024, 10), 4096, "relu", "multiclass", (32, 64, 64, 4), 64), 1.25),
    (Case("gemm_bound", (4096,) * 4, 4096, "relu", "regression", (64,) * 4, 64, gemm_bound=True), None),
]
#: The GEMM-bound net with epilogues keeps at least this share of the measured cuBLAS rate.
EPILOGUE_GEMM_SHARE = 0.95


def section_epilogues(ctx: Context) -> dict[str, Any]:
    """The SGD training step with cuBLASLt epilogues off and on (``set_epilogues``) against the PyTorch eager
    step, on the nets of the targets; the GEMM-bound net's rate against the measured cuBLAS rate."""
    b = ctx.require_device()
    k = b.kernels
    switch = _switch_of(b, "set_epilogues", "cuBLASLt epilogues")
    before = bool(k.epilogues_enabled())
    rows, targets, raw, notes = [], [], [], []
    try:
        for case, target in EPILOGUE_CASES:
            sizes, batch = case.at(ctx.quick)
            device, why = ctx.torch_device(b)
            if why and why not in notes:
                notes.append(why)
            net = _net(sizes, case.activation, case.head, b)
            x_h, t_h = _data(sizes, batch, case.head, np.random.default_rng(7))
            x, t = k.to_device(x_h, DTYPE), k.to_device(t_h, DTYPE)
            sgd = SGD(lr=1e-3)
            ops: dict[str, Callable[[], Any]] = {
                tag: _switched(switch, on, lambda: net.train_step_device(x, t, sgd))
                for tag, on in (("off", False), ("on", True))}
            if device is not None and ctx.peer is not None:
                ops["torch"] = ctx.peer.step_fn(net, x_h, t_h, device, lr=1e-3)
            tm = ctx.time(ops, ctx.sync(b, device))
            switch(True)
            paths = sorted({p for key, p in k.epilogue_paths().items() if key[-1] == "f"})
            switch(False)
            flops = _step_flops(sizes, batch)
            off, on = tm["off"].median, tm["on"].median
            peer = tm.get("torch")
            share = None
            if case.gemm_bound:
                rate = gemm_rate(b, sizes[1], ctx)  # epilogues off: cuBLAS's own GEMM
                share = flops / on / rate
                targets.append({"what": f"{case.name}: rate with epilogues / measured cuBLAS rate",
                                "target": f">= {EPILOGUE_GEMM_SHARE}", "measured": share,
                                "met": bool(share >= EPILOGUE_GEMM_SHARE)})
            if peer is not None and target is not None:
                ratio = peer.median / on
                targets.append({"what": f"{case.name}: torch eager / epilogues", "target": f">= {target}",
                                "measured": ratio, "met": bool(ratio >= target)})
            rows.append([case.name, str(list(sizes)), str(batch), _ms(off), _ms(on), _x(off / on),
                         _ms(peer.median if peer else None), _x(peer.median / on if peer else None),
                         f"{flops / on / 1e12:.1f}", "" if share is None else f"{share:.2f}"])
            raw.append({"name": case.name, "sizes": list(sizes), "batch": batch, "paths": paths,
                        "timings": {op: _timing(v) for op, v in tm.items()}})
    finally:
        switch(before)
    return {
        "description": ("`train_step_device` with SGD (lr 1e-3) in float32, cuBLASLt epilogues off (a GEMM and an "
                        "elementwise kernel per step of each layer, a GEMV for db) and on (`set_epilogues`: bias and "
                        "activation in the forward GEMM, the ReLU slope in the backward GEMM, db in the gradient "
                        f"GEMM), against the PyTorch eager step; median of {ctx.repeats} interleaved samples."),
        "tables": [{"header": ["net", "sizes", "batch", "off ms", "on ms", "off / on", "torch eager ms",
                               "torch / on", "TFLOP/s on", "share of cuBLAS rate"], "rows": rows}],
        "targets": targets, "notes": notes, "cases": raw,
        "settings": {"backend": b.name, "epilogues_before": before},
    }


# --------------------------------------------------------------------------- 8. the CPU
def _cpu_backends(spec: str) -> tuple[list[Backend], list[str]]:
    chosen, notes = [], []
    for name in [n.strip() for n in spec.split(",") if n.strip()]:
        try:
            backend = resolve_backend(name)
        except ValueError as exc:
            notes.append(f"backend {name} skipped: {exc}")
            continue
        if backend.is_gpu:
            notes.append(f"backend {name} skipped: a GPU backend")
            continue
        chosen.append(backend)
    return chosen, notes


def _public_and_device(net: MLP, x: Any, t: Any, opt: SGD) -> tuple[Callable[[], Any], Callable[[], Any]]:
    return (lambda: net.train_step(x, t, opt)), (lambda: net.train_step_device(x, t, opt))


def section_cpu(ctx: Context) -> dict[str, Any]:
    backends, notes = _cpu_backends(ctx.args.cpu_backends)
    if not backends:
        raise SkipSection("no CPU backend to measure (" + "; ".join(notes) + ")")
    peer = ctx.peer
    if peer is None:
        notes.append(f"PyTorch not measured: {ctx.peer_reason}")
    repeats = ctx.args.cpu_repeats if ctx.args.cpu_repeats is not None else (2 if ctx.quick else 21)
    rng = np.random.default_rng(6)
    rows, targets, raw = [], [], {}
    lr = 0.01
    for case in CPU_CASES:
        sizes, batch = case.at(ctx.quick)
        x_h, t_h = _data(sizes, batch, case.head, rng)
        ops: dict[str, Callable[[], Any]] = {}
        if peer is not None:
            ops["torch"] = peer.step_fn(_net(sizes, case.activation, case.head, backends[0]), x_h, t_h, "cpu", lr=lr)
        for be in backends:
            net = _net(sizes, case.activation, case.head, be)
            x, t = be.kernels.to_device(x_h, DTYPE), be.kernels.to_device(t_h, DTYPE)
            opt = SGD(lr=lr)
            ops[f"{be.name}/train_step"], ops[f"{be.name}/train_step_device"] = _public_and_device(net, x, t, opt)
        tm = ctx.time(ops, lambda: None, repeats=repeats, warmup=3)
        tt = tm.get("torch")
        for be in backends:
            pub, dev = tm[f"{be.name}/train_step"], tm[f"{be.name}/train_step_device"]
            ratio = tt.median / pub.median if tt else None
            paired = paired_ratio(tt, pub) if tt else None
            rows.append([case.name, str(sizes), str(batch), be.name, _ms(pub.median), _ms(dev.median),
                         _ms(tt.median if tt else None), _x(ratio), _x(paired),
                         _x(tt.median / dev.median if tt else None), f"{pub.first_call * 1e3:.4g}"])
            targets.append({"what": f"{case.name}, {be.name}: PyTorch step / backprop train_step (median)",
                            "target": f">= {CPU_TARGET}", "measured": ratio,
                            "met": None if ratio is None else bool(ratio >= CPU_TARGET)})
        raw[case.name] = {"sizes": sizes, "batch": batch, "timings": {op: _timing(v) for op, v in tm.items()}}
    threads: dict[str, Any] = {}
    if peer is not None:
        threads["torch"] = peer.torch.get_num_threads()
    if "numba" in sys.modules:
        import numba

        threads["numba"] = numba.get_num_threads()
    notes.append("threads: " + ", ".join(f"{k} {v}" for k, v in threads.items())
                 + (f" (--threads {ctx.args.threads})" if ctx.args.threads else " (the libraries' defaults)")
                 + "; on a machine with other work running, libraries whose threads wait for each other at every "
                   "parallel region (OpenMP) lose most: compare the paired column, and a run with --threads 1")
    return {
        "description": ("One training step on a fixed batch (float32, SGD lr 0.01, the loss read every step), "
                        "PyTorch on the CPU (`zero_grad`, forward, loss, `backward`, `SGD.step`, `loss.item()`) "
                        "against each CPU backend's public `net.train_step(x, t, opt)` (what a user calls: the "
                        "arrays are checked) and `net.train_step_device`; every step of every side timed in "
                        f"{repeats} interleaved rounds (each sample at least {ctx.min_sample_time * 1e3:g} ms), "
                        "median. Ratio = torch / backprop (above 1: backprop faster); paired = the median over "
                        "rounds of that ratio within a round."),
        "tables": [{"header": ["net", "sizes", "batch", "backend", "train_step ms", "train_step_device ms",
                               "torch ms", "torch / train_step", "paired", "torch / train_step_device",
                               "first call ms"], "rows": rows}],
        "targets": targets, "notes": notes, "threads": threads, "cases": raw,
        "settings": {"backends": [be.name for be in backends], "repeats": repeats, "lr": lr},
    }


#: key -> (file stem, title, function); run in this order
SECTIONS: dict[str, tuple[str, str, Callable[[Context], dict[str, Any]]]] = {
    "fit": ("fit_vs_torch", "1. `fit`: one epoch against a PyTorch loop", section_fit),
    "api": ("api_overhead", "2. The public API on device arrays against the device-level calls", section_api),
    "step": ("step_vs_torch", "3. The device-level step against PyTorch eager and torch.compile", section_step),
    "graph": ("graph_step", "4. CUDA-graph step against the plain step", section_graph),
    "tf32": ("tf32", "5. TF32 off and on, the GEMM-bound net", section_tf32),
    "fused": ("fused_narrow", "6. Fused kernels for a narrow net, off and on, against PyTorch", section_fused),
    "epilogues": ("epilogues", "7. cuBLASLt epilogues, off and on, against PyTorch", section_epilogues),
    "cpu": ("cpu_step_vs_torch", "8. CPU: the training step against PyTorch on the CPU", section_cpu),
}


# --------------------------------------------------------------------------- command line
# Every option is checked before any work starts and before anything is written: a bad value is reported
# as "<prog>: error: argument --name: ..." and main returns 2. The numeric checkers are those of
# backprop-bench (:mod:`backprop.bench.cli`); the lists of names and the output folder are checked here.


def _names(text: str, known: Iterable[str], what: str, *, also: str = "") -> list[str]:
    """The comma-separated names of ``text``, stripped, lower-cased, each once (first place kept); an
    ``ArgumentTypeError`` listing the known ones for an unknown name or none at all."""
    known = list(known)
    listed = f"known: {', '.join(known)}{also}"
    names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"no {what} in {text!r}; {listed}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown))}; {listed}")
    return names


def section_list(text: str) -> str:
    """``--sections``: comma-separated keys of :data:`SECTIONS`, run in the order given (a repeated one once)."""
    return ",".join(_names(text, SECTIONS, "section(s)"))


def device_backend(text: str) -> str:
    """``--backend``: ``auto`` or one known backend name (whether it works here is found out when the run
    starts; sections 1-7 are then skipped with the reason)."""
    key = text.strip().lower()
    if key == "auto":
        return key
    if key not in BACKEND_MODULES:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; known: {', '.join(BACKEND_MODULES)} or 'auto'")
    return key


def cpu_backend_list(text: str) -> str:
    """``--cpu-backends``: comma-separated known backend names (a GPU one, or one that does not work here, is
    skipped by section 6 with the reason)."""
    return ",".join(_names(text, BACKEND_MODULES, "backend(s)"))


def out_names(sections: str) -> list[str]:
    """The files a run of ``sections`` (as :func:`section_list` returns them) writes in ``--out``."""
    stems = [SECTIONS[key][0] for key in sections.split(",") if key in SECTIONS] + [SUMMARY]
    return [f"{stem}{ext}" for stem in stems for ext in (".json", ".md")]


def out_problem(out: str, names: Iterable[str]) -> str | None:
    """Why ``out`` cannot be the output folder of files ``names`` (backprop-bench's check, see
    :func:`backprop.bench.cli.out_problem`), or ``None``. Creates nothing."""
    return _out_problem(out, names, f"the section files and {SUMMARY}.json/.md")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the option types cannot check alone (the output folder, against the files the chosen sections
    write): ``parser.error`` naming the option (exit status 2), before any work starts."""
    why = out_problem(args.out, out_names(args.sections))
    if why:
        parser.error(f"argument --out: {why}")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = doc_parser(prog, __doc__)
    p.add_argument("--out", type=out_dir, default=os.environ.get("OUT") or "bench-out",
                   help="folder of the results: one .json and .md per section and gpu_vs_torch.json/.md, the "
                        "summary (default: $OUT, else bench-out)")
    p.add_argument("--sections", type=section_list, default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, in this order: {','.join(SECTIONS)} (default: all)")
    p.add_argument("--backend", type=device_backend, default="auto",
                   help="backend of sections 1-7 (default auto: the first GPU backend that works here; a CPU backend "
                        f"may be named to try those sections on the CPU); known: {', '.join(BACKEND_MODULES)}")
    p.add_argument("--cpu-backends", type=cpu_backend_list, default="numpy,numba",
                   help=f"backends of section 6 (default numpy,numba); known: {', '.join(BACKEND_MODULES)}")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="interleaved samples per measurement (default 7, quick 2)")
    p.add_argument("--fit-repeats", type=positive_int, default=None,
                   help="timed epochs after the warm-up (default 3, quick 1)")
    p.add_argument("--cpu-repeats", type=positive_int, default=None,
                   help="interleaved rounds of section 6 (default 21, quick 2)")
    p.add_argument("--min-sample-time", type=sample_time_float, default=None,
                   help="seconds a sample lasts at least, looping short calls (default 0.05, quick 0.002)")
    p.add_argument("--quick", action="store_true", help="tiny nets and data: a smoke test of a few seconds")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile in section 3")
    p.add_argument("--compile-budget", type=non_negative_float, default=120.0,
                   help="seconds of torch.compile compilation after which later nets skip it (default 120)")
    p.add_argument("--no-tf32", action="store_true", help="skip section 5 (TF32)")
    p.add_argument("--gemm-size", type=positive_int, default=None,
                   help="n of the n^3 reference GEMM (default 4096, quick 64)")
    p.add_argument("--threads", type=threads_int, default=None,
                   help="limit BLAS/OpenMP/Numba and PyTorch threads (default: the libraries' own choice)")
    p.add_argument("--time-limit", type=positive_float, default=None,
                   help="seconds after which no further section starts (those left are recorded as skipped)")
    return p


def _bound(fn: Callable[[Context], dict[str, Any]], ctx: Context) -> Callable[[], dict[str, Any]]:
    return lambda: fn(ctx)


def main(argv: list[str] | None = None, prog: str = "python benchmarks/gpu_vs_torch.py") -> int:
    """Run the sections; returns 0, 1 if a section failed, 2 on bad usage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)  # every option's value is checked by its type ...
        check_args(parser, args)  # ... and the output folder, against the files the sections write, here
    except SystemExit as exc:  # --help, or a usage error argparse has already reported
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    keys = args.sections.split(",")
    start = time.perf_counter()
    try:
        ctx = Context(args)
        cpu, _ = _cpu_backends(args.cpu_backends) if "cpu" in keys else ([], [])
        if args.threads:
            # after the backends are loaded (Numba imported), so that Numba's pool is limited too; PyTorch's
            # own pool is set by TorchPeer. Numba's OpenMP layer and PyTorch may share one OpenMP runtime,
            # whose thread count the last parallel call of either sets: only an equal limit keeps both fixed.
            set_threads(args.threads)
        machine = machine_info(([ctx.device] if ctx.device else []) + cpu)
        device = ctx.device.name if ctx.device else "none: " + ctx.device_reason
        torch_info = (", ".join(f"{k} {v}" for k, v in ctx.peer.info().items() if k != "status") if ctx.peer
                      else f"not measured: {ctx.peer_reason}")
        try:
            writer = SectionWriter(args.out, title="backprop on the user's paths, against PyTorch",
                                   command=prog + "".join(" " + shlex.quote(a) for a in argv), machine=machine,
                                   summary=SUMMARY,
                                   deadline=None if args.time_limit is None else start + args.time_limit,
                                   preamble=[f"- device backend (sections 1-7): {device}", f"- PyTorch: {torch_info}",
                                             f"- quick: {ctx.quick}; repeats {ctx.repeats}"])
        except OSError as exc:  # out_problem looked before; the file system can still refuse (or change since)
            print(f"{parser.prog}: error: argument --out: cannot create the directory {args.out}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
        for key in keys:
            stem, title, fn = SECTIONS[key]
            writer.run(key, title, _bound(fn, ctx), stem=stem)
    finally:
        restore_threads()
    failed = writer.failed
    print(f"wrote {len(writer.sections)} section(s) and {SUMMARY}.json/.md to {writer.out} in "
          f"{time.perf_counter() - start:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
