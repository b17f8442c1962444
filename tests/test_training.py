"""Training experience: history, progress bar, validation split, early stopping, schedules, weight decay,
callbacks, checkpoints, determinism."""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest

import backprop as bp
from backprop import callbacks, schedules, training
from backprop.backend import Backend
from backprop.bench.progress import Progress
from backprop.progress import should_show
from backprop.step import Guard


def blobs(rng: np.random.Generator, n: int = 120, d: int = 4, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, k, size=n)
    centers = rng.normal(size=(k, d)) * 3
    return centers[y] + rng.normal(size=(n, d)), y


def net_for(X: np.ndarray, k: int = 3, **kw) -> bp.MLP:
    kw.setdefault("backend", "numpy")
    return bp.MLP([X.shape[1], 16, k], activation="relu", head="multiclass", dtype="float64", **kw)


# --------------------------------------------------------------------------- history
def test_history_records_every_epoch(rng):
    X, y = blobs(rng)
    h = net_for(X).fit(X, y, epochs=7, batch_size=16, optimizer=bp.Adam(1e-2), validation_data=(X, y))
    assert h.epochs == 7 and len(h.val_loss) == len(h.val_accuracy) == len(h.epoch_time) == len(h.lr) == 7
    assert all(t > 0 for t in h.epoch_time) and h.total_time == pytest.approx(sum(h.epoch_time))
    assert h.loss[-1] < h.loss[0] and h.val_accuracy[-1] > 0.8
    assert h.best_epoch is None and h.stopped_epoch is None
    d = h.as_dict()
    assert d["loss"] == h.loss and d["loss"] is not h.loss and d["best_epoch"] is None
    assert d["stop_reason"] is None and d["restored_epoch"] is None


def test_history_prints_a_short_summary():
    n = 500
    h = bp.History(loss=[1.0 / (e + 1) for e in range(n)], val_loss=[0.5 + abs(e - 37) / 100 for e in range(n)],
                   val_accuracy=[0.5 + min(e, 40) / 100 for e in range(n)], epoch_time=[0.01] * n,
                   lr=[0.1] * n, best_epoch=38, stopped_epoch=n, stop_reason="no val_loss improvement for 10 epochs",
                   restored_epoch=38)
    text = str(h)
    assert text == repr(h) and "\n" not in text and len(text) < 300
    for fact in ("500 epochs", "5s", "final loss 0.002", "val_loss 5.12", "val_accuracy 0.9000",
                 "best val_loss 0.5 at epoch 38", "best val_accuracy 0.9000 at epoch 41",
                 "stopped at epoch 500 (no val_loss improvement for 10 epochs), restored epoch 38"):
        assert fact in text, fact
    assert "0.3333" not in text  # no list is dumped
    assert repr(bp.History()) == "History(no epochs)"
    ran_all = bp.History(loss=[0.3, 0.2, 0.25], epoch_time=[1.0] * 3, lr=[0.1] * 3, best_epoch=2, restored_epoch=2)
    assert training.closing_line(ran_all) == "restored epoch 2 (the best of 3)"
    assert repr(ran_all) == "History(3 epochs in 3s; final loss 0.25; best epoch 2; restored epoch 2 (the best of 3))"
    plain = repr(bp.History(loss=[0.5], epoch_time=[90.0], lr=[0.1]))
    assert plain == "History(1 epoch in 1m30.0s; final loss 0.5)"


def test_fitted_history_summary(rng):
    X, y = blobs(rng)
    h = net_for(X).fit(X, y, epochs=4, optimizer=bp.Adam(1e-2), validation_data=(X, y))
    text = repr(h)
    assert text.startswith("History(4 epochs in ") and f"final loss {h.loss[-1]:.4g}" in text
    best = int(np.argmin(h.val_loss)) + 1
    assert f"best val_loss {min(h.val_loss):.4g} at epoch {best}" in text and "stopped" not in text


def test_regression_history_has_no_accuracy(rng):
    X = rng.normal(size=(50, 3))
    T = X @ rng.normal(size=(3, 2))
    net = bp.MLP([3, 8, 2], head="regression", dtype="float64", backend="numpy")
    h = net.fit(X, T, epochs=3, validation_data=(X, T))
    assert len(h.val_loss) == 3 and h.val_accuracy == []


