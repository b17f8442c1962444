"""The backend switch: which kernel module computes, chosen once, used everywhere.

``set_backend(name)`` / ``get_backend()`` / ``with use_backend(name):``; the environment
variable ``BACKPROP_BACKEND`` sets the initial choice (default ``"auto"``; a name that is no backend is a
``ValueError`` at ``import backprop``, one that does not work here at the first ``get_backend()``). Nothing else in
the package looks at a backend's name: it calls the primitives of ``get_backend().kernels``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from . import threads
from .kernels import BACKEND_MODULES, load_backend_module
from .kernels.contract import Capabilities

ENV_VAR = "BACKPROP_BACKEND"


@dataclass(frozen=True)
class Backend:
    """An active backend: its ``name``, its array module ``xp`` and its ``kernels`` module."""

    name: str
    kernels: ModuleType = field(repr=False)

    @property
    def xp(self) -> Any:
        """The array module of this backend's arrays (``numpy`` or ``cupy``)."""
        return self.kernels.xp

    @property
    def capabilities(self) -> Capabilities:
        """What the backend can do beyond the required primitives (its kernels' ``CAPABILITIES``)."""
        caps: Capabilities = self.kernels.CAPABILITIES
        return caps

    @property
    def is_gpu(self) -> bool:
        """The arrays live on a GPU."""
        return self.capabilities.gpu

    @property
    def is_simulated(self) -> bool:
        """The backend runs on a simulator (correct, slow; ``"auto"`` never picks it)."""
        return bool(self.kernels.is_simulated())

    def synchronize(self) -> None:
        """Block until the device has finished all queued work (no-op on a CPU)."""
        self.kernels.synchronize()


_loaded: dict[str, Backend] = {}
_reasons: dict[str, str] = {}
_current: Backend | None = None


def _probe(name: str) -> Backend | None:
    """Load backend ``name`` if it works on this machine; remember why not otherwise."""
    if name in _loaded:
        return _loaded[name]
    if name in _reasons:
        return None
    try:
        module = load_backend_module(name)
    except ImportError as exc:
        _reasons[name] = f"cannot import its dependencies ({exc})"
        return None
    if not module.is_available():
        _reasons[name] = module.unavailable_reason() or "not available on this machine"
        return None
    backend = Backend(name, module)
    _loaded[name] = backend
    threads.reapply()  # the libraries the backend just loaded get the thread limit in force
    return backend


def available_backends() -> list[str]:
    """Names of the backends that work on this machine, fastest first."""
    return [name for name in BACKEND_MODULES if _probe(name) is not None]


def _auto() -> Backend:
    for name in BACKEND_MODULES:
        backend = _probe(name)
        if backend is not None and not backend.is_simulated:
            return backend
    raise RuntimeError("no backend works on this machine, not even numpy")  # pragma: no cover


def resolve_backend(name: str) -> Backend:
    """Return the backend called ``name`` (or the fastest for ``"auto"``); ``ValueError`` if none."""
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key == "auto":
        return _auto()
    if key not in BACKEND_MODULES:
        raise ValueError(
            f"unknown backend {name!r}; known: {_known()}; "
            f"available here: {', '.join(available_backends())}"
        )
    backend = _probe(key)
    if backend is None:
        raise ValueError(
            f"backend {key!r} is not available on this machine: {_reasons[key]}; "
            f"available here: {', '.join(available_backends())}"
        )
    return backend


def set_backend(name: str) -> Backend:
    """Make ``name`` the active backend and return it."""
    global _current
    _current = resolve_backend(name)
    return _current


def _known() -> str:
    return f"{', '.join(BACKEND_MODULES)} or 'auto'"


def _env_backend_name() -> str:
    """The backend named by ``$BACKPROP_BACKEND`` (``"auto"`` when unset or empty), checked against the known
    names without importing any backend: a ``ValueError`` naming the variable, its value and the known
    backends otherwise. Run once at ``import backprop``; whether the named backend works here is only known
    when :func:`get_backend` first loads it."""
    value = os.environ.get(ENV_VAR, "")
    key = value.strip().lower() or "auto"
    if key != "auto" and key not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {value!r} in environment variable {ENV_VAR}; known: {_known()} "
                         "(unset it for 'auto')")
    return key


def get_backend() -> Backend:
    """The active backend (initially ``$BACKPROP_BACKEND``, else ``"auto"``)."""
    global _current
    if _current is None:
        name = _env_backend_name()
        try:
            backend = resolve_backend(name)
        except ValueError as exc:
            raise ValueError(f"environment variable {ENV_VAR}={os.environ.get(ENV_VAR, '')!r}: {exc}") from None
        _current = backend
    return _current


@contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Activate ``name`` inside a ``with`` block; the previous backend comes back on exit."""
    global _current
    previous = _current
    backend = resolve_backend(name)
    _current = backend
    try:
        yield backend
    finally:
        _current = previous


_env_backend_name()  # a bad $BACKPROP_BACKEND fails at import, naming the variable (nothing optional imported)
