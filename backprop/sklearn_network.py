"""The network behind a scikit-learn estimator, and its parameters both ways.

The estimator's parameters are its ``coefs_[l]`` (``(n_in, n_out)``, as scikit-learn has them) and
``intercepts_[l]``; the network holds them on the backend as ``W^l = coefs_[l]^T`` and ``b^l``. The network is
built on first use (after unpickling, after ``set_params(backend=...)``), given the current ``coefs_`` only when
they differ from those it was last given (compared on the host), and read back into ``coefs_`` after training.
Initial parameters are drawn as scikit-learn draws them.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .backend import get_backend, resolve_backend
from .network import MLP
from .sklearn_params import HIDDEN_ACTIVATIONS

__all__ = ["build_network", "initial_params", "pull", "synced_network"]

#: Held while an estimator's network is (re)built or given its ``coefs_``: two threads predicting at once
#: would otherwise both do it.
SYNC = threading.RLock()


def build_network(est: Any, layer_units: list[int], dtype: np.dtype) -> MLP:
    """A new network for ``est``: its head, hidden activation and backend (default: the active one)."""
    out, loss = est._head()
    backend = resolve_backend(est.backend) if est.backend is not None else get_backend()
    return MLP(layer_units, activation=HIDDEN_ACTIVATIONS[est.activation], output=out, loss=loss,
               dtype=dtype, seed=0, backend=backend.name)


def synced_network(est: Any) -> MLP:
    """``est``'s network holding its current ``coefs_``/``intercepts_`` (rebuilt after unpickling or on another
    backend); the caller holds :data:`SYNC`."""
    net = getattr(est, "_net", None)
    if net is not None and est.backend is not None and resolve_backend(est.backend).name != net.backend.name:
        net = est._net = est._optimizer = None  # set_params(backend=...) after fitting: move over
    if net is None:
        units = [est.coefs_[0].shape[0]] + [c.shape[1] for c in est.coefs_]
        net = est._net = build_network(est, units, np.dtype(est.coefs_[0].dtype))
        est._pushed = None
    if not _in_sync(est):
        net.set_params([(np.asarray(W).T, b) for W, b in zip(est.coefs_, est.intercepts_)])
        _remember_pushed(est)
    return net


def _in_sync(est: Any) -> bool:
    """Whether the network already holds ``coefs_``/``intercepts_`` (compared on the host: far cheaper than
    copying them to the backend again at every ``predict``)."""
    pushed = getattr(est, "_pushed", None)
    current = list(est.coefs_) + list(est.intercepts_)
    return pushed is not None and len(pushed) == len(current) and all(
        np.shape(a) == b.shape and np.array_equal(a, b) for a, b in zip(current, pushed))


def _remember_pushed(est: Any) -> None:
    est._pushed = [np.array(a, copy=True) for a in list(est.coefs_) + list(est.intercepts_)]


def pull(est: Any) -> None:
    """Copy the network's parameters into ``coefs_`` (``(n_in, n_out)``, as scikit-learn has them) and
    ``intercepts_``."""
    params = est._net.get_params()
    est.coefs_ = [np.ascontiguousarray(W.T) for W, _ in params]
    est.intercepts_ = [b for _, b in params]
    _remember_pushed(est)


def initial_params(est: Any, layer_units: list[int], dtype: np.dtype) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """scikit-learn's initialization (Glorot et al.), drawn in the same order from ``est._random_state``:
    ``coefs_``, ``intercepts_`` uniform in ``+-sqrt(factor / (fan_in + fan_out))`` (``factor`` 2 for the
    logistic activation, else 6)."""
    factor = 2.0 if est.activation in ("logistic", "sigmoid") else 6.0
    coefs, intercepts = [], []
    for fan_in, fan_out in zip(layer_units[:-1], layer_units[1:]):
        bound = np.sqrt(factor / (fan_in + fan_out))
        coef = est._random_state.uniform(-bound, bound, (fan_in, fan_out))
        intercept = est._random_state.uniform(-bound, bound, fan_out)
        coefs.append(coef.astype(dtype, copy=False))
        intercepts.append(intercept.astype(dtype, copy=False))
    return coefs, intercepts
