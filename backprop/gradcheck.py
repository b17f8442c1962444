"""Finite-difference check of backpropagation (the naive O(N^2) gradient, used as a test)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .validation import check_positive

if TYPE_CHECKING:
    from .network import MLP

__all__ = ["gradcheck", "numerical_grads"]


def numerical_grads(net: MLP, X: Any, T: Any, eps: float = 1e-5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Central differences ``dE/dp ~ (E(p + eps) - E(p - eps)) / (2 eps)`` for every parameter.

    One pair of forward passes per parameter: O(N) passes of O(N) each, the naive O(N^2) gradient.
    The default step 1e-5 balances truncation (``eps^2``) against rounding (``1e-16 / eps``) in float64.
    The network's parameters are restored exactly afterwards. ``eps`` must be positive and finite.
    """
    eps = check_positive(eps, "eps")
    params = net.get_params()
    out = []
    try:
        for li, (W, b) in enumerate(params):
            grads = []
            for which, P in (("W", W), ("b", b)):
                G = np.zeros(P.shape, dtype=np.float64)
                for idx in np.ndindex(P.shape):
                    old = P[idx]
                    P[idx] = old + eps
                    net.set_params(params)
                    up = net.loss(X, T)
                    P[idx] = old - eps
                    net.set_params(params)
                    down = net.loss(X, T)
                    P[idx] = old
                    G[idx] = (up - down) / (2 * eps)
                grads.append(G)
            out.append((grads[0], grads[1]))
    finally:
        net.set_params(params)
    return out


def gradcheck(net: MLP, X: Any, T: Any, eps: float = 1e-5) -> float:
    """Max relative error of :meth:`MLP.loss_and_grads` against central differences.

    For each parameter array ``P`` (every ``W^l`` and ``b^l``) the error is
    ``||g_bp - g_fd|| / max(||g_bp||, ||g_fd||, 1e-3 G)``, where ``G`` is the largest gradient norm of
    any array (the floor keeps an array whose true gradient vanishes, say a bias under MAE with balanced
    signs, from dividing rounding noise by zero); the result is the largest over all arrays. Use
    ``dtype="float64"`` networks: in float32 the differences themselves carry errors near 1e-3.
    """
    eps = check_positive(eps, "eps")
    _, grads = net.loss_and_grads(X, T)
    k = net.backend.kernels
    pairs = []
    for (dW, db), (nW, nb) in zip(grads, numerical_grads(net, X, T, eps)):
        pairs += [(np.asarray(k.to_host(dW), dtype=np.float64), nW), (np.asarray(k.to_host(db), dtype=np.float64), nb)]
    G = max(max(np.linalg.norm(a), np.linalg.norm(n)) for a, n in pairs)
    if G == 0:
        return 0.0
    return max(float(np.linalg.norm(a - n) / max(np.linalg.norm(a), np.linalg.norm(n), 1e-3 * G)) for a, n in pairs)
