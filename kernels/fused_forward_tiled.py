"""The register-tiled forward pass of the fused narrow-network kernels (``bp_mlp_forward_tiled_w<width>``), a
second CUDA-core forward beside the column kernel ``bp_mlp_forward_w<width>`` of :mod:`.fused_mlp_sources`, in
whose module it is compiled (:data:`SOURCE` uses that module's macros and device functions).

The column kernel gives each thread one column and ``BASE`` rows: per input ``k`` a warp issues one load of ``W``
(one element of each of 32 rows of ``W``: 32 cache lines) and ``BASE`` shared-memory loads for ``BASE`` FMAs. The
tiled kernel:

* keeps the tile's activations k-major in shared memory (``xs``: row ``k`` holds input ``k`` of the tile's rows),
  at a pitch of the tile's rows plus 16 bytes, and writes each layer's output over its input;
* stages ``W^l`` through shared memory in chunks of :data:`W_CHUNK_BYTES` (``ws``: k-major, the :data:`COLUMNS`
  columns of each thread in 16-byte packs, the packs of a warp's threads side by side), read from global memory
  along the rows of ``W`` (coalesced);
* has each thread compute ``BASE / COLUMNS`` rows by :data:`COLUMNS` columns: per ``k``, 16-byte loads (``float4``
  or ``double2`` wide) of its rows of ``x`` and its columns of ``W``, then an FMA for each pair. A warp is 4 row
  groups by 8 column groups: its loads of ``x`` are 4 distinct 16-byte words (each read by 8 threads), its loads
  of ``W`` 8 (each read by 4).

Each output sums ``w * x`` in the order of ``k`` from zero, then adds the bias, as the column kernel does: ``y``,
``u`` and ``delta`` are the same bits. The mean loss adds the same terms in another order (equal to rounding).
"""

from __future__ import annotations

#: Output columns each thread computes: thread (row group ``rg``, column group ``cg``) owns columns
#: ``cg + (width // COLUMNS) * j`` for ``j < COLUMNS``, and rows ``rg * rows_per_thread + i``.
COLUMNS = 4
#: Bytes of ``W^l`` staged in shared memory at a time: ``W_CHUNK_BYTES // (width * itemsize)`` of its inputs.
W_CHUNK_BYTES = 8192
#: Bytes of one vector access of shared memory.
VECTOR_BYTES = 16
#: A warp's piece of the plane of (row group, column group): 4 row groups by 8 column groups.
WARP_ROW_GROUPS, WARP_COLUMN_GROUPS = 4, 8


