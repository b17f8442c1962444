"""CUDA source of the fully fused kernels for narrow networks (every width at most :data:`MAX_WIDTH`).

One launch runs a pass through every layer of the network, a tile of rows at a time, with the tile's
activations in shared memory; global memory carries only the input, the parameters, and what the
other pass reads (each layer's output ``y``, and ``u`` where the slope or the loss needs it):

* ``bp_mlp_forward``: ``u^l = W^l x^{l-1} + b^l``, ``x^l = f(u^l)`` for ``l = 1..L`` (softmax as the
  output's row-wise activation); each layer's ``y`` (and kept ``u``) is written for the backward pass.
  Given an (output, loss) pair (:data:`PAIR_CODES`), it ends with the error at the output, as the
  backend's loss kernels compute it: ``delta^L`` and each block's sum of the loss terms, which
  ``bp_mlp_mean`` adds and divides by the batch.
* ``bp_mlp_backward``: from ``delta^L``, for ``l = L..1``: ``dE/dW^l += delta^l (x^{l-1})^T`` and
  ``dE/db^l += sum delta^l`` into this block's own slice of ``partial``, then
  ``delta^{l-1} = phi(y^{l-1}) * (W^l)^T delta^l`` (the slope from ``u`` for GELU and SiLU), in
  shared memory. Each block walks the tiles ``blockIdx.x, blockIdx.x + gridDim.x, ...`` in order, and
  each group of its threads sums into its own slice of ``partial``.
* ``bp_mlp_reduce``: ``grads[i] = sum over slices b of partial[b][i]``, in the order of ``b``: with the
  same grid, the same bits every time (no atomics).

A block has :data:`THREADS` threads. A network runs at a kernel ``width`` of 32, 64 or 128, the
smallest that holds its widest layer (:func:`kernel_width`): thread ``t`` owns column ``t % width`` of
every layer and ``BASE_ROWS`` rows (32 in float, 16 in double), those of its group ``t // width``, so
that every thread works whatever the width, and a tile is ``THREADS // width`` groups of rows
(:func:`tile_rows`; two buffers of it in shared memory, about 34 KB). The backward pass gives each
group of each block its own slice of partial gradients. The layers are
described by an int64 ``layout`` array of :data:`LAYOUT_FIELDS` per layer (:func:`plan`); the
parameters and gradients use the network's flat layout ``[W^1 | ... | W^L | b^1 | ... | b^L]`` and
the activations one flat buffer each for ``y`` and ``u``, layer ``l`` at its offset. The formulas are the
registry's CUDA forms, dispatched by activation code (:data:`ACT_CODES`). Everything runs in ``T`` on the CUDA
cores, except in the TF32 twins of the passes (``module_source("float", tensor_cores=True)``, sm_80 and newer):
there each layer's products ``W x``, ``W^T delta`` and ``delta x^T`` of a tile are ``mma.sync`` on the tensor cores
(:func:`kernel_name` with ``tensor_cores``; shared memory at a pitch of ``width +`` :data:`TC_PAD`, the padding
kept zero), the rest as in float. The forward pass has a second CUDA-core kernel, register-tiled
(:mod:`.fused_forward_tiled`, ``kernel_name("forward", width, variant="tiled")``), with the same results.

Every pointer parameter is ``__restrict__``: no two arrays of a launch overlap (the backend gives each array a
launch never accesses a one-element stand-in of its own), so the compiler may keep loads of the parameters and
activations across the stores to ``ys``, ``us`` and the gradient slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import fused_forward_tiled as _tiled
from . import registry as _registry
from .cupy_sources import ACT_FORWARD, ACT_SLOPE, CTYPES, LOSS_BODY, MATH_PREAMBLE, REDUCE_PREAMBLE, loss_pairs
from .registry import ACTIVATIONS

_registry.close("cupy")

#: Widest layer (input included) the fused kernels serve, and the threads of a block.
MAX_WIDTH = 128
THREADS = MAX_WIDTH
#: The kernels' widths: a network runs at the smallest of these that holds its widest layer.
WIDTHS = (32, 64, 128)
#: Padding of a row of a tile in shared memory on the tensor cores, by pass (``BP_PITCH``: ``width + TC_PAD``):
#: no bank conflicts for the fragments each pass reads most (the forward's A by rows, the backward's by columns).
TC_PAD = {"forward": 4, "backward": 8}
#: Rows each thread carries, by C type; a tile is ``BASE_ROWS * (THREADS // width)`` rows (two buffers of it
#: in shared memory: about 34 KB either way).
BASE_ROWS = {"float": 32, "double": 16}


def kernel_width(sizes: Sequence[int]) -> int:
    """The kernels' ``width`` for layer widths ``sizes``: the smallest of :data:`WIDTHS` that holds them all.
    Thread ``t`` of a block owns column ``t % width`` and a group of ``BASE_ROWS`` rows, ``t // width``."""
    widest = max(sizes)
    for w in WIDTHS:
        if widest <= w:
            return w
    raise ValueError(f"a layer of width {widest} is wider than {MAX_WIDTH}")


