"""CUDA sources of the CuPy backend, as plain strings: importable (and compilable by ``nvcc``) without CuPy.

Every kernel is written against an element type ``T`` (``float`` or ``double``). CuPy's
``ElementwiseKernel`` emits ``typedef float T;`` (or ``double``) ahead of the preamble from the
arguments' dtype; the raw kernels get the same typedef from :func:`raw_module_source`. Literal
constants are cast, ``(T)0.5``, so that float32 kernels stay in single precision (the source test
checks the float PTX for double-precision instructions).

The activation and loss formulas follow :mod:`backprop.kernels.numpy_ref` term by term:

* ``ACT_FORWARD[name]``: ``f(v)`` as a C expression of ``v`` (the pre-activation, bias included)
  and ``alpha``;
* ``ACT_SLOPE[name]``: ``(variable, expression)``, the slope as ``phi(y)`` of the output ``y``, or,
  for GELU and SiLU, ``f'(u)`` of the pre-activation ``u``;
* ``LOSS_BODY[loss]``: per element, the loss term ``l`` (summed, then divided by the batch) and the
  output delta ``d``, from ``y``, ``u``, ``t``, the Huber threshold ``k``, ``alpha`` and ``batch``;
  the loss kernels multiply both by the row's weight when they are given row weights.

The guard (``guard_step``, the ``*_guarded`` updates and their ``*_probe`` twins, see
:mod:`backprop.kernels.contract`) is a float64 ``(4,)`` array on the device. The updates read
``guard[0]`` through an int64 view of it and compare its bits with those of ``1.0``, and the probes
fail a step by writing its bits, so that float32 kernels stay free of double instructions; only
the one-thread float64 bookkeeping of ``bp_guard_finish``, ``bp_add_to_total``,
``bp_adam_corrections`` and ``bp_count_step`` computes in double (:data:`F64_KERNELS`). Each probe
is generated from its update's ElementwiseKernel operation (:func:`probe_kernel`), so both compute
the same terms.

The raw kernels' pointer parameters are ``__restrict__`` wherever no array the kernel writes can overlap another
it accesses (two read-only ones may be one array: a loss kernel's ``py`` and ``pu``; the weights and biases of the
one-launch step are disjoint pieces of one buffer); not so ``bp_softmax_forward``'s ``u`` and ``y`` (in place) and
``bp_count_step``'s ``count`` and ``guard`` (one array when unguarded).
"""

from __future__ import annotations

import re

from . import registry as _registry
from .registry import ACTIVATIONS, LOSSES

_registry.close("cupy")  # the tables below are made once, from the records as they are now

#: C type of each supported dtype name.
CTYPES = {"float32": "float", "float64": "double"}

#: Threads per block of the raw kernels (a multiple of 32; bp_block_sum needs at most 1024).
BLOCK = 256
#: Rows per block of the row kernels: one warp per row.
ROWS_PER_BLOCK = BLOCK // 32
#: Most blocks of the elementwise-loss kernel (its partial sums are added by bp_sum_scale).
MAX_LOSS_BLOCKS = 1024
#: Most blocks of bp_guard_scan and bp_sum_squares (their per-block results are added by one block).
MAX_GUARD_BLOCKS = 1024

# --------------------------------------------------------------------------- device helpers
_COMMON_HELPERS = r"""
/* numpy.sign: -1, 0 or 1, NaN stays NaN */
__device__ __forceinline__ T bp_sign(T r) { return r > (T)0 ? (T)1 : (r < (T)0 ? (T)-1 : r); }

/* numpy.clip(r, -k, k), NaN stays NaN */
__device__ __forceinline__ T bp_clip(T r, T k) { return r < -k ? -k : (r > k ? k : r); }

/* The bits of the double 1.0: guard[0] (read through an int64 view) says "apply this step". */
#define BP_GUARD_OK_BITS 0x3FF0000000000000LL
"""

