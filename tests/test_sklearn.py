"""backprop.sklearn: scikit-learn's own estimator checks, and step-for-step agreement with scikit-learn's
MLPClassifier / MLPRegressor."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

import scipy.sparse as sp  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import make_classification, make_multilabel_classification, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.neural_network import MLPClassifier as SkMLPClassifier  # noqa: E402
from sklearn.neural_network import MLPRegressor as SkMLPRegressor  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from backprop.backend import available_backends, resolve_backend  # noqa: E402
from backprop.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

from .conftest import switching_often, tolerance  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

#: float32 GEMMs (BLAS) round a row's result differently depending on where the row sits in the batch, so
#: predictions on a permuted or sliced X can differ in the last bit, beyond these checks' rtol=1e-7.
FLOAT32_ROW_ORDER = "float32 BLAS rounds a row differently by its position in the batch (last-bit differences)"
CPU_BACKENDS = [n for n in available_backends() if not resolve_backend(n).is_gpu]


def expected_failed_checks(estimator) -> dict[str, str]:
    if estimator.dtype is not None and np.dtype(estimator.dtype) == np.float32:
        return {"check_methods_sample_order_invariance": FLOAT32_ROW_ORDER,
                "check_methods_subset_invariance": FLOAT32_ROW_ORDER}
    return {}


CHECKED = [
    MLPClassifier(max_iter=20, backend="numpy"),
    MLPRegressor(max_iter=20, backend="numpy"),
    MLPClassifier(max_iter=20, solver="sgd", learning_rate_init=0.01, activation="tanh", backend="numpy"),
    MLPRegressor(max_iter=20, dtype="float32", backend="numpy"),
    MLPClassifier(max_iter=20, solver="lbfgs", backend="numpy"),
    MLPRegressor(max_iter=20, solver="lbfgs", backend="numpy"),
]


@parametrize_with_checks(CHECKED, expected_failed_checks=expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# --------------------------------------------------------------------------- import hygiene
def test_import_backprop_never_imports_sklearn():
    code = ("import sys, backprop, backprop.training, backprop.callbacks, backprop.schedules, backprop.datasets, "
            "backprop.demo; bad = sorted(m for m in sys.modules if m == 'sklearn' or m.startswith('sklearn.')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- agreement with scikit-learn
def _close(ours, theirs, **tol):
    tol = tol or dict(rtol=1e-9, atol=1e-12)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, **tol)


def _pair(ours_cls, sk_cls, **kw):
    return ours_cls(dtype="float64", backend="numpy", **kw), sk_cls(**kw)


def _classification(task):
    if task == "multilabel":
        return make_multilabel_classification(150, 6, n_classes=3, random_state=0)
    return make_classification(157, 6, n_informative=4, n_classes=2 if task == "binary" else 4, random_state=0)


@pytest.mark.parametrize("solver", ["adam", "sgd"])
@pytest.mark.parametrize("alpha", [0.0, 1e-2])
@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_classifier_follows_sklearn_step_for_step(solver, alpha, task):
    X, y = _classification(task)
    kw = dict(hidden_layer_sizes=(9, 5), activation="tanh", solver=solver, alpha=alpha, batch_size=40,
              learning_rate_init=0.01, max_iter=12, random_state=3)
    ours, theirs = _pair(MLPClassifier, SkMLPClassifier, **kw)
    ours.fit(X, y)
    theirs.fit(X, y)
    _close(ours.coefs_, theirs.coefs_)
    _close(ours.intercepts_, theirs.intercepts_)
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-9)
    assert ours.n_iter_ == theirs.n_iter_ and ours.t_ == theirs.t_
    assert ours.out_activation_ == theirs.out_activation_
    assert ours.n_outputs_ == theirs.n_outputs_ and ours.n_layers_ == theirs.n_layers_
    np.testing.assert_array_equal(ours.classes_, theirs.classes_)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
    assert ours.score(X, y) == theirs.score(X, y)


@pytest.mark.parametrize("solver,learning_rate,momentum", [
    ("adam", "constant", 0.9), ("sgd", "constant", 0.5), ("sgd", "invscaling", 0.0), ("sgd", "adaptive", 0.0),
])
def test_regressor_follows_sklearn_with_stopping_rules(solver, learning_rate, momentum):
    # (with momentum, a changing learning rate acts at once here but through the velocity in scikit-learn)
    X, y = make_regression(120, 5, n_targets=3, noise=1.0, random_state=0)
    y = y / 100
    kw = dict(hidden_layer_sizes=(7,), solver=solver, learning_rate=learning_rate, learning_rate_init=0.01,
              alpha=1e-3, max_iter=60, tol=1e-2, n_iter_no_change=2, random_state=1, momentum=momentum)
    ours, theirs = _pair(MLPRegressor, SkMLPRegressor, **kw)
    ours.fit(X, y)
    theirs.fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_ < 60  # the tol rule stopped both at the same epoch
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-9)
    assert ours.best_loss_ == pytest.approx(theirs.best_loss_, rel=1e-9)
    _close(ours.coefs_, theirs.coefs_)
    np.testing.assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
@pytest.mark.parametrize("kind", ["classifier", "regressor", "early_stopping"])
@pytest.mark.parametrize("alpha", [0.0, 1e-2])
def test_sample_weight_follows_sklearn(solver, kind, alpha):
    """fit(X, y, sample_weight=w): the weighted mean loss (and the penalty over the sum of the weights), step for
    step as scikit-learn's, with early stopping splitting the weights along and scoring with them."""
    rng = np.random.default_rng(1)
    if kind == "classifier":
        X, y = make_classification(97, 5, n_informative=3, n_classes=3, random_state=0)
        pair = (MLPClassifier, SkMLPClassifier)
    else:
        X, y = make_regression(97, 5, n_targets=2, noise=1.0, random_state=0)
        y = y / 100
        pair = (MLPRegressor, SkMLPRegressor)
    w = rng.uniform(0.1, 3.0, size=len(X))
    kw = dict(hidden_layer_sizes=(6,), activation="tanh", solver=solver, alpha=alpha, batch_size=20,
              learning_rate_init=0.01, max_iter=6, random_state=2, early_stopping=kind == "early_stopping")
    ours, theirs = _pair(*pair, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours.fit(X, y, sample_weight=w)
        theirs.fit(X, y, sample_weight=w)
    _close(ours.coefs_, theirs.coefs_)
    _close(ours.intercepts_, theirs.intercepts_)
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-9) and ours.n_iter_ == theirs.n_iter_
    if solver != "lbfgs":
        np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-9)
    if kind == "early_stopping" and solver != "lbfgs":
        np.testing.assert_allclose(ours.validation_scores_, theirs.validation_scores_, rtol=1e-9)


