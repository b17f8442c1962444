"""scikit-learn estimators: :class:`MLPClassifier` and :class:`MLPRegressor`, trained by backprop's kernels.

Drop-in replacements for ``sklearn.neural_network.MLPClassifier`` / ``MLPRegressor`` with all three solvers
(``"adam"``, ``"sgd"``, ``"lbfgs"``): the same constructor parameters, the same fitted attributes, the same
training procedure (initialization, shuffling, L2 penalty, stopping rules and early stopping all follow
scikit-learn's, drawn from ``random_state`` in the same order), computed on any backprop backend::

    from backprop.sklearn import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=50, random_state=0).fit(X, y)
    clf.predict(X), clf.predict_proba(X), clf.score(X, y), clf.loss_curve_, clf.coefs_

Extra parameters: ``backend`` (a backend name; default the active one at fit time) and ``dtype``
(``"float32"``, ``"float64"``, or ``None``: like scikit-learn, float32 for float32 ``X`` and float64
otherwise); ``activation`` also takes backprop's hidden activations (``"leaky_relu"``, ``"elu"``, ``"selu"``,
``"softplus"``, ``"gelu"``, ``"silu"``) and the regressor's ``loss`` also ``"absolute_error"`` and ``"huber"``.

Mapping of ``alpha``: scikit-learn minimizes, per minibatch of ``B`` samples,
``E_batch + alpha / (2 B) * sum ||W||^2`` (biases not penalized), whose gradient adds ``(alpha / B) W``.
backprop's optimizers add ``weight_decay * W`` to the weight gradient (coupled L2, not AdamW), so each
minibatch is trained with ``weight_decay = alpha / B``, its own size (the last, smaller batch of an
epoch included): the same gradient, step for step. ``loss_curve_`` includes the penalty as scikit-learn's
does (with the weights before each step), and the regression loss is averaged over outputs as scikit-learn
reports it, while the gradient, like scikit-learn's, is that of the squared error summed over outputs.

``solver="lbfgs"``: SciPy's L-BFGS-B minimizes scikit-learn's full-batch objective ``E + alpha / (2 n) * sum
||W||^2`` over all ``n`` samples (the regression loss again averaged over outputs while its gradient is that of
the sum, as scikit-learn hands them to SciPy), with scikit-learn's options (``maxiter=max_iter``,
``maxfun=max_fun``, ``gtol=tol``); the network computes the loss and gradient on its backend, in its dtype
(float32 networks hand SciPy float32 results as float64), over the parameters packed into one float64 vector as
scikit-learn packs them. As in scikit-learn: ``n_iter_`` and ``loss_`` come from SciPy's result, a
``ConvergenceWarning`` says when it stopped on ``max_iter`` or ``max_fun`` (or any other way than convergence),
there is no ``loss_curve_``, ``best_loss_``, ``validation_scores_`` nor ``best_validation_score_``,
``partial_fit`` does not exist (``AttributeError``), and ``early_stopping``, ``batch_size``, ``shuffle`` and the
learning-rate parameters play no part. Here a loss or gradient that is not finite is a ``ValueError``
(scikit-learn would hand it to SciPy), and ``verbose`` prints scikit-learn's ``Iteration k, loss = ...`` line
after each iteration.

Failures: a ``fit`` or ``partial_fit`` that raises, whatever the cause (a parameter, the data, the backend, a
divergence), leaves the estimator exactly as it was before the call: its fitted attributes, its optimizer's
state and its network's parameters, bit for bit (an estimator that was not fitted stays unfitted).

Divergence: a step whose loss, gradient or update is not finite is never applied, so the parameters stay finite.
Without early stopping the fit stops there with scikit-learn's ``ValueError`` ("Solver produced non-finite
parameter weights. ...") and the estimator is put back as it was. With early stopping nothing is raised, as in
scikit-learn: that epoch's loss and validation score are NaN, a ``ConvergenceWarning`` says where training
diverged, and the weights of the best validation score (the initial ones if no epoch beat them) are restored.
scikit-learn carries its NaN weights on to ``max_iter``; here training stops at the divergence, so ``n_iter_``
counts the diverged epoch last.

The regressor's ``loss="poisson"`` is scikit-learn's: an ``exp`` output and half the Poisson deviance, from the
logits (``delta = (y - t) / batch``); its targets must be non-negative.

``sample_weight`` (``fit``, ``partial_fit``): as scikit-learn's, the loss is the weighted mean over each batch
(``sum_i w_i L_i / sum w``, each row's delta scaled by its weight in the kernels) and the L2 penalty is
``alpha / (2 sum w) ||W||^2``; early stopping splits the weights with the data and scores with them. Weights must
be finite and non-negative. With ``alpha > 0`` the stochastic solvers read ``||W||^2`` back once per step.

Agreement: with ``dtype="float64"`` the parameters, ``loss_curve_``, ``n_iter_`` and validation scores follow
scikit-learn's to rounding error (the tests check a relative 1e-9), and so do L-BFGS's parameters, ``loss_``
and ``n_iter_``, though L-BFGS magnifies rounding differences over many iterations (scikit-learn's own result
moves with the number of BLAS threads). Adam takes scikit-learn's step exactly (scikit-learn adds ``epsilon``
to ``sqrt(v)`` before the bias correction; each step hands backprop's Adam the equivalent ``eps``). SGD keeps
its momentum velocity in gradient units (``v <- mu v + g``, ``W <- W - lr v``), scikit-learn in step units
(``v <- mu v - lr g``): the same steps while the learning rate is constant, but when
``learning_rate="invscaling"`` or ``"adaptive"`` changes it, the change acts at once here and gradually through
the velocity there. The reported loss comes from the logits, without clipping
the probabilities. Pickling keeps the parameters and fitted attributes but not the optimizer's moments (a
``partial_fit`` after unpickling starts them afresh) nor the backend arrays (rebuilt on first use).

Threads: ``predict``, ``predict_proba`` and ``score`` may run in any number of threads at once; ``fit`` and
``partial_fit`` wait for the predictions under way, and a call on an estimator that another thread is fitting
raises :class:`~backprop.ConcurrentTrainingError` at once.

Importing this module imports scikit-learn; ``import backprop`` never does. Without scikit-learn (or SciPy) the
import is an ``ImportError`` saying what to install: ``pip install 'backprop-kernels[sklearn]'``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

try:
    import scipy.sparse as sp
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.preprocessing import LabelBinarizer
    from sklearn.utils import check_random_state, column_or_1d
    from sklearn.utils.metaestimators import available_if
    from sklearn.utils.multiclass import type_of_target, unique_labels
    from sklearn.utils.validation import _check_sample_weight, check_is_fitted
except ImportError as exc:
    raise ImportError(f"backprop.sklearn needs scikit-learn (and SciPy): pip install 'backprop-kernels[sklearn]' "
                      f"({type(exc).__name__}: {exc})", name=exc.name) from exc

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def validate_data(_estimator: Any, /, X: Any = "no_validation", y: Any = "no_validation", **kwargs: Any) -> Any:
        return _estimator._validate_data(X, y, **kwargs)


from .concurrency import exclusive, reading
from .lbfgs import FullBatchObjective, run_lbfgs, transposed_weights_order
from .losses import LOSSES
from .network import MLP, NonFiniteLossError
from .sklearn_data import cast_data, minibatches
from .sklearn_network import SYNC, build_network, initial_params, pull, synced_network
from .sklearn_params import OUT_NAMES, REGRESSION_LOSSES, check_params, check_regression_loss
from .sklearn_sgd import fit_stochastic, init_stochastic_state
from .staging import Batches

__all__ = ["MLPClassifier", "MLPRegressor"]

_PREDICT_CHUNK = 65536
#: rows per forward/backward pass of the L-BFGS objective (the gradient is summed over the chunks)
_LBFGS_CHUNK = 65536
_STOCHASTIC_SOLVERS = ("sgd", "adam")


# --------------------------------------------------------------------------- threads and failures
F = TypeVar("F", bound=Callable[..., Any])


def _fitting(what: str) -> Callable[[F], F]:
    """Decorate ``fit``/``partial_fit``: one thread at a time fits an estimator, waiting for the predictions
    under way and refusing new ones (:func:`backprop.concurrency.exclusive`), and a call that raises leaves
    the estimator exactly as it found it (:meth:`_BaseMLP._kept_on_failure`)."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(self: _BaseMLP, *args: Any, **kwargs: Any) -> Any:
            with exclusive(self, what), self._kept_on_failure():
                return fn(self, *args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap


def _predicting(fn: F) -> F:
    """Decorate a prediction: any number of threads at once, none while another thread fits the estimator
    (:func:`backprop.concurrency.reading`)."""
    @functools.wraps(fn)
    def run(self: _BaseMLP, *args: Any, **kwargs: Any) -> Any:
        with reading(self, fn.__name__):
            return fn(self, *args, **kwargs)

    return run  # type: ignore[return-value]


# --------------------------------------------------------------------------- base
class _BaseMLP(BaseEstimator):
    """The common machinery; use :class:`MLPClassifier` or :class:`MLPRegressor`."""

    _classifier = False

    def __init__(self, hidden_layer_sizes: Any = (100,), activation: str = "relu", *, solver: str = "adam",
                 alpha: float = 0.0001, batch_size: Any = "auto", learning_rate: str = "constant",
                 learning_rate_init: float = 0.001, power_t: float = 0.5, max_iter: int = 200,
                 loss: str = "log_loss", shuffle: bool = True, random_state: Any = None, tol: float = 1e-4,
                 verbose: Any = False, warm_start: bool = False, momentum: float = 0.9,
                 nesterovs_momentum: bool = True, early_stopping: bool = False, validation_fraction: float = 0.1,
                 beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8, n_iter_no_change: Any = 10,
                 max_fun: int = 15000, backend: str | None = None, dtype: Any = None) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.loss = loss
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.backend = backend
        self.dtype = dtype


    # ------------------------------------------------------------------ the network behind the estimator
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_net", None)
        state.pop("_optimizer", None)
        state.pop("_pushed", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._net = None
        self._optimizer = None
        self._pushed = None

    def _check_params(self) -> list[int]:
        return check_params(self)

    def _head(self) -> tuple[str, str]:  # (output activation, loss) in backprop's names
        raise NotImplementedError

    def _params_dtype(self) -> np.dtype:
        """The dtype of the fitted parameters: that of ``coefs_`` (which may have been set by hand)."""
        return np.dtype(self.coefs_[0].dtype)

    def _network(self) -> MLP:
        """The network holding ``coefs_``/``intercepts_`` on the backend (rebuilt after unpickling), with the
        current ``coefs_``/``intercepts_`` copied in (they are the estimator's parameters)."""
        with SYNC:
            return synced_network(self)

    def _forward(self, X: Any, net: MLP | None = None) -> np.ndarray:
        """Network output for validated ``X`` (dense or sparse), in chunks, as a NumPy array of ``X``'s
        floating dtype (float32 or float64, as scikit-learn returns), whatever dtype the network computes in."""
        net = self._network() if net is None else net
        k = net.backend.kernels
        out_dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
        outs = []
        for lo in range(0, X.shape[0], _PREDICT_CHUNK):
            chunk = X[lo:lo + _PREDICT_CHUNK]
            if sp.issparse(chunk):
                chunk = chunk.toarray()
            chunk = cast_data(chunk, net.dtype, first_row=lo)
            # a copy: forward_device returns the workspace's buffer, which the next chunk overwrites
            outs.append(np.array(k.to_host(net.forward_device(k.to_device(chunk, net.dtype))), dtype=out_dtype))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _validate_X(self, X: Any) -> Any:
        check_is_fitted(self)
        return validate_data(self, X, accept_sparse=["csr", "csc"], dtype=(np.float64, np.float32), reset=False)

    # ------------------------------------------------------------------ fitting
    @contextmanager
    def _kept_on_failure(self) -> Iterator[None]:
        """Run a fit; if it raises, put the estimator back as it was: every attribute (fitted or not, lists
        such as ``loss_curve_`` restored in place), the optimizer's state (:meth:`Optimizer.checkpoint`), and
        the network's parameters (``coefs_`` are pushed to it again on next use). A ``KeyboardInterrupt``
        inside the epochs is not a failure: the fit keeps what it learned, as scikit-learn does."""
        before = dict(self.__dict__)
        lists = {name: list(value) for name, value in before.items() if isinstance(value, list)}
        opt, net = before.get("_optimizer"), before.get("_net")
        restore = opt.checkpoint(net.backend.kernels) if opt is not None and net is not None else None
        try:
            yield
        except Exception:
            for name, items in lists.items():
                before[name][:] = items
            self.__dict__.clear()
            self.__dict__.update(before)
            if restore is not None:
                restore()
            if net is not None:
                self._pushed = None
            raise

    def _initialize(self, y: np.ndarray, layer_units: list[int], dtype: np.dtype) -> None:
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = y.shape[1]
        self.n_layers_ = len(layer_units)
        self.out_activation_ = OUT_NAMES[self._head()[0]]
        self.coefs_, self.intercepts_ = initial_params(self, layer_units, dtype)
        self._net = build_network(self, layer_units, dtype)
        self._optimizer = None
        # as scikit-learn: early stopping restores the initial weights if no epoch improves on them
        self._best_params = [(c.T.copy(), i.copy()) for c, i in zip(self.coefs_, self.intercepts_)]
        if self.solver in _STOCHASTIC_SOLVERS:
            init_stochastic_state(self)
        else:  # as scikit-learn, L-BFGS has no loss curve, best loss nor validation scores: none left from before
            for name in ("loss_curve_", "best_loss_", "validation_scores_", "best_validation_score_",
                         "_no_improvement_count"):
                self.__dict__.pop(name, None)

    def _fit(self, X: Any, y: Any, incremental: bool = False, sample_weight: Any = None) -> _BaseMLP:
        hidden = self._check_params()
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X, y = self._validate_input(X, y, incremental, reset=first_pass)
        if sample_weight is not None:  # scikit-learn's checks: one finite, non-negative weight per sample
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64)
            if not np.isfinite(sample_weight).all() or (sample_weight < 0).any():
                raise ValueError("sample_weight must hold finite, non-negative numbers")
        if y.ndim == 1:
            y = y.reshape(-1, 1)
        n_features = X.shape[1]
        layer_units = [n_features] + hidden + [y.shape[1]]
        self._random_state = check_random_state(self.random_state)
        dtype = self._params_dtype() if not first_pass else \
            np.dtype(self.dtype) if self.dtype is not None else X.dtype
        X = cast_data(X, dtype)  # before anything changes
        y = cast_data(np.asarray(y), dtype, "y")
        if first_pass:
            self._initialize(y, layer_units, dtype)
        else:
            units = [self.coefs_[0].shape[0]] + [c.shape[1] for c in self.coefs_]
            if units != layer_units:
                raise ValueError(f"the data needs layers {layer_units} but the fitted network has {units} "
                                 "(hidden_layer_sizes or the number of outputs changed); refit with "
                                 "warm_start=False")
            self.n_outputs_ = y.shape[1]
        net = self._network()
        dtype = net.dtype
        X = X.astype(dtype, copy=False)
        y = np.ascontiguousarray(y, dtype=dtype)
        if self.solver == "lbfgs":
            self._fit_lbfgs(net, X, y, sample_weight)
            return self
        try:
            fit_stochastic(self, net, X, y, incremental, sample_weight)
        except NonFiniteLossError as exc:
            raise ValueError("Solver produced non-finite parameter weights. The input data may contain large values "
                             f"and need to be preprocessed. ({exc}; learning_rate_init may be too large; the estimator "
                             "is left as it was before this fit.)") from exc
        pull(self)
        return self

    def _check_solver(self) -> bool:
        """``partial_fit`` exists only for the stochastic solvers (an ``AttributeError`` otherwise, as in
        scikit-learn, so that ``hasattr(est, "partial_fit")`` is false for ``solver="lbfgs"``)."""
        if self.solver not in _STOCHASTIC_SOLVERS:
            raise AttributeError(f"partial_fit is only available for stochastic optimizers. {self.solver} is not "
                                 "stochastic.")
        return True

    def _objective_scale(self) -> float:
        # scikit-learn reports the squared error averaged over outputs (its gradient is that of the sum); its
        # Poisson deviance is summed over them
        return 1.0 if self._classifier or self._head()[1] == "poisson" else 1.0 / self.n_outputs_

    def _fit_lbfgs(self, net: MLP, X: Any, y: np.ndarray, sample_weight: np.ndarray | None = None) -> None:
        """scikit-learn's L-BFGS fit: :func:`~backprop.lbfgs.run_lbfgs` on the full-batch objective (see
        :class:`_LbfgsObjective`) over the parameters packed into one float64 vector, stopping on ``tol`` (the
        projected gradient), ``max_iter`` iterations or ``max_fun`` evaluations. ``early_stopping`` and the
        minibatch parameters play no part, as in scikit-learn."""
        objective = _LbfgsObjective(net, X, y, float(self.alpha), self._objective_scale(), sample_weight)

        def report(iteration: int, xk: np.ndarray) -> bool:  # after each iteration, at its iterate
            if self.verbose:
                print(f"Iteration {iteration}, loss = {objective.value_at(xk):.8f}")
            return False

        self._optimizer = None
        try:
            run = run_lbfgs(objective, max_iter=self.max_iter, max_fun=self.max_fun, tol=self.tol,
                            after_iteration=report, keep_on_interrupt=True)
        finally:  # the network holds the run's end point (never a trial point of a line search)
            pull(self)
        if run.interrupted:
            warnings.warn("Training interrupted by user.", stacklevel=3)
        result = run.result
        if result is None:  # stopped early: the parameters are those of the latest iterate
            self.n_iter_ = run.iterations
            if run.failure is not None:
                raise ValueError("Solver produced non-finite parameter weights. The input data may contain large "
                                 f"values and need to be preprocessed. ({run.failure} after iteration "
                                 f"{run.iterations}; the estimator is left as it was before this fit.)") from run.failure
            self.loss_ = objective.value_at(run.x)
            return
        self.n_iter_ = min(int(result.nit), self.max_iter)
        self.loss_ = float(result.fun)
        if result.status != 0:  # scikit-learn's warning, word for word
            msg = result.message.decode() if isinstance(result.message, bytes) else str(result.message)
            text = f"lbfgs failed to converge after {self.n_iter_} iteration(s) (status={result.status}):\n{msg}\n"
            if self.n_iter_ == self.max_iter:
                text += f"\nIncrease the number of iterations to improve the convergence (max_iter={self.max_iter})."
            text += ("\nYou might also want to scale the data as shown in:\n"
                     "    https://scikit-learn.org/stable/modules/preprocessing.html")
            warnings.warn(text, ConvergenceWarning, stacklevel=3)

    def _loss_grad_lbfgs(self, packed_coef_inter: np.ndarray, X: Any, y: Any, sample_weight: Any = None,
                         *_buffers: Any) -> tuple[float, np.ndarray]:
        """The L-BFGS objective and its gradient at ``packed_coef_inter`` (the parameters packed as scikit-learn
        packs them), with scikit-learn's private signature (its work buffers, if given, are not used). As
        scikit-learn's, it leaves ``coefs_``/``intercepts_`` at ``packed_coef_inter``."""
        net = self._network()
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64)
        X = validate_data(self, X, accept_sparse=["csr", "csc"], dtype=(np.float64, np.float32), reset=False)
        y = np.asarray(y)
        y = cast_data(y.reshape(-1, 1) if y.ndim == 1 else y, net.dtype, "y")
        objective = _LbfgsObjective(net, cast_data(X, net.dtype), y, float(self.alpha), self._objective_scale(),
                                    sample_weight)
        try:
            return objective(packed_coef_inter)
        finally:
            pull(self)

    # ------------------------------------------------------------------ public
    @_fitting("fit")
    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> _BaseMLP:
        """Fit the model to data matrix ``X`` and target(s) ``y``, each sample weighted by ``sample_weight`` (the
        loss is the weighted mean, as scikit-learn's); returns ``self``. A fit that raises leaves the estimator
        as it was before the call."""
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    def _more_tags(self) -> dict[str, Any]:  # scikit-learn < 1.6
        return {"multioutput": not self._classifier, "multilabel": self._classifier}