#: The device helpers of every kernel: the registry's helpers of each activation, in its order, then the
#: common ones.
MATH_PREAMBLE = "".join(a.cuda_helpers for a in ACTIVATIONS.values()) + _COMMON_HELPERS

REDUCE_PREAMBLE = r"""
__device__ __forceinline__ T bp_neg_inf() { return (T)__int_as_float(0xff800000); }

/* Neither NaN nor infinite, from the exponent bits (no math header, and no fast-math folding). */
__device__ __forceinline__ bool bp_finite(float v) { return (__float_as_int(v) & 0x7f800000) != 0x7f800000; }
__device__ __forceinline__ bool bp_finite(double v) {
    return (__double_as_longlong(v) & 0x7ff0000000000000LL) != 0x7ff0000000000000LL;
}

/* A probe's failing verdict, through the int64 bits of the guard (no double arithmetic): guard[0] =
   0.0, and guard[2] = guard[1] unless a step failed before. Racing threads write the same values. */
__device__ __forceinline__ void bp_fail_step(long long* guard) {
    guard[0] = 0LL;
    if (guard[2] == 0LL) guard[2] = guard[1];
}

/* Butterfly reductions over the 32 lanes of a warp: every lane ends with the same bits. All 32
   lanes must call them (the kernels keep whole warps together). */
__device__ __forceinline__ T bp_warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ T bp_warp_max(T v) {
    for (int o = 16; o > 0; o >>= 1) {
        T w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024), in a fixed order; the result is
   valid in thread 0. Called once per kernel. */
__device__ __forceinline__ T bp_block_sum(T v) {
    __shared__ T warp_sums[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = bp_warp_sum(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : (T)0;
        v = bp_warp_sum(v);
    }
    return v;
}
"""

# --------------------------------------------------------------------------- activation tables
#: f(v), from the registry: ``v`` is the pre-activation with the bias added.
ACT_FORWARD: dict[str, str] = {n: a.cuda_f for n, a in ACTIVATIONS.items() if a.cuda_f is not None}

#: The slope, from the registry: from the output ``y`` (phi(y) = f'(f^-1(y))) or, for the activations
#: that need it, from ``u``.
ACT_SLOPE: dict[str, tuple[str, str]] = {
    n: ("u" if a.needs_u else "y", a.cuda_phi) for n, a in ACTIVATIONS.items() if a.cuda_phi is not None}

#: Per element of the output, from the registry: ``l`` (loss term) and ``d`` (delta, already divided by
#: ``batch``). ``SLOPE`` is replaced by the output activation's slope expression.
LOSS_BODY: dict[str, str] = {n: x.cuda_body for n, x in LOSSES.items() if x.cuda_body is not None}

# --------------------------------------------------------------------------- elementwise kernels
#: Name -> (in_params, out_params, operation), in CuPy's ElementwiseKernel syntax.
ElementwiseSpec = tuple[str, str, str]


def _forward_keep_u(act: str) -> ElementwiseSpec:
    """``u += b`` in place and ``y = f(u)``: one pass over u, both kept."""
    return "T b, T alpha", "T u, T y", f"T v = u + b; u = v; y = {ACT_FORWARD[act]};"


def _forward_in_place(act: str) -> ElementwiseSpec:
    """``u <- f(u + b)`` in place: the pre-activation is not kept."""
    return "T b, T alpha", "T u", f"T v = u + b; u = {ACT_FORWARD[act]};"


def _slope(act: str) -> ElementwiseSpec:
    """``g *= slope``, the slope read from ``y`` or from ``u`` (GELU, SiLU)."""
    var, expr = ACT_SLOPE[act]
    return f"T {var}, T alpha", "T g", f"g = g * {expr};"


MOMENTUM: ElementwiseSpec = (
    "T g, T lr, T mu, T wd, int32 nesterov",
    "T p, T v",
    "T gd = wd != (T)0 ? g + wd * p : g; "
    "v = mu * v + gd; "
    "p = nesterov ? p - lr * (gd + mu * v) : p - lr * v;",
)

