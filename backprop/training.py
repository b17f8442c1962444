"""Minibatch training: epochs of shuffled batches, validation, early stopping, schedules, history,
progress bar.

Epochs are numbered from 1 wherever one is named: the ``epoch`` given to callbacks (the epoch just
completed), ``History.best_epoch`` / ``stopped_epoch`` / ``restored_epoch``, checkpoint paths, messages and
the x axis of ``History.plot``; ``history.loss[e - 1]`` is epoch ``e``'s. A schedule is called with the number
of epochs completed before the epoch it sets (``schedule(0)`` for epoch 1): the same count a callback
receives, taken before the epoch instead of after it (see :mod:`backprop.schedules`).

>>> import backprop as bp
>>> net = bp.MLP([64, 128, 10], head="multiclass", seed=0)
>>> history = net.fit(X, y, epochs=50, batch_size=32, optimizer=bp.Adam(1e-3, weight_decay=1e-4),
...                   validation_split=0.1, early_stopping=True, patience=5,
...                   schedule=bp.schedules.cosine_annealing(1e-3, epochs=50),
...                   callbacks=[bp.callbacks.checkpoint("best.npz", best_only=True)],
...                   progress=True)                                   # doctest: +SKIP
>>> history.plot("curves.png")                                        # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .distributed import Communicator, DataParallel, DistributedError, world
from .lbfgs import LBFGS, FullBatchObjective, NonFiniteObjective, scipy_minimize
from .optimizers import SGD, Optimizer, check_optimizer
from . import step
from .step import NonFiniteLossError
from .concurrency import holding
from .progress import in_ci, should_show
from .staging import Batches, fits_on_device
from .validation import check_inputs, check_positive, check_seed, check_targets

if TYPE_CHECKING:
    from .network import MLP

__all__ = ["PROGRESS_INTERVAL", "Callback", "History", "closing_line", "evaluate", "fit", "in_ci",
           "progress_enabled"]


# --------------------------------------------------------------------------- history
@dataclass
class History:
    """Per-epoch record of a training run (what :func:`fit` returns); ``print(history)`` gives a one-line
    summary.

    ``loss``: mean training loss of each epoch (over its minibatches, before each update);
    ``val_loss`` / ``val_accuracy``: on the validation data after each epoch (accuracy for
    classification heads only); ``epoch_time``: seconds per epoch, validation included; ``lr``: the
    learning rate used in each epoch (``lr[e - 1] == schedule(e - 1)`` for epoch ``e``). Epochs count from 1:
    ``best_epoch`` (set by early stopping: the epoch of the best monitored value), ``stopped_epoch`` (the
    epoch after which training stopped early) with ``stop_reason`` (why, e.g. ``"no val_loss improvement for
    10 epochs"``), and ``restored_epoch`` (the epoch whose parameters early stopping's ``restore_best`` put
    back into the network) stay ``None`` when that did not happen.
    """

    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_epoch: int | None = None
    stop_reason: str | None = None
    restored_epoch: int | None = None

    @property
    def epochs(self) -> int:
        """Number of epochs run."""
        return len(self.loss)

    @property
    def total_time(self) -> float:
        """Seconds spent in all epochs."""
        return float(sum(self.epoch_time))

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}

    def __repr__(self) -> str:
        """One line: epochs run and time, final metrics, best validation values, early stopping."""
        n = self.epochs
        if not n:
            return "History(no epochs)"
        parts = [f"{n} epoch{'' if n == 1 else 's'} in {_seconds(self.total_time)}"]
        final = [f"loss {self.loss[-1]:.4g}"]
        if self.val_loss:
            final.append(f"val_loss {self.val_loss[-1]:.4g}")
        if self.val_accuracy:
            final.append(f"val_accuracy {self.val_accuracy[-1]:.4f}")
        parts.append("final " + ", ".join(final))
        best = [text for text in (_best(self.val_loss, "val_loss", min, "{:.4g}"),
                                  _best(self.val_accuracy, "val_accuracy", max, "{:.4f}")) if text]
        if best:
            parts.append(", ".join(best))
        elif self.best_epoch is not None:
            parts.append(f"best epoch {self.best_epoch}")
        end = closing_line(self)
        if end:
            parts.append(end)
        return "History(" + "; ".join(parts) + ")"

    __str__ = __repr__

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Draw the loss curves (log scale where positive) and the validation accuracy per epoch.

        With ``path`` the figure is written there (format from the extension) without touching pyplot's
        global state, so it works headless; without it the figure comes from ``matplotlib.pyplot`` (shown
        inline in notebooks). Returns the matplotlib ``Figure``.
        """
        try:
            import matplotlib  # noqa: F401
            from matplotlib.figure import Figure
        except ImportError as exc:  # pragma: no cover - matplotlib is in the test extras
            raise ImportError("History.plot needs matplotlib: pip install 'backprop-kernels[plot]'") from exc
        if not self.loss:
            raise ValueError("nothing to plot: the history holds no epochs")
        if path is None:
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(6, 4))
        else:
            fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot(1, 1, 1)
        epochs = np.arange(1, self.epochs + 1)
        lines = ax.plot(epochs, self.loss, label="training loss")
        if self.val_loss:
            lines += ax.plot(epochs[: len(self.val_loss)], self.val_loss, label="validation loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        if min(self.loss + self.val_loss) > 0:
            ax.set_yscale("log")
        if self.best_epoch is not None:
            lines.append(ax.axvline(self.best_epoch, color="grey", linestyle=":",
                                    label=f"best epoch ({self.best_epoch})"))
        if self.val_accuracy:
            ax2 = ax.twinx()
            lines += ax2.plot(epochs[: len(self.val_accuracy)], self.val_accuracy, color="tab:green",
                              label="validation accuracy")
            ax2.set_ylabel("accuracy")
        ax.legend(lines, [ln.get_label() for ln in lines], loc="center right")
        fig.tight_layout()
        if path is not None:
            fig.savefig(os.fspath(path), dpi=120)
        return fig


def _seconds(t: float) -> str:
    return f"{t:.3g}s" if t < 60 else f"{int(t // 60)}m{t % 60:04.1f}s"


def _best(values: list[float], name: str, pick: Callable[..., float], fmt: str) -> str | None:
    """``"best <name> <value> at epoch <e>"`` over the finite values (the first epoch reaching it)."""
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return None
    value = pick(finite)
    return f"best {name} {fmt.format(value)} at epoch {values.index(value) + 1}"


def closing_line(history: History) -> str | None:
    """What ended the run, e.g. ``"stopped at epoch 47 (no val_loss improvement for 10 epochs), restored
    epoch 37"``; ``None`` when it ran every epoch and nothing was restored."""
    if history.stopped_epoch is not None:
        line = f"stopped at epoch {history.stopped_epoch}"
        if history.stop_reason:
            line += f" ({history.stop_reason})"
        if history.restored_epoch is not None:
            line += f", restored epoch {history.restored_epoch}"
        return line
    if history.restored_epoch is not None:
        return f"restored epoch {history.restored_epoch} (the best of {history.epochs})"
    return None


# --------------------------------------------------------------------------- progress
def progress_enabled(progress: bool | None) -> bool:
    """Whether to draw a progress bar (:func:`backprop.progress.should_show`): ``True``/``False`` as given;
    ``None`` ("auto") only on an interactive terminal outside CI."""
    return should_show(progress)


#: Least seconds between two redraws of ``fit``'s bar within an epoch; each reads the device-side guard once
#: (a wait for the queued steps), so an epoch shorter than this reads it only once, at its end.
PROGRESS_INTERVAL = 0.5
_clock = time.monotonic  # the wall clock of the redraws (tests replace it)


class _ProgressBar:
    """A tqdm bar of epochs with the latest metrics; plain lines on stderr when tqdm is missing.

    Within an epoch, :meth:`after_step` redraws it with the batches done and the running loss, at most
    once per :data:`PROGRESS_INTERVAL` seconds of wall clock (a redraw at the end of an epoch counts too).
    """

    def __init__(self, total: int, desc: str | None = None) -> None:
        self.total = total
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is in the test extras
            self._bar = None
        else:
            self._bar = tqdm(total=total, unit="epoch", desc=desc, leave=True, dynamic_ncols=True)
        self._epoch = 0
        self.interval = float(PROGRESS_INTERVAL)
        self._due = _clock() + self.interval
        self._steps = self._rows = self._epoch_steps = 0

    def start_epoch(self, steps: int) -> None:
        """An epoch of ``steps`` minibatches begins."""
        self._steps = self._rows = 0
        self._epoch_steps = steps

    def after_step(self, rows: int, guard: step.Guard) -> None:
        """A step of ``rows`` rows was queued; when a redraw is due (never after the epoch's last step,
        whose read is the epoch's own), read ``guard`` for the running loss: loss sum / rows so far."""
        self._steps += 1
        self._rows += rows
        if self._bar is None or self._steps >= self._epoch_steps or _clock() < self._due:
            return
        state = guard.read()
        loss = "not finite" if state.failed else f"{state.loss_sum / self._rows:.4g}"
        self._bar.set_postfix({"batch": f"{self._steps}/{self._epoch_steps}", "loss": loss}, refresh=True)
        self._due = _clock() + self.interval

    def update(self, metrics: dict[str, str]) -> None:
        self._epoch += 1
        if self._bar is not None:
            self._bar.set_postfix(metrics, refresh=False)
            self._bar.update(1)
        else:  # pragma: no cover
            text = "  ".join(f"{k} {v}" for k, v in metrics.items())
            print(f"epoch {self._epoch}/{self.total}  {text}", file=sys.stderr, flush=True)
        self._due = _clock() + self.interval

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _metrics(history: History, show_lr: bool) -> dict[str, str]:
    post = {"loss": f"{history.loss[-1]:.4g}"}
    if history.val_loss:
        post["val_loss"] = f"{history.val_loss[-1]:.4g}"
    if history.val_accuracy:
        post["val_acc"] = f"{history.val_accuracy[-1]:.4f}"
    if show_lr:
        post["lr"] = f"{history.lr[-1]:.3g}"
    return post


# --------------------------------------------------------------------------- evaluation
def _batch_on_backend(kernels: Any, A: Any, lo: int, hi: int, dtype: np.dtype) -> Any:
    """Rows ``lo:hi`` of a checked array, on the backend (a view when ``A`` already is there)."""
    rows = A[lo:hi]
    return rows if kernels.owns(A) else kernels.to_device(rows, dtype)


def evaluate(net: MLP, X: Any, T: Any, batch_size: int = 4096) -> tuple[float, float | None]:
    """Mean loss on ``(X, T)`` (checked arrays, on the backend or on the host) and accuracy for
    classification heads (argmax for softmax, all outputs thresholded at 0.5 for sigmoid).

    Both are summed on the backend over the minibatches and read once at the end. A non-finite loss
    gives ``nan``."""
    loss_sum, correct = evaluation_sums(net, X, T, batch_size)
    n = int(X.shape[0])
    return loss_sum / n, (correct / n if correct is not None else None)


def evaluation_sums(net: MLP, X: Any, T: Any, batch_size: int = 4096) -> tuple[float, float | None]:
    """:func:`evaluate`'s sums: the loss summed over the rows (``nan`` when not finite) and the rows
    classified correctly (``None`` for a regression head)."""
    k = net.backend.kernels
    rule = net.loss_fn.spec.correct_rule  # how a classification head's prediction is scored, if at all
    tally = step.Guard(k)  # sums rows * loss over the batches; its "gradients" are none
    none = k.zeros((0,), net.dtype)
    correct = k.zeros((1,), np.float64) if rule else None
    n = int(X.shape[0])
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        x = _batch_on_backend(k, X, lo, hi, net.dtype)
        t = _batch_on_backend(k, T, lo, hi, net.dtype)
        ws = step.workspace(net, hi - lo)
        step.forward(net, ws, x)
        k.guard_step(tally.array, step.output_error(net, ws, t), none, float(hi - lo))
        if rule:
            k.count_correct(ws.y[-1], t, rule, correct)
    state = tally.read()
    return (float("nan") if state.failed else state.loss_sum), (float(k.to_host(correct)[0]) if rule else None)


def _take_rows(kernels: Any, A: Any, idx: np.ndarray, dtype: np.dtype) -> Any:
    """``A[idx]`` for a checked array, made where ``A`` lives."""
    if not kernels.owns(A):
        return A[idx]
    out = kernels.zeros((len(idx), A.shape[1]), dtype)
    return kernels.gather_rows(A, kernels.to_device(idx, np.int64), out)


# --------------------------------------------------------------------------- fit
Callback = Callable[["MLP", int, History], Any]


def _check_fraction(value: Any, name: str) -> float:
    value = check_positive(value, name, allow_zero=True)
    if value >= 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return value


def _failed_step_cause(net: MLP, data: Batches, order: np.ndarray | None, batch_size: int, failed: int,
                       optimizer: Optimizer) -> str:
    """What went wrong in step ``failed`` of the epoch (:func:`backprop.step.failure_cause`)."""
    lo = (failed - 1) * batch_size
    rows = np.arange(lo, min(lo + batch_size, data.n)) if order is None else order[lo:lo + batch_size]
    k = net.backend.kernels
    x, t = _take_rows(k, data.X, rows, net.dtype), _take_rows(k, data.T, rows, net.dtype)
    if not k.owns(x):
        x, t = k.to_device(x, net.dtype), k.to_device(t, net.dtype)
    return step.failure_cause(net, step.workspace(net, len(rows)), x, t, optimizer)


def _after_epoch(net: MLP, epoch: int, history: History, val: Any, batch_size: int, callbacks: list,
                 bar: _ProgressBar | None, show_lr: bool, start: float, parallel: DataParallel | None = None) -> bool:
    """What follows each epoch (or L-BFGS iteration) begun at ``start``: validation metrics (each rank scoring
    its share of the rows in a data-parallel fit), its time, the bar, every callback; returns True when one
    asks to stop (``history`` then says which and when)."""
    if val is not None:
        # in minibatches of the training size: bounded memory, never costlier than the epoch itself,
        # and the same GEMM shapes as training (a multithreaded BLAS switching its threading
        # between shapes can stall on a busy machine)
        vl, va = (evaluate(net, *val, batch_size=batch_size) if parallel is None
                  else parallel.evaluate(evaluation_sums, *val, batch_size=batch_size, epoch=epoch))
        history.val_loss.append(vl)
        if va is not None:
            history.val_accuracy.append(va)
    history.epoch_time.append(time.perf_counter() - start)
    if bar is not None:
        bar.update(_metrics(history, show_lr))
    # every callback runs (a checkpoint still saves the epoch at which early stopping fires)
    stops = [cb(net, epoch, history) is True for cb in callbacks]
    if not any(stops):
        return False
    if history.stopped_epoch is None:
        history.stopped_epoch = epoch
    if history.stop_reason is None:
        first = callbacks[stops.index(True)]
        name = getattr(first, "__name__", None) or type(first).__name__
        history.stop_reason = f"callback {name} returned True"
    return True


def _fit_lbfgs(net: MLP, data: Batches, val: Any, opt: LBFGS, epochs: int, callbacks: list,
               bar: _ProgressBar | None, history: History, batch_size: int) -> None:
    """``fit`` with the full-batch :class:`~backprop.lbfgs.LBFGS`: one epoch per L-BFGS iteration, at most
    ``epochs`` of them. A loss or gradient that is not finite stops training with
    :class:`~backprop.network.NonFiniteLossError`, the parameters left at the last iterate."""

    minimize = scipy_minimize()
    objective = FullBatchObjective.over(net, data, opt.chunk, opt.weight_decay)
    k = net.backend.kernels
    last = {"x": np.array(k.to_host(net.params), dtype=np.float64), "epoch": 0, "start": time.perf_counter()}

    def iteration_done(xk: np.ndarray) -> None:  # SciPy calls it after each iteration, at the new iterate
        last["x"], last["epoch"] = np.array(xk, dtype=np.float64, copy=True), last["epoch"] + 1
        loss = objective.value_at(xk)  # the network holds xk afterwards (the last evaluation, or this one)
        net.set_flat_params(xk)
        history.loss.append(loss)
        history.lr.append(float("nan"))
        stop = _after_epoch(net, last["epoch"], history, val, batch_size, callbacks, bar, False, last["start"])
        last["start"] = time.perf_counter()
        if stop:
            raise StopIteration

    if bar is not None:
        bar.start_epoch(1)
    try:
        result = minimize(objective, last["x"], method="L-BFGS-B", jac=True, callback=iteration_done,
                          options={"maxiter": epochs, "maxfun": opt.max_fun, "maxcor": opt.memory, "gtol": opt.tol})
    except NonFiniteObjective as exc:
        net.set_flat_params(last["x"])
        raise NonFiniteLossError(f"L-BFGS stopped in iteration {last['epoch'] + 1}: {exc}; the parameters are those "
                                 f"of iteration {last['epoch']}") from exc
    finally:
        opt.steps += last["epoch"]
        opt.evaluations += objective.evaluations
    net.set_flat_params(result.x)
    opt.message = str(result.message)
    if history.stop_reason is None and last["epoch"] < epochs:
        history.stop_reason = f"L-BFGS stopped: {opt.message}"


def _data_parallel(net: MLP, distributed: Any) -> DataParallel | None:
    """The data-parallel side of a fit: ``None`` for ``distributed=False``, else over :func:`world` or the
    communicator given."""
    if distributed is False or distributed is None:
        return None
    if distributed is True:
        return DataParallel(world(), net)
    if isinstance(distributed, Communicator):
        return DataParallel(distributed, net)
    raise TypeError(f"distributed must be True, False or a backprop.distributed.Communicator, got {distributed!r}")


def _settings(net: MLP, X: Any, T: Any, val: Any, parallel: DataParallel, **options: Any) -> dict[str, Any]:
    """What every rank of a distributed fit must agree on: the network, the data (shapes and a checksum), the
    validation data's shapes and ``options``."""
    return dict(
        network=(tuple(net.sizes), [(L.activation.name, L.activation.alpha) for L in net.layers],
                 net.loss_fn.name, net.loss_fn.param, str(np.dtype(net.dtype)), net.backend.name),
        data=(tuple(X.shape), tuple(T.shape)),
        data_checksum=parallel.data_checksum(X, T),
        validation=None if val is None else (tuple(val[0].shape), tuple(val[1].shape)),
        **options,
    )


@holding("fit")
def fit(net: MLP, X: Any, T: Any, *, epochs: int = 10, batch_size: int = 32,
        optimizer: Optimizer | LBFGS | None = None,
        shuffle: bool = True, validation_data: tuple[Any, Any] | None = None, progress: bool | None = False,
        callbacks: Iterable[Callback] | None = (), schedule: Callable[[int], float] | None = None,
        seed: int | None = None, validation_split: float = 0.0, early_stopping: bool = False,
        patience: int = 10, min_delta: float = 0.0, monitor: str = "auto", restore_best: bool = True,
        graph: bool = False, distributed: bool | Communicator = False) -> History:
    """Train ``net`` for ``epochs`` passes over ``(X, T)`` in minibatches of ``batch_size``.

    - ``optimizer`` defaults to ``SGD(lr=0.01)``; L2 weight decay is the optimizer's ``weight_decay``.
      :class:`~backprop.LBFGS` trains full-batch instead (SciPy's L-BFGS-B, see :mod:`backprop.lbfgs`): each
      iteration is an epoch, ``epochs`` bounds them, and the minibatch options play no part.
    - ``shuffle``: a fresh permutation each epoch, drawn from ``seed`` (default: the network's seed), so the
      same seed, data and backend give the same parameters (bit for bit on the CPU backends).
    - ``validation_data=(X_val, T_val)``, or ``validation_split=f``: hold out a random fraction ``f`` of
      ``(X, T)`` (drawn from ``seed``); validation loss (and accuracy for classification heads) is recorded
      after each epoch.
    - ``early_stopping=True``: stop once ``monitor`` (``"auto"``: ``val_loss``; or ``"val_accuracy"``,
      ``"loss"``) has gone ``patience`` epochs without improving by more than ``min_delta``, then restore
      the parameters of the best epoch if ``restore_best``. Needs validation data unless ``monitor="loss"``.
    - Epochs count from 1 (callbacks, ``History``, messages). ``schedule(completed) -> lr`` sets the learning
      rate at the start of each epoch, called with the number of epochs completed before it: ``schedule(0)``
      for epoch 1, ``schedule(e - 1)`` for epoch ``e`` (see :mod:`backprop.schedules`).
    - ``callbacks``: each ``cb(net, epoch, history)`` runs after each epoch, with the number of the epoch just
      completed (1 after the first); any returning ``True`` stops training (``history.stopped_epoch``,
      ``history.stop_reason``); ``check_setup`` / ``on_train_begin`` / ``on_train_end`` methods are called if
      present (see :mod:`backprop.callbacks`). ``None`` means no callbacks.
    - ``progress``: a tqdm bar of epochs with loss and validation metrics; within an epoch it shows the
      batches done and the running loss, redrawn at most every :data:`PROGRESS_INTERVAL` seconds (each
      redraw reads the loss back from the backend). When training stops early or early stopping restores an
      earlier epoch, a closing line says so (e.g. ``stopped at epoch 47 (no val_loss improvement for 10
      epochs), restored epoch 37``). ``None`` draws the bar only on an interactive terminal and never when
      the environment variable ``CI`` is set (:func:`backprop.progress.should_show`).
    - ``graph=True``: each step replays a captured CUDA graph (see :mod:`backprop.graph`; the cupy backend,
      SGD with or without momentum); the minibatch is gathered outside the graph.
    - ``distributed=True`` (or a :class:`~backprop.distributed.Communicator`): data-parallel training over the
      processes of an ``mpiexec`` run (see :mod:`backprop.distributed`): every rank passes the same network,
      data and options; each step takes ``size * batch_size`` rows, each rank the gradient of its share, one
      all-reduce sums them, and every rank applies the same update: the parameters one process would reach
      with ``batch_size * size``. Each rank scores its share of the validation rows; the progress bar is rank
      0's; callbacks run on every rank.

    All data, every option, every value of ``schedule`` (one call per epoch, all made before the first step)
    and every callback's ``check_setup`` are checked before any parameter changes; the data is moved to the
    backend once (see :mod:`backprop.staging`). The steps read nothing back: the loss is summed on the
    backend and read once per epoch (and, with a progress bar, at most once per redraw). If the loss or a
    gradient becomes non-finite, the update of that step and of every later one is skipped on the backend,
    and at the end of the epoch training stops with
    :class:`~backprop.network.NonFiniteLossError` naming the epoch and step; the parameters and the
    optimizer's state are those from before the failing step.

    One thread trains a network at a time: a call made while another thread trains ``net`` raises
    :class:`~backprop.ConcurrentTrainingError` before anything changes.
    """
    from .callbacks import EarlyStopping, FitSetup

    parallel = _data_parallel(net, distributed)
    shared_seed = None if parallel is None else parallel.shared_seed(net.seed if seed is None else seed)
    with nullcontext() if parallel is None else parallel.setting_up():  # on a failed check, every rank raises
        epochs = check_positive(epochs, "epochs", integer=True)
        batch_size = check_positive(batch_size, "batch_size", integer=True)
        full_batch = isinstance(optimizer, LBFGS)
        if full_batch:
            optimizer.check()
            if schedule is not None or graph:
                raise ValueError("the LBFGS optimizer takes no schedule (it has no learning rate) and no graph=True")
            if parallel is not None:
                raise ValueError("distributed=True trains with the minibatch optimizers (SGD, Adam), not LBFGS")
        else:
            optimizer = check_optimizer(SGD(lr=0.01) if optimizer is None else optimizer, dtype=net.dtype)
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable epoch -> lr, got {type(schedule).__name__}")
        seed = check_seed(seed)
        validation_split = _check_fraction(validation_split, "validation_split")
        show = should_show(progress) and (parallel is None or parallel.rank == 0)  # one bar, rank 0's
        if callbacks is None:
            callbacks = []
        elif callable(callbacks) or isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
            hint = ": wrap a single callback in a list" if callable(callbacks) else ""
            raise TypeError(f"callbacks must be a list of callables cb(net, epoch, history) (or None), got "
                            f"{type(callbacks).__name__}{hint}")
        callbacks = list(callbacks)
        for cb in callbacks:
            if not callable(cb):
                raise TypeError(f"callbacks must be callables cb(net, epoch, history), got {type(cb).__name__}")

        k = net.backend.kernels
        Xd = check_inputs(X, net.sizes[0], k, net.dtype, keep_host=True)
        Td = check_targets(T, net.sizes[-1], net.loss_fn.name, Xd.shape[0], k, net.dtype, keep_host=True)
        rng = np.random.default_rng(shared_seed if parallel is not None else net.seed if seed is None else seed)
        val = None
        if validation_data is not None:
            if validation_split:
                raise ValueError("pass validation_data or validation_split, not both")
            if not isinstance(validation_data, Sequence) or len(validation_data) != 2:
                raise TypeError("validation_data must be a pair (X_val, T_val)")
            Xv = check_inputs(validation_data[0], net.sizes[0], k, net.dtype, "X_val", keep_host=True)
            val = (Xv, check_targets(validation_data[1], net.sizes[-1], net.loss_fn.name, Xv.shape[0], k, net.dtype,
                                     "T_val", keep_host=True))
        elif validation_split:
            n_all = int(Xd.shape[0])
            n_val = int(round(n_all * validation_split))
            if n_val < 1 or n_val >= n_all:
                raise ValueError(f"validation_split={validation_split} of {n_all} samples leaves "
                                 f"{n_val} for validation and {n_all - n_val} for training; both need at least one")
            perm = rng.permutation(n_all)
            val = (_take_rows(k, Xd, perm[:n_val], net.dtype), _take_rows(k, Td, perm[:n_val], net.dtype))
            keep = np.sort(perm[n_val:])
            Xd, Td = _take_rows(k, Xd, keep, net.dtype), _take_rows(k, Td, keep, net.dtype)
        if early_stopping:
            if val is None and monitor != "loss":
                raise ValueError("early_stopping=True needs validation data: pass validation_split or validation_data "
                                 "(or monitor='loss' to watch the training loss)")
            callbacks.append(EarlyStopping(patience=patience, min_delta=min_delta, monitor=monitor,
                                           restore_best=restore_best))

        if not isinstance(graph, (bool, np.bool_)):
            raise TypeError(f"graph must be True or False, got {graph!r}")
        run_step = step.train_step
        if graph:
            if parallel is not None:
                raise ValueError("distributed=True does not replay CUDA graphs: pass graph=False")
            from .graph import check_graph_support, graphed_train_step

            check_graph_support(net, optimizer)
            run_step = graphed_train_step
        lrs = None
        if schedule is not None:  # every epoch's rate, checked before the first step
            lrs = [check_positive(schedule(e), f"scheduled learning rate of epoch {e + 1} (schedule({e}))",
                                  allow_zero=True)
                   for e in range(epochs)]
        setup = FitSetup(epochs=epochs, validation=val is not None,
                         accuracy=val is not None and net.loss_fn.spec.correct_rule is not None, loss=net.loss_fn.name)
        for cb in callbacks:
            hook = getattr(cb, "check_setup", None)
            if hook is not None:
                hook(net, setup)
        data = Batches(k, Xd, Td, net.dtype)
        if val is not None and not k.owns(val[0]) and fits_on_device(k, val[0].nbytes + val[1].nbytes):
            val = (k.to_device(val[0], net.dtype), k.to_device(val[1], net.dtype))
        n = data.n
    if parallel is not None:  # every rank's settings alike, then rank 0's parameters and optimizer state everywhere
        parallel.start(optimizer, _settings(net, Xd, Td, val, parallel, epochs=epochs, batch_size=batch_size,
                                            shuffle=shuffle, lrs=lrs, optimizer=repr(optimizer),
                                            validation_split=validation_split, callbacks=len(callbacks),
                                            early_stopping=(early_stopping, patience, min_delta, monitor,
                                                            restore_best)))
    history = History()
    for cb in callbacks:
        hook = getattr(cb, "on_train_begin", None)
        if hook is not None:
            hook(net, history)
    bar = _ProgressBar(epochs) if show else None
    global_batch = batch_size * (1 if parallel is None else parallel.size)  # the rows of one step
    steps_per_epoch = -(-n // global_batch)

    def staging(rows: int) -> tuple[Any, Any]:
        ws = step.workspace(net, rows)
        return ws.x, ws.t

    try:
        if full_batch:
            _fit_lbfgs(net, data, val, optimizer, epochs, callbacks, bar, history, batch_size)
        for epoch in range(1, epochs + 1 if not full_batch else 1):
            if lrs is not None:
                optimizer.lr = lrs[epoch - 1]
            optimizer.check(net.dtype)  # callbacks may have changed its settings
            start = time.perf_counter()
            order = rng.permutation(n) if shuffle else None
            guard = step.Guard(k)
            steps_before = optimizer.steps
            if bar is not None:
                bar.start_epoch(steps_per_epoch)
            if parallel is None:
                for rows, xb, tb in data.epoch(batch_size, order, staging):
                    run_step(net, step.workspace(net, rows), xb, tb, optimizer, guard, weight=rows)
                    if bar is not None:
                        bar.after_step(rows, guard)  # reads the guard a few times a second at most
                state = guard.read()  # the one read of the epoch (without a bar)
            else:
                for number, (rows, mine, xb, tb) in enumerate(parallel.epoch(data, batch_size, order, staging), 1):
                    parallel.train_step(xb, tb, mine, rows, batch_size, optimizer, guard, number)
                    if bar is not None:
                        bar.after_step(rows, guard)
                state = parallel.read(guard, epoch)
            if state.failed:  # on every rank alike: they all applied the same reduced gradients
                optimizer.steps = steps_before + state.failed_step - 1
                cause = _failed_step_cause(net, data, order, global_batch, state.failed_step, optimizer)
                raise NonFiniteLossError(
                    f"training stopped at epoch {epoch}, step {state.failed_step}: {cause}; this step was not "
                    "applied (try a smaller learning rate)"
                )
            total = state.loss_sum
            history.loss.append(total / n)
            history.lr.append(float(optimizer.lr))
            stop = _after_epoch(net, epoch, history, val, batch_size, callbacks, bar, schedule is not None, start,
                                parallel)
            if parallel is not None and parallel.end_epoch(epoch, stop) and not stop:
                history.stopped_epoch, history.stop_reason = epoch, "another rank's callback asked to stop"
                stop = True
            if stop:
                break
    except (NonFiniteLossError, DistributedError):
        raise  # met by every rank at once
    except BaseException as exc:
        if parallel is not None:  # the other ranks wait for this one: end the job
            parallel.fail(exc, f"epoch {len(history.loss) + 1} of fit")
        raise
    finally:
        if bar is not None:
            bar.close()
    for cb in callbacks:
        hook = getattr(cb, "on_train_end", None)
        if hook is not None:
            hook(net, history)
    if show:
        line = closing_line(history)
        if line:  # under the bar, which stays at the epoch where training stopped
            print(line, file=sys.stderr, flush=True)
    return history