def test_history_plot_writes_a_png_headless(rng, tmp_path):
    pytest.importorskip("matplotlib")
    X, y = blobs(rng)
    h = net_for(X).fit(X, y, epochs=5, optimizer=bp.Adam(1e-2), validation_split=0.2, early_stopping=True,
                       patience=2)
    path = tmp_path / "curves.png"
    fig = h.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert fig.axes and fig.axes[0].get_xlabel() == "epoch"
    with pytest.raises(ValueError, match="no epochs"):
        bp.History().plot(tmp_path / "empty.png")


def test_history_plot_without_path_returns_a_pyplot_figure(rng):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X, y = blobs(rng)
    fig = net_for(X).fit(X, y, epochs=2).plot()
    assert plt.fignum_exists(fig.number)
    plt.close(fig)


# --------------------------------------------------------------------------- progress bar
def test_progress_bar_shows_loss_and_validation_metrics(rng, capsys):
    pytest.importorskip("tqdm")
    X, y = blobs(rng)
    net_for(X).fit(X, y, epochs=3, validation_data=(X, y), progress=True,
                   schedule=schedules.step_decay(0.05, 0.5, 1))
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err and "val_loss=" in err and "val_acc=" in err and "lr=" in err


def _count_guard_reads(monkeypatch) -> list:
    reads = []
    original = Guard.read
    monkeypatch.setattr(Guard, "read", lambda self: reads.append(1) or original(self))
    return reads


def test_progress_bar_moves_within_the_epoch_showing_the_running_loss(rng, capsys, monkeypatch):
    """With a bar, the guard is read again within an epoch (here at every step: no throttle) and the bar shows
    the batches done and the running loss (loss sum / rows so far); without one, once per epoch."""
    pytest.importorskip("tqdm")
    X, y = blobs(rng, n=120)
    monkeypatch.setattr(training, "PROGRESS_INTERVAL", 0.0)
    reads = _count_guard_reads(monkeypatch)
    net = net_for(X, seed=2)
    first_batch = net_for(X, seed=2).loss(X[:16], y[:16])  # the first step's loss, before its update
    net.fit(X, y, epochs=2, batch_size=16, shuffle=False, progress=True)  # 8 steps per epoch, the last short
    assert len(reads) == 2 * 8  # 7 redraws within each epoch (not after its last step) + its own read
    err = capsys.readouterr().err
    assert re.search(r"batch=1/8, loss=([^,\]\s]+)", err).group(1) == f"{first_batch:.4g}"
    assert "batch=7/8" in err and "batch=8/8" not in err and "2/2" in err
    reads.clear()
    net.fit(X, y, epochs=2, batch_size=16, progress=False)
    assert len(reads) == 2 and capsys.readouterr().err == ""  # no bar: one read per epoch, as ever


def test_progress_bar_redraws_are_throttled_by_wall_clock(rng, capsys, monkeypatch):
    pytest.importorskip("tqdm")
    X, y = blobs(rng, n=120)
    reads = _count_guard_reads(monkeypatch)
    net_for(X).fit(X, y, epochs=3, batch_size=8, progress=True)  # epochs far shorter than the interval
    assert training.PROGRESS_INTERVAL <= 1.0 and len(reads) == 3
    clock = iter(range(0, 1000, 3))  # a clock 3 s later at each look
    monkeypatch.setattr(training, "_clock", lambda: float(next(clock)))
    monkeypatch.setattr(training, "PROGRESS_INTERVAL", 5.0)
    reads.clear()
    net_for(X).fit(X, y, epochs=1, batch_size=8, progress=True)  # 15 steps
    # the bar looks at 0 s (next redraw due at 5 s), after step 1 (3 s: not due), after step 2 (6 s: redraw,
    # then a look at 9 s: due at 14 s), step 3 (12 s), step 4 (15 s: redraw), ...: steps 2, 4, ..., 14; none
    # after the last step, whose read is the epoch's own
    assert len(reads) == 7 + 1
    assert "batch=" in capsys.readouterr().err


def test_no_progress_bar_unless_asked(rng, capsys):
    X, y = blobs(rng)
    net_for(X).fit(X, y, epochs=2, validation_data=(X, y))
    net_for(X).fit(X, y, epochs=2, progress=None)  # auto: pytest's captured stderr is no terminal
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


class _Tty:
    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("ci,auto", [(None, True), ("true", False), ("1", False), ("0", True), ("false", True)])
