"""Compile the Numba CPU kernels ahead of time, so that the first training run does not wait for them.

On a cold cache the ``numba`` backend compiles its kernels on first use (seconds each; Numba
caches them on disk, ``cache=True``, so later processes load them in well under a second).
Run this once after installing, or in a CI image::

    python -m backprop.warmup                     # numba, float32 and float64
    python -m backprop.warmup --dtypes float32

or from Python: ``backprop.warmup.warm_up()``. Each dtype gets a few tiny training runs (every
optimizer, the guard's probes, shuffled minibatches, class labels) and one call of each primitive
with tiny arrays, which together compile (or load from the cache) every kernel of
:data:`backprop.kernels.numba_cpu.KERNELS` for that dtype.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

__all__ = ["BACKENDS", "WarmUpResult", "main", "warm_up"]

#: Backends with anything to compile ahead of time.
BACKENDS = ("numba",)
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class WarmUpResult:
    """What :func:`warm_up` did for one backend and dtype."""

    backend: str
    dtype: str
    kernels: int  #: kernels with a compiled signature for this dtype afterwards
    compiled: int  #: signatures compiled now
    loaded: int  #: signatures loaded from Numba's on-disk cache
    seconds: float
    missing: tuple[str, ...]  #: kernels still without a signature for this dtype (empty when all went well)
    cache_path: str  #: Numba's cache directory for the kernels

    @property
    def ok(self) -> bool:
        return not self.missing


def _dtypes(dtypes: str | Iterable[Any]) -> list[np.dtype]:
    items = dtypes.split(",") if isinstance(dtypes, str) else list(dtypes)
    out: list[np.dtype] = []
    for d in items:
        try:
            dt = np.dtype(d.strip() if isinstance(d, str) else d)
        except TypeError:
            dt = None
        if d is None or dt is None or dt.name not in DTYPES:
            raise ValueError(f"dtypes: expected float32 and/or float64, got {d!r}")
        if dt not in out:
            out.append(dt)
    if not out:
        raise ValueError("dtypes: expected float32 and/or float64, got none")
    return out


def _counts(kernels: Sequence[Any]) -> tuple[int, int]:
    """(cache misses, cache hits) summed over ``kernels``: signatures compiled and loaded so far."""
    misses = hits = 0
    for k in kernels:
        stats = k.stats
        misses += sum(stats.cache_misses.values())
        hits += sum(stats.cache_hits.values())
    return misses, hits


def _has_dtype(kernel: Any, dt: np.dtype) -> bool:
    """True when ``kernel`` has a compiled signature with an array argument of dtype ``dt``."""
    from numba import from_dtype, types

    want = from_dtype(dt)
    return any(isinstance(a, types.Array) and a.dtype == want for sig in kernel.signatures for a in sig)


def _train(dt: np.dtype) -> None:
    """Tiny training runs through the public API: the signatures a real run compiles."""
    from .network import MLP
    from .optimizers import SGD, Adam

    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 3))
    labels = np.arange(8, dtype=np.int64) % 3
    runs: list[tuple[str, Any, Any]] = [
        ("multiclass", labels, SGD(lr=0.01)),
        ("binary", (labels == 1).astype(np.float64), SGD(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)),
        ("regression", X[:, :1], Adam(lr=1e-3, weight_decay=1e-4)),
    ]
    for head, T, opt in runs:
        n_out = 3 if head == "multiclass" else 1
        net = MLP([3, 4, n_out], activation="tanh", head=head, dtype=dt, backend="numba", seed=0)
        net.fit(X, T, epochs=1, batch_size=4, optimizer=opt, shuffle=True, seed=0, validation_data=(X, T))


def _call_primitives(k: Any, dt: np.dtype) -> None:
    """One call of each primitive of the numba module with tiny arrays of ``dt`` (every kernel)."""
    def guard() -> np.ndarray:
        return np.array([1.0, 0.0, 0.0, 0.0])

    x = np.full((2, 3), 0.5, dt)
    W = np.full((4, 3), 0.1, dt)
    b = np.zeros(4, dt)
    k.all_finite(x)
    y, u = k.layer_forward(x, W, b, "tanh", keep_u=True)
    k.layer_forward(x, W, b, "relu")
    delta = np.full((2, 4), 0.1, dt)
    k.delta_backward(delta, W, x, x.copy(), "elu", 1.0)
    dW, db = k.weight_gradients(delta, x)
    value, _ = k.output_error(y, u, np.full((2, 4), 0.25, dt), "softmax", "cross_entropy")
    k.guard_step(guard(), value, np.zeros(5, dt))
    k.add_sum_of_squares(np.zeros(1), W)
    for probe in (True, False):
        p, g = W.copy(), dW.copy()
        k.sgd_update(p, g, 0.01, 1e-4, guard=guard(), probe=probe)
        k.momentum_update(p, g, np.zeros_like(p), 0.01, 0.9, True, 1e-4, guard=guard(), probe=probe)
        k.adam_update(p, g, np.zeros_like(p), np.zeros_like(p), 1e-3, 0.9, 0.999, 1e-8, 1, 1e-4,
                      guard=guard(), probe=probe)
    k.one_hot(np.array([0, 2], dtype=np.int64), 3, dt)
    k.gather_rows(np.full((3, 3), 0.5, dt), np.array([2, 0], dtype=np.int64), np.empty((2, 3), dt))


def warm_up(backend: str = "numba", dtypes: str | Iterable[Any] = DTYPES, *,
            out: TextIO | None = None) -> list[WarmUpResult]:
    """Compile (or load from Numba's cache) every kernel of ``backend`` for each of ``dtypes``; one
    :class:`WarmUpResult` per dtype. ``dtypes``: ``"float32,float64"`` or a sequence of them. ``out``:
    where to write what it does (nothing by default). Raises ValueError for a backend without kernels
    to compile or another dtype, ImportError when Numba is not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} (the only backend with CPU kernels "
                         f"to compile ahead of time), got {backend!r}")
    dts = _dtypes(dtypes)

    def say(msg: str) -> None:
        if out is not None:
            print(msg, file=out, flush=True)

    try:
        from .kernels import numba_cpu as k
    except ImportError as exc:
        raise ImportError(f"the numba backend needs Numba: pip install 'backprop-kernels[numba]' ({exc})") from exc
    kernels = k.KERNELS
    results = []
    for dt in dts:
        say(f"{backend} {dt.name}: compiling or loading {len(kernels)} kernels ...")
        start = time.perf_counter()
        misses0, hits0 = _counts(kernels)
        _train(dt)
        _call_primitives(k, dt)
        misses, hits = _counts(kernels)
        seconds = time.perf_counter() - start
        missing = tuple(f.__name__ for f in kernels if not _has_dtype(f, dt))
        res = WarmUpResult(backend=backend, dtype=dt.name, kernels=len(kernels) - len(missing),
                           compiled=misses - misses0, loaded=hits - hits0, seconds=seconds, missing=missing,
                           cache_path=str(kernels[0].stats.cache_path))
        say(f"{backend} {dt.name}: {res.kernels}/{len(kernels)} kernels ready ({res.compiled} signatures compiled, "
            f"{res.loaded} loaded from the cache) in {seconds:.1f} s"
            + (f"; no {dt.name} signature for: {', '.join(missing)}" if missing else ""))
        results.append(res)
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m backprop.warmup",
        description="Compile the numba CPU kernels ahead of time (Numba caches them on disk), so that the "
                    "first training run starts at once instead of waiting for the compiler. Run once after "
                    "installing or upgrading; later runs only load the cache.",
        epilog="Exit status: 0 when every kernel is ready for every dtype, 1 when one is not or Numba is "
               "missing, 2 for bad arguments.")
    p.add_argument("--backends", default="numba", metavar="LIST",
                   help=f"comma-separated backends to warm up (default: numba; choices: {', '.join(BACKENDS)})")
    p.add_argument("--dtypes", default=",".join(DTYPES), metavar="LIST",
                   help="comma-separated dtypes (default: float32,float64)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m backprop.warmup``: see ``--help``."""
    parser = _parser()
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        parser.error(f"argument --backends: expected {', '.join(BACKENDS)}, got {args.backends!r}")
    try:
        _dtypes(args.dtypes)
    except ValueError as exc:
        parser.error(f"argument --dtypes: {str(exc).removeprefix('dtypes: ')}")
    start = time.perf_counter()
    ok = True
    for backend in dict.fromkeys(backends):
        try:
            results = warm_up(backend, args.dtypes, out=sys.stdout)
        except ImportError as exc:
            print(f"{parser.prog}: {backend}: {exc}", file=sys.stderr)
            return 1
        ok = ok and all(r.ok for r in results)
        if results:
            print(f"{backend}: cache {results[0].cache_path}")
    print(f"done in {time.perf_counter() - start:.1f} s" + ("" if ok else "; some kernels are not ready"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
