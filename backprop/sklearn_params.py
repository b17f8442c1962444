"""The scikit-learn estimators' constructor parameters: the names they accept (scikit-learn's activations and
losses mapped to backprop's) and the checks ``fit`` runs on them first, with scikit-learn's messages
(``The '<name>' parameter must be ...``)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from .activations import ACTIVATIONS
from .losses import LOSSES

__all__ = ["HIDDEN_ACTIVATIONS", "OUT_NAMES", "REGRESSION_LOSSES", "check_params", "check_regression_loss"]

#: scikit-learn's hidden activation names -> backprop's; backprop's own hidden activations also work.
SKLEARN_ACTIVATIONS = {a.sklearn_name: n for n, a in ACTIVATIONS.items() if a.sklearn_name and a.hidden}
HIDDEN_ACTIVATIONS = {**SKLEARN_ACTIVATIONS, **{n: n for n, s in ACTIVATIONS.items() if s.hidden and n != "step"}}
#: regressor loss -> backprop loss
REGRESSION_LOSSES = {x.sklearn_name: n for n, x in LOSSES.items() if x.sklearn_name}
#: backprop output activation -> scikit-learn's ``out_activation_`` name
OUT_NAMES = {n: a.sklearn_name for n, a in ACTIVATIONS.items() if a.sklearn_name}


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _need(cond: bool, name: str, value: Any, what: str) -> None:
    if not cond:
        raise ValueError(f"The '{name}' parameter must be {what}; got {value!r}.")


def _real_in(est: Any, name: str, lo: float, hi: float, lo_closed: bool, hi_closed: bool) -> None:
    v = getattr(est, name)
    if not _is_real(v) or not np.isfinite(v):
        raise (TypeError if not _is_real(v) else ValueError)(
            f"The '{name}' parameter must be a real number; got {v!r}.")
    ok = (v >= lo if lo_closed else v > lo) and (v <= hi if hi_closed else v < hi)
    interval = f"{'[' if lo_closed else '('}{lo}, {hi}{']' if hi_closed else ')'}"
    _need(ok, name, v, f"a float in the range {interval}")


def _positive_int(est: Any, name: str) -> None:
    v = getattr(est, name)
    if not _is_int(v):
        raise TypeError(f"The '{name}' parameter must be an int >= 1; got {v!r}.")
    _need(v >= 1, name, v, "an int >= 1")


def _hidden_sizes(value: Any) -> list[int]:
    sizes = [value] if _is_int(value) else value
    try:
        sizes = list(sizes)
    except TypeError:
        raise TypeError(f"The 'hidden_layer_sizes' parameter must be an int or a sequence of ints; "
                        f"got {value!r}.") from None
    for s in sizes:
        if not _is_int(s):
            raise TypeError(f"The 'hidden_layer_sizes' parameter must hold ints; got {value!r}.")
        if s <= 0:
            raise ValueError(f"hidden_layer_sizes must be > 0, got {sizes}.")
    return [int(s) for s in sizes]


def check_regression_loss(est: Any) -> None:
    """The regressor's ``loss``: one of scikit-learn's regression losses, or backprop's extra ones."""
    _need(isinstance(est.loss, str) and est.loss in REGRESSION_LOSSES, "loss", est.loss,
          f"a str among {sorted(REGRESSION_LOSSES)}")


def check_params(est: Any) -> list[int]:
    """Check every constructor parameter of ``est`` (a ``TypeError``/``ValueError`` naming the first wrong
    one); the hidden layer sizes."""
    hidden = _hidden_sizes(est.hidden_layer_sizes)
    _need(isinstance(est.activation, str) and est.activation in HIDDEN_ACTIVATIONS, "activation",
          est.activation, f"a str among {sorted(HIDDEN_ACTIVATIONS)}")
    _need(isinstance(est.solver, str) and est.solver in ("adam", "lbfgs", "sgd"), "solver", est.solver,
          "a str among {'adam', 'lbfgs', 'sgd'}")
    _real_in(est, "alpha", 0, np.inf, True, False)
    if not (isinstance(est.batch_size, str) and est.batch_size == "auto"):
        if not _is_int(est.batch_size):
            raise TypeError(f"The 'batch_size' parameter must be 'auto' or an int >= 1; got {est.batch_size!r}.")
        _need(est.batch_size >= 1, "batch_size", est.batch_size, "'auto' or an int >= 1")
    _need(est.learning_rate in ("constant", "invscaling", "adaptive"), "learning_rate", est.learning_rate,
          "a str among {'constant', 'invscaling', 'adaptive'}")
    _real_in(est, "learning_rate_init", 0, np.inf, False, False)
    _real_in(est, "power_t", 0, np.inf, True, False)
    _positive_int(est, "max_iter")
    _positive_int(est, "max_fun")
    _real_in(est, "tol", 0, np.inf, True, False)
    _real_in(est, "momentum", 0, 1, True, False)
    _real_in(est, "validation_fraction", 0, 1, False, False)
    _real_in(est, "beta_1", 0, 1, True, False)
    _real_in(est, "beta_2", 0, 1, True, False)
    _real_in(est, "epsilon", 0, np.inf, False, False)
    n = est.n_iter_no_change
    _need((_is_int(n) and n >= 1) or (_is_real(n) and n == np.inf), "n_iter_no_change", n,
          "an int >= 1 or numpy.inf")
    for name in ("shuffle", "warm_start", "nesterovs_momentum", "early_stopping"):
        v = getattr(est, name)
        _need(isinstance(v, (bool, np.bool_)), name, v, "a bool")
    _need(est.backend is None or isinstance(est.backend, str), "backend", est.backend, "None or a backend name")
    if est.dtype is not None:
        try:
            dt = np.dtype(est.dtype)
        except TypeError:
            dt = None
        _need(dt in (np.float32, np.float64), "dtype", est.dtype, "None, 'float32' or 'float64'")
    return hidden
