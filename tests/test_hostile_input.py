"""Hostile input: every bad argument is a ValueError/TypeError naming the problem, raised before any parameter
changes (class 3: refusals that used to come after training had started; class 4: errors that did not say
what was wrong)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

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
        ValueError, r"scheduled learning rate of epoch 4 \(schedule\(3\)\)"),
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


# --------------------------------------------------------------------------- class 1: finite or unchanged
def _state(net: bp.MLP, opt: bp.optimizers.Optimizer) -> list[bytes]:
    """The bytes of every parameter and optimizer state array: velocities, moments, Adam's device step
    count (not its bias corrections: scratch that each step writes afresh), and the host's step count."""
    k = net.backend.kernels
    arrays = [a for L in net.layers for a in (L.W, L.b)] + bp.optimizers.Optimizer.state_arrays(opt, [net.optimizer_key])
    if isinstance(opt, bp.Adam):
        arrays += [count for _, count, _ in opt._device.values()]
    return [np.array(k.to_host(a)).tobytes() for a in arrays] + [str(opt.steps).encode()]


HUGE_LR = {"float32": 3e38, "float64": 1e308}
OPTIMIZERS = {
    "sgd": lambda lr: bp.SGD(lr=lr),
    "momentum": lambda lr: bp.SGD(lr=lr, momentum=0.9),
    "nesterov": lambda lr: bp.SGD(lr=lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: bp.Adam(lr=lr),
}


def _float32_only_when_simulated(backend, dtype: str) -> None:
    if backend.is_simulated and dtype != "float32":
        pytest.skip("slow under the CUDA simulator: float32 runs there, and test_kernels probes both dtypes")


#: The CUDA simulator computes with NumPy scalars, which warn where a GPU computes inf and NaN silently.
SIMULATOR_WARNINGS = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")


@SIMULATOR_WARNINGS
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_an_update_that_overflows_is_not_applied(backend, dtype, opt_name):
    """lr = the dtype's largest number and inputs whose gradients exceed 1: the first update itself overflows
    (finite loss and gradients). train_step raises, naming the update and lr, and the parameters and the
    optimizer's state (moments, step counts) are bit for bit those of the last good step; fit stops at
    that step the same way."""
    _float32_only_when_simulated(backend, dtype)
    X, y, _ = _data(8)
    X = X * 100.0
    net = bp.MLP([3, 5, 2], head="multiclass", backend=backend.name, dtype=dtype, seed=0)
    opt = OPTIMIZERS[opt_name](0.01)
    net.train_step(X, y, opt)  # a good step first: state to keep
    before = _state(net, opt)
    opt.lr = float(np.finfo(dtype).max)
    with pytest.raises(bp.NonFiniteLossError, match=r"update would have made .* overflow .*lr=.*not applied"):
        net.train_step(X, y, opt)
    assert _state(net, opt) == before
    fresh = bp.MLP([3, 5, 2], head="multiclass", backend=backend.name, dtype=dtype, seed=0)
    with pytest.raises(bp.NonFiniteLossError, match=r"epoch 1, step 1: the update would have made"):
        fresh.fit(X, y, epochs=2, batch_size=4, optimizer=OPTIMIZERS[opt_name](float(np.finfo(dtype).max)),
                  shuffle=False)
    _assert_unchanged(fresh, bp.MLP([3, 5, 2], head="multiclass", backend=backend.name, dtype=dtype,
                                    seed=0).get_params())


@SIMULATOR_WARNINGS
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_huge_lr_stops_with_the_last_good_parameters(backend, dtype, opt_name):
    """The issue's lr (3e38 in float32, 1e308 in float64): whichever step first fails (its update, or the loss
    of the parameters a huge finite update left), the parameters and the optimizer's state are those before
    it, and finite."""
    _float32_only_when_simulated(backend, dtype)
    X, y, _ = _data(8)
    net = bp.MLP([3, 5, 2], head="multiclass", backend=backend.name, dtype=dtype, seed=0)
    opt = OPTIMIZERS[opt_name](0.01)
    net.train_step(X, y, opt)  # the optimizer's state exists
    opt.lr = HUGE_LR[dtype]
    with pytest.raises(bp.NonFiniteLossError, match="not applied"):
        for _ in range(20):
            before = _state(net, opt)
            net.train_step(X, y, opt)
    assert _state(net, opt) == before
    assert all(np.isfinite(p).all() for pair in net.get_params() for p in pair)


SETTINGS = [
    ("lr", float("nan"), ValueError), ("lr", -1.0, ValueError), ("lr", float("inf"), ValueError),
    ("lr", "0.1", TypeError), ("momentum", 1.5, ValueError), ("momentum", -0.1, ValueError),
    ("weight_decay", float("nan"), ValueError), ("weight_decay", -1e-3, ValueError),
]
ADAM_SETTINGS = [("beta1", 1.0, ValueError), ("beta2", float("nan"), ValueError), ("eps", 0.0, ValueError),
                 ("eps", -1e-8, ValueError), ("lr", None, TypeError)]


@pytest.mark.parametrize("name, value, exc", SETTINGS + [("adam-" + n, v, e) for n, v, e in ADAM_SETTINGS])
def test_hyper_parameters_are_checked_when_set(name, value, exc):
    opt = bp.Adam(lr=0.01) if name.startswith("adam-") else bp.SGD(lr=0.01, momentum=0.5)
    name = name.removeprefix("adam-")
    old = getattr(opt, name)
    with pytest.raises(exc, match=name):
        setattr(opt, name, value)
    assert getattr(opt, name) == old


def test_lr_zero_may_be_set_between_steps():
    X, y, _ = _data()
    net = _classifier()
    opt = bp.SGD(lr=0.1)
    opt.lr = 0.0  # a schedule's last value: a step that changes nothing
    before = net.get_params()
    net.train_step(X, y, opt)
    _assert_unchanged(net, before)


@pytest.mark.parametrize("make, match", [
    (lambda: bp.Adam(lr=1e-3, eps=1e-300), r"eps=1e-300 is 0.0 in float32"),
    (lambda: bp.SGD(lr=1e39), r"lr=1e\+39 is inf in float32"),
    (lambda: bp.Adam(lr=1e-50), r"lr=1e-50 is 0.0 in float32"),
])
def test_hyper_parameters_the_dtype_cannot_hold_are_refused_when_used(backend, make, match):
    X, y, _ = _data()
    net = bp.MLP([3, 5, 2], head="multiclass", backend=backend.name, dtype="float32", seed=0)
    before = net.get_params()
    for call in (lambda opt: net.train_step(X, y, opt), lambda opt: net.fit(X, y, epochs=1, optimizer=opt)):
        opt = make()
        with pytest.raises(ValueError, match=match):
            call(opt)
        assert opt.steps == 0
    _assert_unchanged(net, before)
    net64 = bp.MLP([3, 5, 2], head="multiclass", backend=backend.name, dtype="float64", seed=0)
    net64.train_step(X, y, make())  # float64 holds them


def test_settings_bypassing_the_setters_are_checked_when_used():
    X, y, _ = _data()
    net = _classifier()
    before = net.get_params()
    opt = bp.SGD(lr=0.1, momentum=0.5, nesterov=True)
    opt.momentum = 0.0  # nesterov without momentum: only the pair is wrong
    with pytest.raises(ValueError, match="nesterov"):
        net.train_step(X, y, opt)
    opt = bp.SGD(lr=0.1)
    opt.__dict__["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr"):
        net.fit(X, y, epochs=1, optimizer=opt)
    _assert_unchanged(net, before)


# --------------------------------------------------------------------------- property: finite or unchanged
#: Ordinary numbers and the hostile ones: NaN, infinities, the edges of float32 and float64.
HOSTILE = st.one_of(st.floats(-10, 10), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e-45, 3e38, -3.4e38, 1e39, 1e300, 1.7e308]))
HOSTILE_LR = st.one_of(st.floats(1e-6, 10.0), HOSTILE, st.integers(-3, 3), st.sampled_from(["0.1", None]))


