"""Fused narrow networks on the CPU: each pass of a step as one parallel kernel over tiles of rows.

A narrow network (every width at most :data:`MAX_WIDTH`) passes its activations through memory between a GEMM and
the bias, activation, slope and column-sum passes around it, and its small GEMMs use a thread pool poorly. The
kernels of :mod:`~backprop.kernels.numba_cpu.tiles` run every layer on one tile of rows at a time, the tiles shared
out among Numba's threads (each running its BLAS calls on its own thread), each thread summing its own gradients,
added once at the end. By default on where Numba runs one thread, where it measured faster than the layer-by-layer
path (:func:`set_fused_mlp`).

The GEMMs inside are BLAS calls from compiled code (SciPy's BLAS, as Numba's ``np.dot``). While a pass runs on
several threads, that BLAS is held at one thread (through threadpoolctl, when it can see the library), so that
the kernel's threads and the BLAS's never add up to more than Numba's thread count.

The contract's ``fused_mlp`` capability: :func:`set_fused_mlp`, :func:`fused_mlp_enabled`,
:func:`fused_mlp_reason`, :func:`fused_mlp_path`, :func:`mlp_forward`, :func:`mlp_forward_error`,
:func:`mlp_backward`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .. import numba_math as nm
from ..contract import check_weights
from .tiles import KIND, LAYOUT_COLUMNS, U_OFF, Y_OFF, _mlp_backward_tiles, _mlp_forward_tiles, _sum_chunks

Array = Any

#: The widest layer the fused kernels serve: wider layers are GEMM-bound, where the layer-by-layer path is at the
#: BLAS's rate already.
MAX_WIDTH = 128
#: Bytes of one tile of the widest layer (2048 rows of a width-64 float32 network). Of 128 and 512 KiB, 512 measured
#: as fast or faster on a 2-core AMD EPYC (forward and backward of ``[64]*6+[1]`` at 8192 rows, 1 and 2 threads):
#: fewer, larger BLAS calls. ``BACKPROP_NUMBA_TILE_BYTES`` changes it.
TILE_BYTES = int(os.environ.get("BACKPROP_NUMBA_TILE_BYTES", 512 << 10))

#: ``True`` or ``False``: the fused passes on or off; ``None`` (the default): on exactly where Numba runs one thread
#: (:func:`set_fused_mlp`). ``BACKPROP_NUMBA_FUSED=1`` or ``0`` sets it at import.
_fused_on: bool | None = {"1": True, "0": False}.get(os.environ.get("BACKPROP_NUMBA_FUSED", "").strip())
_scratch = threading.local()


def set_fused_mlp(enabled: bool | None) -> None:
    """Run the passes of narrow networks (:func:`fused_mlp_reason`) as one kernel over tiles of rows instead of a
    GEMM and elementwise passes per layer: ``True`` always, ``False`` never, ``None`` (the default) exactly when
    Numba's thread count is 1. Measured on a 2-core AMD EPYC VM (``benchmarks/results/cpu/cpu_peers.md``): on one
    thread the fused step of ``[64]*6+[1]`` at 8192 rows was 6-17% faster than the layer-by-layer step; on two
    threads it was 1.7-2.3x slower in two runs (and 1.9x faster in a third), so it stays off there until a machine
    shows otherwise. The results equal the layer-by-layer path's to rounding (sums in another order)."""
    global _fused_on
    _fused_on = None if enabled is None else bool(enabled)


def fused_mlp_enabled() -> bool:
    """Whether narrow networks take the fused passes now (:func:`set_fused_mlp`)."""
    return _fused_on if _fused_on is not None else _threads() == 1


_SCIPY_MISSING = importlib.util.find_spec("scipy") is None


def fused_mlp_reason(sizes: Any, acts: Any, dtype: Any) -> str:
    """Why the fused kernels do not serve a network of widths ``sizes`` (input first) and activations ``acts``;
    ``""`` when they do."""
    return _reason(tuple(int(n) for n in sizes), tuple(acts), np.dtype(dtype))