def tile_rows(width: int, ctype: str) -> int:
    """Rows of a tile: every thread's group of :data:`BASE_ROWS` rows, ``THREADS // width`` groups."""
    return BASE_ROWS[ctype] * (THREADS // width)

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


def traffic_bytes(sizes: Sequence[int], keep_u: Sequence[bool], rows: int, itemsize: int) -> dict[str, int]:
    """Bytes the activations move through global memory in each fused pass of ``rows`` rows: what memory
    carries once the layers stay on chip. ``inference``: ``x`` read, every layer's ``y`` (and kept ``u``)
    written; ``forward`` (training) also reads the targets and writes ``delta^L``; ``backward`` reads ``delta^L``,
    ``x`` and every hidden layer's ``y`` (and kept ``u``) again. The parameters and the per-block gradient
    slices are left out (small next to these at a large batch)."""
    widths = list(sizes[1:])
    kept = sum(n for n, keep in zip(widths, keep_u) if keep)
    kept_hidden = sum(n for n, keep in zip(widths[:-1], keep_u[:-1]) if keep)
    inference = sizes[0] + sum(widths) + kept
    return {"inference": rows * inference * itemsize,
            "forward": rows * (inference + 2 * widths[-1]) * itemsize,
            "backward": rows * (widths[-1] + sizes[0] + sum(widths[:-1]) + kept_hidden) * itemsize}


def _switch(name: str, signature: str, cases: dict[int, str], default: str) -> str:
    body = "".join(f"    case {code}: return {expr};\n" for code, expr in cases.items())
    return (f"__device__ __forceinline__ T {name}({signature}) {{\n    switch (code) {{\n{body}    }}\n"
            f"    return {default};\n}}\n")


#: Code of each (output activation, loss) pair whose error the forward pass computes at its end: the
#: elementwise pairs of the backend's loss kernels, then softmax + cross-entropy (row by row).
PAIR_CODES: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(loss_pairs())}
PAIR_CODES[(SOFTMAX, "cross_entropy")] = len(PAIR_CODES)
#: The pair code of a pass that computes no error (inference).
NO_ERROR = -1


def dispatch_source() -> str:
    """``bp_mlp_act(code, v, alpha)`` and ``bp_mlp_slope(code, y, u, alpha)``: each activation's CUDA form
    from the registry, by its code; ``bp_mlp_loss(pair, y, u, t, k, alpha, batch, l, d)``: each elementwise
    (output, loss) pair's loss term ``l`` and delta ``d`` (divided by ``batch``), the backend's loss bodies."""
    act = {code: ACT_FORWARD[n] for n, code in ACT_CODES.items() if n != SOFTMAX}
    slope = {code: ACT_SLOPE[n][1] for n, code in ACT_CODES.items() if n != SOFTMAX}
    cases = "".join(f"    case {code}: {{ {LOSS_BODY[loss].replace('SLOPE', ACT_SLOPE[out][1])} }} return;\n"
                    for (out, loss), code in PAIR_CODES.items() if out != SOFTMAX)
    loss = ("__device__ __noinline__ void bp_mlp_loss(int code, T y, T u, T t, T k, T alpha, T batch, T& l, "
            f"T& d) {{\n    l = (T)0; d = (T)0;\n    switch (code) {{\n{cases}    }}\n}}\n")
    return (_switch("bp_mlp_act", "int code, T v, T alpha", act, "v")
            + _switch("bp_mlp_slope", "int code, T y, T u, T alpha", slope, "(T)1") + loss)


