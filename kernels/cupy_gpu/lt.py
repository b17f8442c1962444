"""cuBLASLt epilogues: a layer's GEMM that applies its bias and activation, its slope, or its bias gradient.

With :func:`set_epilogues`, a layer's GEMMs go through cuBLASLt (``nvmath.bindings.cublasLt``) with the
epilogue :mod:`backprop.kernels.epilogues` picks: bias and activation in the forward GEMM, the slope in the
backward GEMM, the bias gradient in the weight-gradient GEMM. Each (epilogue, shape, dtype, alignment) has
one plan: descriptors and the heuristic's algorithm, made once and kept, so a call issues one
``cublasLtMatmul`` on the current stream with the cuBLAS workspace bound there (a captured graph's own while
it records) and allocates nothing. The bias, aux and bias-gradient pointers are set on the descriptor before
each call (cuBLASLt reads them when the call is issued). A plan the heuristic refuses (no algorithm, or an
error such as CUBLAS_STATUS_NOT_SUPPORTED) is remembered, and its calls take the GEMM and the elementwise
kernel instead. A ReLU layer hands its bit mask ``u > 0`` from the forward to the backward GEMM
(:class:`ReluMask`); :func:`epilogue_paths` and :func:`layer_paths` say what served each GEMM.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .. import epilogues as epi
from . import blas as blas_mod  # CUBLAS_WORKSPACE_BYTES is read there, when a plan is made
from .blas import CUBLAS_OP_N, CUBLAS_OP_T, _NVMATH_HINT, _blas, _host_scalar, _import_binding
from .device import Array, _cupy, _per_device
from .tf32 import tf32_enabled

#: ``cublasComputeType_t`` and ``cudaDataType_t`` values (``nvmath.bindings.cublas.ComputeType``,
#: ``nvmath.CudaDataType``).
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_CUDA_R_32F, _CUDA_R_64F = 0, 1
#: Pointers of the bias (or bias gradient) and of the aux that an epilogue call takes: cuBLASLt's
#: vector loads want this alignment (a misaligned one takes the GEMM and kernel path).
LT_POINTER_ALIGN = 16

_epilogues_on = False
_lt_lib: Any = None
_lt_error: str | None = None
_lt_warned = False


def set_epilogues(enabled: bool) -> None:
    """Let a layer's GEMMs apply their bias, activation, slope and bias gradient in cuBLASLt epilogues
    (ReLU, the tanh form of GELU, identity: :mod:`backprop.kernels.epilogues`) instead of separate
    kernels. Off by default. Needs nvmath-python; without it the GEMM and kernel path stays (one warning)."""
    global _epilogues_on
    _epilogues_on = bool(enabled)


def epilogues_enabled() -> bool:
    return _epilogues_on


def _nvmath_cublaslt() -> Any:
    """``nvmath.bindings.cublasLt`` or ``None`` (then one warning names the reason)."""
    global _lt_lib, _lt_error, _lt_warned
    if _lt_lib is None and _lt_error is None:
        _lt_lib, _lt_error = _import_binding("cublasLt")
    if _lt_lib is None and not _lt_warned:
        _lt_warned = True
        warnings.warn(f"cuBLASLt epilogues need nvmath-python ({_lt_error}): {_NVMATH_HINT}; the layers keep a "
                      "GEMM and an elementwise kernel", RuntimeWarning, stacklevel=3)
    return _lt_lib


def _alignment(ptr: int) -> int:
    """The largest power of two, up to 256, that divides the address ``ptr``."""
    return min(256, ptr & -ptr) if ptr else 256


class _LtPlan:
    """One cuBLASLt matmul: its descriptor (transposes, epilogue, aux leading dimension), the layouts of
    A, B and D (C is D, beta 0), and the heuristic's algorithm (``None`` with ``reason`` when refused)."""

    def __init__(self, lt: _Lt, key: tuple, bias_ptr: int, aux_ptr: int) -> None:
        lib = self.lib = lt.lib
        epilogue, dt_char, tf32, ops, aux_ld, aligns = key[1:]
        f64 = np.dtype(dt_char) == np.float64
        data = _CUDA_R_64F if f64 else _CUDA_R_32F
        compute = _COMPUTE_64F if f64 else (_COMPUTE_32F_FAST_TF32 if tf32 else _COMPUTE_32F)
        self.algo: np.ndarray | None = None
        self.reason = ""
        self.desc = lib.matmul_desc_create(compute, data)
        A = lib.MatmulDescAttribute
        self._set(A.TRANSA, CUBLAS_OP_T if ops.trans_a else CUBLAS_OP_N)
        self._set(A.TRANSB, CUBLAS_OP_T if ops.trans_b else CUBLAS_OP_N)
        self._set(A.EPILOGUE, epi.EPILOGUE[epilogue])
        if aux_ld:
            self._set(A.EPILOGUE_AUX_LD, aux_ld)
        # the heuristic reads the bias and aux pointers for their alignment: the first call's (the key holds
        # their alignments, so a call whose pointers are less aligned gets a plan of its own)
        if bias_ptr:
            self._set(A.BIAS_POINTER, bias_ptr)
        if aux_ptr:
            self._set(A.EPILOGUE_AUX_POINTER, aux_ptr)
        self.layouts = (lib.matrix_layout_create(data, *ops.a_shape(), ops.lda),
                        lib.matrix_layout_create(data, *ops.b_shape(), ops.ldb),
                        lib.matrix_layout_create(data, ops.m, ops.n, ops.ldd))
        self._choose_algorithm(lt, epilogue, aligns)

    def _choose_algorithm(self, lt: _Lt, epilogue: str, aligns: tuple[int, ...]) -> None:
        """Ask the heuristic for one algorithm within our workspace: ``algo``, or ``reason`` when refused."""
        lib = self.lib
        workspace_bytes = blas_mod.CUBLAS_WORKSPACE_BYTES
        pref = lib.matmul_preference_create()
        P = lib.MatmulPreferenceAttribute
        try:
            for attr, value in ((P.MAX_WORKSPACE_BYTES, workspace_bytes), (P.MIN_ALIGNMENT_A_BYTES, aligns[0]),
                                (P.MIN_ALIGNMENT_B_BYTES, aligns[1]), (P.MIN_ALIGNMENT_C_BYTES, aligns[2]),
                                (P.MIN_ALIGNMENT_D_BYTES, aligns[2])):
                v = np.array([value], dtype=lib.get_matmul_preference_attribute_dtype(attr))
                lib.matmul_preference_set_attribute(pref, attr, v.ctypes.data, v.itemsize)
            result = np.zeros(1, dtype=lib.matmul_heuristic_result_dtype)
            found = np.zeros(1, dtype=np.int32)
            a, b, d = self.layouts
            lib.matmul_algo_get_heuristic(lt.handle, self.desc, a, b, d, d, pref, 1, result.ctypes.data,
                                          found.ctypes.data)
            if found[0] < 1:
                self.reason = f"cuBLASLt has no algorithm for {epilogue} here"
            elif int(result["workspace_size"][0]) > workspace_bytes:
                self.reason = f"cuBLASLt's algorithm for {epilogue} wants more workspace than {workspace_bytes}"
            else:
                self.algo = result
        except Exception as exc:  # e.g. cuBLASLtError: CUBLAS_STATUS_NOT_SUPPORTED (an epilogue in float64)
            self.reason = f"cuBLASLt refuses {epilogue}: {type(exc).__name__}: {exc}"
        finally:
            lib.matmul_preference_destroy(pref)

    def _set(self, attr: Any, value: int) -> None:
        v = np.array([value], dtype=self.lib.get_matmul_desc_attribute_dtype(attr))
        self.lib.matmul_desc_set_attribute(self.desc, attr, v.ctypes.data, v.itemsize)


