"""The MLP: backprop gradients against finite differences, training, persistence, bad input."""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backprop as bp
from backprop.backend import resolve_backend
from backprop.kernels import ACTIVATIONS, LOSSES

from .conftest import targets_for

HIDDEN = [n for n, s in ACTIVATIONS.items() if s.hidden and n != "step"]
PAIRS = sorted({(o, loss) for loss, s in LOSSES.items() for o in s.outputs})




@pytest.mark.parametrize("act", HIDDEN)
@pytest.mark.parametrize("output,loss", PAIRS)
def test_gradients_match_central_differences(rng, act, output, loss):
    """Every hidden activation x every compatible output/loss pair, float64."""
    net = bp.MLP([3, 5, 4, 3], activation=act, output=output, loss=loss, dtype="float64", seed=int(rng.integers(1000)),
                 backend="numpy")
    # non-zero biases: with zero biases a sample whose hidden units are all off puts the next layer exactly
    # on ReLU's kink at u = 0, where the two one-sided derivatives differ
    net.set_params([(W, rng.normal(size=b.shape) * 0.5) for W, b in net.get_params()])
    X = rng.normal(size=(6, 3))
    T = targets_for(rng, loss, 6, 3, labels=True)
    if loss in ("mae", "huber"):
        # keep residuals away from the kinks of |r| and of the Huber threshold
        T = net.predict(X) + rng.choice([-1, 1], size=(6, 3)) * rng.uniform(0.1, 0.4, size=(6, 3))
    err = bp.gradcheck(net, X, T)
    assert err < 1e-6, f"{act} -> {output}/{loss}: relative error {err:.2e}"


@pytest.mark.parametrize("head", list(bp.HEADS))
def test_heads(rng, head):
    n_out = 1 if head in ("binary", "regression") else 3
    net = bp.MLP([4, 6, n_out], activation="tanh", head=head, dtype="float64", backend="numpy")
    X = rng.normal(size=(8, 4))
    if head == "multiclass":
        T = rng.integers(0, 3, 8)
    elif head == "regression":
        T = rng.normal(size=(8, n_out))
    else:
        T = rng.integers(0, 2, (8, n_out)).astype(float)
    assert bp.gradcheck(net, X, T) < 1e-6
    assert net.output.name == bp.HEADS[head][0]


def test_backend_gradients_match_reference(backend, small, rng):
    """loss_and_grads on each backend agrees with the float64 NumPy network."""
    sizes = [4, 5, 3] if small else [20, 16, 12, 5]
    ref = bp.MLP(sizes, activation="tanh", output="softmax", loss="cross_entropy", dtype="float64", seed=3,
                 backend="numpy")
    net = ref.to_backend(backend.name)
    X, T = rng.normal(size=(7, sizes[0])), rng.integers(0, sizes[-1], 7)
    l_ref, g_ref = ref.loss_and_grads(X, T)
    l_net, g_net = net.loss_and_grads(X, T)
    assert l_net == pytest.approx(l_ref, rel=1e-10)
    k = backend.kernels
    for (dW, db), (rW, rb) in zip(g_net, g_ref):
        np.testing.assert_allclose(k.to_host(dW), rW, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(k.to_host(db), rb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("opt", [lambda: bp.SGD(lr=0.1), lambda: bp.SGD(lr=0.05, momentum=0.9, nesterov=True,
                                                                          weight_decay=1e-3),
                                 lambda: bp.Adam(lr=1e-2, weight_decay=1e-3)])
def test_train_step_matches_reference_on_every_backend(backend, small, rng, opt):
    sizes = [3, 4, 2] if small else [12, 10, 8, 3]
    ref = bp.MLP(sizes, activation="relu", output="softmax", loss="cross_entropy", dtype="float64", seed=5,
                 backend="numpy")
    net = ref.to_backend(backend.name)
    o_ref, o_net = opt(), opt()
    for _ in range(3):
        X, T = rng.normal(size=(9, sizes[0])), rng.integers(0, sizes[-1], 9)
        assert net.train_step(X, T, o_net) == pytest.approx(ref.train_step(X, T, o_ref), rel=1e-9)
    for (W, b), (rW, rb) in zip(net.get_params(), ref.get_params()):
        np.testing.assert_allclose(W, rW, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b, rb, rtol=1e-9, atol=1e-12)


def test_sgd_step_is_gradient_descent(rng):
    """train_step with plain SGD applies W <- W - eta dE/dW with the gradients of loss_and_grads."""
    net = bp.MLP([4, 6, 2], activation="sigmoid", dtype="float64", backend="numpy")
    X, T = rng.normal(size=(5, 4)), rng.normal(size=(5, 2))
    before = net.get_params()
    _, grads = net.loss_and_grads(X, T)
    net.train_step(X, T, bp.SGD(lr=0.3))
    for (W, b), (W0, b0), (dW, db) in zip(net.get_params(), before, grads):
        np.testing.assert_allclose(W, W0 - 0.3 * dW, rtol=1e-12)
        np.testing.assert_allclose(b, b0 - 0.3 * db, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4), batch=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1), act=st.sampled_from(HIDDEN))