KERNELS = r"""
#define BP_THREADS %(threads)d
#define BP_BASE ((int)(%(base_bytes)d / sizeof(T)))
#define BP_F %(fields)d
#define BP_SOFTMAX %(softmax)d
/* Shared memory of a pass: two buffers of R = BP_BASE * G rows (G * WIDTH == BP_THREADS) of a pitch of WIDTH + 1
   elements on the CUDA cores (no bank conflicts for a column), WIDTH + BP_TC_PAD on the tensor cores, BP_TC_PAD set
   before each pass: 4 in the forward (no bank conflict for a fragment of A read by rows), 8 in the backward (none
   for the fragments of its dE/dW, read by columns); with bp_tc_tiles' order of stores, none for a fragment of D. */
#define BP_PITCH(width, tc) ((tc) ? (width) + BP_TC_PAD : (width) + 1)
#define BP_AT(buf, r, k) smem[((buf) * R + (r)) * pitch + (k)]

/* D = A B on the tensor cores in TF32 (inputs rounded to a 10-bit mantissa, float sums), in tiles of 16 x 8 with
   k in steps of 8: m_tiles x n_tiles tiles over k_steps, shared out among `warps` warps (this one `warp`) in items
   of one 16-row tile by BP_NT column tiles. load_a(m, k) and load_b(k, n) give the elements (zero beyond the
   matrices), store(m, n, v) takes each element of D once. Called by every lane of the warps taking part. A lane
   stores its two columns of a row of D in the order that leaves no bank conflict where D is in shared memory at a
   pitch of PITCH (4 or 8 mod 32): the odd column first in odd rows (bit 0 of g) at 4, in rows g >= 4 at 8. */
#define BP_NT 4
template <int PITCH, class A, class B, class D>
__device__ __forceinline__ void bp_tc_tiles(int m_tiles, int n_tiles, int k_steps, int warp, int warps,
                                            const A& load_a, const B& load_b, const D& store) {
    const int lane = threadIdx.x %% 32, g = lane / 4, q = lane %% 4;
    const int groups = (n_tiles + BP_NT - 1) / BP_NT;
    for (int item = warp; item < m_tiles * groups; item += warps) {
        const int m0 = item / groups * 16, nb = item %% groups * BP_NT;
        float d[BP_NT][4];
#pragma unroll
        for (int j = 0; j < BP_NT; ++j) d[j][0] = d[j][1] = d[j][2] = d[j][3] = 0.0f;
        for (int k0 = 0; k0 < 8 * k_steps; k0 += 8) {
            const unsigned a[4] = {bp_to_tf32(load_a(m0 + g, k0 + q)), bp_to_tf32(load_a(m0 + g + 8, k0 + q)),
                                   bp_to_tf32(load_a(m0 + g, k0 + q + 4)), bp_to_tf32(load_a(m0 + g + 8, k0 + q + 4))};
#pragma unroll
            for (int j = 0; j < BP_NT; ++j) {
                if (nb + j < n_tiles) {  /* the same for every lane */
                    const int n = (nb + j) * 8 + g;
                    const unsigned b[2] = {bp_to_tf32(load_b(k0 + q, n)), bp_to_tf32(load_b(k0 + q + 4, n))};
                    bp_mma_tf32(d[j], a, b);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < BP_NT; ++j) {
            if (nb + j < n_tiles) {
                const int n = (nb + j) * 8 + 2 * q, s = (g >> (PITCH %% 8 == 4 ? 0 : 2)) & 1;
                store(m0 + g, n + s, s ? d[j][1] : d[j][0]);
                store(m0 + g, n + 1 - s, s ? d[j][0] : d[j][1]);
                store(m0 + g + 8, n + s, s ? d[j][3] : d[j][2]);
                store(m0 + g + 8, n + 1 - s, s ? d[j][2] : d[j][3]);
            }
        }
    }
}


#define BP_TC_PAD %(tc_pad_forward)d  /* the forward pass's padding of a row on the tensor cores (BP_PITCH) */
/* The forward pass of every layer for each tile of R rows. Thread t owns column t %% WIDTH of every layer and
   the BP_BASE rows of its group t / WIDTH; blockDim.x == BP_THREADS. WIDTH is a constant of each entry point,
   so that every shared-memory offset is one too. */
template <int WIDTH, bool TC>
__device__ __forceinline__ void bp_mlp_forward_at(const T* __restrict__ x, const T* __restrict__ p,
                                                  const long long* __restrict__ layout, const T* __restrict__ alphas,
                                                  int layers, long long rows, T* __restrict__ ys, T* __restrict__ us,
                                                  const T* __restrict__ target, const T* __restrict__ w, int weighted,
                                                  int pair, T k, T batch, T* __restrict__ delta,
                                                  T* __restrict__ partial) {
    constexpr int pitch = BP_PITCH(WIDTH, TC), R = BP_BASE * (BP_THREADS / WIDTH);
    __shared__ __align__(16) T smem[2 * R * pitch];
    const int t = threadIdx.x, col = t %% WIDTH, r0 = (t / WIDTH) * BP_BASE;
    T loss = (T)0;  /* this thread's loss terms (weighted), over its tiles */
    for (long long row0 = (long long)blockIdx.x * R; row0 < rows; row0 += (long long)gridDim.x * R) {
        const int valid = rows - row0 < R ? (int)(rows - row0) : R;
        const int n0 = (int)layout[%(n_in)d];
        const int span = TC ? WIDTH : n0;  /* tensor cores read the padding columns: zero them */
        for (int i = t; i < R * span; i += BP_THREADS) {
            const int r = i / span, k = i %% span;
            BP_AT(0, r, k) = r < valid && k < n0 ? x[(row0 + r) * n0 + k] : (T)0;
        }
        __syncthreads();
        int cur = 0;
        for (int l = 0; l < layers; ++l) {
            const long long* L = layout + (long long)l * BP_F;
            const int n_in = (int)L[%(n_in)d], n_out = (int)L[%(n_out)d], act = (int)L[%(act)d];
            const T* W = p + L[%(w_offset)d];
            const T alpha = alphas[l];
            const int nxt = cur ^ 1;
            if constexpr (TC) {  /* W x^{l-1} of the whole tile on the tensor cores, into the next buffer */
                bp_tc_tiles<pitch>(R / 16, (n_out + 7) / 8, (n_in + 7) / 8, t / 32, BP_THREADS / 32,
                            [&](int m, int k) { return BP_AT(cur, m, k); },
                            [&](int k, int n) { return k < n_in && n < n_out ? W[(long long)n * n_in + k] : (T)0; },
                            [&](int m, int n, T v) { BP_AT(nxt, m, n) = v; });
                __syncthreads();
            }
            if (col < n_out) {
                T acc[BP_BASE];
                const T bias = p[L[%(b_offset)d] + col];
                if constexpr (TC) {
#pragma unroll
                    for (int r = 0; r < BP_BASE; ++r) acc[r] = BP_AT(nxt, r0 + r, col);
                } else {
#pragma unroll
                    for (int r = 0; r < BP_BASE; ++r) acc[r] = (T)0;
                    for (int k = 0; k < n_in; ++k) {
                        const T w = W[(long long)col * n_in + k];
#pragma unroll
                        for (int r = 0; r < BP_BASE; ++r) acc[r] += w * BP_AT(cur, r0 + r, k);
                    }
                }
#pragma unroll
                for (int r = 0; r < BP_BASE; ++r) {
                    const T v = acc[r] + bias;
                    const T y = act == BP_SOFTMAX ? v : bp_mlp_act(act, v, alpha);  /* softmax: below */
                    BP_AT(nxt, r0 + r, col) = y;
                    if (r0 + r < valid) {
                        const long long row = row0 + r0 + r;
                        if (L[%(u_offset)d] >= 0) us[L[%(u_offset)d] + row * n_out + col] = v;
                        if (act != BP_SOFTMAX) ys[L[%(y_offset)d] + row * n_out + col] = y;
                        if (pair >= 0 && act != BP_SOFTMAX && l == layers - 1) {  /* the error at the output */
                            T lt, d;
                            bp_mlp_loss(pair, y, v, target[row * n_out + col], k, alpha, batch, lt, d);
                            if (weighted) {
                                d *= w[row];
                                lt *= w[row];
                            }
                            delta[row * n_out + col] = d;
                            loss += lt;
                        }
                    }
                }
            }
            __syncthreads();
            if (act == BP_SOFTMAX) {  /* one thread per row (R <= BP_THREADS): exp(u - max) / sum */
                if (t < valid) {
                    const long long row = row0 + t;
                    T m = BP_AT(nxt, t, 0);
                    for (int j = 1; j < n_out; ++j) m = BP_AT(nxt, t, j) > m ? BP_AT(nxt, t, j) : m;
                    T s = (T)0;
                    for (int j = 0; j < n_out; ++j) s += exp(BP_AT(nxt, t, j) - m);
                    const T lse = m + log(s);  /* cross-entropy from the logits: sum_j t_j (lse - u_j) */
                    const T wr = weighted ? w[row] : (T)1;
                    T lt = (T)0;
                    for (int j = 0; j < n_out; ++j) {
                        const T u = BP_AT(nxt, t, j);
                        const T y = exp(u - m) / s;
                        BP_AT(nxt, t, j) = y;
                        ys[L[%(y_offset)d] + row * n_out + j] = y;
                        if (pair >= 0 && l == layers - 1) {
                            const T tj = target[row * n_out + j];
                            T d = (y - tj) / batch;
                            if (weighted) d *= wr;
                            delta[row * n_out + j] = d;
                            lt += tj * (lse - u);
                        }
                    }
                    loss += weighted ? lt * wr : lt;
                }
                __syncthreads();
            }
            cur = nxt;
        }
    }
    if (pair >= 0) {  /* the block's sum of the loss terms; bp_mlp_mean adds the blocks' */
        loss = bp_block_sum(loss);
        if (t == 0) partial[blockIdx.x] = loss;
    }
}

#undef BP_TC_PAD
#define BP_TC_PAD %(tc_pad_backward)d  /* the backward pass's (BP_PITCH) */
/* The backward pass of every layer for each tile of R rows. Each group of threads (t / WIDTH) sums the
   gradients of its BP_BASE rows of every tile into a slice of partial of its own (n_params values, the
   parameters' layout): slice blockIdx.x * G + group. blockDim.x == BP_THREADS. */
template <int WIDTH, bool TC>
__device__ __forceinline__ void bp_mlp_backward_at(const T* __restrict__ x, const T* __restrict__ p,
                                                   const long long* __restrict__ layout, const T* __restrict__ alphas,
                                                   int layers, long long rows, const T* __restrict__ ys,
                                                   const T* __restrict__ us, const T* __restrict__ delta,
                                                   T* __restrict__ partial, long long n_params) {
    constexpr int pitch = BP_PITCH(WIDTH, TC), G = BP_THREADS / WIDTH, R = BP_BASE * G;
    __shared__ __align__(16) T smem[2 * R * pitch];
    const int t = threadIdx.x, col = t %% WIDTH, group = t / WIDTH, r0 = group * BP_BASE;
    T* mine = partial + ((long long)blockIdx.x * G + group) * n_params;
    for (long long i = col; i < n_params; i += WIDTH) mine[i] = (T)0;  /* each group zeroes its own slice */
    const long long* out = layout + (long long)(layers - 1) * BP_F;
    const int n_last = (int)out[%(n_out)d];
    for (long long row0 = (long long)blockIdx.x * R; row0 < rows; row0 += (long long)gridDim.x * R) {
        const int valid = rows - row0 < R ? (int)(rows - row0) : R;
        const int span = TC ? WIDTH : n_last;  /* tensor cores read the padding columns: zero them */
        for (int i = t; i < R * span; i += BP_THREADS) {
            const int r = i / span, j = i %% span;
            BP_AT(0, r, j) = r < valid && j < n_last ? delta[(row0 + r) * n_last + j] : (T)0;
        }
        __syncthreads();
        int cur = 0;
        for (int l = layers - 1; l >= 0; --l) {
            const long long* L = layout + (long long)l * BP_F;
            const int n_in = (int)L[%(n_in)d], n_out = (int)L[%(n_out)d];
            const T* W = p + L[%(w_offset)d];
            const T* x_prev = l > 0 ? ys + layout[(long long)(l - 1) * BP_F + %(y_offset)d] : x;
            if (col < n_out) {  /* dE/db^l += sum over this group's rows of delta^l */
                T s = (T)0;
#pragma unroll
                for (int r = 0; r < BP_BASE; ++r) s += BP_AT(cur, r0 + r, col);
                mine[L[%(b_offset)d] + col] += s;
            }
            if constexpr (TC) {
                /* x^{l-1} of this group's rows into the other buffer (zero beyond n_in and the valid rows) */
                T xr[BP_BASE];
#pragma unroll
                for (int r = 0; r < BP_BASE; ++r) {
                    xr[r] = col < n_in && r0 + r < valid ? x_prev[(row0 + r0 + r) * n_in + col] : (T)0;
                    BP_AT(cur ^ 1, r0 + r, col) = xr[r];
                }
                __syncthreads();
                /* dE/dW^l += (delta^l)^T x^{l-1} over this group's rows, by the group's warps into its slice */
                bp_tc_tiles<pitch>((n_out + 15) / 16, (n_in + 7) / 8, BP_BASE / 8, col / 32, WIDTH / 32,
                            [&](int m, int k) { return BP_AT(cur, r0 + k, m); },
                            [&](int k, int n) { return BP_AT(cur ^ 1, r0 + k, n); },
                            [&](int m, int n, T v) {
                                if (m < n_out && n < n_in) mine[L[%(w_offset)d] + (long long)m * n_in + n] += v;
                            });
                if (l > 0) {
                    __syncthreads();  /* every group has read its x^{l-1} */
                    /* (W^l)^T delta^l of the whole tile, into the other buffer */
                    bp_tc_tiles<pitch>(R / 16, (n_in + 7) / 8, (n_out + 7) / 8, t / 32, BP_THREADS / 32,
                                [&](int m, int k) { return BP_AT(cur, m, k); },
                                [&](int k, int n) { return k < n_out && n < n_in ? W[(long long)k * n_in + n] : (T)0; },
                                [&](int m, int n, T v) { BP_AT(cur ^ 1, m, n) = v; });
                    __syncthreads();
                    /* delta^{l-1} = phi(y^{l-1}) * (W^l)^T delta^l on this thread's column; the padding stays zero */
                    const long long* P = layout + (long long)(l - 1) * BP_F;
                    const int code = (int)P[%(act)d];
                    const T alpha = alphas[l - 1];
#pragma unroll
                    for (int r = 0; r < BP_BASE; ++r) {
                        const bool in = col < n_in && r0 + r < valid;
                        const T u = (P[%(u_offset)d] >= 0 && in) ? us[P[%(u_offset)d] + (row0 + r0 + r) * n_in + col]
                                                                 : (T)0;
                        const T v = BP_AT(cur ^ 1, r0 + r, col);
                        BP_AT(cur ^ 1, r0 + r, col) = in ? v * bp_mlp_slope(code, xr[r], u, alpha) : (T)0;
                    }
                }
            } else if (col < n_in) {  /* column col of dE/dW^l and of (W^l)^T delta^l, over this group's rows */
                T xr[BP_BASE], acc[BP_BASE];
#pragma unroll
                for (int r = 0; r < BP_BASE; ++r) {
                    xr[r] = r0 + r < valid ? x_prev[(row0 + r0 + r) * n_in + col] : (T)0;
                    acc[r] = (T)0;
                }
                for (int j = 0; j < n_out; ++j) {
                    const T w = W[(long long)j * n_in + col];
                    T s = (T)0;
#pragma unroll
                    for (int r = 0; r < BP_BASE; ++r) {
                        const T dj = BP_AT(cur, r0 + r, j);
                        s += dj * xr[r];
                        acc[r] += w * dj;
                    }
                    mine[L[%(w_offset)d] + (long long)j * n_in + col] += s;
                }
                if (l > 0) {  /* delta^{l-1} = phi(y^{l-1}) * (W^l)^T delta^l, y^{l-1} being x_prev */
                    const long long* P = layout + (long long)(l - 1) * BP_F;
                    const int code = (int)P[%(act)d];
                    const T alpha = alphas[l - 1];
#pragma unroll
                    for (int r = 0; r < BP_BASE; ++r) {
                        const bool in = r0 + r < valid;
                        const T u = (P[%(u_offset)d] >= 0 && in) ? us[P[%(u_offset)d] + (row0 + r0 + r) * n_in + col]
                                                                 : (T)0;
                        BP_AT(cur ^ 1, r0 + r, col) = in ? acc[r] * bp_mlp_slope(code, xr[r], u, alpha) : (T)0;
                    }
                }
            }
            __syncthreads();
            cur ^= 1;
        }
    }
}

%(entries)s
/* out[0] = sum(partial[0:blocks]) / batch, one block, fixed order: the mean loss of a forward pass with its error. */
extern "C" __global__ void bp_mlp_mean(const T* __restrict__ partial, long long blocks, T batch, T* __restrict__ out) {
    T acc = (T)0;
    for (long long i = threadIdx.x; i < blocks; i += blockDim.x) acc += partial[i];
    acc = bp_block_sum(acc);
    if (threadIdx.x == 0) out[0] = acc / batch;
}

/* grads[i] = sum over the slices of partial[b * n + i], in the order of the slices. */
extern "C" __global__ void bp_mlp_reduce(const T* __restrict__ partial, long long slices, long long n,
                                          T* __restrict__ grads) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        T s = (T)0;
        for (long long b = 0; b < slices; ++b) s += partial[b * n + i];
        grads[i] = s;
    }
}
"""