def geometry(width: int, base_rows: int, threads: int, itemsize: int) -> dict[str, int]:
    """The layout of the tiled forward at kernel width ``width`` (a multiple of 32), ``base_rows`` outputs a
    thread, ``threads`` a block, elements of ``itemsize`` bytes; sizes in elements. ``tile_rows``; ``x_pitch``
    (of ``xs``, ``width`` rows of it), ``k_chunk`` and ``w_pitch`` (``ws``: ``k_chunk`` rows); ``vector`` (elements
    of a 16-byte access); ``rows_per_thread``, ``column_groups``, ``row_groups``; ``smem_bytes`` (both arrays)."""
    vector = VECTOR_BYTES // itemsize
    tile_rows = base_rows * (threads // width)
    k_chunk = min(W_CHUNK_BYTES // (width * itemsize), width)
    x_pitch, w_pitch = tile_rows + vector, width + vector
    rows_per_thread = base_rows // COLUMNS
    return {"tile_rows": tile_rows, "x_pitch": x_pitch, "k_chunk": k_chunk, "w_pitch": w_pitch, "vector": vector,
            "rows_per_thread": rows_per_thread, "column_groups": width // COLUMNS,
            "row_groups": tile_rows // rows_per_thread, "smem_bytes": (width * x_pitch + k_chunk * w_pitch) * itemsize}


def thread_tile(t: int, width: int) -> tuple[int, int]:
    """``(row group, column group)`` of thread ``t`` of a block: the warps tile the plane in pieces of
    :data:`WARP_ROW_GROUPS` by :data:`WARP_COLUMN_GROUPS`, ``width // (COLUMNS * WARP_COLUMN_GROUPS)`` of them
    across."""
    across = width // (COLUMNS * WARP_COLUMN_GROUPS)
    warp, lane = divmod(t, 32)
    return ((warp // across) * WARP_ROW_GROUPS + lane // WARP_COLUMN_GROUPS,
            (warp % across) * WARP_COLUMN_GROUPS + lane % WARP_COLUMN_GROUPS)


#: The tiled forward (after the column kernels of ``fused_mlp_sources.KERNELS``, formatted with its fields and
#: ``columns``, ``chunk_bytes``, ``vector_bytes``, ``warp_rows``, ``warp_cols``).
SOURCE = r"""
#define BP_CN %(columns)d                              /* output columns a thread computes */
#define BP_VEC ((int)(%(vector_bytes)d / sizeof(T)))  /* elements of a 16-byte access */
#define BP_RM (BP_BASE / BP_CN)                       /* rows a thread computes */
#define BP_W_CHUNK %(chunk_bytes)d                    /* bytes of W staged in shared memory at a time */

/* 16 bytes of E, aligned: a load or store of one is one vector access (ld.shared.v4.f32, ld.shared.v2.f64). */
template <class E> struct __align__(%(vector_bytes)d) bp_pack { E v[%(vector_bytes)d / sizeof(E)]; };

/* to[0:N] in N / BP_VEC vector loads: pack h (to[h * BP_VEC:(h + 1) * BP_VEC]) from from + h * stride, 16-byte
   aligned. */
template <int N> __device__ __forceinline__ void bp_load_packs(const T* from, int stride, T (&to)[N]) {
#pragma unroll
    for (int h = 0; h < N / BP_VEC; ++h) {
        const bp_pack<T> v = *reinterpret_cast<const bp_pack<T>*>(from + h * stride);
#pragma unroll
        for (int e = 0; e < BP_VEC; ++e) to[h * BP_VEC + e] = v.v[e];
    }
}

/* to[0:N] = from[0:N], to 16-byte aligned, in N / BP_VEC vector stores. */
template <int N> __device__ __forceinline__ void bp_store_packs(const T (&from)[N], T* to) {
#pragma unroll
    for (int h = 0; h < N / BP_VEC; ++h) {
        bp_pack<T> v;
#pragma unroll
        for (int e = 0; e < BP_VEC; ++e) v.v[e] = from[h * BP_VEC + e];
        reinterpret_cast<bp_pack<T>*>(to)[h] = v;
    }
}

/* The forward pass of bp_mlp_forward_at (on the CUDA cores), register-tiled: thread (rg, cg) computes rows
   rg * BP_RM + i and columns cg + NC * j (i < BP_RM, j < BP_CN) of every layer, from xs (the tile k-major: xs[k * XP
   + r] is input k of row r) and ws (a chunk of KC inputs of W^l at a time: W^l[c][k0 + kk] at ws[kk * WP + (j /
   BP_VEC) * NC * BP_VEC + cg * BP_VEC + j %% BP_VEC] for c = cg + NC * j: a warp's 8 column groups read 128
   adjacent bytes a pack), each output summed in the order of k. The layer's output is written over its input (after a
   barrier). blockDim.x == BP_THREADS. */
template <int WIDTH>
__device__ __forceinline__ void bp_mlp_forward_tiled_at(
    const T* __restrict__ x, const T* __restrict__ p, const long long* __restrict__ layout,
    const T* __restrict__ alphas, int layers, long long rows, T* __restrict__ ys, T* __restrict__ us,
    const T* __restrict__ target, const T* __restrict__ w, int weighted, int pair, T k, T batch,
    T* __restrict__ delta, T* __restrict__ partial) {
    constexpr int R = BP_BASE * (BP_THREADS / WIDTH), XP = R + BP_VEC, WP = WIDTH + BP_VEC, NC = WIDTH / BP_CN;
    constexpr int KC = BP_W_CHUNK / (WIDTH * (int)sizeof(T)) < WIDTH ? BP_W_CHUNK / (WIDTH * (int)sizeof(T)) : WIDTH;
    constexpr int ACROSS = NC / %(warp_cols)d;  /* warps across the column groups */
    __shared__ __align__(16) T xs[WIDTH * XP];
    __shared__ __align__(16) T ws[KC * WP];
    const int t = threadIdx.x, lane = t %% 32, warp = t / 32;
    const int rg = (warp / ACROSS) * %(warp_rows)d + lane / %(warp_cols)d;
    const int cg = (warp %% ACROSS) * %(warp_cols)d + lane %% %(warp_cols)d, r0 = rg * BP_RM;
    T loss = (T)0;  /* this thread's loss terms (weighted), over its tiles */
    for (long long row0 = (long long)blockIdx.x * R; row0 < rows; row0 += (long long)gridDim.x * R) {
        const int valid = rows - row0 < R ? (int)(rows - row0) : R;
        const int n0 = (int)layout[%(n_in)d];
        for (int i = t; i < R * n0; i += BP_THREADS) {
            const int r = i / n0, c = i %% n0;
            xs[c * XP + r] = r < valid ? x[(row0 + r) * n0 + c] : (T)0;
        }
        __syncthreads();
        for (int l = 0; l < layers; ++l) {
            const long long* L = layout + (long long)l * BP_F;
            const int n_in = (int)L[%(n_in)d], n_out = (int)L[%(n_out)d], act = (int)L[%(act)d];
            const T* W = p + L[%(w_offset)d];
            const T alpha = alphas[l];
            T acc[BP_RM][BP_CN];
#pragma unroll
            for (int i = 0; i < BP_RM; ++i)
#pragma unroll
                for (int j = 0; j < BP_CN; ++j) acc[i][j] = (T)0;
            for (int k0 = 0; k0 < n_in; k0 += KC) {
                const int kn = n_in - k0 < KC ? n_in - k0 : KC;
                for (int i = t; i < WIDTH * kn; i += BP_THREADS) {  /* along the rows of W: coalesced */
                    const int c = i / kn, kk = i %% kn, j = c / NC;
                    ws[kk * WP + (j / BP_VEC) * NC * BP_VEC + (c %% NC) * BP_VEC + j %% BP_VEC] =
                        c < n_out ? W[(long long)c * n_in + k0 + kk] : (T)0;
                }
                __syncthreads();
                if (cg < n_out) {
                    for (int kk = 0; kk < kn; ++kk) {
                        T xv[BP_RM], wv[BP_CN];
                        bp_load_packs(&xs[(k0 + kk) * XP + r0], BP_VEC, xv);
                        bp_load_packs(&ws[kk * WP + cg * BP_VEC], NC * BP_VEC, wv);
#pragma unroll
                        for (int i = 0; i < BP_RM; ++i)
#pragma unroll
                            for (int j = 0; j < BP_CN; ++j) acc[i][j] += wv[j] * xv[i];
                    }
                }
                __syncthreads();  /* ws is staged again, and xs written, once every thread has read them */
            }
#pragma unroll
            for (int j = 0; j < BP_CN; ++j) {
                const int col = cg + NC * j;
                if (col < n_out) {
                    const T bias = p[L[%(b_offset)d] + col];
                    T yv[BP_RM];
#pragma unroll
                    for (int i = 0; i < BP_RM; ++i) {
                        const T v = acc[i][j] + bias;
                        const T y = act == BP_SOFTMAX ? v : bp_mlp_act(act, v, alpha);  /* softmax: below */
                        yv[i] = y;
                        if (r0 + i < valid) {
                            const long long row = row0 + r0 + i;
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
                    bp_store_packs(yv, &xs[col * XP + r0]);
                }
            }
            __syncthreads();
            if (act == BP_SOFTMAX) {  /* one thread per row (R <= BP_THREADS): exp(u - max) / sum */
                if (t < valid) {
                    const long long row = row0 + t;
                    T m = xs[t];
                    for (int j = 1; j < n_out; ++j) m = xs[j * XP + t] > m ? xs[j * XP + t] : m;
                    T s = (T)0;
                    for (int j = 0; j < n_out; ++j) s += exp(xs[j * XP + t] - m);
                    const T lse = m + log(s);  /* cross-entropy from the logits: sum_j t_j (lse - u_j) */
                    const T wr = weighted ? w[row] : (T)1;
                    T lt = (T)0;
                    for (int j = 0; j < n_out; ++j) {
                        const T u = xs[j * XP + t];
                        const T y = exp(u - m) / s;
                        xs[j * XP + t] = y;
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
        }
    }
    if (pair >= 0) {  /* the block's sum of the loss terms; bp_mlp_mean adds the blocks' */
        loss = bp_block_sum(loss);
        if (t == 0) partial[blockIdx.x] = loss;
    }
}
"""

#: An entry point of the tiled forward, formatted with ``w`` (the kernel width).
ENTRY = r"""extern "C" __global__ void bp_mlp_forward_tiled_w%(w)d(
    const T* __restrict__ x, const T* __restrict__ p, const long long* __restrict__ layout,
    const T* __restrict__ alphas, int layers, long long rows, T* __restrict__ ys, T* __restrict__ us,
    const T* __restrict__ target, const T* __restrict__ w, int weighted, int pair, T k, T batch,
    T* __restrict__ delta, T* __restrict__ partial) {
    bp_mlp_forward_tiled_at<%(w)d>(x, p, layout, alphas, layers, rows, ys, us, target, w, weighted, pair, k, batch,
                                   delta, partial);
}
"""


def source(fields: dict) -> str:
    """:data:`SOURCE` and an entry point per width of ``widths`` in ``fields`` (the fused module's format fields)."""
    body = SOURCE % {**fields, "columns": COLUMNS, "chunk_bytes": W_CHUNK_BYTES, "vector_bytes": VECTOR_BYTES,
                     "warp_rows": WARP_ROW_GROUPS, "warp_cols": WARP_COLUMN_GROUPS}
    return body + "".join(ENTRY % {"w": w} for w in fields["widths"])