ADAM: ElementwiseSpec = (
    "T g, T lr_c1, T beta1, T beta2, T one_m_beta1, T one_m_beta2, T c2, T eps, T wd",
    "T p, T m, T v",
    "T gd = wd != (T)0 ? g + wd * p : g; "
    "m = beta1 * m + one_m_beta1 * gd; "
    "v = beta2 * v + one_m_beta2 * gd * gd; "
    "p = p - lr_c1 * m / (sqrt(v / c2) + eps);",
)

#: Adam with its bias corrections read on the device from the ``(2,)`` array of ``bp_adam_corrections``
#: (``corr[0] = lr / c1``, ``corr[1] = c2``): the update of :data:`ADAM`, term for term, so both give
#: the same bits for the same step.
ADAM_DEVICE: ElementwiseSpec = (
    "T g, raw T corr, T beta1, T beta2, T one_m_beta1, T one_m_beta2, T eps, T wd",
    "T p, T m, T v",
    "const T lr_c1 = corr[0]; const T c2 = corr[1]; "
    + ADAM[2],
)

SGD: ElementwiseSpec = (
    "T g, T lr, T wd",
    "T p",
    "T gd = wd != (T)0 ? g + wd * p : g; "
    "p = p - lr * gd;",
)

#: Row ``i / n_classes`` of ``out`` is ``e_{labels[row]}``: every element written, no fill first.
ONE_HOT: ElementwiseSpec = (
    "raw int64 labels, int64 n_classes",
    "T out",
    "out = labels[i / n_classes] == i % n_classes ? (T)1 : (T)0;",
)


def _guarded(spec: ElementwiseSpec) -> ElementwiseSpec:
    """``spec``'s update, done only when the guard says so: ``guard`` is the int64 view of the float64
    guard array, and an element is left unwritten (bit for bit as it was) unless ``guard[0] == 1.0``."""
    in_params, out_params, operation = spec
    return f"{in_params}, raw int64 guard", out_params, f"if (guard[0] == BP_GUARD_OK_BITS) {{ {operation} }}"


#: Which in-params of each elementwise kernel are scalars (for the source test's wrapper).
SCALAR_PARAMS = frozenset({"alpha", "lr", "mu", "wd", "nesterov", "lr_c1", "beta1", "beta2", "one_m_beta1",
                           "one_m_beta2", "c2", "eps", "n_classes"})

_ELEMENTWISE_ACTS = [n for n, s in ACTIVATIONS.items() if n in ACT_FORWARD]


def elementwise_kernels() -> dict[str, ElementwiseSpec]:
    """Every ElementwiseKernel of the backend, by kernel name (all share :data:`MATH_PREAMBLE`)."""
    specs: dict[str, ElementwiseSpec] = {}
    for act in _ELEMENTWISE_ACTS:
        specs[f"bp_fwd_keep_{act}"] = _forward_keep_u(act)
        specs[f"bp_fwd_{act}"] = _forward_in_place(act)
        specs[f"bp_slope_{act}"] = _slope(act)
    for name, spec in UPDATES.items():
        specs[name] = spec
        specs[f"{name}_guarded"] = _guarded(spec)
    specs["bp_one_hot"] = ONE_HOT
    return specs


# --------------------------------------------------------------------------- raw kernels
SOFTMAX_FORWARD = r"""
/* Row-wise softmax with the bias: one warp per row, three passes over the row.
   u (rows x cols) gets u + b in place; y may be u itself (in place) or another buffer.
   Each element is read and written by the same lane in every pass. u and y may be one array: not restricted. */
extern "C" __global__ void bp_softmax_forward(T* u, const T* __restrict__ b, T* y, long long rows, long long cols) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  /* the whole warp leaves together */
    T* ur = u + row * cols;
    T* yr = y + row * cols;
    T m = bp_neg_inf();
    for (long long j = lane; j < cols; j += 32) {
        T v = ur[j] + b[j];
        ur[j] = v;
        m = v > m ? v : m;
    }
    m = bp_warp_max(m);
    T s = (T)0;
    for (long long j = lane; j < cols; j += 32) {
        T e = exp(ur[j] - m);
        yr[j] = e;
        s += e;
    }
    s = bp_warp_sum(s);
    for (long long j = lane; j < cols; j += 32) yr[j] = yr[j] / s;
}
"""