_ENTRIES = r"""extern "C" __global__ void bp_mlp_forward%(tag)s_w%(w)d(const T* __restrict__ x, const T* __restrict__ p,
    const long long* __restrict__ layout, const T* __restrict__ alphas, int layers, long long rows,
    T* __restrict__ ys, T* __restrict__ us, const T* __restrict__ target, const T* __restrict__ w, int weighted,
    int pair, T k, T batch, T* __restrict__ delta, T* __restrict__ partial) {
    bp_mlp_forward_at<%(w)d, %(tc)s>(x, p, layout, alphas, layers, rows, ys, us, target, w, weighted, pair, k, batch,
                                     delta, partial);
}
extern "C" __global__ void bp_mlp_backward%(tag)s_w%(w)d(const T* __restrict__ x, const T* __restrict__ p,
    const long long* __restrict__ layout, const T* __restrict__ alphas, int layers, long long rows,
    const T* __restrict__ ys, const T* __restrict__ us, const T* __restrict__ delta, T* __restrict__ partial,
    long long n_params) {
    bp_mlp_backward_at<%(w)d, %(tc)s>(x, p, layout, alphas, layers, rows, ys, us, delta, partial, n_params);
}
"""

#: The tag of the tensor-core (TF32) entry points: ``bp_mlp_forward_tf32_w64``.
TF32_TAG = "_tf32"