def test_property_gradients_any_shape(sizes, batch, seed, act):
    rng = np.random.default_rng(seed)
    net = bp.MLP(sizes, activation=act, dtype="float64", seed=seed, backend="numpy")
    net.set_params([(W, rng.normal(size=b.shape) * 0.5) for W, b in net.get_params()])  # off ReLU's kink
    X, T = rng.normal(size=(batch, sizes[0])), rng.normal(size=(batch, sizes[-1]))
    _, grads = net.loss_and_grads(X, T)
    assert [(dW.shape, db.shape) for dW, db in grads] == [(L.W.shape, L.b.shape) for L in net.layers]
    assert bp.gradcheck(net, X, T) < 1e-5


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(["float32", "float64"]))
def test_property_same_seed_same_network(seed, dtype):
    a = bp.MLP([5, 7, 3], seed=seed, dtype=dtype, backend="numpy")
    b = bp.MLP([5, 7, 3], seed=seed, dtype=dtype, backend="numpy")
    for (Wa, ba), (Wb, bb) in zip(a.get_params(), b.get_params()):
        assert Wa.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(Wa, Wb)
        np.testing.assert_array_equal(ba, bb)


@pytest.mark.parametrize("hidden", [2, 4])
def test_xor_is_learned(hidden):
    """The notes' XOR network: 2 inputs, a small hidden layer, 1 output."""
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
    T = np.array([0, 1, 1, 0], dtype=float)
    for seed in range(10):  # a 2-2-1 net can land in a local minimum; some seed must solve it
        net = bp.MLP([2, hidden, 1], activation="tanh", output="sigmoid", loss="bce", dtype="float64", seed=seed,
                     backend="numpy")
        net.fit(X, T, epochs=2000, batch_size=4, optimizer=bp.SGD(lr=0.5, momentum=0.9))
        if np.array_equal(net.predict(X).ravel() > 0.5, T > 0.5):
            break
    assert np.array_equal(net.predict(X).ravel() > 0.5, T > 0.5)
    assert net.loss(X, T) < 0.1


def test_perceptron_rule_separates_a_separable_set(rng):
    w_true = rng.normal(size=3)
    X = rng.normal(size=(200, 3))
    margin = X @ w_true + 0.3
    keep = np.abs(margin) > 0.2
    X, y = X[keep], np.where(margin[keep] > 0, 1, -1)
    p = bp.Perceptron().fit(X, y)
    assert p.converged_
    np.testing.assert_array_equal(p.predict(X), y)


@pytest.mark.parametrize("labels", [(0, 1), (-1, 1), ("a", "b"), (False, True), (2.5, 7.0)],
                         ids=["0-1", "pm1", "strings", "bools", "floats"])
def test_perceptron_takes_any_two_labels_and_predicts_them(rng, labels):
    X = rng.normal(size=(60, 2))
    X = X[np.abs(X[:, 0] - X[:, 1]) > 0.2]
    side = X[:, 0] - X[:, 1] > 0
    y = np.where(side, labels[1], labels[0])
    p = bp.Perceptron().fit(X, list(y))
    assert p.converged_
    np.testing.assert_array_equal(p.classes_, np.array(sorted(labels)))
    pred = p.predict(X)
    assert pred.dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(pred, y)
    assert ((p.decision_function(X) > 0) == (y == p.classes_[1])).all()  # classes_[1] is the +1 side


def test_perceptron_on_minus_one_plus_one_is_the_rule_as_before(rng):
    X = rng.normal(size=(40, 3))
    y = np.where(X @ np.array([1.0, -2.0, 0.5]) > 0, 1, -1)
    p = bp.Perceptron(max_epochs=3).fit(X, y)
    w, b = np.zeros(3), 0.0  # the rule by hand, -1/+1 used as given
    for _ in range(p.epochs_):
        for xi, yi in zip(X, y):
            if yi * (xi @ w + b) <= 0:
                w, b = w + yi * xi, b + yi
    np.testing.assert_array_equal(p.w, w)
    assert p.b == b
    np.testing.assert_array_equal(np.unique(p.predict(X)), [-1, 1])