SOFTMAX_XENT = r"""
/* Softmax + cross-entropy from the logits: per row lse = m + log(sum exp(u - m)), the row's loss
   sum_j t_j (lse - u_j) into rowloss[row], and delta = (y - t) / batch; when weighted, both times
   w[row] (w is not read otherwise). One warp per row. */
extern "C" __global__ void bp_softmax_xent(const T* __restrict__ py, const T* __restrict__ pu,
                                           const T* __restrict__ pt, const T* __restrict__ w, int weighted,
                                           T* __restrict__ delta, T* __restrict__ rowloss, long long rows,
                                           long long cols, T batch) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  /* the whole warp leaves together */
    const long long off = row * cols;
    const T wr = weighted ? w[row] : (T)1;
    T m = bp_neg_inf();
    for (long long j = lane; j < cols; j += 32) m = pu[off + j] > m ? pu[off + j] : m;
    m = bp_warp_max(m);
    T s = (T)0;
    for (long long j = lane; j < cols; j += 32) s += exp(pu[off + j] - m);
    s = bp_warp_sum(s);
    const T lse = m + log(s);
    T acc = (T)0;
    for (long long j = lane; j < cols; j += 32) {
        const T t = pt[off + j];
        T d = (py[off + j] - t) / batch;
        if (weighted) d *= wr;
        delta[off + j] = d;
        acc += t * (lse - pu[off + j]);
    }
    acc = bp_warp_sum(acc);
    if (weighted) acc *= wr;
    if (lane == 0) rowloss[row] = acc;
}
"""

SUM_SCALE = r"""
/* out[0] = sum(x[0:n]) / batch, one block, fixed order (deterministic). */
extern "C" __global__ void bp_sum_scale(const T* __restrict__ x, long long n, T batch, T* __restrict__ out) {
    T acc = (T)0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
    acc = bp_block_sum(acc);
    if (threadIdx.x == 0) out[0] = acc / batch;
}
"""

GUARD_SCAN = r"""
/* partial[blockIdx.x] = how many of the block's elements of g[0:n] are NaN or infinite
   (grid-stride loop; bp_guard_finish adds the partial counts). */
extern "C" __global__ void bp_guard_scan(const T* __restrict__ g, T* __restrict__ partial, long long n) {
    T bad = (T)0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        bad += bp_finite(g[i]) ? (T)0 : (T)1;
    bad = bp_block_sum(bad);
    if (threadIdx.x == 0) partial[blockIdx.x] = bad;
}
"""

GUARD_FINISH = r"""
/* The guard's bookkeeping for one step, one block (see contract.guard_step): steps seen + 1; the
   step is ok when no step failed before, the loss is finite and no partial count is nonzero; an ok
   step adds weight * loss to the sum, a failing one records its number once (sticky). The
   bookkeeping is in double, by thread 0 only. */
extern "C" __global__ void bp_guard_finish(double* __restrict__ guard, const T* __restrict__ loss,
                                           const T* __restrict__ partial, long long blocks, double weight) {
    T bad = (T)0;
    for (long long i = threadIdx.x; i < blocks; i += blockDim.x) bad += partial[i];
    bad = bp_block_sum(bad);
    if (threadIdx.x == 0) {
        const T l = loss[0];
        guard[1] = guard[1] + 1.0;
        const bool ok = guard[2] == 0.0 && bad == (T)0 && bp_finite(l);
        guard[0] = ok ? 1.0 : 0.0;
        if (ok) guard[3] = guard[3] + weight * (double)l;
        else if (guard[2] == 0.0) guard[2] = guard[1];
    }
}
"""

