"""Full-batch training by L-BFGS: SciPy's L-BFGS-B over the network's flat parameter buffer.

    E(theta) = (1 / n) sum_i L_i(theta) + (weight_decay / 2) sum_l ||W^l||^2

over all ``n`` training rows, and its gradient by backpropagation: each evaluation is one forward and
backward pass over the data (in chunks of :attr:`LBFGS.chunk` rows), with one read of the loss and of
the flat gradient per chunk. ``theta`` is the network's :attr:`~backprop.MLP.params` in its own layout
(every ``W``, then every ``b``), so an evaluation puts the iterate into the network in one copy and takes the
gradient out in one, with no array split or joined.

Use it through :meth:`backprop.MLP.fit` (``optimizer=LBFGS(...)``): each L-BFGS iteration is one epoch of
the :class:`~backprop.training.History` (loss, validation metrics, callbacks, early stopping), and
``epochs`` bounds the iterations. Needs SciPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .validation import check_positive

if TYPE_CHECKING:
    from .network import MLP
    from .staging import Batches

__all__ = ["LBFGS", "FullBatchObjective", "NonFiniteObjective"]


class NonFiniteObjective(FloatingPointError):
    """The objective or its gradient was not finite at a point L-BFGS-B asked for."""


@dataclass
class LBFGS:
    """Full-batch L-BFGS (SciPy's L-BFGS-B) for :meth:`backprop.MLP.fit`.

    - ``tol``: stop when the largest component of the projected gradient is at most ``tol`` (SciPy's ``gtol``);
    - ``max_fun``: at most this many evaluations of the objective (each a pass over the data);
    - ``memory``: the number of corrections kept (SciPy's ``maxcor``);
    - ``weight_decay``: L2 on the weights, ``(weight_decay / 2) ||W||^2`` added to the objective;
    - ``chunk``: rows per forward/backward pass (bounds the memory of an evaluation).

    ``fit``'s ``epochs`` bounds the iterations; ``batch_size``, ``shuffle``, ``schedule`` and ``graph`` play no
    part. The number of iterations run is ``steps``; ``evaluations`` counts the passes over the data.
    """

    tol: float = 1e-5
    max_fun: int = 15000
    memory: int = 10
    weight_decay: float = 0.0
    chunk: int = 65536

    def __post_init__(self) -> None:
        self.check()
        self.steps = 0
        self.evaluations = 0
        self.message = ""

    def check(self, dtype: Any = None) -> None:
        """Check every setting (a ``ValueError``/``TypeError`` naming it)."""
        self.tol = check_positive(self.tol, "tol", allow_zero=True)
        self.max_fun = check_positive(self.max_fun, "max_fun", integer=True)
        self.memory = check_positive(self.memory, "memory", integer=True)
        self.weight_decay = check_positive(self.weight_decay, "weight_decay", allow_zero=True)
        self.chunk = check_positive(self.chunk, "chunk", integer=True)


def scipy_minimize() -> Any:
    """``scipy.optimize.minimize``, or an ``ImportError`` that says what to install."""
    try:
        from scipy.optimize import minimize
    except ImportError as exc:  # pragma: no cover - SciPy comes with the test extras
        raise ImportError("the LBFGS optimizer needs SciPy: pip install scipy "
                          "(or pip install 'backprop-kernels[sklearn]')") from exc
    return minimize


class FullBatchObjective:
    """``theta -> (E(theta), dE/dtheta)`` over every row of ``data``, computed by ``net`` on its backend.

    ``theta`` is float64 in the layout of ``net.params``; the network computes in its own dtype (a float32
    network gets ``theta`` rounded to float32) and the results come back as float64. ``weight_decay`` adds
    ``(weight_decay / 2) ||W||^2`` on the weights, ``params[:net.n_weights]``."""

    def __init__(self, net: MLP, data: Batches, chunk: int, weight_decay: float = 0.0) -> None:
        self.net, self.data = net, data
        self.chunk = min(chunk, data.n)
        self.weight_decay = weight_decay
        self.evaluations = 0
        self._last: tuple[np.ndarray, float] | None = None

    def value_at(self, theta: np.ndarray) -> float:
        """``E(theta)``: that of the last evaluation when it was at ``theta``, else computed."""
        if self._last is not None and np.array_equal(self._last[0], theta):
            return self._last[1]
        return self(theta)[0]

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        from . import step

        net = self.net
        self.evaluations += 1
        with np.errstate(over="ignore", invalid="ignore"):
            cast = np.asarray(theta, dtype=np.float64).astype(net.dtype)
        if not np.isfinite(cast).all():
            raise NonFiniteObjective(f"at evaluation {self.evaluations}, the parameters asked for were not finite "
                                     f"in {net.dtype.name}")
        net._assign_flat(cast)
        k = net.backend.kernels
        loss, grad = 0.0, None
        for rows, x, t in self.data.epoch(self.chunk, None, None):
            value, _ = net.loss_and_grads_device(x, t)
            g = np.array(k.to_host(step.workspace(net, rows).grads), dtype=np.float64)
            loss += float(k.to_host(value)) * rows
            if grad is None:
                grad = g * rows
            else:
                grad += g * rows
        assert grad is not None
        loss /= self.data.n
        grad /= self.data.n
        if self.weight_decay:
            weights = cast[:net.n_weights].astype(np.float64)
            loss += 0.5 * self.weight_decay * float(np.dot(weights, weights))
            grad[:net.n_weights] += self.weight_decay * weights
        if not (np.isfinite(loss) and np.isfinite(grad).all()):
            what = f"the loss was {loss}" if not np.isfinite(loss) else f"a gradient was not finite (loss {loss:.6g})"
            raise NonFiniteObjective(f"at evaluation {self.evaluations}, {what}")
        self._last = (np.array(theta, dtype=np.float64, copy=True), loss)
        return loss, grad