def test_sample_weight_in_partial_fit_and_bad_weights():
    X, y = make_regression(40, 3, random_state=0)
    w = np.linspace(0.5, 2.0, 40)
    kw = dict(hidden_layer_sizes=(4,), solver="sgd", learning_rate_init=1e-3, random_state=0)
    ours, theirs = _pair(MLPRegressor, SkMLPRegressor, **kw)
    for _ in range(3):
        ours.partial_fit(X, y / 100, sample_weight=w)
        theirs.partial_fit(X, y / 100, sample_weight=w)
    _close(ours.coefs_, theirs.coefs_)
    est = MLPRegressor(max_iter=2, backend="numpy")
    for bad, match in ((w[:5], "sample"), (-w, "non-negative"), (np.full(40, np.nan), "finite|NaN")):
        with pytest.raises(ValueError, match=match):
            est.fit(X, y, sample_weight=bad)
        assert not hasattr(est, "coefs_")


@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
@pytest.mark.parametrize("n_targets", [1, 2])
def test_poisson_regressor_follows_sklearn(solver, n_targets):
    """loss="poisson": an exp output, half the Poisson deviance summed over outputs, as scikit-learn's."""
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(90, 3))
    y = rng.poisson(np.exp(X @ rng.uniform(-1, 1, size=(3, n_targets)) + 0.5)).astype(float)
    y = y.ravel() if n_targets == 1 else y
    kw = dict(loss="poisson", hidden_layer_sizes=(6,), activation="tanh", solver=solver, alpha=1e-3,
              learning_rate_init=0.01, batch_size=30, max_iter=8, random_state=2)
    ours, theirs = _pair(MLPRegressor, SkMLPRegressor, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours.fit(X, y)
        theirs.fit(X, y)
    assert ours.out_activation_ == theirs.out_activation_ == "exp"
    _close(ours.coefs_, theirs.coefs_)
    _close(ours.intercepts_, theirs.intercepts_)
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-9)
    np.testing.assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-9)
    with pytest.raises(ValueError, match="negative which is not allowed for loss='poisson'"):
        MLPRegressor(loss="poisson", max_iter=2, backend="numpy").fit(X, -y)


@pytest.mark.parametrize("cls,sk_cls", [(MLPClassifier, SkMLPClassifier), (MLPRegressor, SkMLPRegressor)])
def test_early_stopping_follows_sklearn(cls, sk_cls):
    if cls is MLPClassifier:
        X, y = make_classification(300, 8, n_informative=5, n_classes=2, flip_y=0.3, random_state=0)
    else:
        X, y = make_regression(300, 8, noise=30.0, random_state=0)
        y = y / 100
    kw = dict(hidden_layer_sizes=(32,), early_stopping=True, validation_fraction=0.2, n_iter_no_change=3,
              max_iter=200, learning_rate_init=0.01, random_state=0)
    ours, theirs = _pair(cls, sk_cls, **kw)
    ours.fit(X, y)
    theirs.fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_ < 200
    np.testing.assert_allclose(ours.validation_scores_, theirs.validation_scores_, rtol=1e-9)
    assert ours.best_validation_score_ == pytest.approx(theirs.best_validation_score_, rel=1e-12)
    assert ours.best_loss_ is None and theirs.best_loss_ is None
    _close(ours.coefs_, theirs.coefs_)  # both restored the parameters of the best validation score


def test_partial_fit_and_warm_start_follow_sklearn():
    X, y = make_classification(90, 5, n_informative=3, n_classes=3, random_state=0)
    kw = dict(hidden_layer_sizes=(6,), learning_rate_init=0.02, random_state=0, batch_size=25)
    ours, theirs = _pair(MLPClassifier, SkMLPClassifier, **kw)
    for i in range(3):
        ours.partial_fit(X[30 * i:30 * i + 30], y[30 * i:30 * i + 30], classes=[0, 1, 2])
        theirs.partial_fit(X[30 * i:30 * i + 30], y[30 * i:30 * i + 30], classes=[0, 1, 2])
    _close(ours.coefs_, theirs.coefs_)
    assert ours.n_iter_ == theirs.n_iter_ == 1 and ours.t_ == theirs.t_ == 90
    ours.set_params(warm_start=True, max_iter=4)
    theirs.set_params(warm_start=True, max_iter=4)
    ours.fit(X, y)
    theirs.fit(X, y)
    _close(ours.coefs_, theirs.coefs_)
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-9)


# --------------------------------------------------------------------------- L-BFGS
STOCHASTIC_ONLY = ("loss_curve_", "best_loss_", "validation_scores_", "best_validation_score_")


def _same_lbfgs_fit(ours, theirs, X):
    _close(ours.coefs_, theirs.coefs_)
    _close(ours.intercepts_, theirs.intercepts_)
    assert ours.n_iter_ == theirs.n_iter_
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-9)
    assert ours.t_ == theirs.t_ == 0
    for name in STOCHASTIC_ONLY:
        assert not hasattr(ours, name) and not hasattr(theirs, name), name
    predict = "predict_proba" if hasattr(theirs, "predict_proba") else "predict"
    np.testing.assert_allclose(getattr(ours, predict)(X), getattr(theirs, predict)(X), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 1e-2])
