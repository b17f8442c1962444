"""Kernel layer of backprop: one module per backend, each with the primitives of ``numpy_ref``.

``BACKEND_MODULES`` maps a backend name to its module (imported lazily, since the GPU
backends import CuPy or Numba). The contract every backend meets is written down in
:mod:`backprop.kernels.contract`; the reference module :mod:`backprop.kernels.numpy_ref`
implements it and is the test oracle of every other backend.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from .contract import CAPABILITY_FUNCTIONS, FUNCTIONS, REQUIRED, Capabilities, KernelModule, check_capabilities, missing_names
from .registry import ACTIVATIONS, FUSED_PAIRS, LOSSES, ActivationSpec, LossSpec

#: Backend name -> module, in the order ``"auto"`` prefers them (fastest first).
BACKEND_MODULES: dict[str, str] = {
    "cupy": "backprop.kernels.cupy_gpu",
    "numba-cuda": "backprop.kernels.numba_cuda",
    "numba": "backprop.kernels.numba_cpu",
    "numpy": "backprop.kernels.numpy_ref",
}

#: The functions every backend module defines (see :class:`~backprop.kernels.contract.KernelModule`).
PRIMITIVES = FUNCTIONS


def load_backend_module(name: str) -> ModuleType:
    """Import the kernel module of backend ``name`` (raises ``ImportError`` if it cannot)."""
    return import_module(BACKEND_MODULES[name])


__all__ = [
    "CAPABILITY_FUNCTIONS",
    "Capabilities",
    "ACTIVATIONS",
    "BACKEND_MODULES",
    "FUSED_PAIRS",
    "LOSSES",
    "PRIMITIVES",
    "REQUIRED",
    "ActivationSpec",
    "KernelModule",
    "check_capabilities",
    "LossSpec",
    "load_backend_module",
    "missing_names",
]
