"""Timing of device work: first call, warm-up, repeats, median and spread.

Every sample is bracketed by ``synchronize()`` so that on a GPU the time covers the work queued,
not just its launch. A sample runs the timed function ``inner`` times back to back (calibrated so
that a sample lasts at least ``min_sample_time``, which keeps the clock's resolution and the
per-sample synchronisation out of small nets' figures) and records the mean time per call.
Several functions timed together are interleaved, one sample of each per repeat, so a burst of
load from other processes falls on all of them alike and their ratios stay meaningful.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Timing", "paired_ratio", "time_ops", "time_repeated"]


@dataclass
class Timing:
    """Seconds per call: one sample per repeat, plus the first (cold) call on its own."""

    samples: list[float]
    inner: int = 1
    first_call: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return float(np.median(self.samples)) if self.samples else math.nan

    @property
    def q1(self) -> float:
        return float(np.percentile(self.samples, 25)) if self.samples else math.nan

    @property
    def q3(self) -> float:
        return float(np.percentile(self.samples, 75)) if self.samples else math.nan

    @property
    def min(self) -> float:
        return float(np.min(self.samples)) if self.samples else math.nan

    @property
    def max(self) -> float:
        return float(np.max(self.samples)) if self.samples else math.nan

    @property
    def first_call_excess(self) -> float:
        """How much longer the first call took than a warm one: JIT compilation, lazy set-up."""
        if math.isnan(self.first_call) or not self.samples:
            return math.nan
        return max(0.0, self.first_call - self.median)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median": self.median, "q1": self.q1, "q3": self.q3, "min": self.min, "max": self.max,
            "first_call": self.first_call, "first_call_excess": self.first_call_excess,
            "inner": self.inner, "repeats": len(self.samples), "samples": list(self.samples), **self.extra,
        }


def _timed(fn: Callable[[], Any], n: int, sync: Callable[[], None], clock: Callable[[], float]) -> float:
    sync()
    t0 = clock()
    for _ in range(n):
        fn()
    sync()
    return (clock() - t0) / n


def time_ops(
    ops: dict[str, Callable[[], Any]],
    *,
    repeats: int = 7,
    warmup: int = 2,
    min_sample_time: float = 0.01,
    max_inner: int = 100_000,
    inner: int | None = None,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time each function of ``ops``; returns one :class:`Timing` per name.

    1. one cold call of each, timed on its own (``first_call``: includes any JIT compilation);
    2. ``warmup`` further calls of each, the fastest of which sets the number of calls per sample (at
       least ``min_sample_time`` seconds a sample), unless ``inner`` fixes it;
    3. ``repeats`` rounds, each taking one sample of every function in turn, with the garbage
       collector off.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    inner_fixed = inner
    first = {name: _timed(fn, 1, sync, clock) for name, fn in ops.items()}
    inner: dict[str, int] = {}
    for name, fn in ops.items():
        est = first[name]
        for _ in range(max(0, warmup)):
            est = min(est, _timed(fn, 1, sync, clock))
        inner[name] = int(min(max_inner, max(1, math.ceil(min_sample_time / max(est, 1e-9)))))
    if inner_fixed is not None:
        if inner_fixed < 1:
            raise ValueError(f"inner must be at least 1, got {inner_fixed}")
        inner = {name: int(inner_fixed) for name in ops}
    samples: dict[str, list[float]] = {name: [] for name in ops}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in ops.items():
                samples[name].append(_timed(fn, inner[name], sync, clock))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing(samples[name], inner[name], first[name]) for name in ops}


def paired_ratio(num: Timing, den: Timing) -> float:
    """Median over the repeats of ``num / den`` within a repeat: of two functions timed together by
    :func:`time_ops`, robust to load that drifts between repeats (each repeat times them back to back)."""
    pairs = [a / b for a, b in zip(num.samples, den.samples) if b > 0]
    return float(np.median(pairs)) if pairs else math.nan


def time_repeated(
    fn: Callable[[], Any],
    *,
    repeats: int = 3,
    budget: float = math.inf,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[Timing, Any]:
    """Time a long-running ``fn`` (seconds a call) up to ``repeats`` times, one call a sample, no warm-up;
    no further sample is started once the samples add up to ``budget`` seconds.

    Returns the timing and the result of the first call. ``first_call`` is the first sample.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    result: Any = None
    samples = []
    for i in range(repeats):
        sync()
        t0 = clock()
        out = fn()
        sync()
        samples.append(clock() - t0)
        if i == 0:
            result = out
        if sum(samples) >= budget:
            break
    return Timing(samples, 1, samples[0]), result