@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_lbfgs_classifier_follows_sklearn(name, alpha, task):
    X, y = _classification(task)
    kw = dict(hidden_layer_sizes=(9, 5), activation="tanh", solver="lbfgs", alpha=alpha, max_iter=15,
              random_state=3)
    ours = MLPClassifier(dtype="float64", backend=name, **kw).fit(X, y)
    theirs = SkMLPClassifier(**kw).fit(X, y)
    _same_lbfgs_fit(ours, theirs, X)
    assert ours.out_activation_ == theirs.out_activation_ and ours.n_outputs_ == theirs.n_outputs_
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 1e-2])
@pytest.mark.parametrize("n_targets", [1, 2])
def test_lbfgs_regressor_follows_sklearn(name, alpha, n_targets):
    X, y = make_regression(120, 5, n_targets=n_targets, noise=1.0, random_state=0)
    kw = dict(hidden_layer_sizes=(7, 4), solver="lbfgs", alpha=alpha, max_iter=15, random_state=1)
    ours = MLPRegressor(dtype="float64", backend=name, **kw).fit(X, y / 100)
    theirs = SkMLPRegressor(**kw).fit(X, y / 100)
    _same_lbfgs_fit(ours, theirs, X)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_lbfgs_converges_on_tol_like_sklearn(name):
    """The regression loss reported averaged over the outputs while its gradient is that of their sum, as
    scikit-learn hands them to SciPy: the same iterates, and the same stop on ``tol`` before ``max_iter``."""
    X, y = make_regression(120, 5, n_targets=2, noise=1.0, random_state=0)
    kw = dict(hidden_layer_sizes=(7,), solver="lbfgs", alpha=1e-3, tol=1e-2, max_iter=100, random_state=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        ours = MLPRegressor(dtype="float64", backend=name, **kw).fit(X, y / 100)
        theirs = SkMLPRegressor(**kw).fit(X, y / 100)
    assert ours.n_iter_ < 100
    _same_lbfgs_fit(ours, theirs, X)


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel", "regression"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_lbfgs_objective_is_sklearns(task, alpha):
    """scikit-learn's private ``_loss_grad_lbfgs`` (its own tests call it): the same value and gradient."""
    if task == "regression":
        X, y = make_regression(60, 5, n_targets=3, random_state=0)
        y = y / 100
    else:
        X, y = _classification(task)
    cls, sk_cls = (MLPRegressor, SkMLPRegressor) if task == "regression" else (MLPClassifier, SkMLPClassifier)
    ours, theirs = _pair(cls, sk_cls, hidden_layer_sizes=(6, 4), solver="lbfgs", alpha=alpha, max_iter=1,
                         random_state=0)
    ours.fit(X, y)
    theirs.fit(X, y)
    Y = (y if task == "regression" else theirs._label_binarizer.transform(y)).reshape(len(X), -1)
    # (small enough that no probability comes near 0 or 1, where scikit-learn's loss clips them)
    theta = np.random.default_rng(0).normal(scale=0.3, size=sum(c.size for c in ours.coefs_ + ours.intercepts_))
    buffers = ([X] + [None] * 3, [None] * 3, [np.empty_like(c) for c in theirs.coefs_],
               [np.empty_like(b) for b in theirs.intercepts_])
    f_theirs, g_theirs = theirs._loss_grad_lbfgs(theta, X, Y, None, *buffers)
    f_ours, g_ours = ours._loss_grad_lbfgs(theta, X, Y)
    assert f_ours == pytest.approx(f_theirs, rel=1e-13)
    np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-12, atol=1e-14)
    _close(ours.coefs_, theirs.coefs_, rtol=0, atol=0)  # both left at theta


def test_lbfgs_warns_like_sklearn_when_it_stops_on_max_iter_or_max_fun():
    X, y = _classification("multiclass")
    for limits, reason in [(dict(max_iter=3), "ITERATIONS REACHED LIMIT"),
                           (dict(max_fun=7), "F,G EVALUATIONS EXCEEDS LIMIT")]:
        kw = dict(hidden_layer_sizes=(8,), solver="lbfgs", random_state=0, **limits)
        with pytest.warns(ConvergenceWarning, match=reason) as ours_warned:
            ours = MLPClassifier(backend="numpy", **kw).fit(X, y)
        with pytest.warns(ConvergenceWarning) as theirs_warned:
            theirs = SkMLPClassifier(**kw).fit(X, y)
        assert [str(w.message) for w in ours_warned] == [str(w.message) for w in theirs_warned]
        assert ours.n_iter_ == theirs.n_iter_ <= limits.get("max_iter", 7)


def test_lbfgs_max_fun_is_checked_before_anything_changes():
    X, y = _classification("binary")
    clf = MLPClassifier(hidden_layer_sizes=(4,), solver="lbfgs", max_iter=5, backend="numpy").fit(X, y)
    before = [c.copy() for c in clf.coefs_ + clf.intercepts_], clf.n_iter_, clf.loss_
    for bad, error in [(0, ValueError), (-3, ValueError), (1.5, TypeError), (True, TypeError), ("10", TypeError)]:
        clf.set_params(max_fun=bad, max_iter=50)
        with pytest.raises(error, match="'max_fun' parameter must be an int >= 1"):
            clf.fit(X[::-1], y[::-1])
        _close(clf.coefs_ + clf.intercepts_, before[0], rtol=0, atol=0)
        assert (clf.n_iter_, clf.loss_) == before[1:]
    assert MLPRegressor().max_fun == MLPClassifier().max_fun == SkMLPClassifier().max_fun == 15000


def test_lbfgs_has_no_partial_fit_and_ignores_early_stopping():
    for est in (MLPClassifier(solver="lbfgs"), MLPRegressor(solver="lbfgs")):
        assert not hasattr(est, "partial_fit")
        with pytest.raises(AttributeError, match="has no attribute 'partial_fit'") as info:
            est.partial_fit
        assert "partial_fit is only available for stochastic optimizers. lbfgs" in str(info.value.__cause__)
        assert hasattr(est.set_params(solver="sgd"), "partial_fit")
    X, y = _classification("binary")
    kw = dict(hidden_layer_sizes=(5,), solver="lbfgs", max_iter=10, random_state=0, backend="numpy")
    plain = MLPClassifier(**kw).fit(X, y)
    early = MLPClassifier(early_stopping=True, validation_fraction=0.3, **kw).fit(X, y)
    _close(early.coefs_, plain.coefs_, rtol=0, atol=0)
    assert not any(hasattr(early, name) for name in STOCHASTIC_ONLY)