#: The CUDA-core forward kernels: ``"column"`` (``bp_mlp_forward_w64``: a column and ``BASE_ROWS`` rows a thread)
#: and ``"tiled"`` (``bp_mlp_forward_tiled_w64``: :mod:`.fused_forward_tiled`), the tag of each in its names.
FORWARD_VARIANTS = {"column": "", "tiled": "_tiled"}


def kernel_name(pass_: str, width: int, tensor_cores: bool = False, variant: str = "column") -> str:
    """The entry point of pass ``"forward"`` or ``"backward"`` at kernel width ``width``, on the CUDA cores or
    (``tensor_cores``, float only) on the tensor cores in TF32; ``variant`` (:data:`FORWARD_VARIANTS`) picks the
    CUDA-core forward kernel."""
    if variant != "column" and (pass_ != "forward" or tensor_cores or variant not in FORWARD_VARIANTS):
        raise ValueError(f"variant {variant!r} is a CUDA-core forward kernel of {sorted(FORWARD_VARIANTS)}")
    return f"bp_mlp_{pass_}{TF32_TAG if tensor_cores else FORWARD_VARIANTS[variant]}_w{width}"


def kernels_body(tensor_cores: bool = False) -> str:
    """The kernels (after :data:`PREAMBLE`), for a ``typedef`` of ``T``: a forward (of each of
    :data:`FORWARD_VARIANTS`) and a backward entry point per width of :data:`WIDTHS` (with ``tensor_cores``, also
    their TF32 twins: float only), and the reductions."""
    fields = format_fields()
    entries = [_ENTRIES % {"w": w, "tag": "", "tc": "false"} for w in WIDTHS]
    if tensor_cores:
        entries += [_ENTRIES % {"w": w, "tag": TF32_TAG, "tc": "true"} for w in WIDTHS]
    return KERNELS % {**fields, "entries": "".join(entries) + _tiled.source(fields)}


