"""Fused narrow networks (every width at most 128): with :func:`set_fused_mlp`, each pass of a training step
or of inference is one launch of the fused kernels of :mod:`backprop.kernels.fused_mlp_sources`
(:func:`mlp_forward`, :func:`mlp_forward_error`, :func:`mlp_backward`), on the TF32 tensor cores when
:func:`~.tf32.set_tf32` is on for float32 (:func:`fused_mlp_path`)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .. import cupy_sources as src
from .. import fused_mlp_sources as fused
from ..contract import check_weights
from .device import Array, _buffer, _contiguous, _cupy, _scalar, _scratch, refuse_while_recording
from .tf32 import tf32_enabled

_fused_on = False
#: The CUDA-core forward kernel of the fused passes (``fused_mlp_sources.FORWARD_VARIANTS``): ``"column"`` or
#: ``"tiled"``. Private: a benchmark times both; the default stays ``"column"`` until a GPU run shows otherwise.
_forward_variant = "column"
_fused_modules: dict[tuple[int, str, bool], Any] = {}
#: (device, sizes, activations, alphas, kept u, rows, dtype) -> the device layout and alphas of the fused kernels
_fused_plans: dict[tuple, tuple[Array, Array]] = {}
_sm_counts: dict[int, int] = {}


def set_fused_mlp(enabled: bool) -> None:
    """Let narrow networks (every width at most 128, float32 or float64, activations the fused kernels
    compute: :func:`fused_mlp_reason`) run each pass of a training step or of inference as one kernel
    launch (:func:`mlp_forward`, :func:`mlp_backward`) instead of a GEMM and an elementwise kernel per layer.
    Off by default. The results equal the layer-by-layer path's to rounding (a different order of sums)."""
    global _fused_on
    _fused_on = bool(enabled)


def fused_mlp_enabled() -> bool:
    return _fused_on


def fused_mlp_reason(sizes: Any, acts: Any, dtype: Any) -> str:
    """Why :func:`mlp_forward` and :func:`mlp_backward` do not serve a network of widths ``sizes`` (input first)
    and activations ``acts``; ``""`` when they do."""
    return fused.unserved_reason(list(sizes), list(acts), dtype)


#: What :func:`fused_mlp_path` says when the fused passes take the TF32 kernels.
FUSED_TF32 = "TF32 tensor cores"


def fused_mlp_path(dtype: Any) -> str:
    """Where the fused passes of a ``dtype`` network run: ``"TF32 tensor cores"`` when :func:`set_tf32` is on for
    a float32 network on sm_80 or newer (and ``NVIDIA_TF32_OVERRIDE`` is not ``0``), else ``"CUDA cores"``, with
    the reason TF32 was asked for and not taken."""
    if not (tf32_enabled() and np.dtype(dtype) == np.float32):
        return "CUDA cores"
    if os.environ.get("NVIDIA_TF32_OVERRIDE") == "0":
        return "CUDA cores (NVIDIA_TF32_OVERRIDE=0)"
    cc = int(_cupy.cuda.Device().compute_capability)
    return FUSED_TF32 if cc >= 80 else f"CUDA cores (TF32 needs sm_80 or newer, this is sm_{cc})"


def _fused_tensor_cores(dtype: Any) -> bool:
    """Whether the fused passes of a ``dtype`` network take the TF32 kernels (:func:`fused_mlp_path`)."""
    return fused_mlp_path(dtype) == FUSED_TF32


def _fused_kernel(name: str, dtype: Any, tensor_cores: bool = False) -> Any:
    """Kernel ``name`` of the fused module for ``dtype`` on this device: the CUDA-core module, or the float module
    with the TF32 twins (compiled only when first asked for: it needs sm_80)."""
    ctype = src.CTYPES[np.dtype(dtype).name]
    key = (_cupy.cuda.Device().id, ctype, tensor_cores)
    module = _fused_modules.get(key)
    if module is None:
        module = _fused_modules[key] = _cupy.RawModule(code=fused.module_source(ctype, tensor_cores))
    return module.get_function(name)