@functools.lru_cache(maxsize=256)
def _reason(sizes: tuple[int, ...], acts: tuple[str, ...], dtype: np.dtype) -> str:
    if np.dtype(dtype) not in (np.float32, np.float64):
        return f"the fused kernels compute in float32 and float64, not {np.dtype(dtype).name}"
    wide = [n for n in sizes if n > MAX_WIDTH]
    if wide:
        return f"width {wide[0]} is wider than {MAX_WIDTH}: the layer-by-layer GEMMs are at the BLAS's rate there"
    for i, act in enumerate(acts[:-1]):
        if nm.act_code(act) == nm.SOFTMAX:
            return f"'softmax' in layer {i + 1}: a hidden layer's activation needs an elementwise slope"
    if _SCIPY_MISSING:
        return "the fused kernels call the BLAS from compiled code, which needs SciPy (pip install scipy)"
    return ""


def tile_rows(sizes: Any, dtype: Any) -> int:
    """Rows of one tile: :data:`TILE_BYTES` of the widest layer, a multiple of 16, at least 16."""
    width = max(int(n) for n in sizes)
    return max(16, TILE_BYTES // (width * np.dtype(dtype).itemsize) // 16 * 16)


def fused_mlp_path(dtype: Any) -> str:
    """Where the fused passes run: the CPU cores, in tiles of rows (SciPy's BLAS inside)."""
    return f"CPU cores, {np.dtype(dtype).name} tiles of {TILE_BYTES >> 10} KiB (SciPy's BLAS inside)"


# --------------------------------------------------------------------------- threads
def _threads() -> int:
    from . import _thread_limit

    return _thread_limit()


class _CompiledBlas:
    """SciPy's BLAS (what Numba's ``np.dot`` calls), seen through threadpoolctl: held at one thread while a fused
    pass runs on several."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._controllers: list[Any] | None = None
        self._held = 0
        self._before: list[int] = []

    def _find(self) -> list[Any]:
        if self._controllers is None:
            try:
                from numba.np.linalg import ensure_blas
                from threadpoolctl import ThreadpoolController

                ensure_blas()
                import scipy.linalg.cython_blas as cb

                path = os.path.realpath(cb.__file__)
                root = os.path.dirname(os.path.dirname(os.path.dirname(path)))  # site-packages
                self._controllers = [lib for lib in ThreadpoolController().lib_controllers
                                     if lib.user_api == "blas" and os.path.realpath(lib.filepath).startswith(
                                         os.path.join(root, "scipy"))]
            except Exception:  # noqa: BLE001 - no threadpoolctl or no SciPy: nothing to hold
                self._controllers = []
        return self._controllers

    @contextmanager
    def one_thread(self, threads: int) -> Iterator[None]:
        """While the block runs (on ``threads`` Numba threads), SciPy's BLAS runs its calls on the calling thread."""
        if threads <= 1:
            yield
            return
        libs = self._find()
        with self._lock:
            if self._held == 0:
                self._before = [lib.num_threads for lib in libs]
                for lib in libs:
                    lib.set_num_threads(1)
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
                if self._held == 0:
                    for lib, n in zip(libs, self._before):
                        lib.set_num_threads(n)


COMPILED_BLAS = _CompiledBlas()


# --------------------------------------------------------------------------- the passes
@functools.lru_cache(maxsize=64)
def _plan(sizes: tuple[int, ...], acts: tuple[str, ...], alphas: tuple[float, ...], keep_u: tuple[bool, ...],
          rows: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(layout, activation codes, alphas)`` of the tile kernels for a network and a batch size."""
    n = len(sizes) - 1
    layout = np.zeros((n, LAYOUT_COLUMNS), dtype=np.int64)
    w_off = y_off = u_off = 0
    b_off = sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))
    for li, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layout[li, :4] = (n_in, n_out, w_off, b_off)
        layout[li, Y_OFF] = y_off
        layout[li, U_OFF] = u_off if keep_u[li] else -1
        w_off += n_in * n_out
        b_off += n_out
        y_off += rows * n_out
        u_off += rows * n_out if keep_u[li] else 0
    codes = np.array([nm.act_code(a) for a in acts], dtype=np.int64)
    alph = np.array(alphas, dtype=dtype)
    for a in (layout, codes, alph):
        a.setflags(write=False)
    return layout, codes, alph


def _buffer(a: Any, size: int, dtype: np.dtype, name: str) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != 1 or a.size < size or not a.flags.c_contiguous:
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a C-contiguous 1-D {dtype} array of at least {size} elements, got {got}")


def _checked(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
             u_flat: Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Check a pass's arrays against the network; ``(layout, codes, alphas, tile)``."""
    sizes, acts = tuple(int(n) for n in sizes), tuple(acts)
    keep_u, alphas = tuple(bool(k) for k in keep_u), tuple(float(a) for a in alphas)
    if not isinstance(params, np.ndarray):
        raise TypeError(f"params must be a NumPy array, got {type(params).__name__}")
    dtype = params.dtype
    reason = fused_mlp_reason(sizes, acts, dtype)
    if reason:
        raise ValueError(f"the fused kernels do not serve this network: {reason}")
    if not (len(acts) == len(keep_u) == len(alphas) == len(sizes) - 1):
        raise ValueError(f"{len(sizes) - 1} layers need as many activations, alphas and keep_u flags")
    if (not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != sizes[0] or x.dtype != dtype
            or not x.flags.c_contiguous):
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"x must be a C-contiguous {dtype} array of shape (rows, {sizes[0]}), got {got}")
    rows = x.shape[0]
    _buffer(params, sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:])), dtype, "params")
    _buffer(y_flat, rows * sum(sizes[1:]), dtype, "y_flat")
    _buffer(u_flat, rows * sum(n for n, k in zip(sizes[1:], keep_u) if k), dtype, "u_flat")
    return (*_plan(sizes, acts, alphas, keep_u, rows, dtype), tile_rows(sizes, dtype))