def test_lbfgs_warm_start_and_switching_solvers():
    X, y = _classification("multiclass")
    kw = dict(hidden_layer_sizes=(6,), solver="lbfgs", max_iter=6, warm_start=True, random_state=0)
    ours, theirs = _pair(MLPClassifier, SkMLPClassifier, **kw)
    for _ in range(2):  # the second fit goes on from the first one's parameters
        ours.fit(X, y)
        theirs.fit(X, y)
        _close(ours.coefs_, theirs.coefs_)
        assert ours.n_iter_ == theirs.n_iter_ == 6
    # on to Adam from the L-BFGS parameters (scikit-learn has no loss curve to go on with there)
    ours.set_params(solver="adam", max_iter=3)
    ours.partial_fit(X, y)
    assert len(ours.loss_curve_) == 1 and ours.best_loss_ == ours.loss_curve_[0] and ours.t_ == len(X)
    # a fresh L-BFGS fit leaves nothing of the stochastic solver's attributes behind
    ours.set_params(solver="lbfgs", warm_start=False)
    ours.fit(X, y)
    assert not any(hasattr(ours, name) for name in STOCHASTIC_ONLY) and ours.t_ == 0


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_lbfgs_sparse_and_chunked_rows_match_one_dense_pass(name, monkeypatch):
    import backprop.sklearn as bsk

    X, y = make_regression(90, 12, n_targets=2, random_state=0)
    X[np.abs(X) < 0.8] = 0
    kw = dict(hidden_layer_sizes=(5,), solver="lbfgs", alpha=1e-2, max_iter=10, random_state=0, dtype="float64",
              backend=name)
    dense = MLPRegressor(**kw).fit(X, y / 100)
    sparse = MLPRegressor(**kw).fit(sp.csr_matrix(X), y / 100)
    _close(sparse.coefs_, dense.coefs_)
    monkeypatch.setattr(bsk, "_LBFGS_CHUNK", 16)  # 90 rows in chunks of 16: the chunks' losses and gradients summed
    for X_fit in (X, sp.csc_matrix(X)):
        chunked = MLPRegressor(**kw).fit(X_fit, y / 100)
        _close(chunked.coefs_, dense.coefs_)
        assert chunked.n_iter_ == dense.n_iter_ and chunked.loss_ == pytest.approx(dense.loss_, rel=1e-9)


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
def test_lbfgs_in_float32(name, cls):
    """A float32 network computes the objective in float32 (handed to SciPy as float64) and keeps float32
    parameters; it follows the float64 fit closely over a few iterations."""
    X, y = _classification("multiclass")
    kw = dict(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=8, random_state=0, backend=name)
    f32 = cls(**kw).fit(X.astype(np.float32), y)
    f64 = cls(dtype="float64", **kw).fit(X, y)
    assert f32._net.dtype == np.float32 and all(a.dtype == np.float32 for a in f32.coefs_ + f32.intercepts_)
    assert type(f32.loss_) is float and f32.n_iter_ == f64.n_iter_ == 8
    assert f32.loss_ == pytest.approx(f64.loss_, rel=1e-4)
    _close(f32.coefs_, f64.coefs_, rtol=1e-3, atol=1e-4)
    theta = np.concatenate([a.ravel() for a in f64.coefs_ + f64.intercepts_])
    Y = y.reshape(-1, 1) if cls is MLPRegressor else f64._label_binarizer.transform(y)
    f_64, g_64 = f64._loss_grad_lbfgs(theta, X, Y)
    f_32, g_32 = f32._loss_grad_lbfgs(theta, X.astype(np.float32), Y)
    assert type(f_32) is float and g_32.dtype == np.float64
    assert f_32 == pytest.approx(f_64, rel=1e-5)
    np.testing.assert_allclose(g_32, g_64, rtol=1e-3, atol=1e-5 * np.abs(g_64).max())
    assert f32.predict(X.astype(np.float32)).dtype == (np.float32 if cls is MLPRegressor else y.dtype)


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_lbfgs_refuses_a_non_finite_objective_and_keeps_the_estimator(dtype):
    X, y = make_regression(50, 4, random_state=0)
    reg = MLPRegressor(hidden_layer_sizes=(5,), solver="lbfgs", random_state=0, dtype=dtype, backend="numpy")
    scale = 1e150 if dtype == "float64" else 1e18
    message = (r"^Solver produced non-finite parameter weights\. The input data may contain large values and need "
               r"to be preprocessed\. \(at evaluation \d+ of the objective, (the loss was|.*not finite).* after "
               r"iteration \d+; the estimator is left as it was before this fit\.\)")
    with pytest.raises(ValueError, match=message):
        reg.fit(X * scale, y)
    assert not hasattr(reg, "coefs_")  # a first fit that fails leaves the estimator unfitted
    reg.fit(X, y)
    before = fitted_state(reg)
    with pytest.raises(ValueError, match=message):
        reg.fit(X * scale, y)
    assert_same_state(fitted_state(reg), before)


def test_lbfgs_interrupted_keeps_the_latest_iterate(monkeypatch):
    """Ctrl-C inside a line search: a warning, and the parameters of the last finished iteration."""
    import backprop.sklearn as bsk

    X, y = _classification("binary")
    kw = dict(hidden_layer_sizes=(5,), solver="lbfgs", random_state=0, backend="numpy")
    evaluate = bsk._LbfgsObjective.__call__

    def interrupted(objective, theta):
        if objective.evaluations == 6:
            raise KeyboardInterrupt
        return evaluate(objective, theta)

    monkeypatch.setattr(bsk._LbfgsObjective, "__call__", interrupted)
    with pytest.warns(UserWarning, match="Training interrupted by user"):
        clf = MLPClassifier(**kw).fit(X, y)
    monkeypatch.undo()
    ref = MLPClassifier(max_iter=clf.n_iter_, **kw).fit(X, y)
    assert 0 < clf.n_iter_ == ref.n_iter_ and clf.loss_ == ref.loss_
    _close(clf.coefs_ + clf.intercepts_, ref.coefs_ + ref.intercepts_, rtol=0, atol=0)
    np.testing.assert_array_equal(clf.predict_proba(X), ref.predict_proba(X))  # the network holds them too


def test_lbfgs_verbose_prints_each_iteration(capsys):
    X, y = _classification("binary")
    clf = MLPClassifier(hidden_layer_sizes=(4,), solver="lbfgs", max_iter=4, verbose=True, random_state=0,
                        backend="numpy").fit(X, y)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"Iteration {i}, loss = {line.split('= ')[1]}" for i, line in enumerate(lines, 1)]
    assert len(lines) == clf.n_iter_ == 4 and float(lines[-1].split("= ")[1]) == pytest.approx(clf.loss_, abs=1e-8)


