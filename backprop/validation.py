"""Checks on user data: every problem becomes a ``ValueError``/``TypeError`` naming it,
raised before any parameter changes."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_inputs", "check_targets", "check_positive", "is_device_array"]


def is_device_array(a: Any) -> bool:
    """True for arrays that live on a GPU (CuPy arrays, Numba device arrays)."""
    return not isinstance(a, np.ndarray) and hasattr(a, "__cuda_array_interface__")


def _as_float_host(a: Any, name: str) -> np.ndarray:
    if a is None:
        raise TypeError(f"{name} is None; expected an array")
    if is_device_array(a):
        a = np.asarray(a.get() if hasattr(a, "get") else a.copy_to_host())
    try:
        arr = np.asarray(a)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{name} cannot be read as an array: {exc}") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name} holds non-finite values (NaN or inf), first at index {tuple(int(i) for i in bad)}"
        )


def check_inputs(X: Any, n_features: int, dtype: np.dtype, name: str = "X") -> np.ndarray:
    """Return ``X`` as a finite ``(batch, n_features)`` host array of ``dtype``."""
    arr = _as_float_host(X, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, {n_features}), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: it has no samples")
    if arr.shape[1] != n_features:
        raise ValueError(f"{name} has {arr.shape[1]} features per sample, the network takes {n_features}")
    _check_finite(arr, name)
    out = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} overflows {np.dtype(dtype).name}")
    return out


def check_targets(T: Any, n_outputs: int, loss: str, batch: int, dtype: np.dtype, name: str = "T") -> np.ndarray:
    """Return targets as a finite ``(batch, n_outputs)`` host array of ``dtype``.

    For ``cross_entropy`` a 1-D array of integer class labels in ``[0, n_outputs)`` becomes one-hot
    rows; 2-D targets must be probability rows. For ``bce`` targets must lie in ``[0, 1]``.
    """
    arr = _as_float_host(T, name)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: it has no targets")
    if arr.shape[0] != batch:
        raise ValueError(f"{name} has {arr.shape[0]} samples but X has {batch}")
    _check_finite(arr, name)
    if loss == "cross_entropy" and arr.ndim == 1:
        if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
            raise ValueError(f"{name}: class labels must be integers, got non-integer values")
        labels = arr.astype(np.int64)
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_outputs:
            raise ValueError(
                f"{name}: class labels must lie in [0, {n_outputs}), got values from {lo} to {hi}"
            )
        onehot = np.zeros((batch, n_outputs), dtype=dtype)
        onehot[np.arange(batch), labels] = 1
        return onehot
    if arr.ndim == 1 and n_outputs == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[1] != n_outputs:
        raise ValueError(f"{name} must have shape ({batch}, {n_outputs}), got {arr.shape}")
    out = np.ascontiguousarray(arr, dtype=dtype)
    if loss in ("bce", "cross_entropy") and (out.min() < 0 or out.max() > 1):
        raise ValueError(f"{name}: targets of {loss} must lie in [0, 1]")
    if loss == "cross_entropy":
        sums = out.sum(axis=1, dtype=np.float64)
        if not np.allclose(sums, 1.0, atol=1e-4 if out.dtype == np.float32 else 1e-8):
            raise ValueError(f"{name}: cross_entropy targets must be one-hot or probability rows summing to 1")
    if not np.isfinite(out).all():
        raise ValueError(f"{name} overflows {np.dtype(dtype).name}")
    return out


def check_positive(value: Any, name: str, *, allow_zero: bool = False, integer: bool = False) -> Any:
    """Check a hyper-parameter: a finite number, positive (or non-negative), integer if asked."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if integer and not float(value).is_integer():
        raise TypeError(f"{name} must be an integer, got {value}")
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'} and finite, got {value}")
    return int(value) if integer else float(value)