def test_auto_progress_is_off_in_ci(monkeypatch, ci, auto):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert training.in_ci() is (not auto)
    assert training.progress_enabled(None) is auto
    assert training.progress_enabled(True) is True  # an explicit request always shows the bar
    assert training.progress_enabled(False) is False
    with pytest.raises(TypeError, match="progress"):
        training.progress_enabled("yes")
    assert should_show(None) is auto and should_show(True) and not should_show(False)


@pytest.mark.parametrize("ci,tty,auto", [(None, True, True), ("true", True, False), (None, False, False),
                                         ("true", False, False)])
def test_benchmark_bar_follows_the_same_rule(monkeypatch, ci, tty, auto):
    """backprop-bench's bar: drawn where fit(progress=None) draws one, off with --no-progress, forced on
    request."""
    pytest.importorskip("tqdm")
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    if tty:
        monkeypatch.setattr(sys, "stderr", _Tty())
    assert should_show(None) is auto and training.progress_enabled(None) is auto
    with Progress(3) as bar:
        assert bar.shown is auto
    with Progress(3, enabled=False) as bar:
        assert not bar.shown
    with Progress(3, force=True) as bar:
        assert bar.shown
    with Progress(3, enabled=False, force=True) as bar:
        assert not bar.shown


# --------------------------------------------------------------------------- validation split, early stopping
def test_validation_split_holds_out_a_fraction(rng):
    X, y = blobs(rng, n=100)
    seen = []

    def spy(net, epoch, history):
        seen.append(epoch)

    h = net_for(X).fit(X, y, epochs=2, batch_size=100, validation_split=0.25, callbacks=[spy])
    assert len(h.val_loss) == 2 and seen == [1, 2]
    # 75 training samples in one batch of 100: the recorded loss is that of 75 samples
    with pytest.raises(ValueError, match="not both"):
        net_for(X).fit(X, y, validation_split=0.2, validation_data=(X, y))
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="validation_split"):
            net_for(X).fit(X, y, validation_split=bad)
    with pytest.raises(ValueError, match="both need at least one"):
        net_for(X[:2]).fit(X[:2], y[:2], validation_split=0.1)


def _overfitting_problem(rng):
    """Few noisy samples, a wide network, a large learning rate: validation loss turns up quickly."""
    X = rng.normal(size=(60, 10))
    y = (X[:, 0] + rng.normal(size=60) * 1.5 > 0).astype(int)
    return X, y


def test_early_stopping_stops_and_restores_the_best_epoch(rng):
    X, y = _overfitting_problem(rng)
    snapshots = {}

    def keep(net, epoch, history):
        snapshots[epoch] = net.get_params()

    net = bp.MLP([10, 128, 2], head="multiclass", dtype="float64", backend="numpy", seed=0)
    h = net.fit(X, y, epochs=300, batch_size=8, optimizer=bp.Adam(1e-2), validation_split=0.3,
                early_stopping=True, patience=5, callbacks=[keep])
    assert h.stopped_epoch is not None and h.epochs == h.stopped_epoch < 300
    assert h.best_epoch == int(np.argmin(h.val_loss)) + 1 == h.stopped_epoch - 5
    for (W, b), (Wb, bb) in zip(net.get_params(), snapshots[h.best_epoch]):
        np.testing.assert_array_equal(W, Wb)
        np.testing.assert_array_equal(b, bb)


def test_early_stopping_says_why_it_stopped(rng, capsys):
    """The closing line under the bar (which stays at the stopping epoch), and the same facts on the History."""
    pytest.importorskip("tqdm")
    X, y = _overfitting_problem(rng)
    kw = dict(epochs=300, batch_size=8, optimizer=bp.Adam(1e-2), validation_split=0.3, early_stopping=True,
              patience=5)
    h = bp.MLP([10, 128, 2], head="multiclass", dtype="float64", backend="numpy", seed=0).fit(X, y, progress=True,
                                                                                             **kw)
    assert h.stop_reason == "no val_loss improvement for 5 epochs" and h.restored_epoch == h.best_epoch
    line = (f"stopped at epoch {h.stopped_epoch} (no val_loss improvement for 5 epochs), "
            f"restored epoch {h.best_epoch}")
    err = capsys.readouterr().err
    assert err.rstrip().endswith(line) and f"{h.stopped_epoch}/300" in err
    assert line in repr(h)

    quiet = bp.MLP([10, 128, 2], head="multiclass", dtype="float64", backend="numpy", seed=0).fit(X, y, **kw)
    assert capsys.readouterr().err == "" and quiet.stop_reason == h.stop_reason  # no bar: nothing printed

    kept = bp.MLP([10, 128, 2], head="multiclass", dtype="float64", backend="numpy", seed=0).fit(
        X, y, progress=True, **{**kw, "restore_best": False, "min_delta": 0.01, "patience": 1})
    assert kept.restored_epoch is None
    assert capsys.readouterr().err.rstrip().endswith(
        f"stopped at epoch {kept.stopped_epoch} (no val_loss improvement by more than 0.01 for 1 epoch)")


