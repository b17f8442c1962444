"""Full-batch training by L-BFGS: SciPy's L-BFGS-B over the network's parameters, the one driver
(:func:`run_lbfgs`) and the one objective (:class:`FullBatchObjective`) of ``fit(optimizer=LBFGS(...))`` and of
the scikit-learn estimators' ``solver="lbfgs"``.

    E(theta) = scale * sum_i w_i L_i(theta) / sum_i w_i + (l2 / (2 total)) sum_l ||W^l||^2

over all ``n`` training rows (``w_i = 1`` without sample weights), and its gradient by backpropagation: each
evaluation is one forward and backward pass over the data (in chunks of :attr:`LBFGS.chunk` rows), with one
read of the loss and of the flat gradient per chunk. ``fit``'s objective is ``scale = 1``, ``l2 =
weight_decay``, ``total = 1``, with ``theta`` the network's :attr:`~backprop.MLP.params` in its own layout
(every ``W``, then every ``b``), so an evaluation puts the iterate into the network in one copy and takes the
gradient out in one, with no array split or joined; scikit-learn's is ``l2 = alpha``, ``total = sum_i w_i``,
with ``theta`` packed as its ``coefs_`` are (:func:`transposed_weights_order`).

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

__all__ = ["LBFGS", "FullBatchObjective", "LbfgsRun", "NonFiniteObjective", "run_lbfgs", "transposed_weights_order"]


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


def transposed_weights_order(net: MLP) -> np.ndarray:
    """The permutation ``perm`` with ``packed[i] = params[perm[i]]`` that packs the parameters as scikit-learn
    packs its ``coefs_``/``intercepts_``: every ``W^l`` transposed, ``(n_in, n_out)`` row by row, then every ``b^l``.
    Each layer's weights stay one contiguous piece, at the same place as in :attr:`~backprop.MLP.params`."""
    from . import step

    W_idx, b_idx = step.flat_views(np.arange(net.n_params), [(L.n_out, L.n_in) for L in net.layers])
    return np.concatenate([W.T.ravel() for W in W_idx] + list(b_idx))


class FullBatchObjective:
    """``theta -> (E(theta), dE/dtheta)`` over every row of the data, computed by ``net`` on its backend (the
    module's ``E``).

    ``chunks()`` yields the data as ``(rows, x, t)`` or ``(rows, x, t, weights)`` on the backend, ``n`` rows in
    all (``Batches.epoch`` in the stored order); ``weights`` are the rows' weights of ``output_error``, scaled so
    that they average 1 over all ``n`` rows (``w_i n / sum(w)``): the loss is then the weighted mean.
    ``theta`` is float64, in the layout of ``net.params`` or, given ``order``, packed as ``theta[i] =
    params[order[i]]``; the network computes in its own dtype (a float32 network gets ``theta`` rounded to
    float32) and the results come back as float64. The penalty ``(l2 / (2 total)) ||W||^2`` is on the weights,
    ``theta[:net.n_weights]``, its sum taken over them at once or, with ``by_layer``, layer by layer."""

    def __init__(self, net: MLP, chunks: Callable[[], Iterable[tuple[Any, ...]]], n: int,
                 weight_decay: float = 0.0, *, scale: float = 1.0, total: float = 1.0,
                 order: np.ndarray | None = None, by_layer: bool = False) -> None:
        self.net, self.chunks, self.n = net, chunks, n
        self.weight_decay, self.scale, self.total = weight_decay, scale, total
        self.order = order
        self.n_weights = net.n_weights
        ends = np.cumsum([L.n_out * L.n_in for L in net.layers]).tolist() if by_layer else [net.n_weights]
        self._weight_blocks = list(zip([0] + ends[:-1], ends))
        self.evaluations = 0
        self._last: tuple[np.ndarray, float] | None = None

    @classmethod
    def over(cls, net: MLP, data: Batches, chunk: int, weight_decay: float = 0.0) -> FullBatchObjective:
        """``fit``'s objective over the rows of ``data``, ``chunk`` rows per pass."""
        rows = min(chunk, data.n)
        return cls(net, lambda: data.epoch(rows, None, None), data.n, weight_decay)

    def start(self) -> np.ndarray:
        """The network's parameters as ``theta`` (float64, in this objective's order)."""
        flat = np.array(self.net.backend.kernels.to_host(self.net.params), dtype=np.float64)
        return flat if self.order is None else flat[self.order]

    def put(self, theta: np.ndarray) -> None:
        """Put ``theta`` (finite in the network's dtype) into the network: one copy (after one scatter into the
        network's layout when ``theta`` is packed in another order)."""
        net = self.net
        if self.order is None:
            net.set_flat_params(theta)
            return
        flat = np.empty(net.n_params, dtype=net.dtype)
        flat[self.order] = theta
        net.set_flat_params(flat)

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
        cast = self._checked(theta)
        self.put(cast)
        loss, grad = self._passes()
        value = self.scale * loss
        if self.order is not None:
            grad = grad[self.order]
        if self.weight_decay:
            weights = cast[:self.n_weights].astype(np.float64, copy=False)
            squares = 0.0
            for lo, hi in self._weight_blocks:
                squares += np.dot(weights[lo:hi], weights[lo:hi])
            value += (0.5 * self.weight_decay) * squares / self.total
            grad[:self.n_weights] += (self.weight_decay / self.total) * weights
        return self._finish(theta, value, grad)