# --------------------------------------------------------------------------- the L-BFGS objective
class _LbfgsObjective(FullBatchObjective):
    """scikit-learn's L-BFGS objective for SciPy, computed by the network on its backend: the
    :class:`~backprop.lbfgs.FullBatchObjective` with scikit-learn's parameters.

    ``f(theta) = scale * E(theta) + alpha / (2 n) * sum_l ||W^l||^2`` over the whole training set of ``n`` rows,
    with ``E`` the network's mean loss, and the gradient ``dE/dtheta + (alpha / n) W`` (biases not penalized);
    with sample weights ``E`` is the weighted mean and ``n`` their sum. ``scale`` is 1 for the classifiers and
    ``1 / n_outputs`` for the regressor: scikit-learn's objective reports the squared error averaged over the
    outputs while its gradient is that of their sum, and L-BFGS-B sees both.

    ``theta`` is a float64 vector packed as scikit-learn packs it (every ``coefs_[l]``, ``(n_in, n_out)``
    row-major, then every ``intercepts_[l]``); the network computes in its own dtype. The rows go through the
    network in chunks of ``_LBFGS_CHUNK`` (the loss and gradient summed over them on the host); dense data goes
    to the backend once (if it fits there), sparse data is densified a chunk at a time.
    """

    def __init__(self, net: MLP, X: Any, y: np.ndarray, alpha: float, scale: float,
                 sample_weight: np.ndarray | None = None) -> None:
        n = int(X.shape[0])
        total = n if sample_weight is None else float(np.sum(sample_weight))
        data = None if sp.issparse(X) else Batches(net.backend.kernels, X, y, net.dtype)
        rows = min(n, _LBFGS_CHUNK)

        if sample_weight is None:
            def chunks() -> Iterator[tuple[Any, ...]]:
                return minibatches(net, data, X, y, rows, None)
        else:  # w_i n / sum w, moved to the backend once
            k = net.backend.kernels
            scaled = np.asarray(sample_weight, dtype=np.float64) * (n / total)
            weights = [k.to_device(scaled[lo:lo + rows], net.dtype) for lo in range(0, n, rows)]

            def chunks() -> Iterator[tuple[Any, ...]]:
                return ((*chunk, w) for chunk, w in zip(minibatches(net, data, X, y, rows, None), weights))

        super().__init__(net, chunks, n, alpha, scale=scale, total=total, order=transposed_weights_order(net),
                         by_layer=True)