def _fused_plan(sizes: tuple, acts: tuple, alphas: tuple, keep_u: tuple, rows: int, dtype: Any) -> tuple[Array, Array]:
    key = (_cupy.cuda.Device().id, sizes, acts, alphas, keep_u, rows, np.dtype(dtype).char)
    plan = _fused_plans.get(key)
    if plan is None:
        reason = fused_mlp_reason(sizes, acts, dtype)
        if reason:
            raise ValueError(f"the fused kernels do not serve this network: {reason}")
        refuse_while_recording(f"the fused kernels' layout of a {rows}-row pass")
        layout = fused.plan(sizes, acts, rows, keep_u)[0]
        plan = _fused_plans[key] = (_cupy.asarray(layout, dtype=np.int64),
                                    _cupy.asarray(np.array(alphas, dtype=np.float64), dtype=dtype))
    return plan


def _fused_args(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                u_flat: Array) -> tuple[int, Array, Array, tuple, tuple]:
    """Check the arrays of a fused pass against the network; returns ``(rows, layout, alphas, sizes, acts)``."""
    sizes, acts = tuple(int(n) for n in sizes), tuple(acts)
    keep_u = tuple(bool(k) for k in keep_u)
    dtype = params.dtype
    rows = int(x.shape[0]) if x.ndim == 2 else -1
    if x.ndim != 2 or x.shape[1] != sizes[0] or x.dtype != dtype or not x.flags.c_contiguous:
        raise ValueError(f"x must be a C-contiguous {dtype} array of shape (rows, {sizes[0]}), got {x.dtype} "
                         f"{tuple(x.shape)}")
    _, _, _, ny, nu = fused.plan(sizes, acts, rows, keep_u)
    n_params = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
    _buffer(params, (n_params,), dtype, "params")
    _buffer(y_flat, (ny,), dtype, "y_flat")
    _buffer(u_flat, (max(nu, 1),), dtype, "u_flat")
    layout, alph = _fused_plan(sizes, acts, tuple(float(a) for a in alphas), keep_u, rows, dtype)
    return rows, layout, alph, sizes, acts


def mlp_forward(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                u_flat: Array) -> None:
    """``u^l = W^l x^{l-1} + b^l``, ``x^l = f(u^l)`` for every layer in one launch: each layer's ``y`` into
    ``y_flat`` and, where ``keep_u``, its ``u`` into ``u_flat``, layer after layer as ``(rows, n_l)`` blocks
    (``fused_mlp_sources.plan``). ``params``: the network's flat ``[W^1 | ... | W^L | b^1 | ... | b^L]``."""
    _mlp_forward(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat, None)


def mlp_forward_error(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                      u_flat: Array, t: Array, loss: str, param: float = 0.0, *, delta: Array, value: Array,
                      weights: Array | None = None) -> None:
    """:func:`mlp_forward`, and at its end the error at the output, as :func:`output_error` computes it (the same
    formulas, row ``weights`` included): ``delta^L`` into ``delta`` (``(rows, n_L)``) and the mean loss into
    ``value`` (0-d), the loss summed per block and the blocks' sums added by one more launch."""
    dtype = params.dtype
    rows = int(x.shape[0]) if x.ndim == 2 else -1
    pair = fused.PAIR_CODES.get((tuple(acts)[-1], loss))
    if pair is None:
        raise ValueError(f"output {tuple(acts)[-1]!r} does not go with loss {loss!r}")
    check_weights(weights, rows, dtype)
    _buffer(t, (rows, int(tuple(sizes)[-1])), dtype, "t")
    _buffer(delta, (rows, int(tuple(sizes)[-1])), dtype, "delta")
    _buffer(value, (), dtype, "value")
    _mlp_forward(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat, (t, weights, pair, param, delta, value))


def _unused(name: str, dtype: Any) -> Array:
    """A one-element stand-in for the array ``name`` that a launch is given and never accesses: one per parameter,
    so that no two ``__restrict__`` pointers of a launch share memory."""
    return _scratch(f"unused_{name}", (1,), dtype)