SUM_SQUARES = r"""
/* partial[blockIdx.x] = the sum of a[i]^2 over the block's elements of a[0:n] (grid-stride loop). */
extern "C" __global__ void bp_sum_squares(const T* __restrict__ a, T* __restrict__ partial, long long n) {
    T acc = (T)0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) acc += a[i] * a[i];
    acc = bp_block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

/* total[0] += sum(partial[0:blocks]), one block: the sum in T, the running total in double. */
extern "C" __global__ void bp_add_to_total(const T* __restrict__ partial, long long blocks,
                                           double* __restrict__ total) {
    T acc = (T)0;
    for (long long i = threadIdx.x; i < blocks; i += blockDim.x) acc += partial[i];
    acc = bp_block_sum(acc);
    if (threadIdx.x == 0) total[0] = total[0] + (double)acc;
}
"""

ADAM_CORRECTIONS = r"""
/* Adam's bias corrections for the coming step, kept on the device, one thread, in double on purpose
   (see contract.adam_corrections): t = count[0] + 1 (count unchanged), out[0] = lr / (1 - beta1^t),
   out[1] = 1 - beta2^t, each rounded to T. */
extern "C" __global__ void bp_adam_corrections(const double* __restrict__ count, T* __restrict__ out, double lr,
                                               double beta1, double beta2) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const double t = count[0] + 1.0;
    out[0] = (T)(lr / (1.0 - pow(beta1, t)));
    out[1] = (T)(1.0 - pow(beta2, t));
}
"""

COUNT_STEP = r"""
/* count[0] += 1, one thread, unless guarded and guard[0] != 1.0 (the applied steps, in double). Unguarded, guard
   is count itself: not restricted. */
extern "C" __global__ void bp_count_step(double* count, const double* guard, long long guarded) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    if (guarded && guard[0] != 1.0) return;
    count[0] = count[0] + 1.0;
}
"""

#: The ElementwiseKernels that update parameters in place, each with a ``_guarded`` and a ``_probe`` twin.
UPDATES: dict[str, ElementwiseSpec] = {"bp_sgd": SGD, "bp_momentum": MOMENTUM, "bp_adam": ADAM,
                                       "bp_adam_device": ADAM_DEVICE}

_C_PARAM = {"T": "T", "int32": "int", "int64": "long long"}


def _params(params: str) -> list[tuple[str, str]]:
    """``(type, name)`` of each ElementwiseKernel parameter; a raw array's type keeps ``"raw "``."""
    return [(" ".join(p.split()[:-1]), p.split()[-1]) for p in params.split(",") if p.strip()]


def probe_kernel(name: str, spec: ElementwiseSpec) -> str:
    """Raw kernel ``<name>_probe``: update ``spec``'s operation run on copies of the elements it
    updates, writing nothing but the guard (the int64 view of it): the step fails
    (``bp_fail_step``) when a result is not finite; nothing when ``guard[0] != 1.0``. Its parameters
    are the update's in-params, then its out-params (read only), then ``guard`` and ``n``."""
    in_params, out_params, operation = spec
    args, loads = [], []
    for typ, pname in _params(in_params):
        if typ.startswith("raw "):
            args.append(f"const {_C_PARAM[typ.split()[1]]}* __restrict__ {pname}")
        elif pname in SCALAR_PARAMS:
            args.append(f"{_C_PARAM[typ]} {pname}")
        else:
            args.append(f"const {_C_PARAM[typ]}* __restrict__ {pname}_in")
            loads.append(f"const {_C_PARAM[typ]} {pname} = {pname}_in[i];")
    outs = [pname for _, pname in _params(out_params)]
    for typ, pname in _params(out_params):
        args.append(f"const {_C_PARAM[typ]}* __restrict__ {pname}_in")
        loads.append(f"{_C_PARAM[typ]} {pname} = {pname}_in[i];")
    finite = " && ".join(f"bp_finite({o})" for o in outs)
    return (f'extern "C" __global__ void {name}_probe({", ".join(args)}, long long* __restrict__ guard, '
            f"long long n) {{\n"
            f"    if (guard[0] != BP_GUARD_OK_BITS) return;\n"
            f"    const long long stride = (long long)gridDim.x * blockDim.x;\n"
            f"    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {{\n"
            f"        {' '.join(loads)}\n"
            f"        {operation}\n"
            f"        if (!({finite})) {{ bp_fail_step(guard); return; }}\n"
            f"    }}\n}}\n")