def test_a_callback_that_stops_training_is_named(rng, capsys):
    pytest.importorskip("tqdm")
    X, y = blobs(rng)

    def enough(net, epoch, history):
        return epoch == 2

    h = net_for(X).fit(X, y, epochs=10, callbacks=[enough], progress=True)
    assert (h.stopped_epoch, h.stop_reason, h.restored_epoch) == (2, "callback enough returned True", None)
    assert capsys.readouterr().err.rstrip().endswith("stopped at epoch 2 (callback enough returned True)")


def test_early_stopping_without_restore_keeps_the_last_epoch(rng):
    X, y = _overfitting_problem(rng)
    last = {}
    net = bp.MLP([10, 128, 2], head="multiclass", dtype="float64", backend="numpy", seed=0)
    h = net.fit(X, y, epochs=300, batch_size=8, optimizer=bp.Adam(1e-2), validation_split=0.3,
                early_stopping=True, patience=5, restore_best=False,
                callbacks=[lambda n, e, hist: last.update(p=n.get_params())])
    assert h.stopped_epoch < 300
    np.testing.assert_array_equal(net.get_params()[0][0], last["p"][0][0])


def test_early_stopping_on_accuracy_and_on_training_loss(rng):
    X, y = _overfitting_problem(rng)
    h = net_for(X, k=2).fit(X, y, epochs=200, optimizer=bp.Adam(1e-2), validation_split=0.3,
                            early_stopping=True, patience=3, monitor="val_accuracy")
    assert h.stopped_epoch is not None and h.best_epoch == int(np.argmax(h.val_accuracy)) + 1
    h = net_for(X, k=2).fit(X, y, epochs=50, optimizer=bp.SGD(1e-4), early_stopping=True, patience=2,
                            monitor="loss", min_delta=1.0)
    assert h.stopped_epoch == 3 and h.best_epoch == 1


def test_early_stopping_needs_validation_data(rng):
    X, y = blobs(rng)
    with pytest.raises(ValueError, match="needs validation data"):
        net_for(X).fit(X, y, early_stopping=True)
    with pytest.raises(ValueError, match="monitor"):
        callbacks.early_stopping(monitor="accuracy")
    with pytest.raises(ValueError, match="no validation data"):
        net_for(X).fit(X, y, callbacks=[callbacks.early_stopping(monitor="val_loss")])


# --------------------------------------------------------------------------- schedules
def test_schedule_values():
    s = schedules.step_decay(0.1, drop=0.5, every=10)
    assert [s(e) for e in (0, 9, 10, 25)] == [0.1, 0.1, 0.05, 0.025]
    e = schedules.exponential_decay(1.0, rate=0.5, lr_min=0.1)
    assert [e(i) for i in range(5)] == [1.0, 0.5, 0.25, 0.125, 0.1]
    c = schedules.cosine_annealing(0.1, epochs=100, lr_min=0.001)
    assert c(0) == pytest.approx(0.1) and c(50) == pytest.approx(0.0505) and c(100) == pytest.approx(0.001)
    assert c(150) == pytest.approx(0.001)
    assert all(c(i) >= c(i + 1) for i in range(100))
    r = schedules.cosine_annealing(0.1, epochs=10, restart=True)
    assert r(10) == r(0) and r(13) == r(3)
    assert schedules.constant(0.3)(7) == 0.3
    assert "StepDecay(lr0=0.1" in repr(s)