def _mlp_forward(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                 u_flat: Array, error: tuple | None) -> None:
    rows, layout, alph, sizes, acts = _fused_args(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat)
    dtype = params.dtype
    tc = _fused_tensor_cores(dtype)
    width = fused.kernel_width(sizes)
    tiles = -(-rows // fused.tile_rows(width, src.CTYPES[dtype.name]))
    if error is None:
        t, w, delta, partial = (_unused(name, dtype) for name in ("target", "weights", "delta", "partial"))
        weighted, pair, k = 0, fused.NO_ERROR, 0.0
    else:
        t, weights, pair, k, delta, value = error
        w, weighted = (_unused("weights", dtype), 0) if weights is None else (_contiguous(weights), 1)
        partial = _scratch("fused_loss_partial", (max(tiles, 1),), dtype)
    if rows > 0:
        _fused_kernel(fused.kernel_name("forward", width, tc) if tc or _forward_variant == "column"
                      else fused.kernel_name("forward", width, False, "tiled"), dtype, tc)((tiles,), (fused.THREADS,), (
            x, params, layout, alph, np.int32(len(acts)), np.int64(rows), y_flat, u_flat, t, w, np.int32(weighted),
            np.int32(pair), _scalar(k, dtype), _scalar(max(rows, 1), dtype), delta, partial))
    if error is not None:
        _fused_kernel("bp_mlp_mean", dtype, tc)((1,), (src.BLOCK,), (partial, np.int64(tiles), _scalar(rows, dtype),
                                                                  value))


def _backward_blocks() -> int:
    """Blocks of the fused backward pass: two per multiprocessor (each keeps a slice of partial gradients)."""
    dev = _cupy.cuda.Device().id
    if dev not in _sm_counts:
        _sm_counts[dev] = int(_cupy.cuda.runtime.getDeviceProperties(dev).get("multiProcessorCount", 4))
    return 2 * _sm_counts[dev]


def mlp_backward(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                 u_flat: Array, delta: Array, grads: Array) -> None:
    """From ``delta^L`` (``(rows, n_L)``), every ``dE/dW^l = delta^l (x^{l-1})^T`` and ``dE/db^l = sum delta^l``
    into ``grads`` (the parameters' flat layout), with ``delta^{l-1} = phi(y^{l-1}) * (W^l)^T delta^l`` kept in
    shared memory: one launch whose blocks each sum their tiles into a slice of a cached buffer, then one that
    adds the slices in a fixed order (deterministic). ``y_flat``, ``u_flat``: what :func:`mlp_forward` wrote."""
    rows, layout, alph, sizes, acts = _fused_args(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat)
    dtype = params.dtype
    tc = _fused_tensor_cores(dtype)
    _buffer(delta, (rows, sizes[-1]), dtype, "delta")
    n = int(params.size)
    _buffer(grads, (n,), dtype, "grads")
    if rows == 0:
        _fused_kernel("bp_mlp_reduce", dtype, tc)((1,), (src.BLOCK,), (_unused("partial", dtype), np.int64(0),
                                                                     np.int64(n), grads))  # zeros
        return
    width = fused.kernel_width(sizes)
    tiles = -(-rows // fused.tile_rows(width, src.CTYPES[dtype.name]))
    grid = max(1, min(tiles, _backward_blocks()))
    slices = grid * (fused.THREADS // width)  # one per group of threads of each block
    partial = _scratch("fused_partial", (slices * n,), dtype)
    _fused_kernel(fused.kernel_name("backward", width, tc), dtype, tc)((grid,), (fused.THREADS,), (
        x, params, layout, alph, np.int32(len(acts)), np.int64(rows), y_flat, u_flat, delta, partial, np.int64(n)))
    blocks = min(-(-n // src.BLOCK), 1024)
    _fused_kernel("bp_mlp_reduce", dtype, tc)((blocks,), (src.BLOCK,), (partial, np.int64(slices), np.int64(n),
                                                                        grads))
