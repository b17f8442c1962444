"""The notice printed once per process before the Numba CPU kernels are first compiled.

A cold on-disk cache takes seconds per kernel: Numba's ``numba:compile`` event, which fires only on a real
compilation (not on a load from the cache), prints :data:`COMPILE_NOTICE` to stderr the first time it concerns
one of :data:`~backprop.kernels.numba_cpu.compiled.KERNELS`. ``BACKPROP_QUIET=1`` silences it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .compiled import KERNELS

#: Printed to stderr, once per process, just before the first kernel is compiled (a cold cache takes
#: seconds per kernel); not printed when the kernels load from Numba's on-disk cache.
#: ``BACKPROP_QUIET=1`` (or ``true``/``yes``) silences it.
COMPILE_NOTICE = "backprop: compiling numba kernels (first run only, cached afterwards)..."
_KERNEL_IDS = frozenset(id(k) for k in KERNELS)
_noticed = False


def _quiet() -> bool:
    return os.environ.get("BACKPROP_QUIET", "").strip().lower() not in ("", "0", "false", "no")


def _compile_notice(dispatcher: Any) -> bool:
    """Print :data:`COMPILE_NOTICE` if ``dispatcher`` is one of :data:`KERNELS`, the notice was not printed
    yet and ``BACKPROP_QUIET`` is unset; True when it printed. Called by Numba's ``numba:compile`` event,
    which Numba fires only on a real compilation: after the in-memory overloads and the on-disk cache
    (``dispatcher._cache.load_overload``) both missed the signature."""
    global _noticed
    if _noticed or id(dispatcher) not in _KERNEL_IDS or _quiet():
        return False
    _noticed = True
    print(COMPILE_NOTICE, file=sys.stderr, flush=True)
    return True


def _install_compile_notice() -> bool:
    """Listen to Numba's ``numba:compile`` events (Numba >= 0.53); False where that API is missing."""
    try:
        from numba.core import event
    except ImportError:  # pragma: no cover - another Numba layout
        return False

    class _Notice(event.Listener):  # type: ignore[misc]
        def on_start(self, ev: Any) -> None:
            data = ev.data
            if isinstance(data, dict):
                _compile_notice(data.get("dispatcher"))

        def on_end(self, ev: Any) -> None:
            pass

    event.register("numba:compile", _Notice())
    return True


_install_compile_notice()
