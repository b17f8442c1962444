"""A layer's three primitives: the forward pass, the delta into the layer below, and the layer's gradients.

* Forward: ``u = x W^T`` by cuBLAS, into ``y`` (or into ``u`` when it is kept: GELU, SiLU, the output
  layer), then one kernel adds the bias and applies ``f`` in place (or from ``u`` into ``y``). Softmax is
  one row kernel.
* Backward: ``delta W`` by cuBLAS into ``out``, then one kernel multiplies by the slope in place, read from
  ``y`` (``phi(y)``) or, for GELU and SiLU, from ``u``.
* Gradients: ``delta^T x_prev`` by one GEMM, ``delta^T 1`` by one GEMV, into the caller's views of its flat
  gradient buffer.

With :func:`~.lt.set_epilogues`, each is one cuBLASLt call where an epilogue does the kernel's work
(:mod:`.lt`). Given the keyword output buffers, none allocates.
"""

from __future__ import annotations

import numpy as np

from .. import cupy_sources as src
from .. import epilogues as epi
from ..registry import ACTIVATIONS
from .blas import _bias_gemv, _gemm
from .compiled import _ew, _raw
from .device import Array, _buffer, _contiguous, _scalar
from .lt import ReluMask, _lt_matmul, _mask_for, epilogues_enabled


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}")


def layer_forward(
    x: Array, W: Array, b: Array, act: str, alpha: float = 0.0, keep_u: bool = False, *,
    y: Array | None = None, u: Array | None = None, aux: ReluMask | None = None,
) -> tuple[Array, Array | None]:
    """``u = x W^T + b``, ``y = f(u)``: one GEMM and one fused kernel. Returns ``(y, u if keep_u else None)``.

    Without ``keep_u`` the GEMM writes into ``y`` and the bias and ``f`` are applied there in place
    (``u`` is ignored); with it the GEMM writes into ``u``, which gets the bias, and ``f(u)`` goes
    to ``y``. Either buffer is allocated when not given. With :func:`set_epilogues`, one cuBLASLt call
    where an epilogue computes ``f`` (``BIAS``, ``RELU_BIAS``, ``GELU_BIAS``; ``GELU_AUX_BIAS`` writes
    the kept ``u``; ``RELU_AUX_BIAS`` also writes the mask ``aux`` of :func:`layer_aux` for the backward pass).
    """
    _check_act(act)
    batch, n_out = x.shape[0], W.shape[0]
    shape = (batch, n_out)
    if keep_u:
        u = _buffer(u, shape, W.dtype, "u")
        y = _buffer(y, shape, W.dtype, "y")
        z = u
    else:
        y = _buffer(y, shape, W.dtype, "y")
        z = y
    mask = aux if isinstance(aux, ReluMask) and aux.shape == shape else None
    if mask is not None:
        mask.source = None
    if epilogues_enabled() and y.size and x.shape[1] and x.dtype == W.dtype:
        choice = epi.forward_epilogue(act, keep_u, n_out, W.dtype, mask is not None)
        ops = epi.forward_operands(batch, x.shape[1], n_out)
        aux_arr, aux_ld = (mask.bits, mask.ld) if choice.epilogue == "RELU_AUX_BIAS" and mask is not None else \
            ((u, n_out) if choice.epilogue == "GELU_AUX_BIAS" else (None, 0))
        if _lt_matmul("forward", act, choice, ops, _contiguous(W), _contiguous(x), y, _contiguous(b), aux_arr, aux_ld):
            if aux_arr is not None and mask is not None:
                mask.source = (y.data.ptr, shape)
            return y, (u if keep_u else None)
    _gemm("N", "T", x, W, z)
    if z.size == 0:  # nothing to activate
        return y, (u if keep_u else None)
    if ACTIVATIONS[act].rowwise:  # softmax
        grid = (batch + src.ROWS_PER_BLOCK - 1) // src.ROWS_PER_BLOCK
        _raw("bp_softmax_forward", z.dtype)(
            (grid,), (src.BLOCK,), (z, _contiguous(b), y, np.int64(batch), np.int64(n_out)))
    elif keep_u:
        _ew(f"bp_fwd_keep_{act}")(b, _scalar(alpha, z.dtype), u, y)
    else:
        _ew(f"bp_fwd_{act}")(b, _scalar(alpha, z.dtype), y)
    return y, (u if keep_u else None)


def delta_backward(
    delta: Array, W: Array, y_prev: Array, u_prev: Array | None, act_prev: str, alpha_prev: float = 0.0, *,
    out: Array | None = None, aux_prev: ReluMask | None = None,
) -> Array:
    """``delta^{l-1} = (delta W) * phi(y_prev)``: one GEMM into ``out`` and one fused kernel in place
    (none for identity). With :func:`set_epilogues`, one cuBLASLt call where an epilogue applies the
    slope: ``DGELU`` from ``u_prev`` (``gelu_tanh``), ``DRELU`` from the mask ``aux_prev`` that the
    forward pass wrote with this ``y_prev``."""
    _check_act(act_prev)
    if act_prev not in src.ACT_SLOPE:
        raise ValueError(f"activation {act_prev!r} has no elementwise slope")
    var, _ = src.ACT_SLOPE[act_prev]
    if var == "u" and u_prev is None:
        raise ValueError(f"{act_prev}'s slope needs the pre-activation u")
    g = _buffer(out, (delta.shape[0], W.shape[1]), W.dtype, "out")
    if epilogues_enabled() and g.size and delta.shape[1] and delta.dtype == W.dtype:
        mask = _mask_for(aux_prev, y_prev)
        choice = epi.backward_epilogue(act_prev, W.shape[0], W.shape[1], W.dtype, mask is not None)
        aux_arr, aux_ld = (mask.bits, mask.ld) if choice.epilogue == "DRELU" and mask is not None else \
            ((_contiguous(u_prev), W.shape[1]) if choice.epilogue == "DGELU" else (None, 0))
        ops = epi.backward_operands(delta.shape[0], W.shape[0], W.shape[1])
        if _lt_matmul("backward", act_prev, choice, ops, _contiguous(W), _contiguous(delta), g, None, aux_arr, aux_ld):
            return g
    _gemm("N", "N", delta, W, g)
    if not ACTIVATIONS[act_prev].linear and g.size:
        _ew(f"bp_slope_{act_prev}")(u_prev if var == "u" else y_prev, _scalar(alpha_prev, g.dtype), g)
    return g


def weight_gradients(
    delta: Array, x_prev: Array, dW: Array | None = None, db: Array | None = None
) -> tuple[Array, Array]:
    """``dE/dW = delta^T x_prev`` (GEMM) and ``dE/db = delta^T 1`` (GEMV), into ``dW``/``db`` when given;
    with :func:`set_epilogues`, both in one cuBLASLt call (``BGRADB``)."""
    dW = _buffer(dW, (delta.shape[1], x_prev.shape[1]), delta.dtype, "dW")
    db = _buffer(db, (delta.shape[1],), delta.dtype, "db")
    if epilogues_enabled() and dW.size and delta.shape[0] and x_prev.dtype == delta.dtype:
        choice = epi.gradient_epilogue(delta.shape[0], delta.dtype)
        ops = epi.gradient_operands(delta.shape[0], delta.shape[1], x_prev.shape[1])
        if _lt_matmul("gradients", "", choice, ops, _contiguous(x_prev), _contiguous(delta), dW, db):
            return dW, db
    _gemm("T", "N", delta, x_prev, dW)
    _bias_gemv(delta, db, 1.0, 0.0)
    return dW, db