@pytest.mark.parametrize("make,match", [
    (lambda: schedules.step_decay(0.1, drop=1.5), "drop"),
    (lambda: schedules.step_decay(0.1, every=0), "every"),
    (lambda: schedules.exponential_decay(-1), "lr0"),
    (lambda: schedules.exponential_decay(0.1, rate=2), "rate"),
    (lambda: schedules.cosine_annealing(0.1, epochs=0), "epochs"),
    (lambda: schedules.cosine_annealing(0.1, epochs=5, lr_min=0.2), "lr_min"),
    (lambda: schedules.step_decay(0.1)(-1), "epoch"),
])
def test_schedule_bad_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_fit_follows_the_schedule(rng):
    X, y = blobs(rng)
    sched = schedules.cosine_annealing(0.05, epochs=6)
    opt = bp.SGD(lr=1.0)
    h = net_for(X).fit(X, y, epochs=6, optimizer=opt, schedule=sched)
    assert h.lr == [sched(e) for e in range(6)]
    with pytest.raises(TypeError, match="schedule"):
        net_for(X).fit(X, y, schedule=0.1)
    with pytest.raises(ValueError, match=r"scheduled learning rate of epoch 1 \(schedule\(0\)\)"):
        net_for(X).fit(X, y, schedule=lambda e: -1.0)
    with pytest.raises(ValueError, match=r"scheduled learning rate of epoch 3 \(schedule\(2\)\)"):
        net_for(X).fit(X, y, epochs=4, schedule=lambda e: 0.1 if e < 2 else float("nan"))


def test_epoch_numbering_is_one_rule(rng):
    """Epochs count from 1 (callbacks, History); a schedule gets the number of epochs completed before the
    epoch it sets: schedule(e - 1) for epoch e, the count the callback of epoch e - 1 received."""
    X, y = blobs(rng)
    asked, seen = [], []

    def sched(completed):
        asked.append(completed)
        return 0.01 * (completed + 1)

    def cb(net, epoch, history):
        seen.append((epoch, history.epochs, history.lr[-1]))

    h = net_for(X).fit(X, y, epochs=4, optimizer=bp.SGD(1.0), schedule=sched, callbacks=[cb])
    assert asked == [0, 1, 2, 3]
    assert seen == [(e, e, sched(e - 1)) for e in (1, 2, 3, 4)]
    assert h.lr == [sched(i) for i in range(4)]
    # the built-in schedules: the first epoch runs at lr0, step_decay(every=2) drops after two epochs
    h = net_for(X).fit(X, y, epochs=5, optimizer=bp.SGD(1.0), schedule=schedules.step_decay(0.1, 0.5, every=2))
    assert h.lr == [0.1, 0.1, 0.05, 0.05, 0.025]


# --------------------------------------------------------------------------- weight decay
@pytest.mark.parametrize("make", [lambda wd: bp.SGD(0.05, weight_decay=wd),
                                  lambda wd: bp.SGD(0.05, momentum=0.9, weight_decay=wd),
                                  lambda wd: bp.Adam(1e-2, weight_decay=wd)])
def test_weight_decay_shrinks_weights_not_biases(rng, make):
    X, y = blobs(rng)
    norms = []
    for wd in (0.0, 0.5):
        net = net_for(X, seed=0)
        net.fit(X, y, epochs=20, optimizer=make(wd), seed=1)
        norms.append(sum(float((W ** 2).sum()) for W, _ in net.get_params()))
    assert norms[1] < 0.7 * norms[0]


def test_weight_decay_alone_decays_weights_geometrically():
    """Zero error (targets equal to the outputs): plain SGD with decay multiplies W by (1 - lr wd) per step."""
    net = bp.MLP([3, 4, 2], head="regression", dtype="float64", backend="numpy", seed=0)
    X = np.random.default_rng(0).normal(size=(8, 3))
    W0 = [W for W, _ in net.get_params()]
    net.fit(X, net.predict(X), epochs=1, batch_size=8, optimizer=bp.SGD(0.1, weight_decay=0.5))
    np.testing.assert_allclose(net.get_params()[1][0], W0[1] * 0.95, rtol=1e-12)


# --------------------------------------------------------------------------- callbacks and checkpoints
def test_callbacks_see_every_epoch_and_can_stop(rng):
    X, y = blobs(rng)
    calls = []

    class Recorder(callbacks.Callback):
        def on_train_begin(self, net, history):
            calls.append("begin")

        def __call__(self, net, epoch, history):
            calls.append(epoch)
            return epoch == 3

        def on_train_end(self, net, history):
            calls.append("end")

    after = []
    h = net_for(X).fit(X, y, epochs=10, callbacks=[Recorder(), lambda n, e, hist: after.append(e)])
    assert calls == ["begin", 1, 2, 3, "end"] and h.epochs == 3 and h.stopped_epoch == 3
    assert after == [1, 2, 3]  # every callback runs, also at the epoch where another one stops training
    with pytest.raises(TypeError, match="callbacks"):
        net_for(X).fit(X, y, callbacks=[42])