#: The single-launch steps: kernel name -> (update spec, its scalars computed in the kernel from the count of
#: applied steps, as :data:`ADAM_CORRECTIONS` computes them). See :func:`step_kernel`.
STEP_UPDATES: dict[str, tuple[ElementwiseSpec, dict[str, str]]] = {
    "bp_step_sgd": (SGD, {}),
    "bp_step_momentum": (MOMENTUM, {}),
    "bp_step_adam": (ADAM, {"lr_c1": "s_corr[0]", "c2": "s_corr[1]"}),
}
#: Most parameters a single-launch step takes: its one block, on one SM, walks them three times (32 a thread at
#: this size); larger networks take the grid-wide guard and updates, spread over every SM (the one block is
#: estimated to become the bottleneck from about 2^16 parameters; unverified on a GPU).
STEP_MAX_PARAMS = 1 << 15
#: Threads of the single-launch step's one block (the kernels' ``__launch_bounds__``: ptxas keeps their registers
#: within what a block of this size may hold, so that a launch cannot fail for want of registers).
STEP_THREADS = 1024


def step_kernel(name: str, spec: ElementwiseSpec, computed: dict[str, str]) -> str:
    """Raw kernel ``name``: a whole guarded update of the flat parameters in one launch of one block, the
    work of ``bp_guard_scan``, ``bp_guard_finish``, every ``_probe`` and every guarded update (and, for
    Adam, ``bp_adam_corrections`` and ``bp_count_step``) in that order, with the same arithmetic:

    1. the guard: steps + 1; the step is ok when no step failed before, the loss is finite and every
       gradient is finite; an ok step adds ``weight * loss`` to the sum, a failing one records its number;
    2. the probe: ``spec``'s operation on copies of every element; a value that is not finite fails the
       step (as ``bp_fail_step`` does) and nothing is written;
    3. the update: ``spec``'s operation in place on every element.

    The parameters come in two pieces, the weights ``[0, nw)`` (weight decay ``wd_w``) and the biases
    ``[0, nb)`` (none): each array of ``spec`` is passed as ``<name>_w`` and ``<name>_b``. ``computed``: the
    spec's scalars the kernel derives from ``count`` (Adam's bias corrections, in double from
    ``lr``, ``beta1``, ``beta2`` given as ``d_lr``, ``d_beta1``, ``d_beta2``); with them, ``count[0] += 1``
    once the update is applied."""
    in_params, out_params, operation = spec
    args, loads, stores, finite = [], ["const T wd = w_ ? wd_w : (T)0;"], [], []
    for typ, pname in _params(out_params):
        args += [f"T* __restrict__ {pname}_w", f"T* __restrict__ {pname}_b"]
        loads.append(f"{_C_PARAM[typ]} {pname} = w_ ? {pname}_w[j_] : {pname}_b[j_];")
        stores.append(f"if (w_) {pname}_w[j_] = {pname}; else {pname}_b[j_] = {pname};")
        finite.append(f"bp_finite({pname})")
    for typ, pname in _params(in_params):
        if pname == "wd":
            args.append("T wd_w")
        elif pname in computed:
            loads.append(f"const T {pname} = {computed[pname]};")
        elif pname in SCALAR_PARAMS:
            args.append(f"{_C_PARAM[typ]} {pname}")
        else:
            args += [f"const T* __restrict__ {pname}_w", f"const T* __restrict__ {pname}_b"]
            loads.append(f"const T {pname} = w_ ? {pname}_w[j_] : {pname}_b[j_];")
    if computed:
        args += ["double* __restrict__ count", "double d_lr", "double d_beta1", "double d_beta2"]
    grads = next(pname for typ, pname in _params(in_params) if pname not in SCALAR_PARAMS and pname not in computed)
    index = "const bool w_ = i < nw; const long long j_ = w_ ? i : i - nw;"
    loop = "for (long long i = threadIdx.x; i < nw + nb; i += blockDim.x) {"
    corrections = ("        const double t = count[0] + 1.0;\n"
                   "        s_corr[0] = (T)(d_lr / (1.0 - pow(d_beta1, t)));\n"
                   "        s_corr[1] = (T)(1.0 - pow(d_beta2, t));\n") if computed else ""
    return (f'extern "C" __global__ void __launch_bounds__({STEP_THREADS}) {name}({", ".join(args)}, '
            f"double* __restrict__ guard, const T* __restrict__ loss, double weight, long long nw, long long nb) {{\n"
            f"    __shared__ int s_ok, s_fail;\n    __shared__ T s_corr[2];\n"
            f"    T bad = (T)0;\n"
            f"    {loop}\n        {index}\n"
            f"        bad += bp_finite(w_ ? {grads}_w[j_] : {grads}_b[j_]) ? (T)0 : (T)1;\n    }}\n"
            f"    bad = bp_block_sum(bad);\n"
            f"    if (threadIdx.x == 0) {{\n"
            f"        const T l = loss[0];\n"
            f"        guard[1] = guard[1] + 1.0;\n"
            f"        const bool ok = guard[2] == 0.0 && bad == (T)0 && bp_finite(l);\n"
            f"        guard[0] = ok ? 1.0 : 0.0;\n"
            f"        if (ok) guard[3] = guard[3] + weight * (double)l;\n"
            f"        else if (guard[2] == 0.0) guard[2] = guard[1];\n"
            f"        s_ok = ok ? 1 : 0;\n        s_fail = 0;\n{corrections}"
            f"    }}\n    __syncthreads();\n"
            f"    if (!s_ok) return;  /* the whole block */\n"
            f"    int fails = 0;\n"
            f"    {loop}\n        {index}\n        {' '.join(loads)}\n        {operation}\n"
            f"        if (!({' && '.join(finite)})) fails = 1;\n    }}\n"
            f"    if (fails) s_fail = 1;  /* racing threads write the same value */\n"
            f"    __syncthreads();\n"
            f"    if (s_fail) {{\n"
            f"        if (threadIdx.x == 0) {{ guard[0] = 0.0; if (guard[2] == 0.0) guard[2] = guard[1]; }}\n"
            f"        return;\n    }}\n"
            f"    {loop}\n        {index}\n        {' '.join(loads)}\n        {operation}\n"
            f"        {' '.join(stores)}\n    }}\n"
            + ("    if (threadIdx.x == 0) count[0] = count[0] + 1.0;\n" if computed else "")
            + "}\n")


