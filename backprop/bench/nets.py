"""The benchmarked nets: size specifications, parameter and operation counts, memory estimates.

The default family is a stack of ``depth`` square layers, ``[w] * (depth + 1)``, ReLU hidden units,
identity output and mean squared error; its parameter count is ``N = depth * (w^2 + w)``, so a target
``N`` fixes the width. Square layers keep every layer GEMM-shaped alike, and with ``depth = 3`` the
operation-count ratio of the gradient to the forward pass is ``1 + 1 + 2/3 = 2.67``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DEFAULT_DEPTH",
    "available_bytes",
    "estimate_bytes",
    "flop_counts",
    "flop_ratio",
    "is_out_of_memory",
    "log_range",
    "n_params",
    "parse_sizes",
    "sizes_for_params",
    "step_flop_ratio",
]

DEFAULT_DEPTH = 3


def n_params(sizes: Sequence[int]) -> int:
    """Weights and biases of an MLP with layer widths ``sizes`` (the notes' N, ``MLP.n_params``)."""
    return sum(n_out * (n_in + 1) for n_in, n_out in zip(sizes[:-1], sizes[1:]))


def sizes_for_params(n: float, depth: int = DEFAULT_DEPTH) -> list[int]:
    """Layer widths ``[w] * (depth + 1)`` with ``depth * (w^2 + w)`` closest to ``n`` (``w >= 1``)."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    if not n > 0:
        raise ValueError(f"parameter count must be positive, got {n}")
    w = max(1, round((-depth + math.sqrt(depth * depth + 4.0 * depth * n)) / (2.0 * depth)))
    return [int(w)] * (depth + 1)


def log_range(lo: float, hi: float, count: int) -> list[float]:
    """``count`` values spaced evenly in ``log`` from ``lo`` to ``hi`` inclusive."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not (0 < lo <= hi):
        raise ValueError(f"need 0 < lo <= hi, got {lo} and {hi}")
    if count == 1:
        return [float(lo)]
    a, b = math.log(lo), math.log(hi)
    return [math.exp(a + (b - a) * i / (count - 1)) for i in range(count)]


_RANGE = re.compile(r"^\s*([0-9.eE+]+)\s*:\s*([0-9.eE+]+)\s*(?::\s*([0-9]+))?\s*$")


def parse_sizes(spec: str, depth: int = DEFAULT_DEPTH) -> list[list[int]]:
    """Parse a sweep specification into a list of layer-width lists, sorted by ``N``, duplicates dropped.

    Comma-separated items, each one of:

    * ``1e5`` or ``25000``: a parameter count, realised as ``depth`` square layers;
    * ``1e3:1e7:13``: ``13`` parameter counts log-spaced from ``1e3`` to ``1e7`` (count defaults to
      3 per decade);
    * ``784-256-256-10``: explicit layer widths.
    """
    nets: list[list[int]] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        m = _RANGE.match(item)
        try:
            if m:
                lo, hi = float(m.group(1)), float(m.group(2))
                count = int(m.group(3)) if m.group(3) else max(2, round(3 * math.log10(hi / lo)) + 1)
                nets.extend(sizes_for_params(n, depth) for n in log_range(lo, hi, count))
            elif "-" in item.lstrip("-"):
                widths = [int(p) for p in item.split("-")]
                if len(widths) < 2 or min(widths) < 1:
                    raise ValueError
                nets.append(widths)
            else:
                nets.append(sizes_for_params(float(item), depth))
        except ValueError:
            raise ValueError(
                f"cannot read size {item!r}: use a parameter count (1e5), a log range (1e3:1e7:13) "
                f"or explicit layer widths (784-256-10)"
            ) from None
    seen: set[tuple[int, ...]] = set()
    unique = []
    for s in sorted(nets, key=lambda s: (n_params(s), s)):
        if tuple(s) not in seen:
            seen.add(tuple(s))
            unique.append(s)
    if not unique:
        raise ValueError(f"no sizes in {spec!r}")
    return unique


def flop_counts(sizes: Sequence[int], batch: int) -> dict[str, int]:
    """Multiply-add operation counts (2 per multiply-add) of the GEMMs of one pass over a batch.

    ``forward``: ``2 B sum_l n_in n_out``; ``weight_gradients``: the same again (``delta^T x_prev``);
    ``input_deltas``: ``2 B sum_{l >= 2} n_in n_out`` (``delta W`` is not needed below the first layer);
    ``sgd_update``: ``2 N`` (scale and subtract, weights and biases).
    """
    macs = [n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    return {
        "forward": 2 * batch * sum(macs),
        "weight_gradients": 2 * batch * sum(macs),
        "input_deltas": 2 * batch * sum(macs[1:]),
        "sgd_update": 2 * n_params(sizes),
    }


def flop_ratio(sizes: Sequence[int]) -> float:
    """Operation-count ratio of forward + backward to forward alone: ``2 + sum_{l>=2} / sum_l``.

    3 for GEMM-bound layers in the limit of many layers; ``[n, n, n, n]`` gives ``2 + 2/3``; a single
    layer gives 2. Independent of the batch.
    """
    f = flop_counts(sizes, 1)
    return (f["forward"] + f["weight_gradients"] + f["input_deltas"]) / f["forward"]


def step_flop_ratio(sizes: Sequence[int], batch: int) -> float:
    """:func:`flop_ratio` plus the SGD update (``2 N`` operations, negligible once the batch is large)."""
    f = flop_counts(sizes, batch)
    return (f["forward"] + f["weight_gradients"] + f["input_deltas"] + f["sgd_update"]) / f["forward"]


def estimate_bytes(sizes: Sequence[int], batch: int, itemsize: int, peers: int = 0) -> int:
    """Peak memory of one benchmarked net, generously: parameters, one gradient and one temporary of
    their size, and for every layer the batch's ``y``, ``u``, ``delta`` and a temporary; ``peers``
    more copies for other frameworks timed alongside."""
    n = n_params(sizes)
    acts = batch * sum(sizes)
    one = itemsize * (3 * n + 4 * acts)
    return int(one * (1 + peers))


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(backend: Any) -> int | None:
    """Free memory where ``backend`` keeps its arrays (host RAM, or the GPU's); ``None`` if unknown."""
    if not backend.capabilities.device_queries:
        return _host_available()
    try:
        return backend.kernels.device_memory_free()
    except Exception:  # noqa: BLE001 - a probe: unknown is an answer
        return None


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, CuPy's OutOfMemoryError (a MemoryError), or a CUDA driver/torch out-of-memory error."""
    if isinstance(exc, MemoryError):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return "outofmemory" in text or "out of memory" in text or "out_of_memory" in text
