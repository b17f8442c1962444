"""The naive gradient: one forward pass per parameter, the O(N^2) baseline backpropagation replaces.

Each parameter is nudged in place on the backend's own array, the loss re-evaluated with the lean
inference pass (:meth:`MLP.forward_device`) and the loss kernel, and the parameter put back: no host
round trip, no validation, nothing but the ``N + 1`` forward passes the method needs.

:func:`fd_gradient` runs all of them (the measurement at small ``N``). :func:`fd_pass_op` gives one
such pass at a time, cycling over randomly drawn parameters, so that the cost of a pass can be timed
at sizes where all ``N + 1`` would take hours: the cost of the whole is then ``(N + 1)`` passes, every
pass being the same forward pass of the same net whichever parameter it nudges.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..kernels.registry import FUSED_PAIRS

if TYPE_CHECKING:
    from ..network import MLP

__all__ = ["FDTimeout", "default_step", "fd_gradient", "fd_pass_op", "relative_error"]


class FDTimeout(TimeoutError):
    """A finite-difference run passed its deadline (the parameters were restored)."""


def default_step(dtype: Any) -> float:
    """Forward-difference step ``sqrt(machine epsilon)``: 3.5e-4 in float32, 1.5e-8 in float64."""
    return float(np.sqrt(np.finfo(np.dtype(dtype)).eps))


def _loss_fn(net: MLP, x: Any, t: Any) -> Callable[[], Any]:
    out, loss = net.output, net.loss_fn
    if (out.name, loss.name) in FUSED_PAIRS:
        raise ValueError("the finite-difference baseline reads the loss from the output only; "
                         "fused output/loss pairs need the logits")
    k = net.backend.kernels

    def loss_value() -> Any:
        y = net.forward_device(x)
        value, _ = k.output_error(y, y, t, out.name, loss.name, loss.param, out.alpha)
        return value

    return loss_value


def _gather(values: list[Any], net: MLP) -> np.ndarray:
    """Device scalars to one host vector, in one transfer where the array module can stack them."""
    k = net.backend.kernels
    try:
        return np.asarray(k.to_host(net.backend.xp.stack(values)), dtype=np.float64).reshape(-1)
    except Exception:  # noqa: BLE001 - a backend whose scalars do not stack: one at a time
        return np.array([float(k.to_host(v)) for v in values], dtype=np.float64)


def _flat_params(net: MLP) -> list[tuple[Any, np.ndarray, tuple[int, ...]]]:
    """``(flat view on the backend array, host copy, shape)`` for ``W^1, b^1, W^2, ...``."""
    k = net.backend.kernels
    out = []
    for layer in net.layers:
        for arr in (layer.W, layer.b):
            flat = arr.reshape(-1)
            out.append((flat, np.array(k.to_host(flat), dtype=np.float64), tuple(arr.shape)))
    return out


def fd_gradient(net: MLP, x: Any, t: Any, h: float | None = None,
                deadline: float | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Forward differences ``(E(p + h) - E(p)) / h`` for every weight and bias of ``net``.

    ``x`` and ``t`` are on the backend (as for :meth:`MLP.loss_and_grads_device`). ``N + 1`` forward
    passes; each parameter is restored exactly (from a host copy) after its pass. Past ``deadline``
    (a ``time.perf_counter()`` value) it stops with :class:`FDTimeout`.
    """
    if h is None:
        h = default_step(net.dtype)
    loss_value = _loss_fn(net, x, t)
    k = net.backend.kernels
    base = loss_value()
    values: list[Any] = []
    params = _flat_params(net)
    for flat, host, _shape in params:
        try:
            for i in range(host.size):
                flat[i] = host[i] + h
                values.append(loss_value())
                flat[i] = host[i]
                if deadline is not None and not i % 256 and time.perf_counter() > deadline:
                    raise FDTimeout("finite differences passed their time limit")
        finally:
            flat[:] = k.to_device(host, net.dtype)
    e = _gather([base, *values], net)
    g = (e[1:] - e[0]) / h
    arrays, pos = [], 0
    for _flat, host, shape in params:
        arrays.append(g[pos:pos + host.size].reshape(shape))
        pos += host.size
    return [(arrays[i], arrays[i + 1]) for i in range(0, len(arrays), 2)]


def fd_pass_op(net: MLP, x: Any, t: Any, h: float | None = None, seed: int = 0,
               draws: int = 4096) -> tuple[Callable[[], Any], Callable[[], None]]:
    """One finite-difference pass per call (nudge a parameter, forward pass and loss, restore), cycling
    over ``draws`` parameters drawn uniformly from all ``N``; returns ``(op, restore)``."""
    if h is None:
        h = default_step(net.dtype)
    loss_value = _loss_fn(net, x, t)
    params = _flat_params(net)
    sizes = np.array([host.size for _f, host, _s in params])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    picks = np.random.default_rng(seed).integers(0, int(offsets[-1]), size=draws)
    which = np.searchsorted(offsets, picks, side="right") - 1
    plan = [(params[a][0], int(p - offsets[a]), float(params[a][1][p - offsets[a]])) for a, p in zip(which, picks)]
    state = {"i": 0}

    def op() -> Any:
        flat, j, old = plan[state["i"]]
        state["i"] = (state["i"] + 1) % len(plan)
        flat[j] = old + h
        value = loss_value()
        flat[j] = old
        return value

    def restore() -> None:
        k = net.backend.kernels
        for flat, host, _shape in params:
            flat[:] = k.to_device(host, net.dtype)

    return op, restore


def relative_error(a: list[tuple[Any, Any]], b: list[tuple[Any, Any]], to_host: Any = np.asarray) -> float:
    """``||a - b|| / max(||a||, ||b||)`` over all parameters together."""
    va = np.concatenate([np.asarray(to_host(p), dtype=np.float64).ravel() for pair in a for p in pair])
    vb = np.concatenate([np.asarray(to_host(p), dtype=np.float64).ravel() for pair in b for p in pair])
    scale = max(np.linalg.norm(va), np.linalg.norm(vb))
    return float(np.linalg.norm(va - vb) / scale) if scale > 0 else 0.0