def test_lbfgs_on_every_backend(backend, small):
    """Each backend's L-BFGS fit is numpy's, in float64 and float32 (float64 only, and tiny, under the CUDA
    simulator)."""
    X, y = make_classification(12, 3, n_informative=2, n_redundant=0, random_state=0)
    for dtype in ["float64"] if small else ["float64", "float32"]:
        kw = dict(hidden_layer_sizes=(4,), solver="lbfgs", max_iter=2 if small else 5, random_state=0, dtype=dtype)
        ours = MLPClassifier(backend=backend.name, **kw).fit(X, y)
        ref = MLPClassifier(backend="numpy", **kw).fit(X, y)
        assert ours.n_iter_ == ref.n_iter_ and ours.coefs_[0].dtype == dtype
        _close(ours.coefs_, ref.coefs_, **tolerance(dtype))


# --------------------------------------------------------------------------- heads and attributes
@pytest.mark.parametrize("task,out,loss,n_out", [
    ("binary", "logistic", "bce", 1), ("multiclass", "softmax", "cross_entropy", 3),
    ("multilabel", "logistic", "bce", 4),
])
def test_classifier_heads(task, out, loss, n_out):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5))
    if task == "binary":
        y = np.where(X[:, 0] > 0, "yes", "no")
    elif task == "multiclass":
        y = np.digitize(X[:, 0], [-0.5, 0.5])
    else:
        y = (X[:, :4] > 0).astype(int)
    clf = MLPClassifier(hidden_layer_sizes=(8, 4), max_iter=5, backend="numpy").fit(X, y)
    assert clf.out_activation_ == out and clf._net.loss_fn.name == loss
    assert clf.n_outputs_ == n_out and clf.n_features_in_ == 5 and clf.n_layers_ == 4
    assert [c.shape for c in clf.coefs_] == [(5, 8), (8, 4), (4, n_out)]
    assert [b.shape for b in clf.intercepts_] == [(8,), (4,), (n_out,)]
    assert all(type(c) is np.ndarray for c in clf.coefs_ + clf.intercepts_)
    proba = clf.predict_proba(X)
    assert proba.shape == (60, 2 if task == "binary" else n_out)
    assert clf.predict(X).shape == np.shape(y)
    if task != "multilabel":
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
        assert set(clf.predict(X)) <= set(np.ravel(y))
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(X)), proba)


def test_regressor_multi_output_and_attributes():
    X, y = make_regression(80, 4, n_targets=2, random_state=0)
    reg = MLPRegressor(hidden_layer_sizes=(16,), max_iter=30, learning_rate_init=0.01, random_state=0,
                       backend="numpy").fit(X, y / 100)
    assert reg.out_activation_ == "identity" and reg._net.loss_fn.name == "mse"
    assert reg.predict(X).shape == (80, 2) and reg.n_outputs_ == 2
    assert len(reg.loss_curve_) == reg.n_iter_ and reg.best_loss_ == min(reg.loss_curve_)
    assert reg.validation_scores_ is None and reg.best_validation_score_ is None
    assert MLPRegressor(max_iter=5, backend="numpy").fit(X, y[:, 0]).predict(X).shape == (80,)


@pytest.mark.parametrize("loss,name", [("absolute_error", "mae"), ("huber", "huber")])
def test_regressor_extra_losses(loss, name):
    X, y = make_regression(80, 4, random_state=0)
    reg = MLPRegressor(loss=loss, max_iter=50, learning_rate_init=0.01, random_state=0, backend="numpy")
    reg.fit(X, y / 100)
    assert reg._net.loss_fn.name == name and reg.loss_curve_[-1] < reg.loss_curve_[0]


