"""The TF32 switch: whether float32 GEMMs (and the fused narrow-network passes) may use TF32 tensor cores,
and the error that costs. The flag lives here alone; the other modules read it through :func:`tf32_enabled`."""

from __future__ import annotations

#: Relative error of a float32 GEMM in TF32 mode (inputs rounded to a 10-bit mantissa), in the
#: Frobenius norm, for well-scaled data: about 1e-3 (against about 1e-6 in full float32).
TF32_RTOL = 2e-3

#: cuBLAS's ``CUBLAS_TF32_TENSOR_OP_MATH`` (``cublasMath_t`` in cublas_api.h, value 3). CuPy 14's
#: ``cupy_backends.cuda.libs.cublas`` does not export it (only ``CUBLAS_TENSOR_OP_MATH``), so the
#: value is used whenever the attribute is missing.
CUBLAS_TF32_TENSOR_OP_MATH = 3

_tf32 = False


def set_tf32(enabled: bool) -> None:
    """Let float32 GEMMs use TF32 tensor cores (Ampere and newer), or not (the default).

    TF32 rounds the GEMM inputs to a 10-bit mantissa and accumulates in float32: several times
    faster on large layers, at a relative error of about 1e-3 per GEMM (``TF32_RTOL``) instead of
    about 1e-6. Float64 is unaffected, and so are the elementwise kernels. The setting is read when
    a GEMM is issued (a captured CUDA graph keeps the mode it was captured with; the graph cache
    is keyed by it). ``NVIDIA_TF32_OVERRIDE=0`` in the environment disables TF32 whatever this says.
    With :func:`set_fused_mlp` too, a float32 narrow network's fused passes run their layers' products on the
    tensor cores in TF32 (``mma.sync``, sm_80 and newer), at the same error per layer (:func:`fused_mlp_path`).
    """
    global _tf32
    _tf32 = bool(enabled)


def tf32_enabled() -> bool:
    return _tf32