@dataclass
class LbfgsRun:
    """How a :func:`run_lbfgs` ended: ``x``, the point the network holds afterwards (SciPy's result, else the
    latest iterate: the starting point before the first iteration); ``iterations`` completed; ``result``,
    SciPy's ``OptimizeResult`` when it returned; ``failure``, the :class:`NonFiniteObjective` that ended it;
    ``interrupted``, whether a ``KeyboardInterrupt`` did."""

    x: np.ndarray
    iterations: int = 0
    result: Any = None
    failure: NonFiniteObjective | None = None
    interrupted: bool = False


def run_lbfgs(objective: FullBatchObjective, *, max_iter: int, max_fun: int, tol: float, memory: int = 10,
              after_iteration: Callable[[int, np.ndarray], bool] | None = None,
              keep_on_interrupt: bool = False) -> LbfgsRun:
    """Minimize ``objective`` by SciPy's L-BFGS-B from the network's parameters: at most ``max_iter`` iterations
    and ``max_fun`` evaluations, stopping when the projected gradient is at most ``tol`` (``gtol``), with
    ``memory`` corrections (``maxcor``).

    ``after_iteration(k, theta_k)`` runs after iteration ``k`` (from 1) at its iterate; returning ``True`` ends
    the run there. A :class:`NonFiniteObjective` ends the run at the latest iterate (``run.failure``), and so
    does a ``KeyboardInterrupt`` with ``keep_on_interrupt`` (``run.interrupted``; otherwise it propagates).
    Whichever way the run ends, the network is left holding ``run.x``, never a trial point of a line search."""
    minimize = scipy_minimize()
    run = LbfgsRun(x=objective.start())

    def iteration_done(xk: np.ndarray) -> None:  # SciPy calls it after each iteration, at the new iterate
        run.x = np.array(xk, dtype=np.float64, copy=True)
        run.iterations += 1
        if after_iteration is not None and after_iteration(run.iterations, xk):
            raise StopIteration

    try:
        run.result = minimize(objective, run.x, method="L-BFGS-B", jac=True, callback=iteration_done,
                              options={"maxiter": max_iter, "maxfun": max_fun, "maxcor": memory, "gtol": tol})
        run.x = run.result.x
    except NonFiniteObjective as exc:
        run.failure = exc
    except KeyboardInterrupt:
        if not keep_on_interrupt:
            raise
        run.interrupted = True
    finally:
        objective.put(run.x)
    return run