def format_fields() -> dict[str, Any]:
    """The fields :data:`KERNELS` (but ``entries``) and ``fused_forward_tiled.source`` are formatted with."""
    return {"threads": THREADS, "base_bytes": BASE_ROWS["float"] * 4, "fields": LAYOUT_FIELDS,
            "softmax": ACT_CODES[SOFTMAX], "n_in": N_IN, "n_out": N_OUT, "w_offset": W_OFFSET, "b_offset": B_OFFSET,
            "act": ACT, "y_offset": Y_OFFSET, "u_offset": U_OFFSET, "tc_pad_forward": TC_PAD["forward"],
            "tc_pad_backward": TC_PAD["backward"], "widths": WIDTHS}


def tiled_geometry(width: int, ctype: str) -> dict[str, int]:
    """The shared-memory layout of the tiled forward at kernel width ``width`` for C type ``ctype``
    (``fused_forward_tiled.geometry``)."""
    return _tiled.geometry(width, BASE_ROWS[ctype], THREADS, 4 if ctype == "float" else 8)


#: The tensor cores' two primitives, in PTX (sm_80 and newer; a trap before): ``bp_to_tf32(v)`` rounds a float to
#: TF32 (10-bit mantissa, to nearest, ties away from zero: ``cvt.rna.tf32.f32``), and ``bp_mma_tf32(d, a, b)`` is
#: ``d += a b`` for one 16 x 8 x 8 tile (``mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32``), each lane of the
#: warp holding its fragment as the PTX ISA lays it out: with ``g = lane / 4``, ``q = lane % 4``, ``a = (A[g][q],
#: A[g+8][q], A[g][q+4], A[g+8][q+4])``, ``b = (B[q][g], B[q+4][g])``, ``d = (D[g][2q], D[g][2q+1], D[g+8][2q],
#: D[g+8][2q+1])``. Unused by the CUDA-core kernels; the host emulator of the tests stands in its own.
MMA_PRIMITIVES = r"""
__device__ __forceinline__ unsigned bp_to_tf32(float v) {
    unsigned r = 0u;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
#else
    __trap();
#endif
    return r;
}
__device__ __forceinline__ void bp_mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}
"""