@pytest.mark.parametrize("y,exc,match", [
    ([0, 1, 2, 2], ValueError, r"two classes; y holds 3: \[0, 1, 2\]"),
    (["a", "b", "c", "a"], ValueError, r"y holds 3: \['a', 'b', 'c'\]"),
    ([1, 1, 1, 1], ValueError, r"two classes; y holds 1: \[1\]"),
    (list(range(4)) * 5, ValueError, r"y holds 4"),
    ([0.0, 1.0, np.nan, 1.0], ValueError, "finite"),
    ([None, 1, 1, 0], TypeError, "labels"),
    ([0, 1, 1], ValueError, "3 labels but X has 4 samples"),
])
def test_perceptron_refuses_labels_that_are_not_two_classes(y, exc, match):
    p = bp.Perceptron()
    X = np.arange(len(y) * 2 if len(y) != 3 else 8, dtype=float).reshape(-1, 2)
    with pytest.raises(exc, match=match):
        p.fit(X, y)
    assert p.w is None and p.classes_ is None  # nothing fitted


def test_perceptron_refit_resets_convergence():
    X = np.array([[0.0, 0], [0, 1], [1, 0], [1, 1]])
    p = bp.Perceptron(max_epochs=50).fit(X, [0, 0, 0, 1])
    assert p.converged_
    p.fit(X, ["x", "y", "y", "x"])  # XOR: never separable
    assert not p.converged_ and list(p.classes_) == ["x", "y"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fit_reduces_loss_and_keeps_dtype(backend, small, rng, dtype):
    n, batch = (16, 16) if small else (300, 32)  # under the CUDA simulator one minibatch an epoch
    X = rng.normal(size=(n, 4))
    T = (X[:, :1] * X[:, 1:2] > 0).astype(int).ravel()
    net = bp.MLP([4, 16, 2], activation="relu", head="multiclass", dtype=dtype, seed=1, backend=backend.name)
    hist = net.fit(X, T, epochs=3 if small else 30, batch_size=batch, optimizer=bp.Adam(lr=0.01),
                   validation_data=(X, T))
    assert hist.loss[-1] < hist.loss[0]
    assert len(hist.val_accuracy) == hist.epochs
    assert net.layers[0].W.dtype == np.dtype(dtype)
    assert net.predict(X).dtype == np.dtype(dtype)


def test_save_load_round_trip_is_exact(tmp_path, rng):
    net = bp.MLP([3, 4, 5, 2], activation=["elu", bp.Activation("leaky_relu", 0.2)], output="softmax",
                 loss="cross_entropy", dtype="float32", seed=7, backend="numpy")
    net.train_step(rng.normal(size=(4, 3)), [0, 1, 1, 0], bp.SGD(lr=0.1))
    path = tmp_path / "net.npz"
    net.save(path)
    back = bp.MLP.load(path, backend="numpy")
    assert back.sizes == net.sizes
    assert [L.activation for L in back.layers] == [L.activation for L in net.layers]
    assert back.loss_fn == net.loss_fn and back.dtype == net.dtype
    for (W, b), (W2, b2) in zip(net.get_params(), back.get_params()):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
    X = rng.normal(size=(5, 3))
    np.testing.assert_array_equal(net.predict(X), back.predict(X))


def test_load_rejects_foreign_npz(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.ones(3))
    with pytest.raises(ValueError, match="not a saved backprop network"):
        bp.MLP.load(path)


def test_huge_logits_give_finite_loss_and_gradients():
    net = bp.MLP([2, 3], output="softmax", loss="cross_entropy", dtype="float32", backend="numpy")
    net.set_params([(np.array([[1e4, 0], [-1e4, 0], [0, 0]]), np.zeros(3))])
    loss, grads = net.loss_and_grads(np.array([[1.0, 0.0], [-1.0, 0.0]]), [1, 0])
    assert np.isfinite(loss) and loss > 1e3
    assert all(np.isfinite(g).all() for pair in grads for g in pair)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def net():
    return bp.MLP([3, 4, 2], activation="relu", head="multiclass", backend="numpy")


@pytest.mark.parametrize("X,match", [
    (np.full((2, 3), np.nan), "non-finite"),
    (np.array([[1.0, np.inf, 0.0]]), "non-finite"),
    (np.ones((2, 4)), "3"),
    (np.ones(3), "2-D"),
    (np.ones((0, 3)), "empty"),
])
def test_bad_inputs_are_refused_before_any_change(net, X, match):
    before = net.get_params()
    with pytest.raises(ValueError, match=match):
        net.train_step(X, np.zeros(len(X), dtype=int), bp.SGD(lr=0.1))
    for (W, b), (W0, b0) in zip(net.get_params(), before):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("T,match", [
    ([0, 2], "labels must lie in \\[0, 2\\)"),
    ([0, -1], "labels must lie"),
    ([0.5, 1.0], "integers"),
    ([0], "1 samples but X has 2"),
    ([[0.5, 0.6], [1, 0]], "summing to 1"),
    ([0, np.nan], "non-finite"),
])
def test_bad_targets(net, T, match):
    with pytest.raises(ValueError, match=match):
        net.fit(np.ones((2, 3)), T, epochs=1)


def test_wrong_dtypes_are_type_errors(net):
    with pytest.raises(TypeError, match="real numbers"):
        net.forward(np.array([["a", "b", "c"]]))
    with pytest.raises(TypeError, match="float32 or float64"):
        bp.MLP([2, 2], dtype="int32")
    with pytest.raises(TypeError, match="integers"):
        bp.MLP([2, 2.5])
    with pytest.raises(TypeError, match="optimizer"):
        net.fit(np.ones((2, 3)), [0, 1], optimizer="sgd")


@pytest.mark.parametrize("kwargs,match", [
    (dict(activation="swish2"), "unknown activation 'swish2'"),
    (dict(loss="hinge"), "unknown loss 'hinge'"),
    (dict(output="softmax", loss="mae"), "'softmax' does not go with loss 'mae'"),
    (dict(output="identity", loss="cross_entropy"), "does not go with"),
    (dict(output="tanh", loss="bce"), "does not go with"),
    (dict(activation="softmax"), "output layer only"),
    (dict(head="ranking"), "unknown head"),
    (dict(activation=["relu", "tanh"]), "2 activations given for 1 hidden"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bp.MLP([3, 4, 2], **kwargs)


@pytest.mark.parametrize("kwargs,got", [
    (dict(head="multiclass", output="sigmoid"), "got output='sigmoid'$"),
    (dict(head="multiclass", loss="mse"), "got loss='mse'$"),
    (dict(head="multiclass", output="sigmoid", loss="bce"), "got output='sigmoid' and loss='bce'$"),
    (dict(head="regression", output="tanh"), "got output='tanh'$"),
    (dict(head="binary", loss="mse"), "got loss='mse'$"),
    (dict(head="multilabel", loss=bp.Loss("huber")), "got loss=Loss"),
])
def test_head_with_a_conflicting_output_or_loss_is_refused(kwargs, got):
    head = kwargs["head"]
    output, loss = bp.HEADS[head]
    with pytest.raises(ValueError) as info:
        bp.MLP([3, 4, 2], backend="numpy", **kwargs)
    message = str(info.value).split(" (give the head")[0]
    assert message.startswith(f"head={head!r} sets output={output!r} and loss={loss!r}; ")
    assert re.search(got, message), message


def test_head_conflict_is_refused_before_anything_is_built(monkeypatch):
    import backprop.network as network

    def no_weights(*args, **kwargs):
        raise AssertionError("weights drawn before the configuration was checked")

    monkeypatch.setattr(network, "_init_weights", no_weights)
    monkeypatch.setattr(network, "get_backend", no_weights)
    with pytest.raises(ValueError, match="head='multiclass' sets output='softmax' and loss='cross_entropy'; "
                                         "got output='sigmoid'"):
        bp.MLP([3, 4, 2], head="multiclass", output="sigmoid")


@pytest.mark.parametrize("head", list(bp.HEADS))
def test_head_with_its_own_output_and_loss_is_fine(head):
    output, loss = bp.HEADS[head]
    aliases = {"identity": "linear", "sigmoid": "logistic", "cross_entropy": "log_loss", "mse": "squared_error",
               "bce": "binary_cross_entropy"}
    plain = bp.MLP([3, 4, 2], head=head, seed=0, backend="numpy")
    for kwargs in (dict(output=output), dict(loss=loss), dict(output=output, loss=loss),
                   dict(output=bp.Activation(output), loss=bp.Loss(loss)),
                   dict(output=aliases.get(output, output), loss=aliases.get(loss, loss))):
        net = bp.MLP([3, 4, 2], head=head, seed=0, backend="numpy", **kwargs)
        assert (net.output, net.loss_fn) == (plain.output, plain.loss_fn), kwargs
        for (W, b), (W0, b0) in zip(net.get_params(), plain.get_params()):
            np.testing.assert_array_equal(W, W0)


def test_default_output_and_loss_without_a_head():
    net = bp.MLP([3, 4, 2], backend="numpy")
    assert (net.output.name, net.loss_fn.name) == ("identity", "mse")
    net = bp.MLP([3, 4, 2], output="sigmoid", loss="bce", backend="numpy")
    assert (net.output.name, net.loss_fn.name) == ("sigmoid", "bce")


def test_fit_has_the_parameters_of_training_fit():
    """MLP.fit spells out training.fit's options (help() shows them) and forwards them: same names, order,
    kinds, defaults and annotations after the data, so the two cannot drift apart."""
    import inspect

    from backprop import training

    ours = inspect.signature(bp.MLP.fit)
    theirs = inspect.signature(training.fit)
    assert [p.name for p in ours.parameters.values()][:3] == ["self", "X", "T"]
    assert [p.name for p in theirs.parameters.values()][:3] == ["net", "X", "T"]
    assert list(ours.parameters.values())[1:] == list(theirs.parameters.values())[1:]
    assert ours.return_annotation == theirs.return_annotation
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(ours.parameters.values())[3:])
    assert "validation_split" in (bp.MLP.fit.__doc__ or "") and "early_stopping" in (bp.MLP.fit.__doc__ or "")


def test_fit_forwards_every_option(monkeypatch):
    import inspect

    from backprop import training

    options = {name: object() for name in list(inspect.signature(training.fit).parameters)[3:]}
    assert {"epochs", "validation_split", "callbacks", "graph"} <= set(options)
    seen = {}
    monkeypatch.setattr(training, "fit", lambda net, X, T, **kw: seen.update(kw, net=net, X=X, T=T))
    net = bp.MLP([3, 4, 2], backend="numpy")
    net.fit("X", "T", **options)
    assert seen.pop("net") is net and seen.pop("X") == "X" and seen.pop("T") == "T"
    assert seen == options


@pytest.mark.parametrize("make,match", [
    (lambda: bp.SGD(lr=-1), "lr"), (lambda: bp.SGD(lr=float("nan")), "lr"), (lambda: bp.SGD(momentum=1.0), "momentum"),
    (lambda: bp.SGD(nesterov=True), "nesterov"), (lambda: bp.Adam(beta1=1.0), "beta1"), (lambda: bp.Adam(eps=0), "eps"),
])
def test_bad_optimizer_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_divergence_stops_with_epoch_and_step_and_keeps_last_finite_params(rng):
    X = rng.normal(size=(64, 3)) * 100
    T = rng.normal(size=(64, 1)) * 100
    net = bp.MLP([3, 8, 1], activation="relu", dtype="float32", backend="numpy")
    with pytest.raises(bp.NonFiniteLossError, match=r"epoch \d+, step \d+"):
        net.fit(X, T, epochs=50, batch_size=8, optimizer=bp.SGD(lr=10.0), shuffle=False)
    # step by step: the failing step changes nothing, so the parameters are those after the last finite step
    net = bp.MLP([3, 8, 1], activation="relu", dtype="float32", backend="numpy")
    opt = bp.SGD(lr=10.0)
    for _ in range(100):
        before = net.get_params()
        try:
            net.train_step(X[:8], T[:8], opt)
        except bp.NonFiniteLossError:
            break
    else:
        pytest.fail("training did not diverge")
    for (W, b), (W0, b0) in zip(net.get_params(), before):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)


# ----------------------------------------------------------------------------- no silent corruption: parameters
CPU = [n for n in bp.available_backends() if not resolve_backend(n).is_gpu]


def _assert_params_equal(net, before):
    for (W, b), (W0, b0) in zip(net.get_params(), before):
        assert W.dtype == W0.dtype and W.tobytes() == W0.tobytes()
        assert b.dtype == b0.dtype and b.tobytes() == b0.tobytes()


def _replace(params, layer, which, value):
    """``params`` with ``W`` (``which`` 0) or ``b`` (1) of ``layer`` (0-based) replaced by ``value``."""
    out = [list(p) for p in params]
    out[layer][which] = value(out[layer][which]) if callable(value) else value
    return [tuple(p) for p in out]


@pytest.mark.parametrize("name", CPU)
@pytest.mark.parametrize("make,error,match", [
    (lambda p: _replace(p, 0, 0, lambda W: W.astype(np.complex128)), TypeError,
     r"layer 1: W must hold real numbers, got complex128"),
    (lambda p: _replace(p, 1, 1, lambda b: b.astype(str)), TypeError, r"layer 2: b must hold real numbers, got <U"),
    (lambda p: _replace(p, 0, 0, lambda W: W.astype(object)), TypeError,
     "layer 1: W must hold real numbers, got object"),
    (lambda p: _replace(p, 0, 1, lambda b: b > 0), TypeError, "layer 1: b must hold real numbers, got bool"),
    (lambda p: _replace(p, 0, 0, lambda W: np.full(W.shape, 1e39)), ValueError,
     r"layer 1: W has values that are not finite in float32 \(first at index \(0, 0\): 1e\+39\)"),
    (lambda p: _replace(p, 1, 1, lambda b: np.where(np.arange(b.size) == 1, np.nan, b)), ValueError,
     r"layer 2: b has values that are not finite in float32 \(first at index \(1,\): nan\)"),
    (lambda p: _replace(p, 1, 0, lambda W: -np.inf * np.ones(W.shape)), ValueError,
     "layer 2: W has values that are not finite"),
    (lambda p: _replace(p, 0, 0, [[1.0, 2.0], [3.0]]), ValueError, "layer 1: W cannot be read as an array"),
    (lambda p: _replace(p, 0, 0, np.ones((3, 4))), ValueError, r"layer 1: expected W \(4, 3\)"),
    (lambda p: {0: p[0], 1: p[1]}, TypeError, r"params must be a sequence of \(W, b\) pairs"),
    (lambda p: "Wb", TypeError, r"params must be a sequence of \(W, b\) pairs"),
    (lambda p: [p[0][0], p[1]], TypeError, r"layer 1: expected a \(W, b\) pair, got ndarray"),
    (lambda p: [p[0] + (p[0][1],), p[1]], TypeError, r"layer 1: expected a \(W, b\) pair, got tuple of length 3"),
    (lambda p: p[:1], ValueError, r"expected 2 \(W, b\) pairs, got 1"),
])
def test_set_params_refuses_hostile_arrays_before_any_change(name, make, error, match):
    """Kinds are refused by name before any cast (no ComplexWarning, no numpy error), values are checked
    after the cast to the network's dtype, and a refusal in layer 2 leaves layer 1 untouched."""
    net = bp.MLP([3, 4, 2], activation="tanh", dtype="float32", seed=1, backend=name)
    before = net.get_params()
    params = [(W * 2 + 1, b + 1) for W, b in before]  # differ from the network's, so a partial update shows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(error, match=match):
            net.set_params(make(params))
    _assert_params_equal(net, before)


@pytest.mark.parametrize("name", CPU)
def test_set_params_checks_finiteness_in_the_networks_dtype(name):
    """1e39 is finite in float64 but not in float32; float32's largest value and integers are fine."""
    big = [(np.full((2, 3), 1e39), np.zeros(2))]
    net64 = bp.MLP([3, 2], dtype="float64", backend=name)
    net64.set_params(big)
    assert net64.get_params()[0][0][0, 0] == 1e39
    net32 = bp.MLP([3, 2], dtype="float32", backend=name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the overflowing cast warns nothing
        with pytest.raises(ValueError, match="not finite in float32"):
            net32.set_params(big)
        net32.set_params([(np.full((2, 3), float(np.finfo(np.float32).max)), np.arange(2, dtype=np.int64))])
    W, b = net32.get_params()[0]
    assert W.dtype == np.float32 and W[0, 0] == np.finfo(np.float32).max and b.tolist() == [0.0, 1.0]


# ----------------------------------------------------------------------------- no silent corruption: files
def _saved_net(tmp_path, name="numpy", dtype="float32", seed=7):
    net = bp.MLP([3, 4, 2], activation="tanh", head="multiclass", dtype=dtype, seed=seed, backend=name)
    path = tmp_path / "net.npz"
    net.save(path)
    return net, path


def _members(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _rewrite(path, **changes):
    """Rewrite ``path`` with members replaced (``None`` removes one)."""
    arrays = _members(path)
    arrays.update(changes)
    with open(path, "wb") as fh:
        np.savez(fh, **{k: v for k, v in arrays.items() if v is not None})


def _npy_member(header: dict, data: bytes) -> bytes:
    """A ``.npy`` file with any header (a lying one included) and any data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def _no_build(monkeypatch):
    """Make building a network fail the test: load must refuse the file before it builds anything."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("load built a network from a file it should have refused")
    monkeypatch.setattr(bp.MLP, "__init__", refuse)


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", CPU)
@pytest.mark.parametrize("seed", [7, 0, None, 2**70 + 3])
def test_seed_round_trips_and_fit_after_load_is_reproducible(tmp_path, rng, name, seed):
    net, path = _saved_net(tmp_path, name, seed=seed)
    back = bp.MLP.load(path, backend=name)
    assert back.seed == net.seed
    if seed is None:
        return
    X, T = rng.normal(size=(40, 3)), rng.integers(0, 2, 40)
    net.fit(X, T, epochs=3, batch_size=8, optimizer=bp.SGD(lr=0.1))
    back.fit(X, T, epochs=3, batch_size=8, optimizer=bp.SGD(lr=0.1))
    _assert_params_equal(back, net.get_params())


def test_file_of_the_previous_format_without_seed_loads(tmp_path):
    net, path = _saved_net(tmp_path)
    _rewrite(path, seed=None)
    back = bp.MLP.load(path, backend="numpy")
    assert back.seed is None and back.sizes == net.sizes
    _assert_params_equal(back, net.get_params())


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        bp.MLP.load(tmp_path / "absent.npz")


def test_save_writes_exactly_the_path_given(tmp_path):
    net = bp.MLP([3, 2], seed=3, backend="numpy")
    net.save(tmp_path / "weights.bin")
    assert os.listdir(tmp_path) == ["weights.bin"]
    assert bp.MLP.load(tmp_path / "weights.bin").seed == 3


def test_failed_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    net, path = _saved_net(tmp_path)
    before = path.read_bytes()

    def broken_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", broken_savez)
    net.set_params([(W + 1, b) for W, b in net.get_params()])
    with pytest.raises(OSError, match="No space left"):
        net.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["net.npz"]  # no temporary file left behind


@pytest.mark.parametrize("damage,match", [
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "damaged: a truncated or corrupt zip"),
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "damaged: a truncated or corrupt zip"),
    (lambda p: p.write_bytes(b"sizes = [3, 4, 2]\n"), r"not a zip archive \(\.npz\)"),
    (lambda p: np.save(open(p, "wb"), np.ones(3)), "a single .npy array, not an .npz archive"),
    (lambda p: _rewrite(p, W1=None), "missing W1"),
    (lambda p: _rewrite(p, activations=None), "missing activations"),
    (lambda p: _rewrite(p, sizes=np.array([3.0, 4.0, 2.0])), "sizes must hold integers, got float64"),
    (lambda p: _rewrite(p, sizes=np.array(3)), r"sizes must be a 1-D array of integers, got shape \(\)"),
    (lambda p: _rewrite(p, sizes=np.array([3])), "at least 2 positive layer widths"),
    (lambda p: _rewrite(p, sizes=np.array([3, 0, 2])), "at least 2 positive layer widths"),
    (lambda p: _rewrite(p, sizes=np.array([3, 5, 2])), r"W0 must be shape \(5, 3\), got shape \(4, 3\)"),
    (lambda p: _rewrite(p, W0=np.ones((4, 3), dtype=complex)), "W0 must hold real numbers, got complex128"),
    (lambda p: _rewrite(p, b1=np.array(["1", "2"])), "b1 must hold real numbers, got <U1"),
    (lambda p: _rewrite(p, W1=np.full((2, 4), 1e39)),
     r"W1 has values that are not finite in float32 \(first at index \(0, 0\): 1e\+39\)"),
    (lambda p: _rewrite(p, b0=np.array([0.0, np.nan, 0.0, 0.0])), "b0 has values that are not finite in float32"),
    (lambda p: _rewrite(p, dtype=np.array("int32")), "dtype must be float32 or float64, got int32"),
    (lambda p: _rewrite(p, activations=np.array(["swish2", "softmax"])), "unknown activation 'swish2'"),
    (lambda p: _rewrite(p, alphas=np.array([np.nan, 0.0])), "alpha must be finite"),
    (lambda p: _rewrite(p, loss=np.array(["hinge"])), r"loss must be a string, got shape \(1,\)"),
    (lambda p: _rewrite(p, loss_param=np.array(1 + 1j)), "loss_param must hold real numbers"),
    (lambda p: _rewrite(p, seed=np.array([-1])), "seed words must be non-negative"),
    (lambda p: _rewrite(p, seed=np.array([1.5])), "seed must hold integers, got float64"),
])
def test_damaged_or_foreign_files_are_named_value_errors(tmp_path, monkeypatch, damage, match):
    _, path = _saved_net(tmp_path)
    damage(path)
    _no_build(monkeypatch)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} is not a saved backprop network: .*{match}"):
        bp.MLP.load(path)


def test_configuration_the_network_refuses_names_the_file(tmp_path):
    """An output/loss pair that makes no sense is refused by the constructor, before it allocates anything."""
    _, path = _saved_net(tmp_path)
    _rewrite(path, activations=np.array(["tanh", "tanh"]))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} is not a saved backprop network: .*does not go"):
        bp.MLP.load(path)