def test_checkpoint_every_and_placeholder(rng, tmp_path):
    X, y = blobs(rng)
    net = net_for(X)
    cb = callbacks.checkpoint(tmp_path / "ckpt-{epoch:02d}.npz", every=2)
    net.fit(X, y, epochs=5, callbacks=[cb])
    assert sorted(os.listdir(tmp_path)) == ["ckpt-02.npz", "ckpt-04.npz"]
    assert cb.saved == [str(tmp_path / "ckpt-02.npz"), str(tmp_path / "ckpt-04.npz")]
    latest = tmp_path / "sub" / "latest.npz"
    net.fit(X, y, epochs=2, callbacks=[callbacks.checkpoint(latest)])
    back = bp.MLP.load(latest, backend="numpy")
    np.testing.assert_array_equal(back.predict(X), net.predict(X))
    with pytest.raises(ValueError, match="placeholder"):
        callbacks.checkpoint(tmp_path / "{step}.npz")


def test_checkpoint_best_only_keeps_the_best_epoch(rng, tmp_path):
    X, y = _overfitting_problem(rng)
    snapshots = {}
    net = bp.MLP([10, 128, 2], head="multiclass", dtype="float64", backend="numpy", seed=0)
    cb = callbacks.checkpoint(tmp_path / "best.npz", best_only=True)
    h = net.fit(X, y, epochs=40, batch_size=8, optimizer=bp.Adam(1e-2), validation_split=0.3,
                callbacks=[cb, lambda n, e, hist: snapshots.update({e: n.get_params()})])
    best = int(np.argmin(h.val_loss)) + 1
    assert cb.best_epoch == best < 40 and len(cb.saved) < 40
    saved = bp.MLP.load(tmp_path / "best.npz", backend="numpy").get_params()
    np.testing.assert_array_equal(saved[0][0], snapshots[best][0][0])
    assert os.listdir(tmp_path) == ["best.npz"]  # no temporary files left behind


# --------------------------------------------------------------------------- determinism
def _cpu(backend: Backend) -> None:
    if backend.is_gpu or backend.is_simulated:
        pytest.skip("bit-identical training is promised on the CPU backends")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_same_parameters_bit_for_bit(backend, rng, dtype):
    _cpu(backend)
    X, y = blobs(rng, n=200, d=6)

    def run(seed: int, opt) -> list:
        net = bp.MLP([6, 32, 16, 3], activation="tanh", head="multiclass", dtype=dtype, seed=seed,
                     backend=backend.name)
        h = net.fit(X, y, epochs=4, batch_size=24, optimizer=opt, validation_split=0.2,
                    schedule=schedules.exponential_decay(0.01, 0.9))
        return [a for pair in net.get_params() for a in pair] + [np.array(h.loss)]

    for make in (lambda: bp.Adam(1e-2, weight_decay=1e-3), lambda: bp.SGD(0.05, momentum=0.9, nesterov=True)):
        a, b, c = run(3, make()), run(3, make()), run(4, make())
        for x, z in zip(a, b):
            np.testing.assert_array_equal(x, z)
        assert not np.array_equal(a[0], c[0])


def test_fit_seed_overrides_the_network_seed(rng):
    X, y = blobs(rng)
    a, b = net_for(X, seed=1), net_for(X, seed=1)
    a.fit(X, y, epochs=2, seed=5)
    b.fit(X, y, epochs=2, seed=6)
    assert not np.array_equal(a.get_params()[0][0], b.get_params()[0][0])


# --------------------------------------------------------------------------- divergence message
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_non_finite_loss_names_epoch_step_and_cause(rng):
    X = rng.normal(size=(64, 3)) * 100
    T = rng.normal(size=(64, 1)) * 100
    net = bp.MLP([3, 8, 1], activation="relu", dtype="float32", backend="numpy")
    with pytest.raises(bp.NonFiniteLossError, match=r"epoch \d+, step \d+: the loss is (nan|inf)") as info:
        net.fit(X, T, epochs=50, batch_size=8, optimizer=bp.SGD(lr=10.0), shuffle=False)
    assert "smaller learning rate" in str(info.value)