_LOSS_KERNEL = r"""
/* %(output)s + %(loss)s: delta = d per element and, per block, the sum of the loss terms l into
   partial[blockIdx.x] (added by bp_sum_scale); when weighted, d and l times the weight w[i / cols] of
   their row (w is not read otherwise). Grid-stride loop over the n = rows * cols elements. */
extern "C" __global__ void %(name)s(const T* __restrict__ py, const T* __restrict__ pu, const T* __restrict__ pt,
                                    const T* __restrict__ w, int weighted, T* __restrict__ delta,
                                    T* __restrict__ partial, long long n, long long cols, T batch, T k, T alpha) {
    T acc = (T)0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        %(loads)s
        T d, l;
        %(body)s
        if (weighted) {
            const T wr = w[i / cols];
            d *= wr;
            l *= wr;
        }
        delta[i] = d;
        acc += l;
    }
    acc = bp_block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
"""


def loss_kernel_name(output: str, loss: str) -> str:
    return f"bp_loss_{output}_{loss}"


def loss_pairs() -> list[tuple[str, str]]:
    """The (output, loss) pairs the elementwise-loss kernel handles (all but softmax + cross-entropy)."""
    return [(o, loss) for loss in LOSSES if loss in LOSS_BODY for o in _registry.loss_outputs(loss)]


