"""Hostile input: every bad argument is a ValueError/TypeError naming the problem, raised before any parameter
changes (class 3: refusals that used to come after training had started; class 4: errors that did not say
what was wrong)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import backprop as bp
from backprop import callbacks
from backprop.datasets import IDXError, read_idx


def _data(n: int = 24, d: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d))
    return X, (X[:, 0] > 0).astype(int), X[:, :1] * 2.0


def _regression() -> bp.MLP:
    return bp.MLP([3, 5, 1], head="regression", backend="numpy", dtype="float64", seed=0)


def _classifier() -> bp.MLP:
    return bp.MLP([3, 5, 2], head="multiclass", backend="numpy", dtype="float64", seed=0)


def _assert_unchanged(net: bp.MLP, before: list) -> None:
    for (W0, b0), (W1, b1) in zip(before, net.get_params()):
        np.testing.assert_array_equal(W1, W0)
        np.testing.assert_array_equal(b1, b0)
        assert W1.tobytes() == W0.tobytes() and b1.tobytes() == b0.tobytes()


# --------------------------------------------------------------------------- class 3: refused before the first step
def _file(tmp_path):
    f = tmp_path / "plain.txt"
    f.write_text("not a directory")
    return f


CLASS3 = {
    "early_stopping_val_accuracy_regression": (
        "regression", lambda tmp: dict(validation_split=0.25, early_stopping=True, monitor="val_accuracy"),
        ValueError, "val_accuracy"),
    "early_stopping_callback_val_accuracy_regression": (
        "regression", lambda tmp: dict(validation_split=0.25,
                                       callbacks=[callbacks.early_stopping(monitor="val_accuracy")]),
        ValueError, "val_accuracy"),
    "early_stopping_callback_val_loss_no_validation": (
        "classifier", lambda tmp: dict(callbacks=[callbacks.early_stopping(monitor="val_loss")]),
        ValueError, "val_loss"),
    "checkpoint_val_accuracy_regression": (
        "regression", lambda tmp: dict(validation_split=0.25, callbacks=[
            callbacks.checkpoint(tmp / "best.npz", best_only=True, monitor="val_accuracy")]),
        ValueError, "val_accuracy"),
    "checkpoint_best_only_no_validation": (
        "classifier", lambda tmp: dict(callbacks=[callbacks.checkpoint(tmp / "best.npz", best_only=True)]),
        ValueError, "validation"),
    "checkpoint_parent_is_a_file": (
        "classifier", lambda tmp: dict(callbacks=[callbacks.checkpoint(_file(tmp) / "net.npz")]),
        ValueError, "plain.txt"),
    "checkpoint_grandparent_is_a_file": (
        "classifier", lambda tmp: dict(callbacks=[callbacks.checkpoint(_file(tmp) / "sub" / "net-{epoch}.npz")]),
        ValueError, "plain.txt"),
    "checkpoint_directory_cannot_be_created": (
        "classifier", lambda tmp: dict(callbacks=[callbacks.checkpoint(tmp / ("d" * 300) / "net.npz")]),
        ValueError, "cannot create"),
    "checkpoint_path_is_a_directory": (
        "classifier", lambda tmp: dict(callbacks=[callbacks.checkpoint(tmp)]), ValueError, "is a directory"),
    "schedule_bad_in_a_later_epoch": (
        "classifier", lambda tmp: dict(epochs=5, schedule=lambda e: 0.1 if e < 3 else -1.0),
        ValueError, r"scheduled learning rate \(epoch 3\)"),
}


@pytest.mark.parametrize("case", list(CLASS3))
def test_refused_before_the_first_step(case, tmp_path):
    kind, make_kwargs, exc, match = CLASS3[case]
    X, y, t = _data()
    net = _regression() if kind == "regression" else _classifier()
    T = t if kind == "regression" else y
    before = net.get_params()
    opt = bp.SGD(0.1, momentum=0.9)
    kwargs = dict(epochs=3, batch_size=8, optimizer=opt)
    kwargs.update(make_kwargs(tmp_path))
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(exc, match=match):
        net.fit(X, T, **kwargs)
    _assert_unchanged(net, before)
    assert opt.steps == 0
    assert sorted(os.listdir(tmp_path)) == listing  # no checkpoint, directory or probe file left behind


def test_setup_checks_allow_what_works(tmp_path):
    X, y, t = _data()
    # best_only on the training loss, asked for explicitly
    cb = callbacks.checkpoint(tmp_path / "new" / "deeper" / "best.npz", best_only=True, monitor="loss")
    _classifier().fit(X, y, epochs=2, batch_size=8, callbacks=[cb])
    assert os.path.exists(tmp_path / "new" / "deeper" / "best.npz")
    # val_accuracy on a classification head; callbacks=None is no callbacks
    h = _classifier().fit(X, y, epochs=2, batch_size=8, validation_split=0.25, early_stopping=True,
                          monitor="val_accuracy", callbacks=None)
    assert len(h.val_accuracy) == h.epochs


def test_user_callback_check_setup_sees_the_run():
    X, y, _ = _data()
    seen = []

    class Needs(callbacks.Callback):
        def check_setup(self, net, setup):
            seen.append(setup)
            raise ValueError("Needs: refused")

    net = _classifier()
    before = net.get_params()
    with pytest.raises(ValueError, match="Needs"):
        net.fit(X, y, epochs=2, validation_split=0.25, callbacks=[Needs()])
    _assert_unchanged(net, before)
    assert seen == [callbacks.FitSetup(epochs=2, validation=True, accuracy=True, loss="cross_entropy")]


# --------------------------------------------------------------------------- class 4: the message names the problem
def _mlp(**kw):
    return lambda: bp.MLP([3, 4, 2], backend="numpy", **kw)


CONSTRUCTORS = [
    pytest.param(_mlp(activation=123), TypeError, "activation", id="activation-int"),
    pytest.param(_mlp(activation=None), TypeError, "activation", id="activation-None"),
    pytest.param(_mlp(activation=["relu", 7]), TypeError, "activation 2", id="activation-list-item"),
    pytest.param(_mlp(output=5), TypeError, "output", id="output-int"),
    pytest.param(_mlp(loss=5), TypeError, "loss", id="loss-int"),
    pytest.param(_mlp(head=["multiclass"]), TypeError, "head", id="head-list"),
    pytest.param(lambda: bp.Activation("elu", alpha="x"), TypeError, "alpha", id="alpha-str"),
    pytest.param(lambda: bp.Activation("elu", alpha=float("nan")), ValueError, "alpha", id="alpha-nan"),
    pytest.param(lambda: bp.Loss("huber", param="abc"), TypeError, "param", id="huber-param-str"),
    pytest.param(_mlp(seed=-1), ValueError, "seed", id="seed-negative"),
    pytest.param(_mlp(seed=1.5), TypeError, "seed", id="seed-float"),
    pytest.param(_mlp(dtype=None), TypeError, "dtype", id="dtype-None"),
]


@pytest.mark.parametrize("make, exc, match", CONSTRUCTORS)
def test_constructor_arguments_are_named(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_mlp_accepts_good_arguments():
    net = bp.MLP([3, 4, 4, 2], activation=(a for a in ["relu", bp.Activation("elu", alpha=np.float32(0.5))]),
                 head="multiclass", seed=np.int64(3), backend="numpy")
    assert [L.activation.name for L in net.layers] == ["relu", "elu", "softmax"]
    assert bp.MLP([3, 2], seed=None, backend="numpy").seed is None


CALLS = [
    pytest.param(lambda net, X, y: net.loss(X, 3), ValueError, "T is a scalar", id="targets-int"),
    pytest.param(lambda net, X, y: net.loss(X, np.array(1)), ValueError, "T is a scalar", id="targets-0d"),
    pytest.param(lambda net, X, y: net.fit(X, 1), ValueError, "T is a scalar", id="fit-targets-int"),
    pytest.param(lambda net, X, y: net.train_step(X, y, None), TypeError, "optimizer", id="train_step-None"),
    pytest.param(lambda net, X, y: net.train_step(X, y, "sgd"), TypeError, "optimizer.*'sgd'", id="train_step-str"),
    pytest.param(lambda net, X, y: net.train_step(X, y, bp.SGD), TypeError, "optimizer.*class SGD",
                 id="train_step-class"),
    pytest.param(lambda net, X, y: net.fit(X, y, optimizer="adam"), TypeError, "optimizer", id="fit-optimizer-str"),
    pytest.param(lambda net, X, y: bp.gradcheck(net, X[:4], y[:4], eps=0), ValueError, "eps", id="gradcheck-eps-0"),
    pytest.param(lambda net, X, y: bp.gradcheck(net, X[:4], y[:4], eps=float("nan")), ValueError, "eps",
                 id="gradcheck-eps-nan"),
    pytest.param(lambda net, X, y: bp.numerical_grads(net, X[:4], y[:4], eps=-1e-5), ValueError, "eps",
                 id="numerical_grads-eps-negative"),
    pytest.param(lambda net, X, y: net.fit(X, y, seed=-1), ValueError, "seed", id="fit-seed-negative"),
    pytest.param(lambda net, X, y: net.fit(X, y, seed="0"), TypeError, "seed", id="fit-seed-str"),
    pytest.param(lambda net, X, y: net.fit(X, y, callbacks=42), TypeError, "callbacks", id="fit-callbacks-int"),
    pytest.param(lambda net, X, y: net.fit(X, y, callbacks=callbacks.early_stopping()), TypeError, "callbacks",
                 id="fit-callbacks-single"),
]


@pytest.mark.parametrize("call, exc, match", CALLS)
def test_call_arguments_are_named_and_nothing_changes(call, exc, match):
    X, y, _ = _data()
    net = _classifier()
    before = net.get_params()
    with pytest.raises(exc, match=match):
        call(net, X, y)
    _assert_unchanged(net, before)


@pytest.mark.parametrize("label", [1e20, -1e20, 2.0 ** 70])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_huge_class_label_names_its_range_without_warnings(label, backend):
    X, y, _ = _data()
    net = bp.MLP([3, 5, 2], head="multiclass", backend=backend, seed=0)
    before = net.get_params()
    T = y.astype(np.float64)
    T[3] = label
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in (lambda: net.loss(X, T), lambda: net.fit(X, T, epochs=1)):
            with pytest.raises(ValueError, match=r"class labels must lie in \[0, 2\)") as info:
                call()
            assert f"{label:g}" in str(info.value) and str(np.iinfo(np.int64).min) not in str(info.value)
    _assert_unchanged(net, before)


def test_fit_callbacks_none_is_no_callbacks():
    X, y, _ = _data()
    h = _classifier().fit(X, y, epochs=2, callbacks=None)
    assert h.epochs == 2


def test_read_idx_overflowing_header_names_the_file(tmp_path):
    path = tmp_path / "huge-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x0E, 3]) + np.array([0xFFFFFFFF] * 3, dtype=">u4").tobytes() + b"\0" * 16)
    with pytest.raises(IDXError, match="huge-idx3-ubyte.*truncated"):
        read_idx(path)
