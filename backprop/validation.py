"""Checks on user data: every problem becomes a ``ValueError``/``TypeError`` naming it,
raised before any parameter changes.

Data is checked where it lives. An array the network's backend owns (a CuPy array for the cupy
backend, a NumPy array for the CPU backends) is checked from its metadata and by reductions on
the backend (:func:`~backprop.kernels.numpy_ref.array_stats`), with one small read, and is never
copied to the host. Host data (a NumPy array or a list) for a GPU backend is checked on the host
and moved once. A device array the backend does not own is refused with what to do instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .kernels import numpy_ref as host
from .kernels.registry import LOSSES
from .kernels.contract import (
    STAT_FIRST_NONFINITE,
    STAT_MAX,
    STAT_MIN,
    STAT_NON_INTEGER,
    STAT_NONFINITE,
    STAT_ROW_SUM_ERROR,
)

__all__ = ["cast_finite", "check_inputs", "check_number", "check_positive", "check_seed", "check_targets", "real_array"]

Array = Any


def _is_device_array(a: Any) -> bool:
    """True for objects that say they live on a GPU (the CUDA array interface or a DLPack device)."""
    if isinstance(a, np.ndarray):
        return False
    if hasattr(a, "__cuda_array_interface__"):
        return True
    device = getattr(a, "__dlpack_device__", None)
    if device is None:
        return False
    try:
        return int(device()[0]) != 1  # 1 is kDLCPU
    except Exception:  # noqa: BLE001 - not a DLPack producer after all
        return False


class _Data:
    """An array with the module that owns it: the backend's kernels, or the host reference."""

    def __init__(self, array: Array, kernels: Any, on_backend: bool) -> None:
        self.array = array
        self.kernels = kernels if on_backend else host
        self.backend_kernels = kernels
        self.on_backend = on_backend

    def stats(self, integers: bool = False, row_sums: bool = False) -> np.ndarray:
        return self.kernels.array_stats(self.array, integers=integers, row_sums=row_sums)

    def to_backend(self, dtype: np.dtype, keep_host: bool = False) -> Array:
        """The array on the backend, as ``dtype``: no copy when it already is one; moved once otherwise
        (or, with ``keep_host``, left on the host as a C-contiguous array of ``dtype``)."""
        if self.on_backend:
            return self.backend_kernels.as_array(self.array, dtype)
        if keep_host:
            return np.ascontiguousarray(self.array, dtype=dtype)
        return self.backend_kernels.to_device(self.array, dtype)


def _read(a: Any, kernels: Any, name: str) -> _Data:
    if a is None:
        raise TypeError(f"{name} is None; expected an array")
    if kernels.owns(a):
        data = _Data(a, kernels, True)
    elif _is_device_array(a):
        raise TypeError(
            f"{name} is a device array ({type(a).__name__}) that the network's backend ({kernels.NAME!r}) does not "
            "own: an array of another library, or on another GPU than the current one. Move the data to the "
            f"network's backend first (to the host for a CPU backend, e.g. cupy's {name}.get()), or move the "
            "network to the data with net.to_backend(name)"
        )
    else:
        try:
            arr = np.asarray(a)
        except Exception as exc:  # ragged lists and the like
            raise ValueError(f"{name} cannot be read as an array: {exc}") from None
        data = _Data(arr, kernels, kernels.owns(arr))
    dtype = np.dtype(data.array.dtype)
    if dtype == object or dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {dtype}")
    return data


