"""CUDA source of the fully fused kernels for narrow networks (every width at most :data:`MAX_WIDTH`).

One launch runs a pass through every layer of the network, a tile of rows at a time, with the tile's
activations in shared memory; global memory carries only the input, the parameters, and what the
other pass reads (each layer's output ``y``, and ``u`` where the slope or the loss needs it):

* ``bp_mlp_forward``: ``u^l = W^l x^{l-1} + b^l``, ``x^l = f(u^l)`` for ``l = 1..L`` (softmax as the
  output's row-wise activation); each layer's ``y`` (and kept ``u``) is written for the backward pass.
* ``bp_mlp_backward``: from ``delta^L``, for ``l = L..1``: ``dE/dW^l += delta^l (x^{l-1})^T`` and
  ``dE/db^l += sum delta^l`` into this block's own slice of ``partial``, then
  ``delta^{l-1} = phi(y^{l-1}) * (W^l)^T delta^l`` (the slope from ``u`` for GELU and SiLU), in
  shared memory. Each block walks the tiles ``blockIdx.x, blockIdx.x + gridDim.x, ...`` in order.
* ``bp_mlp_reduce``: ``grads[i] = sum over blocks b of partial[b][i]``, in the order of ``b``: with the
  same grid, the same bits every time (no atomics).

A block has :data:`THREADS` threads, thread ``t`` owning column ``t`` of a layer; a tile is
``TILE[ctype]`` rows (32 in float, 16 in double: the two shared buffers stay at 33 KB). The layers are
described by an int64 ``layout`` array of :data:`LAYOUT_FIELDS` per layer (:func:`layout_row`); the
parameters and gradients use the network's flat layout ``[W^1 | ... | W^L | b^1 | ... | b^L]`` and
the activations one flat buffer each for ``y`` and ``u``, layer ``l`` at its offset. The formulas are the
registry's CUDA forms, dispatched by activation code (:data:`ACT_CODES`). CUDA cores only, in ``T``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import registry as _registry
from .cupy_sources import ACT_FORWARD, ACT_SLOPE, CTYPES, MATH_PREAMBLE
from .registry import ACTIVATIONS

_registry.close("cupy")

#: Widest layer (input included) the fused kernels serve, and the threads of a block (one per column).
MAX_WIDTH = 128
THREADS = MAX_WIDTH
#: Rows per tile, by C type: two ``TILE x (MAX_WIDTH + 1)`` buffers of shared memory, 33 KB either way.
TILE = {"float": 32, "double": 16}

#: The int64 fields of a layer in ``layout``.
N_IN, N_OUT, W_OFFSET, B_OFFSET, ACT, Y_OFFSET, U_OFFSET = range(7)
LAYOUT_FIELDS = 7

#: Activation code of each activation the fused kernels compute: the elementwise ones, then softmax (the
#: output's row-wise activation).
ACT_CODES: dict[str, int] = {name: i for i, name in enumerate(n for n in ACT_FORWARD if n in ACT_SLOPE)}
SOFTMAX = "softmax"
ACT_CODES[SOFTMAX] = len(ACT_CODES)


def served(act: str, last: bool) -> bool:
    """Whether the fused kernels compute activation ``act`` (softmax only as the output's)."""
    return act in ACT_CODES and (act != SOFTMAX or last) and (last or ACTIVATIONS[act].hidden)


def unserved_reason(sizes: Sequence[int], acts: Sequence[str], dtype: Any) -> str:
    """Why the fused kernels do not serve a network of layer widths ``sizes`` (input first) and activations
    ``acts`` (one per layer) in ``dtype``; ``""`` when they do."""
    if np.dtype(dtype).name not in CTYPES:
        return f"dtype {np.dtype(dtype).name} (float32 and float64 only)"
    if max(sizes) > MAX_WIDTH:
        return f"a layer of width {max(sizes)} (at most {MAX_WIDTH})"
    last = len(acts) - 1
    for i, act in enumerate(acts):
        if not served(act, i == last):
            return f"activation {act!r} in layer {i + 1}"
    return ""


def plan(sizes: Sequence[int], acts: Sequence[str], rows: int,
         keep_u: Sequence[bool]) -> tuple[np.ndarray, list[int], list[int], int, int]:
    """The ``layout`` of a network of widths ``sizes`` and activations ``acts`` at a batch of ``rows``, with
    layer ``l``'s ``y`` at ``y_offsets[l]`` of one flat buffer and its ``u`` (where ``keep_u[l]``) at
    ``u_offsets[l]`` of another (``-1`` where it keeps none). Returns ``(layout, y_offsets, u_offsets, y
    elements, u elements)``; the weights and biases sit at their offsets in the parameters' flat layout."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    n_weights = sum(n_in * n_out for n_in, n_out in pairs)
    rows_out, y_offsets, u_offsets = [], [], []
    w = b = y = u = 0
    for (n_in, n_out), act, keep in zip(pairs, acts, keep_u):
        y_offsets.append(y)
        u_offsets.append(u if keep else -1)
        rows_out.append([n_in, n_out, w, n_weights + b, ACT_CODES[act], y, u if keep else -1])
        w, b, y = w + n_in * n_out, b + n_out, y + rows * n_out
        u += rows * n_out if keep else 0
    return np.array(rows_out, dtype=np.int64).reshape(-1), y_offsets, u_offsets, y, u


def _switch(name: str, signature: str, cases: dict[int, str], default: str) -> str:
    body = "".join(f"    case {code}: return {expr};\n" for code, expr in cases.items())
    return (f"__device__ __forceinline__ T {name}({signature}) {{\n    switch (code) {{\n{body}    }}\n"
            f"    return {default};\n}}\n")


def dispatch_source() -> str:
    """``bp_mlp_act(code, v, alpha)`` and ``bp_mlp_slope(code, y, u, alpha)``: each activation's CUDA form
    from the registry, by its code."""
    act = {code: ACT_FORWARD[n] for n, code in ACT_CODES.items() if n != SOFTMAX}
    slope = {code: ACT_SLOPE[n][1] for n, code in ACT_CODES.items() if n != SOFTMAX}
    return (_switch("bp_mlp_act", "int code, T v, T alpha", act, "v")
            + _switch("bp_mlp_slope", "int code, T y, T u, T alpha", slope, "(T)1"))


KERNELS = r"""
#define BP_W %(width)d
#define BP_TILE ((int)(%(tile_bytes)d / sizeof(T)))
#define BP_F %(fields)d
#define BP_SOFTMAX %(softmax)d

/* The forward pass of every layer for each tile of rows; blockDim.x == BP_W. */
extern "C" __global__ void bp_mlp_forward(const T* x, const T* p, const long long* layout, const T* alphas,
                                          int layers, long long rows, T* ys, T* us) {
    __shared__ T a[2][BP_TILE][BP_W + 1];
    const int t = threadIdx.x;
    for (long long row0 = (long long)blockIdx.x * BP_TILE; row0 < rows; row0 += (long long)gridDim.x * BP_TILE) {
        const int valid = rows - row0 < BP_TILE ? (int)(rows - row0) : BP_TILE;
        const int n0 = (int)layout[%(n_in)d];
#pragma unroll
        for (int r = 0; r < BP_TILE; ++r)
            if (t < n0) a[0][r][t] = r < valid ? x[(row0 + r) * n0 + t] : (T)0;
        __syncthreads();
        int cur = 0;
        for (int l = 0; l < layers; ++l) {
            const long long* L = layout + (long long)l * BP_F;
            const int n_in = (int)L[%(n_in)d], n_out = (int)L[%(n_out)d], act = (int)L[%(act)d];
            const T* W = p + L[%(w_offset)d];
            const T alpha = alphas[l];
            const int nxt = cur ^ 1;
            if (t < n_out) {
                T acc[BP_TILE];
                const T bias = p[L[%(b_offset)d] + t];
#pragma unroll
                for (int r = 0; r < BP_TILE; ++r) acc[r] = (T)0;
                for (int k = 0; k < n_in; ++k) {
                    const T w = W[(long long)t * n_in + k];
#pragma unroll
                    for (int r = 0; r < BP_TILE; ++r) acc[r] += w * a[cur][r][k];
                }
#pragma unroll
                for (int r = 0; r < BP_TILE; ++r) {
                    const T v = acc[r] + bias;
                    const T y = act == BP_SOFTMAX ? v : bp_mlp_act(act, v, alpha);  /* softmax: below */
                    a[nxt][r][t] = y;
                    if (r < valid) {
                        const long long row = row0 + r;
                        if (L[%(u_offset)d] >= 0) us[L[%(u_offset)d] + row * n_out + t] = v;
                        if (act != BP_SOFTMAX) ys[L[%(y_offset)d] + row * n_out + t] = y;
                    }
                }
            }
            __syncthreads();
            if (act == BP_SOFTMAX) {  /* one thread per row: exp(u - max) / sum */
                if (t < valid) {
                    T m = a[nxt][t][0];
                    for (int j = 1; j < n_out; ++j) m = a[nxt][t][j] > m ? a[nxt][t][j] : m;
                    T s = (T)0;
                    for (int j = 0; j < n_out; ++j) s += exp(a[nxt][t][j] - m);
                    for (int j = 0; j < n_out; ++j) {
                        const T y = exp(a[nxt][t][j] - m) / s;
                        a[nxt][t][j] = y;
                        ys[L[%(y_offset)d] + (row0 + t) * n_out + j] = y;
                    }
                }
                __syncthreads();
            }
            cur = nxt;
        }
    }
}

/* The backward pass of every layer for each tile of rows, the gradients summed into this block's slice of
   partial (n_params values, the parameters' layout); blockDim.x == BP_W. */
extern "C" __global__ void bp_mlp_backward(const T* x, const T* p, const long long* layout, const T* alphas,
                                           int layers, long long rows, const T* ys, const T* us, const T* delta,
                                           T* partial, long long n_params) {
    __shared__ T d[2][BP_TILE][BP_W + 1];
    const int t = threadIdx.x;
    T* mine = partial + (long long)blockIdx.x * n_params;
    for (long long i = t; i < n_params; i += blockDim.x) mine[i] = (T)0;
    __syncthreads();
    const long long* out = layout + (long long)(layers - 1) * BP_F;
    const int n_last = (int)out[%(n_out)d];
    for (long long row0 = (long long)blockIdx.x * BP_TILE; row0 < rows; row0 += (long long)gridDim.x * BP_TILE) {
        const int valid = rows - row0 < BP_TILE ? (int)(rows - row0) : BP_TILE;
#pragma unroll
        for (int r = 0; r < BP_TILE; ++r)
            if (t < n_last) d[0][r][t] = r < valid ? delta[(row0 + r) * n_last + t] : (T)0;
        __syncthreads();
        int cur = 0;
        for (int l = layers - 1; l >= 0; --l) {
            const long long* L = layout + (long long)l * BP_F;
            const int n_in = (int)L[%(n_in)d], n_out = (int)L[%(n_out)d];
            const T* W = p + L[%(w_offset)d];
            const T* x_prev = l > 0 ? ys + layout[(long long)(l - 1) * BP_F + %(y_offset)d] : x;
            if (t < n_out) {  /* dE/db^l += sum over the tile's rows of delta^l */
                T s = (T)0;
#pragma unroll
                for (int r = 0; r < BP_TILE; ++r) s += d[cur][r][t];
                mine[L[%(b_offset)d] + t] += s;
            }
            if (t < n_in) {  /* column t of dE/dW^l and of (W^l)^T delta^l */
                T xr[BP_TILE], acc[BP_TILE];
#pragma unroll
                for (int r = 0; r < BP_TILE; ++r) {
                    xr[r] = r < valid ? x_prev[(row0 + r) * n_in + t] : (T)0;
                    acc[r] = (T)0;
                }
                for (int j = 0; j < n_out; ++j) {
                    const T w = W[(long long)j * n_in + t];
                    T s = (T)0;
#pragma unroll
                    for (int r = 0; r < BP_TILE; ++r) {
                        const T dj = d[cur][r][j];
                        s += dj * xr[r];
                        acc[r] += w * dj;
                    }
                    mine[L[%(w_offset)d] + (long long)j * n_in + t] += s;
                }
                if (l > 0) {  /* delta^{l-1} = phi(y^{l-1}) * (W^l)^T delta^l, y^{l-1} being x_prev */
                    const long long* P = layout + (long long)(l - 1) * BP_F;
                    const int code = (int)P[%(act)d];
                    const T alpha = alphas[l - 1];
#pragma unroll
                    for (int r = 0; r < BP_TILE; ++r) {
                        const T u = (P[%(u_offset)d] >= 0 && r < valid) ? us[P[%(u_offset)d] + (row0 + r) * n_in + t]
                                                                         : (T)0;
                        d[cur ^ 1][r][t] = r < valid ? acc[r] * bp_mlp_slope(code, xr[r], u, alpha) : (T)0;
                    }
                }
            }
            __syncthreads();
            cur ^= 1;
        }
    }
}

/* grads[i] = sum over the blocks of partial[b * n + i], in the order of the blocks. */
extern "C" __global__ void bp_mlp_reduce(const T* partial, long long blocks, long long n, T* grads) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        T s = (T)0;
        for (long long b = 0; b < blocks; ++b) s += partial[b * n + i];
        grads[i] = s;
    }
}
"""


def kernels_body() -> str:
    """The three kernels (after :data:`MATH_PREAMBLE` and the dispatch functions), for a ``typedef`` of ``T``."""
    return KERNELS % {"width": MAX_WIDTH, "tile_bytes": TILE["float"] * 4, "fields": LAYOUT_FIELDS,
                      "softmax": ACT_CODES[SOFTMAX], "n_in": N_IN, "n_out": N_OUT, "w_offset": W_OFFSET,
                      "b_offset": B_OFFSET, "act": ACT, "y_offset": Y_OFFSET, "u_offset": U_OFFSET}


#: The kernels of the module, as CuPy's RawModule names them.
KERNEL_NAMES = ("bp_mlp_forward", "bp_mlp_backward", "bp_mlp_reduce")


def module_source(ctype: str) -> str:
    """The whole RawModule source for C type ``ctype`` (``"float"`` or ``"double"``)."""
    if ctype not in CTYPES.values():
        raise ValueError(f"ctype must be one of {sorted(CTYPES.values())}, got {ctype!r}")
    return f"typedef {ctype} T;\n{MATH_PREAMBLE}\n{dispatch_source()}\n{kernels_body()}"
