"""cuBLASLt epilogues for a layer's three GEMMs: which epilogue serves an activation, the column-major
operands of each call, and the size of the auxiliary buffers. Importable without CuPy: the CPU tests
check these choices. :mod:`backprop.kernels.cupy_gpu.lt` issues the calls.

A C-order ``(r, c)`` array read column-major is its transpose with leading dimension ``c``. So every
call below writes the transpose of the row-major result, ``D = op(A) op(B)`` (column-major, ``m x n``):

* forward ``u^l = W^l x^{l-1} + b^l``, ``x^l = f(u^l)``: ``D = u^T = W x^T`` (``m = n_out``, ``n = batch``,
  ``k = n_in``). The bias is a column vector of ``m``, so the epilogue adds ``b`` and then applies ``f``:
  ``BIAS``, ``RELU_BIAS``, ``GELU_BIAS``. The ``AUX`` forms also write what the backward pass reads:
  the ReLU mask ``u > 0`` as bits, or ``u`` itself for GELU.
* backward ``delta^{l-1} = f'(u^{l-1}) * (W^l)^T delta^l``: ``D = W^T delta^T`` (``m = n_in``,
  ``n = batch``, ``k = n_out``). ``DRELU`` and ``DGELU`` multiply by the slope read from that aux.
* gradients ``dE/dW^l = delta^l (x^{l-1})^T``, ``dE/db^l = sum_rows delta^l``: ``D = dW^T = x^T delta``
  (``m = n_in``, ``n = n_out``, ``k = batch``). ``BGRADB`` sums ``op(B) = delta`` over ``k`` into the
  bias gradient in the same call.

cuBLASLt's GELU epilogue is the tanh form, so it serves the activation ``"gelu_tanh"``. The exact
``"gelu"`` (erf) keeps the GEMM and the elementwise kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: ``cublasLtEpilogue_t`` (cublasLt.h; ``nvmath.bindings.cublasLt.Epilogue``).
EPILOGUE: dict[str, int] = {
    "DEFAULT": 1, "RELU": 2, "RELU_AUX": 130, "BIAS": 4, "RELU_BIAS": 6, "RELU_AUX_BIAS": 134, "DRELU": 136,
    "DRELU_BGRAD": 152, "GELU": 32, "GELU_AUX": 160, "GELU_BIAS": 36, "GELU_AUX_BIAS": 164, "DGELU": 192,
    "DGELU_BGRAD": 208, "BGRADA": 256, "BGRADB": 512,
}

#: cuBLASLt wants the leading dimension of a ReLU bit mask to be a multiple of 128 bits (16 bytes)...
RELU_MASK_LD_BITS = 128
#: ... and that of a GELU aux (``u``, in D's dtype) a multiple of 8 elements.
GELU_AUX_LD = 8

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Choice(NamedTuple):
    """The epilogue of one GEMM (``None``: no cuBLASLt call), or why the plain GEMM and kernel stay."""

    epilogue: str | None
    reason: str = ""


class Operands(NamedTuple):
    """A column-major ``D (m x n, ldd) = op(A) op(B)``: which row-major operand is ``A`` and which is
    ``B`` (names of the primitive's arguments), their transpose flags and leading dimensions."""

    a: str
    b: str
    trans_a: bool
    trans_b: bool
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldd: int

    def a_shape(self) -> tuple[int, int]:
        """Rows and columns of ``A`` as stored (column-major, before ``op``)."""
        return (self.k, self.m) if self.trans_a else (self.m, self.k)

    def b_shape(self) -> tuple[int, int]:
        return (self.n, self.k) if self.trans_b else (self.k, self.n)


def forward_operands(batch: int, n_in: int, n_out: int) -> Operands:
    """``u^T = W x^T``: ``A`` is ``W`` ``(n_out, n_in)`` read as ``W^T`` and transposed back, ``B`` is
    ``x`` ``(batch, n_in)`` read as ``x^T``."""
    return Operands("W", "x", True, False, n_out, batch, n_in, max(1, n_in), max(1, n_in), max(1, n_out))


def backward_operands(batch: int, n_out: int, n_in: int) -> Operands:
    """``delta_prev^T = W^T delta^T``: ``A`` is ``W`` ``(n_out, n_in)`` read as ``W^T``, ``B`` is ``delta``
    ``(batch, n_out)`` read as ``delta^T``."""
    return Operands("W", "delta", False, False, n_in, batch, n_out, max(1, n_in), max(1, n_out), max(1, n_in))


def gradient_operands(batch: int, n_out: int, n_in: int) -> Operands:
    """``dW^T = x_prev^T delta``: ``A`` is ``x_prev`` ``(batch, n_in)`` read as ``x_prev^T``, ``B`` is
    ``delta`` ``(batch, n_out)`` read as ``delta^T`` and transposed back."""
    return Operands("x_prev", "delta", False, True, n_in, n_out, batch, max(1, n_in), max(1, n_out), max(1, n_in))


def relu_mask_layout(n: int, batch: int) -> tuple[int, int]:
    """``(ld, nbytes)`` of the bit mask of a ``(batch, n)`` ReLU layer: a column of ``n`` bits per row of
    the batch, each column padded to a multiple of 128 bits; ``ld`` counts bits."""
    col_bytes = -(-max(n, 1) // RELU_MASK_LD_BITS) * (RELU_MASK_LD_BITS // 8)
    return col_bytes * 8, col_bytes * max(batch, 1)


def _dtype_reason(dtype: object) -> str:
    dt = np.dtype(dtype)  # type: ignore[call-overload]
    return "" if dt in DTYPES else f"cuBLASLt epilogues are used here for float32 and float64, not {dt}"


def forward_epilogue(act: str, keep_u: bool, n_out: int, dtype: object, mask: bool = False) -> Choice:
    """The epilogue of the forward GEMM of a layer with activation ``act``: ``u`` is kept when ``keep_u``;
    ``mask``: write the ReLU mask for the backward pass."""
    reason = _dtype_reason(dtype)
    if reason:
        return Choice(None, reason)
    if act == "identity":
        return Choice(None, "u is kept as well as y: the GEMM writes u and one kernel copies it") if keep_u \
            else Choice("BIAS")
    if act == "relu":
        if keep_u:
            return Choice(None, "u is kept as well as y (cuBLASLt's ReLU aux is a bit mask, not u)")
        return Choice("RELU_AUX_BIAS" if mask else "RELU_BIAS")
    if act == "gelu_tanh":
        if not keep_u:
            return Choice("GELU_BIAS")
        if n_out % GELU_AUX_LD:
            return Choice(None, f"cuBLASLt needs the leading dimension of the GELU aux (u, {n_out} wide) "
                                f"to be a multiple of {GELU_AUX_LD}")
        return Choice("GELU_AUX_BIAS")
    if act == "gelu":
        return Choice(None, "'gelu' is exact (erf); cuBLASLt's GELU epilogue is the tanh form ('gelu_tanh')")
    return Choice(None, f"no cuBLASLt epilogue computes {act}")


def backward_epilogue(act_prev: str, n_out: int, n_prev: int, dtype: object, mask: bool = False) -> Choice:
    """The epilogue of ``delta^{l-1} = f'(u^{l-1}) * (W^l)^T delta^l`` (``k = n_out``, ``m = n_prev``);
    ``mask``: this step's forward pass wrote the ReLU mask of layer ``l-1``."""
    reason = _dtype_reason(dtype)
    if reason:
        return Choice(None, reason)
    if act_prev == "identity":
        return Choice(None, "f' = 1: the plain GEMM is the whole step")
    if act_prev not in ("relu", "gelu_tanh"):
        return Choice(None, f"no cuBLASLt epilogue computes the slope of {act_prev}")
    if n_out < 2:
        return Choice(None, "cuBLASLt's DRELU and DGELU epilogues need k = n_out > 1")
    if act_prev == "relu":
        return Choice("DRELU") if mask else Choice(None, "no ReLU mask from this step's forward pass")
    if n_prev % GELU_AUX_LD:
        return Choice(None, f"cuBLASLt needs the leading dimension of the GELU aux (u, {n_prev} wide) "
                            f"to be a multiple of {GELU_AUX_LD}")
    return Choice("DGELU")


def gradient_epilogue(batch: int, dtype: object) -> Choice:
    """The epilogue of ``dE/dW = delta^T x_prev`` that also gives ``dE/db = delta^T 1`` (``k = batch``)."""
    reason = _dtype_reason(dtype)
    if reason:
        return Choice(None, reason)
    if batch < 2:
        return Choice(None, "cuBLASLt's BGRADB needs k = batch > 1 (before cuBLASLt 12.3.4)")
    return Choice("BGRADB")