def test_crc_damage_inside_a_member_is_found(tmp_path, monkeypatch):
    net, path = _saved_net(tmp_path)
    W0 = net.get_params()[0][0]
    _flip(path, path.read_bytes().index(W0.tobytes()) + 5)
    _no_build(monkeypatch)
    with pytest.raises(ValueError, match="damaged: CRC check failed for W0"):
        bp.MLP.load(path)


def test_object_arrays_are_refused_without_unpickling(tmp_path, monkeypatch):
    _, path = _saved_net(tmp_path)
    arrays = _members(path)
    arrays["W0"] = np.array([_Trap()] * 12, dtype=object).reshape(4, 3)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # allow_pickle: this member is a pickle
    _no_build(monkeypatch)
    with pytest.raises(ValueError, match="W0 must hold real numbers, got object"):
        bp.MLP.load(path)
    assert not _SPRUNG


_SPRUNG: list[int] = []


def _spring() -> None:
    _SPRUNG.append(1)


class _Trap:
    def __reduce__(self):
        return _spring, ()


@pytest.mark.parametrize("sizes", [[12000, 12000], [10**6, 10**6]])
def test_huge_sizes_without_weights_build_nothing(tmp_path, monkeypatch, sizes):
    """A 1.5 KB file claiming [12000, 12000] (1.6 GB) or [1e6, 1e6] (7 TiB) is refused before anything is
    built or allocated."""
    _, path = _saved_net(tmp_path)
    arrays = _members(path)
    arrays.update(sizes=np.array(sizes), activations=np.array(["identity"]), alphas=np.zeros(1),
                  loss=np.array("mse"))
    for key in ("W0", "b0", "W1", "b1"):
        del arrays[key]
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    assert path.stat().st_size < 2000
    _no_build(monkeypatch)
    with pytest.raises(ValueError, match="missing W0"):
        bp.MLP.load(path)


