"""CuPy backend: cuBLAS GEMMs plus one fused kernel per step, on an NVIDIA GPU.

It implements the contract of :mod:`backprop.kernels.contract` (the reference is
:mod:`backprop.kernels.numpy_ref`); given the keyword output buffers, no primitive allocates. This package
is the backend's surface; each subsystem lives in a module of its own:

* :mod:`.device`: whether CuPy and a GPU are there (:func:`is_available` says why not; importing never
  fails for want of them), arrays, memory, device facts, the checked output buffers and cached scratch.
* :mod:`.data`: :func:`array_stats`, :func:`one_hot`, :func:`gather_rows`, :func:`count_correct`.
* :mod:`.compiled`: the elementwise and raw kernels of :mod:`backprop.kernels.cupy_sources`, compiled once.
* :mod:`.tf32`: :func:`set_tf32`, the TF32 tensor-core mode of float32 GEMMs and fused passes.
* :mod:`.blas`: cuBLAS GEMMs and GEMVs through nvmath-python (our own handle per device, bound to CuPy's
  current stream, with an explicit workspace), else through ``cupy.cublas``; :func:`flop_count`.
* :mod:`.lt`: cuBLASLt epilogues (:func:`set_epilogues`), their plans, the ReLU mask, what served each GEMM.
* :mod:`.layers`: :func:`layer_forward`, :func:`delta_backward`, :func:`weight_gradients`.
* :mod:`.losses`: :func:`output_error` and :func:`add_sum_of_squares`.
* :mod:`.updates`: :func:`guard_step`, the SGD, momentum and Adam updates, :func:`guarded_step` in one launch.
* :mod:`.graphs`: :func:`capture`, :func:`replay` and :func:`copy_into`, for CUDA graphs.
* :mod:`.fused_mlp`: the fused passes of narrow networks (:func:`set_fused_mlp`, :func:`mlp_forward`,
  :func:`mlp_backward`).
* :mod:`.collectives`: NCCL sums and broadcasts over processes (:func:`collective`).

Module-level settings and caches live in their module alone and are read there (the TF32 flag in
:mod:`.tf32`, the epilogue switch in :mod:`.lt`, the fused switch in :mod:`.fused_mlp`).
"""

from __future__ import annotations

from ..contract import Capabilities
from .blas import flop_count
from .collectives import collective
from .data import array_stats, count_correct, gather_rows, one_hot
from .device import (
    NAME,
    all_finite,
    as_array,
    device_info,
    device_memory_free,
    is_available,
    is_simulated,
    owns,
    release_memory,
    synchronize,
    to_device,
    to_host,
    unavailable_reason,
    use_device,
    xp,
    zeros,
)
from .fused_mlp import (
    fused_mlp_enabled,
    fused_mlp_path,
    fused_mlp_reason,
    mlp_backward,
    mlp_forward,
    mlp_forward_error,
    set_fused_mlp,
)
from .graphs import capture, capture_unavailable_reason, copy_into, replay
from .layers import delta_backward, layer_forward, weight_gradients
from .losses import add_sum_of_squares, output_error
from .lt import (
    LT_POINTER_ALIGN,
    ReluMask,
    epilogue_paths,
    epilogues_enabled,
    layer_aux,
    layer_paths,
    set_epilogues,
)
from .tf32 import CUBLAS_TF32_TENSOR_OP_MATH, TF32_RTOL, set_tf32, tf32_enabled
from .updates import adam_corrections, adam_update, guard_step, guarded_step, momentum_update, sgd_update

# Attributes of the backend outside ``__all__``: the contract's count_step, the cuBLAS constants and the plan,
# engine and graph types, and the helpers and caches its tests reach. The constants here are copies: the
# modules read their own (CUBLAS_WORKSPACE_BYTES is changed in blas, a function is patched where it is called).
from .blas import (  # noqa: F401
    CUBLAS_DEFAULT_MATH,
    CUBLAS_OP_N,
    CUBLAS_OP_T,
    CUBLAS_WORKSPACE_BYTES,
    GemmPlan,
    GemvPlan,
    _bias_gemv,
    _gemm,
    _gemm_plan,
    _gemv_plan,
)
from .collectives import NcclEngine  # noqa: F401
from .device import Array, CaptureAllocationError, _cupy, _scratch_cache  # noqa: F401
from .fused_mlp import FUSED_TF32  # noqa: F401
from .graphs import CapturedGraph  # noqa: F401
from .updates import count_step  # noqa: F401

#: Everything the contract lets a backend declare: this one has every capability.
CAPABILITIES = Capabilities(gpu=True, device_queries=True, memory_pool=True, device_choice=True, graphs=True,
                            collectives=True, tf32=True, fused_mlp=True, one_launch_update=True, epilogues=True,
                            layer_aux=True, layer_paths=True)

__all__ = [
    "CUBLAS_TF32_TENSOR_OP_MATH",
    "CAPABILITIES",
    "LT_POINTER_ALIGN",
    "NAME",
    "ReluMask",
    "TF32_RTOL",
    "adam_corrections",
    "adam_update",
    "add_sum_of_squares",
    "all_finite",
    "array_stats",
    "as_array",
    "capture",
    "capture_unavailable_reason",
    "collective",
    "copy_into",
    "count_correct",
    "delta_backward",
    "device_info",
    "device_memory_free",
    "epilogue_paths",
    "epilogues_enabled",
    "flop_count",
    "fused_mlp_enabled",
    "fused_mlp_path",
    "fused_mlp_reason",
    "gather_rows",
    "guard_step",
    "guarded_step",
    "is_available",
    "is_simulated",
    "layer_aux",
    "layer_forward",
    "layer_paths",
    "mlp_backward",
    "mlp_forward",
    "mlp_forward_error",
    "momentum_update",
    "one_hot",
    "output_error",
    "owns",
    "release_memory",
    "replay",
    "set_epilogues",
    "set_fused_mlp",
    "set_tf32",
    "sgd_update",
    "synchronize",
    "tf32_enabled",
    "to_device",
    "to_host",
    "unavailable_reason",
    "use_device",
    "weight_gradients",
    "xp",
    "zeros",
]