def _loss_kernel(output: str, loss: str) -> str:
    body = LOSS_BODY[loss]
    if "SLOPE" in body:
        body = body.replace("SLOPE", ACT_SLOPE[output][1])
    # load only what the body reads (u is read for bce and for GELU/SiLU outputs only)
    loads = " ".join(f"const T {v} = p{v}[i];" for v in ("y", "u", "t") if re.search(rf"\b{v}\b", body))
    return _LOSS_KERNEL % {"output": output, "loss": loss, "name": loss_kernel_name(output, loss), "body": body,
                           "loads": loads}


#: Names of the kernels of the raw module.
RAW_KERNELS = ("bp_softmax_forward", "bp_softmax_xent", "bp_sum_scale", "bp_guard_scan", "bp_guard_finish",
               "bp_sum_squares", "bp_add_to_total", "bp_adam_corrections", "bp_count_step",
               *(f"{name}_probe" for name in UPDATES), *STEP_UPDATES)

#: Raw kernels that compute in double whatever ``T`` is: one thread's float64 bookkeeping (the guard,
#: a running total, Adam's step count and bias corrections).
F64_KERNELS = frozenset({"bp_guard_finish", "bp_add_to_total", "bp_adam_corrections", "bp_count_step", *STEP_UPDATES})


def raw_kernel_names() -> list[str]:
    return list(RAW_KERNELS) + [loss_kernel_name(o, loss) for o, loss in loss_pairs()]


def raw_module_body() -> str:
    """Every raw kernel, without the typedef and preambles."""
    return "\n".join([SOFTMAX_FORWARD, SOFTMAX_XENT, SUM_SCALE, GUARD_SCAN, GUARD_FINISH, SUM_SQUARES, ADAM_CORRECTIONS,
                      COUNT_STEP] + [probe_kernel(name, spec) for name, spec in UPDATES.items()]
                     + [step_kernel(name, spec, computed) for name, (spec, computed) in STEP_UPDATES.items()]
                     + [_loss_kernel(o, loss) for o, loss in loss_pairs()])


def raw_module_source(ctype: str) -> str:
    """The complete source of the raw module for element type ``ctype`` (``"float"`` or ``"double"``),
    as given to ``cupy.RawModule``: self-contained, no includes (NVRTC builtins only)."""
    if ctype not in CTYPES.values():
        raise ValueError(f"unsupported element type {ctype!r}")
    return f"typedef {ctype} T;\n{MATH_PREAMBLE}\n{REDUCE_PREAMBLE}\n{raw_module_body()}"


__all__ = [
    "ACT_FORWARD",
    "ACT_SLOPE",
    "ADAM",
    "ADAM_CORRECTIONS",
    "ADAM_DEVICE",
    "BLOCK",
    "COUNT_STEP",
    "CTYPES",
    "F64_KERNELS",
    "GUARD_FINISH",
    "GUARD_SCAN",
    "LOSS_BODY",
    "MATH_PREAMBLE",
    "MAX_GUARD_BLOCKS",
    "MAX_LOSS_BLOCKS",
    "MOMENTUM",
    "ONE_HOT",
    "RAW_KERNELS",
    "STEP_MAX_PARAMS",
    "STEP_THREADS",
    "STEP_UPDATES",
    "REDUCE_PREAMBLE",
    "ROWS_PER_BLOCK",
    "SCALAR_PARAMS",
    "SGD",
    "SUM_SQUARES",
    "step_kernel",
    "UPDATES",
    "elementwise_kernels",
    "loss_kernel_name",
    "loss_pairs",
    "probe_kernel",
    "raw_kernel_names",
    "raw_module_body",
    "raw_module_source",
]
