"""How many threads NumPy's BLAS, OpenMP and Numba may use.

By default OpenBLAS (or MKL) starts one thread per core and leaves them spinning after each
GEMM. On a small or busy machine that costs more than it gains: on a 2-core machine with
another process running, a 0.23 ms training step took 0.5 to 70 ms. :func:`set_num_threads`
limits every pool at once::

    import backprop as bp
    bp.set_num_threads(1)            # for the rest of the process
    with bp.limit_threads(1):        # or for a block; the previous limits come back on exit
        net.fit(X, T)

BLAS and OpenMP pools are limited through `threadpoolctl <https://github.com/joblib/threadpoolctl>`_
(``pip install threadpoolctl``, part of the ``bench`` extra); Numba's pool through
:func:`numba.set_num_threads` (clamped to ``numba.config.NUMBA_NUM_THREADS``) when Numba is
installed. Numba's limit belongs to the calling thread (and the parallel regions it starts).

A limit holds for libraries loaded later too: Numba is imported (and its threading layer started) before
the pools are limited, and each backend, when it first loads, loads the libraries its kernels call and
has the current limit applied to them (:func:`reapply`).
"""

from __future__ import annotations

import importlib.util
import operator
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["get_num_threads", "limit_threads", "reapply", "set_num_threads"]

#: The process-wide limit of :func:`set_num_threads` (``None`` until set).
_process_limit: int | None = None
#: One limit per open :func:`limit_threads` block, innermost last; the innermost is the one in force.
_block_limits: list[int] = []

#: How to get threadpoolctl, named in the ImportError.
INSTALL_HINT = "pip install threadpoolctl  (or: pip install 'backprop-kernels[bench]')"


def _check_n(n: Any) -> int:
    """``n`` as a positive int: TypeError for a non-integer (bools included), ValueError below 1."""
    if isinstance(n, bool):
        raise TypeError(f"n must be a positive int, got {n!r} (bool)")
    try:
        value = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be a positive int, got {n!r} ({type(n).__name__})") from None
    if value < 1:
        raise ValueError(f"n must be a positive int, got {value}")
    return value


def _threadpoolctl(strict: bool) -> Any:
    """The threadpoolctl module, or ``None`` when missing and not ``strict`` (ImportError when strict)."""
    try:
        import threadpoolctl
    except ImportError:
        if strict:
            raise ImportError(
                "backprop.set_num_threads needs threadpoolctl to limit the BLAS/OpenMP thread pools: "
                f"{INSTALL_HINT}. Without it, pass strict=False to limit Numba's threads only."
            ) from None
        return None
    return threadpoolctl


def _numba() -> Any:
    """Numba when it is installed and imports, else ``None`` (imported here so that a limit set before a
    Numba backend is first used applies to it too)."""
    if "numba" not in sys.modules and importlib.util.find_spec("numba") is None:
        return None
    try:
        import numba
    except Exception:  # noqa: BLE001 - a broken Numba install: nothing to limit
        return None
    return numba


def _limit(n: int, strict: bool) -> tuple[list[str], Callable[[], None]]:
    """Apply the limit; ``(what was limited, a function restoring the previous limits)``."""
    n = _check_n(n)
    tpc = _threadpoolctl(strict)
    done: list[str] = []
    undo: list[Callable[[], None]] = []
    # Numba first: starting its threading layer may load an OpenMP runtime, which the limit below then covers
    numba = _numba()
    if numba is not None:
        try:
            before = numba.get_num_threads()
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        except Exception:  # noqa: BLE001 - e.g. no threading layer could start: leave Numba alone
            pass
        else:
            undo.append(lambda: numba.set_num_threads(before))
            done.append("numba")
    if tpc is not None:
        limiter = tpc.threadpool_limits(limits=n)
        undo.append(limiter.restore_original_limits)
        done.append("BLAS/OpenMP via threadpoolctl")

    def restore() -> None:
        while undo:
            undo.pop()()

    return done, restore


def set_num_threads(n: int, *, strict: bool = True) -> list[str]:
    """Limit NumPy's BLAS, OpenMP and Numba to ``n`` threads each, for the rest of the process (or until
    changed); returns what was limited (``["BLAS/OpenMP via threadpoolctl", "numba"]``).

    ``n``: a positive int (TypeError for another type, ValueError below 1); Numba gets
    ``min(n, numba.config.NUMBA_NUM_THREADS)``. Without threadpoolctl an ImportError says how to
    install it, unless ``strict=False``: then only Numba is limited. :func:`limit_threads` limits
    for a ``with`` block instead.
    """
    global _process_limit
    done, _ = _limit(n, strict)
    _process_limit = _check_n(n)
    return done


def reapply() -> list[str]:
    """Apply the limit in force (:func:`set_num_threads`, or the innermost :func:`limit_threads`) to the BLAS and
    OpenMP libraries loaded since it was set; nothing when no limit was set. The backend switch calls it when
    a backend first loads. Returns what was limited (empty when nothing was)."""
    n = _block_limits[-1] if _block_limits else _process_limit
    if n is None:
        return []
    tpc = _threadpoolctl(strict=False)
    if tpc is None:
        return []
    counts = [lib.get("num_threads") for lib in tpc.threadpool_info()]
    if not any(isinstance(c, int) and c > n for c in counts):
        return []
    tpc.threadpool_limits(limits=n)
    return ["BLAS/OpenMP via threadpoolctl"]


def get_num_threads() -> dict[str, int]:
    """The current limits: ``{"blas": ..., "openmp": ..., "numba": ...}``, each the largest thread count
    among that kind's loaded libraries; kinds that cannot be known (threadpoolctl or Numba missing, no
    OpenMP runtime loaded) are left out."""
    out: dict[str, int] = {}
    tpc = _threadpoolctl(strict=False)
    if tpc is not None:
        for lib in tpc.threadpool_info():
            api, count = lib.get("user_api"), lib.get("num_threads")
            if isinstance(api, str) and isinstance(count, int):
                out[api] = max(out.get(api, 0), count)
    numba = _numba()
    if numba is not None:
        try:
            out["numba"] = int(numba.get_num_threads())
        except Exception:  # noqa: BLE001 - no threading layer: unknown
            pass
    return out


@contextmanager
def limit_threads(n: int, *, strict: bool = True) -> Iterator[list[str]]:
    """``with limit_threads(n): ...``: :func:`set_num_threads` for the block, then the previous limits come
    back (also when the block raises). Yields what was limited."""
    done, restore = _limit(n, strict)
    _block_limits.append(_check_n(n))
    try:
        yield done
    finally:
        _block_limits.pop()
        restore()
