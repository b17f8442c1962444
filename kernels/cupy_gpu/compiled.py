"""The compiled CUDA kernels of :mod:`backprop.kernels.cupy_sources`: CuPy elementwise kernels by name, and raw
kernels from one module per device and dtype, each compiled on first use and kept for the process."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import cupy_sources as src
from .device import _cupy

_elementwise: dict[str, Any] = {}
_raw_modules: dict[tuple[int, str], Any] = {}


def _ew(name: str) -> Any:
    """The ElementwiseKernel ``name`` (CuPy compiles it per dtype on first call and caches it)."""
    kern = _elementwise.get(name)
    if kern is None:
        in_params, out_params, operation = src.elementwise_kernels()[name]
        kern = _cupy.ElementwiseKernel(in_params, out_params, operation, name=name, preamble=src.MATH_PREAMBLE,
                                       no_return=True)
        _elementwise[name] = kern
    return kern


def _raw(name: str, dtype: Any) -> Any:
    """Raw kernel ``name`` for ``dtype`` (one module per device and dtype holds them all)."""
    ctype = src.CTYPES[np.dtype(dtype).name]
    key = (_cupy.cuda.Device().id, ctype)
    module = _raw_modules.get(key)
    if module is None:
        module = _cupy.RawModule(code=src.raw_module_source(ctype))
        _raw_modules[key] = module
    return module.get_function(name)