#: What the kernels need before them: the registry's device helpers, the block reductions, the dispatch functions,
#: the tensor cores' primitives.
PREAMBLE = f"{MATH_PREAMBLE}\n{REDUCE_PREAMBLE}\n{dispatch_source()}\n{MMA_PRIMITIVES}"

#: The kernels of the CUDA-core module, as CuPy's RawModule names them; the TF32 module adds :data:`TF32_KERNEL_NAMES`.
KERNEL_NAMES = tuple(kernel_name(p, w) for w in WIDTHS for p in ("forward", "backward")) + tuple(
    kernel_name("forward", w, variant="tiled") for w in WIDTHS) + ("bp_mlp_mean", "bp_mlp_reduce")
TF32_KERNEL_NAMES = tuple(kernel_name(p, w, True) for w in WIDTHS for p in ("forward", "backward"))


def module_source(ctype: str, tensor_cores: bool = False) -> str:
    """The whole RawModule source for C type ``ctype`` (``"float"`` or ``"double"``); with ``tensor_cores``
    (float only: TF32 is a float32 format), the TF32 entry points too (they need sm_80 or newer)."""
    if ctype not in CTYPES.values():
        raise ValueError(f"ctype must be one of {sorted(CTYPES.values())}, got {ctype!r}")
    if tensor_cores and ctype != "float":
        raise ValueError(f"the tensor-core (TF32) kernels are float only, got {ctype!r}")
    return f"typedef {ctype} T;\n{PREAMBLE}\n{kernels_body(tensor_cores)}"