def _check_finite(stats: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    if stats[STAT_NONFINITE]:
        first = np.unravel_index(int(stats[STAT_FIRST_NONFINITE]), shape)
        raise ValueError(
            f"{name} holds non-finite values (NaN or inf), first at index {tuple(int(i) for i in first)}"
        )


def _check_range(stats: np.ndarray, dtype: np.dtype, name: str) -> None:
    """Values of a wider float type that the network's dtype cannot hold."""
    limit = float(np.finfo(dtype).max)
    if stats[STAT_MAX] > limit or stats[STAT_MIN] < -limit:
        raise ValueError(f"{name} overflows {np.dtype(dtype).name}")


def check_inputs(X: Any, n_features: int, kernels: Any, dtype: np.dtype, name: str = "X", *,
                 keep_host: bool = False) -> Array:
    """Return ``X`` as a finite ``(batch, n_features)`` array of ``dtype`` on the backend of ``kernels``
    (``keep_host``: host data stays on the host, for the caller to move)."""
    data = _read(X, kernels, name)
    shape = tuple(data.array.shape)
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D (batch, {n_features}), got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty: it has no samples")
    if shape[1] != n_features:
        raise ValueError(f"{name} has {shape[1]} features per sample, the network takes {n_features}")
    stats = data.stats()
    _check_finite(stats, shape, name)
    _check_range(stats, dtype, name)
    return data.to_backend(dtype, keep_host)


def check_targets(T: Any, n_outputs: int, loss: str, batch: int, kernels: Any, dtype: np.dtype,
                  name: str = "T", *, keep_host: bool = False) -> Array:
    """Return targets as a finite ``(batch, n_outputs)`` array of ``dtype`` on the backend of ``kernels``
    (``keep_host``: host data stays on the host, for the caller to move).

    What a loss accepts is its record's ``targets`` (:mod:`backprop.kernels.registry`): ``"distribution"``
    (cross-entropy): a 1-D array of integer class labels in ``[0, n_outputs)`` becomes one-hot rows, and 2-D
    targets must be probability rows; ``"unit"`` (bce): targets in ``[0, 1]``; ``"nonnegative"`` (poisson):
    targets ``>= 0``; ``"real"``: any finite value.
    """
    kind = LOSSES[loss].targets
    data = _read(T, kernels, name)
    arr = data.array
    shape = tuple(arr.shape)
    if not shape:
        raise ValueError(f"{name} is a scalar; expected targets with one row (or class label) per sample of X, "
                         f"shape ({batch},) or ({batch}, {n_outputs})")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: it has no targets")
    if shape[0] != batch:
        raise ValueError(f"{name} has {shape[0]} samples but X has {batch}")
    if len(shape) == 1 and kind == "distribution":
        stats = data.stats(integers=True)
        _check_finite(stats, shape, name)
        if stats[STAT_NON_INTEGER]:
            raise ValueError(f"{name}: class labels must be integers, got non-integer values")
        lo, hi = stats[STAT_MIN], stats[STAT_MAX]
        if lo < 0 or hi >= n_outputs:
            raise ValueError(
                f"{name}: class labels must lie in [0, {n_outputs}), got values from {lo:g} to {hi:g}"
            )
        data.array = data.kernels.one_hot(arr, n_outputs, dtype)
        return data.to_backend(dtype, keep_host)
    if len(shape) == 1 and n_outputs == 1:
        data.array = arr = arr.reshape(-1, 1)
        shape = tuple(arr.shape)
    if len(shape) != 2 or shape[1] != n_outputs:
        raise ValueError(f"{name} must have shape ({batch}, {n_outputs}), got {shape}")
    stats = data.stats(row_sums=kind == "distribution")
    _check_finite(stats, shape, name)
    _check_range(stats, dtype, name)
    if kind == "nonnegative" and stats[STAT_MIN] < 0:
        raise ValueError(f"{name}: targets of {loss} must be non-negative, got values down to {stats[STAT_MIN]:g}")
    if kind in ("unit", "distribution") and (stats[STAT_MIN] < 0 or stats[STAT_MAX] > 1):
        raise ValueError(f"{name}: targets of {loss} must lie in [0, 1]")
    if kind == "distribution":
        tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-8
        if stats[STAT_ROW_SUM_ERROR] > tol:
            raise ValueError(f"{name}: {loss} targets must be one-hot or probability rows summing to 1")
    return data.to_backend(dtype, keep_host)


def _check_real(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")


def check_number(value: Any, name: str) -> float:
    """Check a real-valued parameter: a finite number (any sign); returns it as a ``float``."""
    _check_real(value, name)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_positive(value: Any, name: str, *, allow_zero: bool = False, integer: bool = False) -> Any:
    """Check a hyper-parameter: a finite number, positive (or non-negative), integer if asked."""
    _check_real(value, name)
    if integer and not float(value).is_integer():
        raise TypeError(f"{name} must be an integer, got {value}")
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'} and finite, got {value}")
    return int(value) if integer else float(value)


def check_seed(seed: Any, name: str = "seed") -> int | None:
    """Check a random seed: ``None`` (fresh entropy) or a non-negative integer."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be None or a non-negative integer, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{name} must be None or a non-negative integer, got {seed}")
    return int(seed)


def real_array(value: Any, what: str) -> np.ndarray:
    """``value`` as a NumPy array of integers or floats; anything else (complex, strings, objects, booleans)
    is a ``TypeError`` naming ``what``."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - ragged lists and the like
        raise ValueError(f"{what} cannot be read as an array: {exc}") from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{what} must hold real numbers, got {arr.dtype}")
    return arr


def cast_finite(arr: np.ndarray, dtype: np.dtype, what: str, error: Callable[[str], Exception] = ValueError,
                offset: tuple[int, ...] | None = None) -> np.ndarray:
    """``arr`` cast to ``dtype`` (no copy when it already is one); values that are not finite there
    (NaN, inf, or too large for ``dtype``) raise ``error`` naming ``what`` and the first such value
    (its index plus ``offset``, where ``arr`` is a chunk of a larger array)."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = arr.astype(dtype, copy=False)
    finite = np.isfinite(cast)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        shown = first if offset is None else tuple(i + o for i, o in zip(first, offset))
        where = f"row {shown[0]}, column {shown[1]}" if offset is not None and len(shown) == 2 else f"index {shown}"
        raise error(f"{what} has values that are not finite in {np.dtype(dtype).name} "
                    f"(first at {where}: {float(arr[first]):g})")
    return cast