# --------------------------------------------------------------------------- classifier
class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier trained by backprop (scikit-learn API).

    Heads: two classes -> one sigmoid output with binary cross-entropy; more classes -> softmax with
    cross-entropy; a 2-D 0/1 ``y`` (multilabel) -> one sigmoid output per label with binary cross-entropy.
    Parameters and attributes are scikit-learn's (see ``sklearn.neural_network.MLPClassifier``) for the
    ``"adam"``, ``"sgd"`` and ``"lbfgs"`` solvers, plus ``backend`` and ``dtype``; see :mod:`backprop.sklearn`.

    Attributes: ``classes_``, ``coefs_`` / ``intercepts_`` (NumPy, ``coefs_[i]`` is ``(n_in, n_out)``),
    ``loss_``, ``loss_curve_``, ``best_loss_``, ``validation_scores_``, ``best_validation_score_`` (these four
    not with ``"lbfgs"``), ``n_iter_``, ``t_``, ``n_features_in_``, ``feature_names_in_``, ``n_layers_``,
    ``n_outputs_``, ``out_activation_``.
    """

    _classifier = True

    def __init__(self, hidden_layer_sizes: Any = (100,), activation: str = "relu", *, solver: str = "adam",
                 alpha: float = 0.0001, batch_size: Any = "auto", learning_rate: str = "constant",
                 learning_rate_init: float = 0.001, power_t: float = 0.5, max_iter: int = 200,
                 shuffle: bool = True, random_state: Any = None, tol: float = 1e-4, verbose: Any = False,
                 warm_start: bool = False, momentum: float = 0.9, nesterovs_momentum: bool = True,
                 early_stopping: bool = False, validation_fraction: float = 0.1, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-8, n_iter_no_change: Any = 10, max_fun: int = 15000,
                 backend: str | None = None, dtype: Any = None) -> None:
        super().__init__(
            hidden_layer_sizes=hidden_layer_sizes, activation=activation, solver=solver, alpha=alpha,
            batch_size=batch_size, learning_rate=learning_rate, learning_rate_init=learning_rate_init,
            power_t=power_t, max_iter=max_iter, loss="log_loss", shuffle=shuffle, random_state=random_state,
            tol=tol, verbose=verbose, warm_start=warm_start, momentum=momentum,
            nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
            validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
            n_iter_no_change=n_iter_no_change, max_fun=max_fun, backend=backend, dtype=dtype)

    def _head(self) -> tuple[str, str]:
        if self._label_binarizer.y_type_ == "multiclass":
            return "softmax", "cross_entropy"
        return "sigmoid", "bce"

    def _validate_input(self, X: Any, y: Any, incremental: bool, reset: bool) -> tuple[Any, np.ndarray]:
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if (not hasattr(self, "classes_")) or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError("warm_start can only be used where `y` has the same classes as in the "
                                     f"previous call to fit. Previously got {self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has {self.classes_}. "
                                 f"'y' has {classes}.")
        return X, self._label_binarizer.transform(y).astype(bool)

    def _val_targets(self, y_val: np.ndarray) -> np.ndarray:
        return self._label_binarizer.inverse_transform(y_val)

    def _score_raw(self, raw: np.ndarray, y_true: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
        return accuracy_score(y_true, self._labels(raw), sample_weight=sample_weight)

    def _labels(self, raw: np.ndarray) -> np.ndarray:
        if self.n_outputs_ == 1:
            raw = raw.ravel()
        return self._label_binarizer.inverse_transform(raw)

    @available_if(lambda est: est._check_solver())
    @_fitting("partial_fit")
    def partial_fit(self, X: Any, y: Any, classes: Any = None, sample_weight: Any = None) -> MLPClassifier:
        """One pass over ``(X, y)``; ``classes`` (all the labels) is required on the first call."""
        first = not hasattr(self, "classes_")
        if first:
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit.")
            self.classes_ = unique_labels(classes)
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
        elif classes is not None:
            if not np.array_equal(self.classes_, unique_labels(classes)):
                raise ValueError(f"`classes={classes!r}` is not the same as on last call to partial_fit, was: "
                                 f"{self.classes_!r}")
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)

    @_predicting
    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels (a 0/1 indicator matrix for multilabel ``y``)."""
        return self._labels(self._forward(self._validate_X(X)))

    @_predicting
    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)``, columns ordered as ``classes_``."""
        y_pred = self._forward(self._validate_X(X))
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        if y_pred.ndim == 1:
            return np.vstack([1 - y_pred, y_pred]).T
        return y_pred

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """``log(predict_proba(X))``."""
        proba = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(proba, out=proba)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


# --------------------------------------------------------------------------- regressor
class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor trained by backprop (scikit-learn API).

    Identity output with the squared error (``loss="squared_error"``; also ``"absolute_error"`` and
    ``"huber"``), or an exp output with half the Poisson deviance (``loss="poisson"``), any number of outputs.
    Parameters and attributes are scikit-learn's (see ``sklearn.neural_network.MLPRegressor``) for the ``"adam"``,
    ``"sgd"`` and ``"lbfgs"`` solvers, plus ``backend`` and ``dtype``; see :mod:`backprop.sklearn`.
    """

    def __init__(self, loss: str = "squared_error", hidden_layer_sizes: Any = (100,), activation: str = "relu", *,
                 solver: str = "adam", alpha: float = 0.0001, batch_size: Any = "auto",
                 learning_rate: str = "constant", learning_rate_init: float = 0.001, power_t: float = 0.5,
                 max_iter: int = 200, shuffle: bool = True, random_state: Any = None, tol: float = 1e-4,
                 verbose: Any = False, warm_start: bool = False, momentum: float = 0.9,
                 nesterovs_momentum: bool = True, early_stopping: bool = False, validation_fraction: float = 0.1,
                 beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8, n_iter_no_change: Any = 10,
                 max_fun: int = 15000, backend: str | None = None, dtype: Any = None) -> None:
        super().__init__(
            hidden_layer_sizes=hidden_layer_sizes, activation=activation, solver=solver, alpha=alpha,
            batch_size=batch_size, learning_rate=learning_rate, learning_rate_init=learning_rate_init,
            power_t=power_t, max_iter=max_iter, loss=loss, shuffle=shuffle, random_state=random_state,
            tol=tol, verbose=verbose, warm_start=warm_start, momentum=momentum,
            nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
            validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
            n_iter_no_change=n_iter_no_change, max_fun=max_fun, backend=backend, dtype=dtype)

    def _check_params(self) -> list[int]:
        check_regression_loss(self)
        return super()._check_params()

    def _head(self) -> tuple[str, str]:
        # the loss's own output where it has one (poisson: exp, as scikit-learn's), else the identity
        loss = REGRESSION_LOSSES[self.loss]
        outputs = LOSSES[loss].allowed_outputs
        return (outputs[0] if outputs else "identity"), loss

    def _validate_input(self, X: Any, y: Any, incremental: bool, reset: bool) -> tuple[Any, np.ndarray]:
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True, y_numeric=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if LOSSES[self._head()[1]].targets == "nonnegative" and np.any(np.asarray(y) < 0):  # before any change
            raise ValueError(f"Some value(s) of y are negative which is not allowed for loss={self.loss!r}.")
        return X, y

    def _val_targets(self, y_val: np.ndarray) -> np.ndarray:
        return y_val

    def _score_raw(self, raw: np.ndarray, y_true: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
        return r2_score(y_true, raw, sample_weight=sample_weight)

    @available_if(lambda est: est._check_solver())
    @_fitting("partial_fit")
    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None) -> MLPRegressor:
        """One pass over ``(X, y)``."""
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)

    @_predicting
    def predict(self, X: Any) -> np.ndarray:
        """Predicted values, ``(n_samples,)`` for one output, else ``(n_samples, n_outputs)``."""
        y_pred = self._forward(self._validate_X(X))
        return y_pred.ravel() if y_pred.shape[1] == 1 else y_pred

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