@SIMULATOR_WARNINGS
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_parameters_end_bit_identical_or_finite(backend_name, data):
    """Random hostile arrays and hyper-parameters into train_step and fit: whatever is raised (a named
    ValueError/TypeError, or NonFiniteLossError), the parameters afterwards are either bit for bit what they
    were, or finite; the optimizer's state is finite."""
    dtype = data.draw(st.sampled_from(["float32", "float64"]), label="dtype")
    n = data.draw(st.integers(1, 6), label="rows")
    X = data.draw(arrays(np.float64, (n, 3), elements=HOSTILE), label="X")
    T = data.draw(arrays(np.float64, (n, 1), elements=HOSTILE), label="T")
    kind = data.draw(st.sampled_from(sorted(OPTIMIZERS)), label="optimizer")
    net = bp.MLP([3, 4, 1], head="regression", backend=backend_name, dtype=dtype, seed=0)
    before = net.get_params()
    opt = None
    try:
        opt = OPTIMIZERS[kind](0.01)
        setattr(opt, "lr", data.draw(HOSTILE_LR, label="lr"))
        if data.draw(st.booleans(), label="fit"):
            net.fit(X, T, epochs=2, batch_size=data.draw(st.integers(1, 4), label="batch"), optimizer=opt,
                    shuffle=False)
        else:
            net.train_step(X, T, opt)
        event("trained")
    except (ValueError, TypeError, bp.NonFiniteLossError) as exc:
        event(type(exc).__name__)
    after = net.get_params()
    same = all(W0.tobytes() == W1.tobytes() and b0.tobytes() == b1.tobytes()
               for (W0, b0), (W1, b1) in zip(before, after))
    assert same or all(np.isfinite(a).all() for pair in after for a in pair)
    if opt is not None:
        k = net.backend.kernels
        assert all(np.isfinite(k.to_host(a)).all() for a in bp.optimizers.Optimizer.state_arrays(opt))