def test_dtype_follows_x_like_sklearn_unless_given():
    X, y = make_classification(60, 4, random_state=0)
    c64 = MLPClassifier(max_iter=3, backend="numpy").fit(X, y)
    c32 = MLPClassifier(max_iter=3, backend="numpy").fit(X.astype(np.float32), y)
    forced = MLPClassifier(max_iter=3, backend="numpy", dtype="float32").fit(X, y)
    assert c64.coefs_[0].dtype == np.float64 and c32.coefs_[0].dtype == np.float32
    assert forced.coefs_[0].dtype == np.float32 and forced._net.dtype == np.float32
    assert forced.predict_proba(X).dtype == np.float64  # predictions come back in X's float dtype
    assert forced.predict_proba(X.astype(np.float32)).dtype == np.float32


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_cpu_backends_agree(name):
    X, y = make_classification(120, 6, n_classes=3, n_informative=4, random_state=0)
    kw = dict(hidden_layer_sizes=(10,), max_iter=5, random_state=0, dtype="float64")
    ref = MLPClassifier(backend="numpy", **kw).fit(X, y)
    other = MLPClassifier(backend=name, **kw).fit(X, y)
    assert other._net.backend.name == name
    _close(other.coefs_, ref.coefs_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(other.predict_proba(X), ref.predict_proba(X), rtol=1e-7, atol=1e-9)


def test_changing_backend_after_fit_moves_the_network():
    X, y = make_classification(40, 4, random_state=0)
    clf = MLPClassifier(max_iter=2, backend="numpy", dtype="float64").fit(X, y)
    proba = clf.predict_proba(X)
    other = [n for n in available_backends() if n != "numpy" and not resolve_backend(n).is_gpu]
    for name in other:
        clf.set_params(backend=name)
        np.testing.assert_allclose(clf.predict_proba(X), proba, rtol=1e-9, atol=1e-12)
        assert clf._net.backend.name == name
        clf.partial_fit(X, y)


def test_default_backend_is_the_active_one():
    import backprop as bp

    X, y = make_classification(40, 4, random_state=0)
    with bp.use_backend("numpy"):
        clf = MLPClassifier(max_iter=2).fit(X, y)
    assert clf._net.backend.name == "numpy" and clf.backend is None


# --------------------------------------------------------------------------- behaviour
def test_sparse_input_matches_dense():
    X, y = make_classification(80, 10, random_state=0)
    X[np.abs(X) < 0.8] = 0
    kw = dict(max_iter=5, random_state=0, backend="numpy")
    dense = MLPClassifier(**kw).fit(X, y)
    sparse = MLPClassifier(**kw).fit(sp.csr_matrix(X), y)
    _close(sparse.coefs_, dense.coefs_)
    np.testing.assert_allclose(sparse.predict_proba(sp.csc_matrix(X)), dense.predict_proba(X))


def test_pickle_clone_and_continue_training():
    X, y = make_classification(60, 4, random_state=0)
    clf = MLPClassifier(hidden_layer_sizes=(5,), max_iter=5, random_state=0, backend="numpy").fit(X, y)
    back = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(back.predict_proba(X), clf.predict_proba(X))
    back.partial_fit(X, y)  # the network is rebuilt on the backend; training goes on
    assert back.t_ == clf.t_ + 60 and len(back.loss_curve_) == len(clf.loss_curve_) + 1
    assert not hasattr(clone(clf), "coefs_")


def test_coefs_are_the_parameters():
    X, y = make_classification(50, 4, random_state=0)
    reg = MLPRegressor(hidden_layer_sizes=(3,), max_iter=3, backend="numpy").fit(X, y.astype(float))
    reg.coefs_[-1][:] = 0
    reg.intercepts_[-1][:] = 2.5
    np.testing.assert_allclose(reg.predict(X), 2.5)


def test_verbose_shows_a_progress_bar_on_a_terminal_and_lines_elsewhere(capsys, monkeypatch):
    """verbose=True: on a terminal outside CI a bar (the rule of fit's progress=None); in CI or into a file,
    scikit-learn's own lines on stdout; verbose=False: nothing."""
    from backprop import progress

    X, y = make_classification(50, 4, random_state=0)
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    monkeypatch.delenv("CI", raising=False)
    MLPClassifier(max_iter=3, verbose=True, backend="numpy").fit(X, y)
    out = capsys.readouterr()
    assert "3/3" in out.err and "loss=" in out.err and "Iteration" not in out.out
    monkeypatch.setenv("CI", "true")
    MLPClassifier(max_iter=3, verbose=True, backend="numpy").fit(X, y)
    out = capsys.readouterr()
    assert out.err == "" and out.out.count("Iteration ") == 3 and "loss = " in out.out
    MLPClassifier(max_iter=3, backend="numpy").fit(X, y)
    assert capsys.readouterr() == ("", "")


def test_convergence_warning_and_divergence():
    X, y = make_classification(50, 4, random_state=0)
    with pytest.warns(ConvergenceWarning, match="Maximum iterations"):
        MLPClassifier(max_iter=2, backend="numpy").fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="non-finite"):
            MLPRegressor(solver="sgd", learning_rate_init=1e3, max_iter=50, momentum=0.9,
                         backend="numpy").fit(X * 1e3, y * 1e3)


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # diverges on purpose
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_divergence_with_early_stopping_restores_the_best_weights(backend):
    """As scikit-learn: with early stopping a diverging fit raises nothing, its last validation score is NaN and
    the weights are those of the best validation score (the initial ones if none improved on them)."""
    X, y = make_regression(n_samples=150, n_features=4, noise=0.1, random_state=0)
    est = MLPRegressor(hidden_layer_sizes=(20,), activation="identity", solver="sgd", learning_rate_init=1.0,
                       max_iter=20, early_stopping=True, random_state=0, backend=backend)
    with pytest.warns(ConvergenceWarning, match="Training diverged: at iteration"):
        est.fit(X, y)
    assert np.isnan(est.validation_scores_[-1]) and isinstance(est.validation_scores_[-1], float)
    assert np.isnan(est.loss_curve_[-1]) and est.n_iter_ == len(est.loss_curve_) == len(est.validation_scores_)
    assert all(np.isfinite(c).all() for c in est.coefs_ + est.intercepts_)
    finite = [s for s in est.validation_scores_ if np.isfinite(s)]
    best = int(np.argmax(finite)) + 1
    assert est.best_validation_score_ == max(finite)
    twin = MLPRegressor(hidden_layer_sizes=(20,), activation="identity", solver="sgd", learning_rate_init=1.0,
                        max_iter=best, early_stopping=True, random_state=0, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        twin.fit(X, y)  # stops at the best epoch
    for a, b in zip(est.coefs_ + est.intercepts_, twin.coefs_ + twin.intercepts_):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="non-finite"):  # without early stopping it still stops with an error
        MLPRegressor(hidden_layer_sizes=(20,), activation="identity", solver="sgd", learning_rate_init=1.0,
                     max_iter=20, random_state=0, backend=backend).fit(X, y)


#: A wrong value for each kind of parameter, the error it raises, and what the message names.
BAD_PARAMETERS = [
    (dict(solver="newton"), ValueError, "solver"),
    (dict(max_fun=0), ValueError, "max_fun"),
    (dict(max_fun=2.5), TypeError, "max_fun"),
    (dict(activation="softmax"), ValueError, "activation"),
    (dict(activation="step"), ValueError, "activation"),
    (dict(hidden_layer_sizes=(4, 0)), ValueError, "hidden_layer_sizes"),
    (dict(hidden_layer_sizes="4"), TypeError, "hidden_layer_sizes"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(learning_rate_init=0.0), ValueError, "learning_rate_init"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(beta_2=1.0), ValueError, "beta_2"),
    (dict(n_iter_no_change=0), ValueError, "n_iter_no_change"),
    (dict(dtype="int32"), ValueError, "dtype"),
    (dict(backend="no-such-backend"), ValueError, "unknown backend"),
    (dict(max_iter=2.5), TypeError, "max_iter"),
]


@pytest.mark.parametrize("params,error,match", BAD_PARAMETERS)
def test_bad_parameters_are_named(params, error, match):
    X, y = make_classification(30, 4, random_state=0)
    with pytest.raises(error, match=match):
        MLPClassifier(**params).fit(X, y)


def test_partial_fit_refuses_early_stopping_and_needs_classes():
    X, y = make_regression(30, 4, random_state=0)
    with pytest.raises(ValueError, match="early_stopping"):
        MLPRegressor(early_stopping=True).partial_fit(X, y)
    with pytest.raises(ValueError, match="classes must be passed"):
        MLPClassifier().partial_fit(X, y > 0)


