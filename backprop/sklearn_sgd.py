"""The scikit-learn estimators' ``"sgd"`` and ``"adam"`` solvers: scikit-learn's epochs on the epoch runner
(:func:`backprop.epochs.run_epochs`).

What scikit-learn does is done here in its order and with its random numbers: the validation split of
``early_stopping`` (``train_test_split`` from ``random_state``, stratified for one output), the shuffle of each
epoch (``sklearn.utils.shuffle`` of the row numbers), the minibatches (``gen_batches``), and its bookkeeping:
``n_iter_`` (epochs of this call), ``t_`` (samples seen), ``loss_``, ``loss_curve_``, ``best_loss_``,
``validation_scores_``, ``best_validation_score_`` and ``_no_improvement_count``, the ``tol`` /
``n_iter_no_change`` stopping rule (``learning_rate="adaptive"`` divides the rate by 5 instead), the
``invscaling`` rate, the ``max_iter`` ``ConvergenceWarning`` and ``verbose``'s lines. Each step is set up to
take scikit-learn's step (:meth:`ScikitLearnEpochs.prepare_step`); see :mod:`backprop.sklearn`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import gen_batches
from sklearn.utils import shuffle as sk_shuffle

from . import step
from .epochs import run_epochs
from .network import MLP, NonFiniteLossError
from .optimizers import SGD, Adam, Optimizer
from .progress import should_show
from .sklearn_data import minibatches
from .staging import Batches
from .step import GuardState

__all__ = ["ScikitLearnEpochs", "fit_stochastic", "init_stochastic_state"]

#: How far up the stack the warnings of an epoch point: to the estimator's ``fit``/``partial_fit``, as those
#: raised while setting the fit up (``stacklevel=3`` in :func:`fit_stochastic`).
_EPOCH_STACKLEVEL = 5


def init_stochastic_state(est: Any) -> None:
    """The fitted attributes of the stochastic solvers, as a fresh fit starts them."""
    est.loss_curve_ = []
    est._no_improvement_count = 0
    if est.early_stopping:
        est.validation_scores_ = []
        est.best_validation_score_ = -np.inf
        est.best_loss_ = None
    else:
        est.best_loss_ = np.inf
        est.validation_scores_ = None
        est.best_validation_score_ = None


def _make_optimizer(est: Any) -> Optimizer:
    if est.solver == "sgd":
        return SGD(lr=est.learning_rate_init, momentum=est.momentum,
                   nesterov=bool(est.nesterovs_momentum and est.momentum > 0))
    return Adam(lr=est.learning_rate_init, beta1=est.beta_1, beta2=est.beta_2, eps=est.epsilon)


def _split(est: Any, X: Any, y: np.ndarray, sample_weight: np.ndarray | None) -> tuple[Any, ...]:
    """``(X_train, y_train, sw_train, X_val, y_val, sw_val)``: with ``early_stopping``, scikit-learn's split
    (the weights going along; ``y_val`` as the scorer takes it), else every row for training."""
    if not est.early_stopping:
        return X, y, sample_weight, None, None, None
    # on the binarized labels as booleans, as scikit-learn does (its messages name classes 'True'/'False')
    stratify = y.astype(bool) if (est._classifier and est.n_outputs_ == 1) else None
    if sample_weight is None:
        X_train, X_val, y_train, y_val = train_test_split(
            X, y, random_state=est._random_state, test_size=est.validation_fraction, stratify=stratify)
        sw_train = sw_val = None
    else:  # the same split, the weights going along
        X_train, X_val, y_train, y_val, sw_train, sw_val = train_test_split(
            X, y, sample_weight, random_state=est._random_state, test_size=est.validation_fraction,
            stratify=stratify)
    if X_val.shape[0] < 2:
        raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size of "
                         "your dataset.")
    return X_train, y_train, sw_train, X_val, est._val_targets(y_val), sw_val


def _batch_size(est: Any, n_samples: int) -> int:
    if est.batch_size == "auto":
        return min(200, n_samples)
    if est.batch_size > n_samples:
        warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped",
                      stacklevel=4)
    return int(np.clip(est.batch_size, 1, n_samples))


def fit_stochastic(est: Any, net: MLP, X: Any, y: np.ndarray, incremental: bool,
                   sample_weight: np.ndarray | None = None) -> None:
    """Train ``est``'s network by its stochastic solver: up to ``max_iter`` epochs (one for ``partial_fit``),
    as scikit-learn's ``_fit_stochastic``. A step that is not finite is a
    :class:`~backprop.network.NonFiniteLossError` without early stopping; ``KeyboardInterrupt`` keeps what was
    learned, with a warning; early stopping leaves the weights of the best validation score."""
    if not hasattr(est, "loss_curve_"):  # a warm start or partial_fit after an L-BFGS fit
        init_stochastic_state(est)
    if not incremental or getattr(est, "_optimizer", None) is None:
        est._optimizer = _make_optimizer(est)
    if est.early_stopping and incremental:
        raise ValueError("partial_fit does not support early_stopping=True")
    if est.early_stopping and est.validation_scores_ is None:  # warm start of a fit made without early stopping
        est.validation_scores_, est.best_validation_score_, est.best_loss_ = [], -np.inf, None
    if not est.early_stopping and est.best_loss_ is None:  # warm start of a fit made with early stopping
        est.best_loss_ = np.inf
    X_train, y_train, sw_train, X_val, y_val, sw_val = _split(est, X, y, sample_weight)
    batch_size = _batch_size(est, X_train.shape[0])
    # verbose: a bar on a terminal outside CI (the rule of fit's progress=None), else scikit-learn's lines
    bar = None
    if est.verbose and not incremental and should_show(None):
        from .training import _ProgressBar

        bar = _ProgressBar(est.max_iter, desc=type(est).__name__)
    epochs = ScikitLearnEpochs(est, net, (X_train, y_train, sw_train), (X_val, y_val, sw_val), batch_size,
                               incremental, bar is not None)
    est.n_iter_ = 0  # as scikit-learn: epochs of this call (loss_curve_ and t_ accumulate)
    try:
        run_epochs(epochs, est._optimizer, net.backend.kernels, est.max_iter, epochs.steps_per_epoch, bar)
    except KeyboardInterrupt:
        warnings.warn("Training interrupted by user.", stacklevel=3)
    finally:
        if bar is not None:
            bar.close()
    if est.early_stopping and est._best_params is not None:
        net.set_params(est._best_params)


class ScikitLearnEpochs:
    """scikit-learn's policy for :func:`~backprop.epochs.run_epochs` (module docstring). ``train``: ``(X, y,
    sample_weight)`` of the training rows; ``val``: the same of the validation rows (``None`` each without
    early stopping); ``with_bar``: whether a bar shows the epochs (``verbose``'s stop line then goes to stderr)."""

    def __init__(self, est: Any, net: MLP, train: tuple[Any, np.ndarray, np.ndarray | None],
                 val: tuple[Any, Any, np.ndarray | None], batch_size: int, incremental: bool, with_bar: bool) -> None:
        self.est, self.net, self.opt = est, net, est._optimizer
        self.X, self.y, self.sample_weight = train
        self.val = val
        self.batch_size, self.incremental, self.with_bar = batch_size, incremental, with_bar
        self.kernels = k = net.backend.kernels
        self.n = int(self.X.shape[0])
        self.sample_idx = np.arange(self.n, dtype=int)
        # dense data goes to the backend once; sparse data is densified and copied a minibatch at a time
        self.data = None if sp.issparse(self.X) else Batches(k, self.X, self.y, net.dtype)
        self.alpha = float(est.alpha)
        self.scale = est._objective_scale()
        self.steps_per_epoch = -(-self.n // batch_size)
        self.penalty: Any = None

    def begin_epoch(self, epoch: int) -> np.ndarray | None:
        """The epoch's shuffle, and a fresh device-side sum of its L2 penalties: the losses and the penalties
        of its steps are summed on the backend and read once, at its end."""
        if self.est.shuffle:
            self.sample_idx = sk_shuffle(self.sample_idx, random_state=self.est._random_state)
        self.penalty = self.kernels.zeros((1,), np.float64)
        return self.sample_idx if self.est.shuffle else None

    def steps(self, order: np.ndarray | None, guard: step.Guard) -> Iterator[int]:
        net, k, sw = self.net, self.kernels, self.sample_weight
        batch_rows = gen_batches(self.n, self.batch_size)
        for B, xb, tb in minibatches(net, self.data, self.X, self.y, self.batch_size, order):
            rows = next(batch_rows)
            weights, total = None, float(B)
            if sw is not None:  # the batch's weights w: sum_i w_i L_i / sum w, each delta by w_i
                w = sw[order[rows] if order is not None else rows]
                total = float(w.sum())
                weights = k.to_device(w * (B / total), net.dtype)
            self.prepare_step(total, B / total)
            step.train_step(net, step.workspace(net, B), xb, tb, self.opt, guard, weight=B * self.scale,
                            weights=weights)
            yield B

    def prepare_step(self, batch: float, factor: float = 1.0) -> None:
        """Set the optimizer up for the next step so that it takes scikit-learn's step, and add the step's
        ``factor * ||W||^2`` (before the update) to the epoch's penalty sum.

        L2: scikit-learn's penalty ``alpha / (2 B) ||W||^2`` on a batch of ``B`` is weight decay ``alpha / B``;
        with sample weights ``B`` is the batch's sum of weights, and the epoch's loss counts the penalty
        ``B_rows / sum w`` times (``factor``): then ``||W||^2`` is read back to the host, one read per step.
        Adam: scikit-learn steps ``lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)``; backprop's kernel
        steps ``lr / (1 - b1^t) m / (sqrt(v / (1 - b2^t)) + eps')``, the same step for
        ``eps' = eps / sqrt(1 - b2^t)``.
        """
        opt, alpha = self.opt, self.alpha
        opt.weight_decay = alpha / batch
        if isinstance(opt, Adam):
            opt.eps = float(self.est.epsilon) / np.sqrt(1.0 - float(self.est.beta_2) ** (opt.steps + 1))
        if alpha:
            k, weights = self.kernels, self.net.param_pieces[0]
            if factor == 1.0:
                k.add_sum_of_squares(self.penalty, weights)
            else:
                one = k.zeros((1,), np.float64)
                k.add_sum_of_squares(one, weights)
                self.penalty[0] += factor * float(k.to_host(one)[0])

    def read(self, guard: step.Guard, epoch: int) -> GuardState:
        return guard.read()

    def diverged(self, epoch: int, state: GuardState, order: np.ndarray | None) -> None:
        """Without early stopping: :class:`~backprop.network.NonFiniteLossError`. With it, as scikit-learn: the
        diverged epoch scores NaN, and the best weights are restored. Every later epoch would be NaN as well
        (scikit-learn carries NaN weights on to ``max_iter``); here the parameters never left the last finite
        step, and training stops."""
        est = self.est
        where = (f"at iteration {est.n_iter_ + 1}, step {state.failed_step}, the loss, a gradient or the "
                 "update was not finite; that step was not applied")
        if not est.early_stopping:
            raise NonFiniteLossError(where)
        est.n_iter_ += 1
        est.t_ += self.n
        est.loss_ = float("nan")
        est.loss_curve_.append(est.loss_)
        est.validation_scores_.append(float("nan"))
        warnings.warn(f"Training diverged: {where}. Stopping, and restoring the weights of the best "
                      f"validation score ({est.best_validation_score_:.6g}).", ConvergenceWarning,
                      stacklevel=_EPOCH_STACKLEVEL)

    def record(self, epoch: int, state: GuardState) -> None:
        """``loss_``: the epoch's mean loss with the L2 penalty, as scikit-learn reports it."""
        est = self.est
        accumulated = state.loss_sum
        if self.alpha:
            accumulated += 0.5 * self.alpha * float(self.kernels.to_host(self.penalty)[0])
        est.n_iter_ += 1
        est.loss_ = accumulated / self.n
        est.t_ += self.n
        est.loss_curve_.append(est.loss_)

    def validate(self, epoch: int) -> None:
        """scikit-learn's ``_update_no_improvement_count``: the validation score (early stopping) or the
        training loss against the best by more than ``tol``."""
        est = self.est
        if est.early_stopping:
            score = self._val_score()
            est.validation_scores_.append(score)
            if score < est.best_validation_score_ + est.tol:
                est._no_improvement_count += 1
            else:
                est._no_improvement_count = 0
            if score > est.best_validation_score_:
                est.best_validation_score_ = score
                est._best_params = self.net.get_params()
        else:
            if est.loss_curve_[-1] > est.best_loss_ - est.tol:
                est._no_improvement_count += 1
            else:
                est._no_improvement_count = 0
            if est.loss_curve_[-1] < est.best_loss_:
                est.best_loss_ = est.loss_curve_[-1]

    def _val_score(self) -> float:
        X_val, y_val, sw_val = self.val
        raw = self.est._forward(X_val, self.net)
        if not np.isfinite(raw).all():
            return np.nan
        return float(self.est._score_raw(raw, y_val, sw_val))

    def metrics(self) -> dict[str, str]:
        post = {"loss": f"{self.est.loss_:.4g}"}
        if self.est.early_stopping:
            post["val_score"] = f"{self.est.validation_scores_[-1]:.4f}"
        return post

    def log(self) -> None:
        if self.est.verbose:
            print(f"Iteration {self.est.n_iter_}, loss = {self.est.loss_:.8f}")

    def should_stop(self, epoch: int) -> bool:
        """The ``invscaling`` rate; the ``tol`` / ``n_iter_no_change`` rule (``adaptive``: the rate divided by 5
        instead, while above 1e-6); one epoch for ``partial_fit``; the ``max_iter`` warning."""
        est, opt = self.est, self.opt
        if est.solver == "sgd" and est.learning_rate == "invscaling":
            opt.lr = float(est.learning_rate_init) / (est.t_ + 1) ** est.power_t
        if est._no_improvement_count > est.n_iter_no_change:
            what = "Validation score" if est.early_stopping else "Training loss"
            msg = f"{what} did not improve more than tol={est.tol:f} for {est.n_iter_no_change} consecutive epochs."
            if est.solver == "sgd" and est.learning_rate == "adaptive" and opt.lr > 1e-6:
                opt.lr /= 5.0
                est._no_improvement_count = 0
                if est.verbose:
                    print(f"{msg} Setting learning rate to {opt.lr:f}")
            else:
                if est.verbose:
                    print(f"{msg} Stopping.", file=sys.stderr if self.with_bar else sys.stdout)
                return True
        if self.incremental:
            return True
        if est.n_iter_ == est.max_iter:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({est.max_iter}) reached and the "
                          "optimization hasn't converged yet.", ConvergenceWarning, stacklevel=_EPOCH_STACKLEVEL + 1)
        return False