class _Lt:
    """Our cuBLASLt handle on one device and its plans (kept for the process: a captured graph may use them)."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.handle = lib.create()
        self.plans: dict[tuple, _LtPlan] = {}


_lt_handles: dict[int, _Lt] = {}


def _lt() -> _Lt | None:
    """Our cuBLASLt handle on the current device, or ``None`` without nvmath-python."""
    global _lt_lib, _lt_error
    lib = _nvmath_cublaslt()
    if lib is None or _blas() is None:
        return None
    try:
        return _per_device(_lt_handles, lambda: _Lt(lib))
    except Exception as exc:  # nvmath imports but cannot load or start cuBLASLt
        _lt_lib, _lt_error = None, f"its cuBLASLt cannot make a handle: {type(exc).__name__}: {exc}"
        return None


#: (kind, activation, m, n, k, dtype) -> what served that GEMM the last time: an epilogue, or why not.
_lt_paths: dict[tuple, str] = {}


def _lt_matmul(kind: str, act: str, choice: epi.Choice, ops: epi.Operands, a: Array, b: Array, d: Array,
               bias: Array | None = None, aux: Array | None = None, aux_ld: int = 0) -> bool:
    """``D = op(A) op(B)`` with ``choice``'s epilogue, issued on the current stream; ``False`` (nothing
    issued) when it takes the GEMM and kernel path. ``bias``: the bias, or where the bias gradient goes."""
    path_key = (kind, act, ops.m, ops.n, ops.k, d.dtype.char)
    if choice.epilogue is None:
        _lt_paths[path_key] = f"GEMM + kernel ({choice.reason})"
        return False
    for p in (bias, aux):
        if p is not None and p.data.ptr % LT_POINTER_ALIGN:
            _lt_paths[path_key] = f"GEMM + kernel (a bias or aux pointer not {LT_POINTER_ALIGN}-byte aligned)"
            return False
    lt = _lt()
    if lt is None:
        _lt_paths[path_key] = f"GEMM + kernel (no cuBLASLt: {_lt_error})"
        return False
    blas = _blas()
    assert blas is not None
    dt = d.dtype
    tf32 = tf32_enabled() and dt == np.float32
    bias_ptr, aux_ptr = (0 if v is None else int(v.data.ptr) for v in (bias, aux))
    aligns = tuple(_alignment(p) for p in (a.data.ptr, b.data.ptr, d.data.ptr, bias_ptr, aux_ptr))
    key = (_cupy.cuda.Device().id, choice.epilogue, dt.char, tf32, ops, aux_ld, aligns)
    plan = lt.plans.get(key)
    if plan is None:
        plan = lt.plans[key] = _LtPlan(lt, key, bias_ptr, aux_ptr)
    if plan.algo is None:
        _lt_paths[path_key] = f"GEMM + kernel ({plan.reason})"
        return False
    blas.ready(dt)  # binds our cuBLAS handle's stream and workspace: the cuBLASLt call shares them
    A = lt.lib.MatmulDescAttribute
    if bias_ptr:
        plan._set(A.BIAS_POINTER, bias_ptr)
    if aux_ptr:
        plan._set(A.EPILOGUE_AUX_POINTER, aux_ptr)
    la, lb, ld = plan.layouts
    try:
        lt.lib.matmul(lt.handle, plan.desc, _host_scalar(1.0, dt), a.data.ptr, la, b.data.ptr, lb,
                      _host_scalar(0.0, dt), d.data.ptr, ld, d.data.ptr, ld, plan.algo.ctypes.data,
                      blas.bound.data.ptr, blas.bound.nbytes, blas.stream)
    except Exception as exc:  # refused when issued (cuBLASLt checks before it enqueues): this plan is done
        plan.algo, plan.reason = None, f"cuBLASLt refused the call: {type(exc).__name__}: {exc}"
        _lt_paths[path_key] = f"GEMM + kernel ({plan.reason})"
        return False
    _lt_paths[path_key] = f"cuBLASLt {choice.epilogue}"
    return True


# --------------------------------------------------------------------------- the ReLU mask
class ReluMask:
    """The bit mask ``u > 0`` of a ReLU layer's ``(batch, n)`` output, written by the forward GEMM's
    ``RELU_AUX_BIAS`` epilogue and read by the ``DRELU`` epilogue of the backward GEMM below it
    (column-major bits, ``ld`` per row of the batch: :func:`~backprop.kernels.epilogues.relu_mask_layout`).
    ``source``: the address and shape of the ``y`` it was written with (``None`` until then, or when the
    forward pass took another path), so the backward pass reads it only for that ``y``."""

    __slots__ = ("bits", "ld", "shape", "source")

    def __init__(self, batch: int, n: int) -> None:
        self.ld, nbytes = epi.relu_mask_layout(n, batch)
        self.bits = _cupy.zeros((nbytes,), dtype=np.uint8)
        self.shape = (batch, n)
        self.source: tuple[int, tuple[int, ...]] | None = None


def layer_aux(act: str, batch: int, n_out: int, dtype: Any) -> ReluMask | None:
    """The buffer a training forward pass of a ``(batch, n_out)`` layer with activation ``act`` hands to the
    backward pass through the epilogues (``layer_forward(aux=)``, ``delta_backward(aux_prev=)``): a
    :class:`ReluMask` for ReLU (``batch n_out / 8`` bytes, padded; written only while :func:`set_epilogues`
    is on), else ``None``."""
    if act != "relu" or epi.forward_epilogue(act, False, n_out, dtype, True).epilogue is None:
        return None
    return ReluMask(batch, n_out)


def _mask_for(aux: Any, y: Array) -> ReluMask | None:
    """``aux`` when it is a :class:`ReluMask` written with ``y``, else ``None``."""
    if isinstance(aux, ReluMask) and aux.source == (y.data.ptr, tuple(y.shape)):
        return aux
    return None


# --------------------------------------------------------------------------- what served each GEMM
def epilogue_paths() -> dict[tuple, str]:
    """What served each GEMM the last time it ran: ``(kind, activation, m, n, k, dtype char) -> "cuBLASLt
    EPILOGUE"`` or ``"GEMM + kernel (why)"``; kind is ``forward``, ``backward`` or ``gradients``, and
    ``m, n, k`` are the column-major sizes of :mod:`backprop.kernels.epilogues`."""
    return dict(_lt_paths)


def layer_paths(n_in: int, n_out: int, act: str, act_prev: str | None, batch: int, dtype: Any) -> dict[str, str]:
    """What served a ``n_in -> n_out`` layer's GEMMs at ``batch`` rows the last time they ran (from
    :func:`epilogue_paths`): ``forward``, ``gradients``, and ``backward`` (the delta into the layer below,
    whose activation is ``act_prev``; absent for the first layer)."""
    ch = np.dtype(dtype).char
    kinds = {"forward": ("forward", act, n_out, batch, n_in, ch),
             "gradients": ("gradients", "", n_in, n_out, batch, ch)}
    if act_prev is not None:
        kinds["backward"] = ("backward", act_prev, n_in, batch, n_out, ch)
    default = "GEMM + kernel (epilogues off)" if not _epilogues_on else "not run yet"
    return {kind: _lt_paths.get(key, default) for kind, key in kinds.items()}
