"""Power-law fits: the slope of ``log T`` against ``log N`` is the measured cost exponent."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PowerFit", "fit_power_law", "local_slopes"]


@dataclass(frozen=True)
class PowerFit:
    """``T ~ coef * N ** slope`` by least squares on the logs."""

    slope: float
    coef: float
    r2: float
    stderr: float
    n_points: int
    n_min: float
    n_max: float

    def predict(self, n: float | np.ndarray) -> float | np.ndarray:
        return self.coef * np.asarray(n, dtype=float) ** self.slope

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def fit_power_law(n: Sequence[float], t: Sequence[float]) -> PowerFit:
    """Least-squares line through ``(log N, log T)``; needs two distinct ``N`` and positive values.

    ``stderr`` is the standard error of the slope (``nan`` with two points), ``r2`` the coefficient of
    determination in log space.
    """
    n_arr, t_arr = np.asarray(n, dtype=float), np.asarray(t, dtype=float)
    if n_arr.shape != t_arr.shape:
        raise ValueError(f"N and T differ in length: {n_arr.size} and {t_arr.size}")
    both = np.concatenate([n_arr.ravel(), t_arr.ravel()])
    if not (np.all(np.isfinite(both)) and np.all(both > 0)):
        raise ValueError("N and T must be positive and finite")
    x, y = np.log(n_arr), np.log(t_arr)
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("a fit needs at least two distinct N")
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    resid = y - (intercept + slope * x)
    ss_res = float((resid**2).sum())
    ss_tot = float(((y - ym) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    stderr = math.sqrt(ss_res / (x.size - 2) / sxx) if x.size > 2 else math.nan
    return PowerFit(slope, math.exp(intercept), r2, stderr, int(x.size), float(np.exp(x.min())), float(np.exp(x.max())))


def local_slopes(n: Sequence[float], t: Sequence[float]) -> list[float]:
    """Slopes between neighbouring points, ``d log T / d log N``: where overhead gives way to the GEMMs."""
    x = np.log(np.asarray(n, dtype=float))
    y = np.log(np.asarray(t, dtype=float))
    return [float(v) for v in np.diff(y) / np.diff(x)]