def _zip_with(path, members: dict[str, bytes], compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for key, data in members.items():
            zf.writestr(f"{key}.npy", data)


def _one_layer_members(n_in, n_out, W_npy: bytes) -> dict[str, bytes]:
    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    return {"sizes": npy(np.array([n_in, n_out])), "activations": npy(np.array(["identity"])),
            "alphas": npy(np.zeros(1)), "loss": npy(np.array("mse")), "loss_param": npy(np.array(1.0)),
            "dtype": npy(np.array("float64")), "W0": W_npy, "b0": npy(np.zeros(n_out))}


@pytest.mark.parametrize("n", [4, 10**6])
def test_lying_npy_header_is_refused_before_reading(tmp_path, monkeypatch, n):
    """A member whose header claims more data than the member holds allocates nothing."""
    header = {"descr": "<f8", "fortran_order": False, "shape": (n, 3)}
    path = tmp_path / "lying.npz"
    _zip_with(path, _one_layer_members(3, n, _npy_member(header, b"\0" * 8)))
    _no_build(monkeypatch)
    with pytest.raises(ValueError, match=rf"damaged: W0 declares shape \({n}, 3\) of float64 but holds 8 bytes"):
        bp.MLP.load(path)


def test_zip_bomb_claims_are_refused_before_reading(tmp_path, monkeypatch):
    """A deflated member whose directory entry claims far more bytes than its compressed data can hold."""
    n = 10**5
    header = {"descr": "<f8", "fortran_order": False, "shape": (n, 3)}
    path = tmp_path / "bomb.npz"
    _zip_with(path, _one_layer_members(3, n, _npy_member(header, b"\0" * 64)), zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    central = data.rindex(b"PK\x01\x02", 0, data.rindex(b"W0.npy"))
    data[central + 24:central + 28] = (0xFFFF_FFF0).to_bytes(4, "little")  # uncompressed size: 4 GB
    path.write_bytes(bytes(data))
    _no_build(monkeypatch)
    with pytest.raises(ValueError, match="damaged: the zip directory gives W0 4294967280 bytes from"):
        bp.MLP.load(path)


def test_compressed_and_fortran_order_files_load(tmp_path):
    """What np.savez_compressed writes, or Fortran-ordered or big-endian arrays, still loads exactly."""
    net, path = _saved_net(tmp_path, dtype="float64")
    arrays = _members(path)
    arrays["W0"] = np.asfortranarray(arrays["W0"])
    arrays["W1"] = arrays["W1"].astype(">f8")
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    back = bp.MLP.load(tmp_path / "c.npz", backend="numpy")
    _assert_params_equal(back, net.get_params())


def test_describe_without_layer_paths():
    net = bp.MLP([3, 4, 2], backend="numpy")
    lines = net.describe().splitlines()
    assert lines[0] == repr(net) and all("a GEMM and an elementwise kernel per pass" in line for line in lines[1:])
    assert len(lines) == 3


def test_set_flat_params_replaces_every_parameter_or_nothing(rng):
    """``set_flat_params`` takes the layout of ``params`` (every W row by row, then every b), casts, and refuses
    a wrong shape, a non-real array or a value not finite in the network's dtype, changing nothing."""
    net = bp.MLP([3, 4, 2], dtype="float32", backend="numpy")
    flat = rng.normal(size=net.n_params)
    net.set_flat_params(flat)
    np.testing.assert_array_equal(net.params, flat.astype(np.float32))
    W0, b1 = net.get_params()[0][0], net.get_params()[1][1]
    np.testing.assert_array_equal(W0.ravel(), flat[:12].astype(np.float32))
    np.testing.assert_array_equal(b1, flat[-2:].astype(np.float32))
    before = np.array(net.params, copy=True)
    for bad, error, match in [(flat[:-1], ValueError, r"shape \(26,\)"), (flat + 1j, TypeError, "flat parameters"),
                              (np.where(np.arange(flat.size) == 5, 1e39, flat), ValueError, "not finite in float32")]:
        with pytest.raises(error, match=match):
            net.set_flat_params(bad)
        np.testing.assert_array_equal(net.params, before)
