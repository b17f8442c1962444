"""Kernel layer of backprop: one module per backend, each with the primitives of ``numpy_ref``.

``BACKEND_MODULES`` maps a backend name to its module (imported lazily, since the GPU
backends import CuPy or Numba). The reference module :mod:`backprop.kernels.numpy_ref` is the
specification: every other backend is tested against it.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from .spec import ACTIVATIONS, FUSED_PAIRS, LOSSES, ActivationSpec, LossSpec

#: Backend name -> module, in the order ``"auto"`` prefers them (fastest first).
BACKEND_MODULES: dict[str, str] = {
    "cupy": "backprop.kernels.cupy_gpu",
    "numba-cuda": "backprop.kernels.numba_cuda",
    "numba": "backprop.kernels.numba_cpu",
    "numpy": "backprop.kernels.numpy_ref",
}

#: The primitives every backend module defines, with the reference's signatures.
PRIMITIVES = (
    "is_available",
    "unavailable_reason",
    "to_device",
    "to_host",
    "zeros",
    "synchronize",
    "all_finite",
    "layer_forward",
    "delta_backward",
    "weight_gradients",
    "sgd_update_from_delta",
    "output_error",
    "momentum_update",
    "adam_update",
)


def load_backend_module(name: str) -> ModuleType:
    """Import the kernel module of backend ``name`` (raises ``ImportError`` if it cannot)."""
    return import_module(BACKEND_MODULES[name])


__all__ = [
    "ACTIVATIONS",
    "BACKEND_MODULES",
    "FUSED_PAIRS",
    "LOSSES",
    "PRIMITIVES",
    "ActivationSpec",
    "LossSpec",
    "load_backend_module",
]