def _chunks(rows: int, tile: int) -> int:
    return max(1, min(_threads(), -(-rows // tile)))


def _dummy(dtype: np.dtype) -> np.ndarray:
    """What stands in for an array a kernel does not read."""
    return np.zeros(1, dtype=dtype)


def mlp_forward(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                u_flat: Array) -> None:
    """``u^l = W^l x^{l-1} + b^l``, ``x^l = f(u^l)`` for every layer, tile by tile: each layer's ``y`` into
    ``y_flat`` and, where ``keep_u``, its ``u`` into ``u_flat``, layer after layer as ``(rows, n_l)`` blocks.
    ``params``: the network's flat ``[W^1 | ... | W^L | b^1 | ... | b^L]``."""
    layout, codes, alph, tile = _checked(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat)
    dt = params.dtype
    chunks = _chunks(x.shape[0], tile)
    _run_tiles(chunks, _mlp_forward_tiles, KIND[dt], x.reshape(-1), x.shape[0], params, layout, codes, alph, y_flat,
               u_flat, tile, chunks, False, _dummy(dt), _dummy(dt), False, 0, False, dt.type(0), _dummy(dt),
               _dummy(dt))


def mlp_forward_error(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                      u_flat: Array, t: Array, loss: str, param: float = 0.0, *, delta: Array, value: Array,
                      weights: Array | None = None) -> None:
    """:func:`mlp_forward`, and on each tile the error at the output as ``output_error`` computes it (row
    ``weights`` included): ``delta^L`` into ``delta`` ``(rows, n_L)``, the mean loss into ``value`` (0-d)."""
    layout, codes, alph, tile = _checked(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat)
    dt = params.dtype
    rows, n_out = x.shape[0], int(tuple(sizes)[-1])
    lcode, _, fused = nm.output_loss_codes(tuple(acts)[-1], loss, True)
    check_weights(weights, rows, dt)
    for a, name in ((t, "t"), (delta, "delta")):
        if not isinstance(a, np.ndarray) or a.shape != (rows, n_out) or a.dtype != dt or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous {dt} array of shape ({rows}, {n_out})")
    if not isinstance(value, np.ndarray) or value.shape != () or value.dtype != dt:
        raise ValueError(f"value must be a 0-d {dt} array")
    chunks = _chunks(rows, tile)
    partial = np.zeros(chunks, dtype=dt)
    w = _dummy(dt) if weights is None else np.ascontiguousarray(weights)
    _run_tiles(chunks, _mlp_forward_tiles, KIND[dt], x.reshape(-1), rows, params, layout, codes, alph, y_flat, u_flat,
               tile, chunks, True, t.reshape(-1), w, weights is not None, lcode, fused, dt.type(param),
               delta.reshape(-1), partial)
    value[()] = partial.sum() / dt.type(rows) if rows else dt.type(np.nan)  # the mean of no rows, as output_error


def mlp_backward(x: Array, params: Array, sizes: Any, acts: Any, alphas: Any, keep_u: Any, y_flat: Array,
                 u_flat: Array, delta: Array, grads: Array) -> None:
    """From ``delta^L`` ``(rows, n_L)``, every ``dE/dW^l = delta^l (x^{l-1})^T`` and ``dE/db^l = sum delta^l`` into
    ``grads`` (the parameters' flat layout), ``delta^{l-1} = phi(x^{l-1}) * (W^l)^T delta^l`` kept in a scratch
    tile; each thread sums its tiles, and the threads' sums are added in a fixed order. ``y_flat``, ``u_flat``:
    what :func:`mlp_forward` wrote."""
    layout, codes, alph, tile = _checked(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat)
    dt = params.dtype
    sizes = tuple(int(n) for n in sizes)
    rows = x.shape[0]
    if (not isinstance(delta, np.ndarray) or delta.shape != (rows, sizes[-1]) or delta.dtype != dt
            or not delta.flags.c_contiguous):
        raise ValueError(f"delta must be a C-contiguous {dt} array of shape ({rows}, {sizes[-1]})")
    _buffer(grads, params.size, dt, "grads")
    chunks = _chunks(rows, tile)
    partial, scratch = _backward_scratch(chunks, params.size, tile, sizes, dt)
    _run_tiles(chunks, _mlp_backward_tiles, KIND[dt], x.reshape(-1), rows, params, layout, codes, alph, y_flat,
               u_flat, delta.reshape(-1), tile, chunks, partial, scratch)
    _run_tiles(chunks, _sum_chunks, partial, grads[:params.size])


def _backward_scratch(chunks: int, n: int, tile: int, sizes: tuple[int, ...], dt: np.dtype) -> tuple[Array, ...]:
    """The backward pass's per-thread buffers, kept per Python thread and reused while the shapes hold."""
    key = (chunks, n, tile, max(sizes), dt)
    held = getattr(_scratch, "backward", None)
    if held is None or held[0] != key:
        held = _scratch.backward = (key, np.empty((chunks, n), dt), np.empty((chunks, 2 * tile * key[3]), dt))
    return held[1:]


def _run_tiles(chunks: int, kernel: Any, *args: Any) -> None:
    """``kernel(*args)`` on ``chunks`` Numba threads, SciPy's BLAS on one thread meanwhile."""
    before = _threads()  # sets up the package's thread-count functions on the first call
    from . import _one_at_a_time, _set_threads

    with COMPILED_BLAS.one_thread(chunks):
        if _one_at_a_time is not None:
            with _one_at_a_time:
                _call(kernel, chunks, before, _set_threads, args)
        else:
            _call(kernel, chunks, before, _set_threads, args)


def _call(kernel: Any, chunks: int, before: int, set_threads: Any, args: tuple) -> None:
    if chunks == before:
        kernel(*args)
        return
    set_threads(chunks)
    try:
        kernel(*args)
    finally:
        set_threads(before)
