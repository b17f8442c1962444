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

from collections.abc import Callable, Iterable
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
    """``theta -> (E(theta), dE/dtheta)`` over every row of the data, computed by ``net`` on its backend.

    ``chunks()`` yields the data as ``(rows, x, t)`` or ``(rows, x, t, weights)`` on the backend, ``n`` rows in
    all (``Batches.epoch`` in the stored order); ``weights`` are the rows' weights of ``output_error``, scaled so
    that they average 1 over all ``n`` rows (``w_i n / sum(w)``): ``E`` is then the weighted mean loss.
    ``theta`` is float64 in the layout of ``net.params``; the network computes in its own dtype (a float32
    network gets ``theta`` rounded to float32) and the results come back as float64.
    ``weight_decay`` adds ``(weight_decay / 2) ||W||^2`` on the weights, ``params[:net.n_weights]``.
    Subclasses that see ``theta`` in another order or add another penalty reuse :meth:`_checked`,
    :meth:`_passes` and :meth:`_finish`."""

    def __init__(self, net: MLP, chunks: Callable[[], Iterable[tuple[Any, ...]]], n: int,
                 weight_decay: float = 0.0) -> None:
        self.net, self.chunks, self.n = net, chunks, n
        self.weight_decay = weight_decay
        self.evaluations = 0
        self._last: tuple[np.ndarray, float] | None = None

    @classmethod
    def over(cls, net: MLP, data: Batches, chunk: int, weight_decay: float = 0.0) -> FullBatchObjective:
        """The objective over the rows of ``data``, ``chunk`` rows per pass."""
        rows = min(chunk, data.n)
        return cls(net, lambda: data.epoch(rows, None, None), data.n, weight_decay)

    def value_at(self, theta: np.ndarray) -> float:
        """``E(theta)``: that of the last evaluation when it was at ``theta``, else computed."""
        if self._last is not None and np.array_equal(self._last[0], theta):
            return self._last[1]
        return self(theta)[0]

    def _checked(self, theta: np.ndarray) -> np.ndarray:
        """``theta`` in the network's dtype, counted as an evaluation; not finite there: :class:`NonFiniteObjective`."""
        self.evaluations += 1
        with np.errstate(over="ignore", invalid="ignore"):
            cast = np.asarray(theta, dtype=np.float64).astype(self.net.dtype)
        if not np.isfinite(cast).all():
            raise NonFiniteObjective(f"at evaluation {self.evaluations} of the objective, the parameters asked for "
                                     f"were not finite in {self.net.dtype.name}")
        return cast

    def _passes(self) -> tuple[float, np.ndarray]:
        """The mean loss and its flat gradient (float64) over every chunk, at the network's parameters: one
        read of each per chunk. With one chunk, exactly the network's own; else the chunks' means weighted by
        their rows."""
        from . import step

        net = self.net
        k = net.backend.kernels
        parts = []
        for rows, x, t, *weights in self.chunks():
            value, _ = net.loss_and_grads_device(x, t, weights[0] if weights else None)
            grads = step.workspace(net, rows).grads
            parts.append((rows, float(k.to_host(value)), np.array(k.to_host(grads), dtype=np.float64)))
        if len(parts) == 1:
            return parts[0][1], parts[0][2]
        loss = sum(rows * value for rows, value, _ in parts) / self.n
        grad = parts[0][0] * parts[0][2]
        for rows, _, g in parts[1:]:
            grad += rows * g
        return loss, grad / self.n

    def _finish(self, theta: np.ndarray, value: float, grad: np.ndarray) -> tuple[float, np.ndarray]:
        if not (np.isfinite(value) and np.isfinite(grad).all()):
            what = f"the loss was {value}" if not np.isfinite(value) else \
                f"a gradient was not finite (loss {value:.6g})"
            raise NonFiniteObjective(f"at evaluation {self.evaluations} of the objective, {what}")
        self._last = (np.array(theta, dtype=np.float64, copy=True), float(value))
        return float(value), grad

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        net = self.net
        cast = self._checked(theta)
        net.set_flat_params(cast)
        loss, grad = self._passes()
        if self.weight_decay:
            weights = cast[:net.n_weights].astype(np.float64)
            loss += 0.5 * self.weight_decay * float(np.dot(weights, weights))
            grad[:net.n_weights] += self.weight_decay * weights
        return self._finish(theta, loss, grad)