# --------------------------------------------------------------------------- no silent corruption
@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
@pytest.mark.parametrize("sparse", [False, True])
def test_float32_model_refuses_float64_input_that_overflows_float32(name, cls, sparse):
    """1e39 is finite in float64 X but infinite in the float32 network: refused, not NaN predictions."""
    X, y = make_classification(40, 4, random_state=0)
    est = cls(hidden_layer_sizes=(5,), max_iter=3, dtype="float32", random_state=0, backend=name).fit(X, y)
    bad = X.copy()
    bad[25, 2] = -1e39
    bad = sp.csr_matrix(bad) if sparse else bad
    methods = [est.predict] + ([est.predict_proba, est.predict_log_proba] if cls is MLPClassifier else [])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for method in methods:
            with pytest.raises(ValueError, match=r"X has values that are not finite in float32 \(first at row 25, "
                                                 r"column 2: -1e\+39\)"):
                method(bad)
    ok = X.copy()
    ok[0, 0] = np.finfo(np.float32).max  # the largest float32 is finite after the cast: accepted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the network itself may overflow on it
        assert est.predict(sp.csr_matrix(ok) if sparse else ok).shape[0] == 40


def test_float32_model_checks_every_prediction_chunk(monkeypatch):
    """The row named is the row of X, in whichever chunk it falls."""
    import backprop.sklearn as bsk

    monkeypatch.setattr(bsk, "_PREDICT_CHUNK", 16)
    X, y = make_regression(40, 3, random_state=0)
    reg = MLPRegressor(hidden_layer_sizes=(4,), max_iter=2, dtype="float32", random_state=0,
                       backend="numpy").fit(X, y)
    X[37, 1] = 1e300
    with pytest.raises(ValueError, match="first at row 37, column 1: 1e\\+300"):
        reg.predict(X)


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # diverges on purpose
def test_what_scikit_learns_own_tests_read():
    """Details scikit-learn's MLP tests rely on: the optimizer's ``learning_rate``; its divergence message;
    the stratified early-stopping split naming classes as booleans; partial_fit on parameters set by hand."""
    X, y = make_classification(n_samples=40, n_features=4, random_state=0)
    clf = MLPClassifier(solver="sgd", learning_rate="invscaling", max_iter=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    assert clf._optimizer.learning_rate == clf._optimizer.lr
    with pytest.raises(ValueError, match=r"^Solver produced non-finite parameter weights\. The input data may "
                                         r"contain large values and need to be preprocessed\."):
        MLPRegressor(solver="sgd", learning_rate_init=1e30, max_iter=5).fit(X * 1e10, X[:, 0] * 1e10)
    y_bool = np.zeros(20, dtype=bool)
    y_bool[0] = True
    with pytest.raises(ValueError, match=r"Classes with too few members are: \['True'\]"):
        MLPClassifier(early_stopping=True).fit(X[:20], y_bool)
    fresh = MLPClassifier(hidden_layer_sizes=(3,), solver="sgd", max_iter=1)
    fresh.coefs_ = [np.zeros((4, 3)), np.zeros((3, 1))]
    fresh.intercepts_ = [np.zeros(3), np.zeros(1)]
    fresh.n_outputs_, fresh.n_layers_, fresh.out_activation_ = 1, 3, "logistic"
    fresh.t_, fresh.best_loss_, fresh.loss_curve_, fresh._no_improvement_count = 0, 1e10, [], 0
    fresh.partial_fit(X, y, classes=[0, 1])
    assert fresh.coefs_[0].dtype == np.float64 and np.isfinite(fresh.coefs_[0]).all()


# --------------------------------------------------------------------------- a failed fit changes nothing
def fitted_state(est) -> dict:
    """Everything a fit may change, by value: every attribute (the label binarizer's and the random state's
    contents), the optimizer's hyper-parameters, step count and state arrays, and the network's parameters as
    the next prediction uses them."""
    state = {}
    for name, value in vars(est).items():
        if name == "_random_state":
            state[name] = value.get_state()
        elif name == "_label_binarizer":
            state[name] = copy.deepcopy(vars(value))
        elif name not in ("_net", "_optimizer", "_pushed"):
            state[name] = copy.deepcopy(value)
    opt = vars(est).get("_optimizer")
    if opt is not None:
        k = est._net.backend.kernels
        state["optimizer"] = (dict(vars(opt)) | {"_state": None, "_device": None, "_corrections": None},
                              [np.array(k.to_host(a)) for a in opt.state_arrays()])
    if hasattr(est, "coefs_"):
        state["network"] = est._network().get_params()
    return state


def assert_same_state(got, want, where="state") -> None:
    """``got`` and ``want`` equal bit for bit (NaN equal to NaN), containers compared element by element."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert got.keys() == want.keys(), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same_state(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_state(a, b, f"{where}[{i}]")
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype, f"{where}: {got.dtype} != {want.dtype}"
        np.testing.assert_array_equal(got, want, err_msg=where)
    elif isinstance(want, float) and np.isnan(want):
        assert np.isnan(got), where
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _failing_step(monkeypatch, after: int) -> None:
    """Make the estimators' training step raise a RuntimeError once ``after`` steps have run."""
    import backprop.step as steps

    real, calls = steps.train_step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError("a step failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "train_step", step)


def _refit_failures(est, X, y, monkeypatch):
    """``(what, call)`` for every way a refit of the fitted ``est`` can fail: each wrong parameter, wrong data,
    wrong sample weights, a divergence, and a step that raises halfway."""
    stochastic = est.solver != "lbfgs"
    incremental = stochastic and not est.early_stopping
    nan = X.copy()
    nan[3, 1] = np.nan
    for params, error, _ in BAD_PARAMETERS:
        yield f"fit with {params}", error, lambda p=params: est.set_params(**p).fit(X, y)
    yield "NaN in X", ValueError, lambda: est.fit(nan, y)
    yield "y of another length", ValueError, lambda: est.fit(X, y[:-1])
    yield "negative sample_weight", ValueError, lambda: est.fit(X, y, sample_weight=-np.ones(len(y)))
    yield "warm start on other features", ValueError, lambda: est.set_params(warm_start=True).fit(X[:, :3], y)
    if stochastic:
        yield "validation set too small", ValueError, \
            lambda: est.set_params(early_stopping=True, validation_fraction=0.01).fit(X[:40], y[:40])
    if est._classifier:
        yield "warm start with other classes", ValueError, lambda: est.set_params(warm_start=True).fit(X, y + 5)
    else:
        yield "poisson with negative y", ValueError, lambda: est.set_params(loss="poisson").fit(X, y)
    huge = X * 1e150, y if est._classifier else y * 1e150  # an update by lr=1e300 overflows
    if not est.early_stopping:  # with early stopping a divergence is no failure: the best epoch is restored
        yield "divergence", ValueError, lambda: est.set_params(warm_start=True, learning_rate_init=1e300).fit(*huge)
    if stochastic:
        def failing_fit():
            _failing_step(monkeypatch, after=4)
            try:
                est.set_params(warm_start=True).fit(X, y)
            finally:
                monkeypatch.undo()

        yield "a step raising halfway", RuntimeError, failing_fit
    if incremental:
        yield "partial_fit on other features", ValueError, lambda: est.partial_fit(X[:, :3], y)
        yield "partial_fit with early stopping", ValueError, \
            lambda: est.set_params(early_stopping=True).partial_fit(X, y)
        yield "partial_fit diverging", ValueError, lambda: est.set_params(learning_rate_init=1e300).partial_fit(*huge)
        if est._classifier:
            yield "partial_fit with a new class", ValueError, lambda: est.partial_fit(X, np.where(y == 0, 9, y))
            yield "partial_fit with other classes", ValueError, lambda: est.partial_fit(X, y, classes=[0, 1, 2, 3])

        def failing_partial_fit():
            _failing_step(monkeypatch, after=0)
            try:
                est.partial_fit(X, y)
            finally:
                monkeypatch.undo()

        yield "partial_fit with a step raising", RuntimeError, failing_partial_fit


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # diverges on purpose
@pytest.mark.parametrize("cls,solver,early_stopping,backend", [
    (MLPClassifier, "sgd", False, "numpy"), (MLPClassifier, "adam", True, "numpy"),
    (MLPRegressor, "adam", False, "numba"), (MLPRegressor, "lbfgs", False, "numpy")])
def test_a_failed_refit_keeps_the_fitted_state(cls, solver, early_stopping, backend, monkeypatch):
    """Every kind of failed fit or partial_fit leaves the fitted estimator bit for bit as it was (coefficients,
    optimizer state, n_iter_, loss_curve_, classes_, ...), and training then goes on exactly as it would have
    without the failures."""
    if cls is MLPClassifier:
        X, y = make_classification(60, 5, n_informative=3, n_classes=3, random_state=0)
    else:
        X, y = make_regression(60, 5, random_state=0)
    params = dict(hidden_layer_sizes=(7,), solver=solver, max_iter=3, early_stopping=early_stopping,
                  random_state=0, backend=backend, momentum=0.9, batch_size=16)
    est, twin = cls(**params).fit(X, y), cls(**params).fit(X, y)
    incremental = solver != "lbfgs" and not early_stopping
    if incremental:  # the optimizer's state from more than one call
        est.partial_fit(X, y)
        twin.partial_fit(X, y)
    params = est.get_params()
    before = fitted_state(est)
    for what, error, call in _refit_failures(est, X, y, monkeypatch):
        try:
            call()
        except error:
            pass
        else:
            pytest.fail(f"{what}: no {error.__name__}")
        est.set_params(**params)
        assert_same_state(fitted_state(est), before, what)
    if incremental:
        est.partial_fit(X, y)
        twin.partial_fit(X, y)
    else:
        est.set_params(warm_start=True).fit(X, y)
        twin.set_params(warm_start=True).fit(X, y)
    assert_same_state(fitted_state(est), fitted_state(twin))


def test_a_failed_first_fit_leaves_the_estimator_unfitted():
    X, y = make_classification(30, 4, random_state=0)
    for est, call in [(MLPClassifier(backend="no-such-backend"), lambda e: e.fit(X, y)),
                      (MLPClassifier(max_iter=2), lambda e: e.fit(X, y, sample_weight=-np.ones(30))),
                      (MLPClassifier(), lambda e: e.partial_fit(X, y + 7, classes=[0, 1]))]:
        unfitted = dict(vars(est))
        with pytest.raises(ValueError):
            call(est)
        assert vars(est) == unfitted


def test_threads_predicting_with_one_estimator_and_a_fit_from_another(monkeypatch):
    """Predictions from several threads at once give the sequential bits; a fit waits for the predictions under
    way, and a prediction or fit while another thread fits raises ConcurrentTrainingError."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from backprop import ConcurrentTrainingError

    X, y = make_classification(200, 6, n_informative=4, n_classes=3, random_state=0)
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=5, random_state=0, backend="numpy").fit(X, y)
    rng = np.random.default_rng(0)
    calls = [(("predict", "predict_proba", "score")[i % 3], rng.normal(size=((1, 7, 64, 513)[i % 4], 6)))
             for i in range(8 * 50)]

    def run(kind, Xc):
        if kind == "score":
            return clf.score(Xc, clf.predict(Xc))
        return getattr(clf, kind)(Xc)

    want = [run(*c) for c in calls]
    with switching_often(), ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda c: run(*c), calls))
    assert all(np.array_equal(a, b) for a, b in zip(got, want))

    fitting, release = threading.Event(), threading.Event()
    real = MLPClassifier._fit

    def paused_fit(self, *args, **kwargs):
        fitting.set()
        release.wait(30)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MLPClassifier, "_fit", paused_fit)
    t = threading.Thread(target=lambda: clf.fit(X, y), name="fitter")
    t.start()
    try:
        assert fitting.wait(30)
        for call in (lambda: clf.predict(X), lambda: clf.predict_proba(X), lambda: clf.fit(X, y),
                     lambda: clf.partial_fit(X, y)):
            with pytest.raises(ConcurrentTrainingError, match="being changed by fit in thread 'fitter'"):
                call()
    finally:
        release.set()
        t.join(30)
    np.testing.assert_array_equal(clf.predict(X), MLPClassifier(hidden_layer_sizes=(16,), max_iter=5, random_state=0,
                                                                backend="numpy").fit(X, y).predict(X))
