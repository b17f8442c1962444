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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import step
from .concurrency import holding
from .distributed import Communicator, DistributedError
from .epochs import end_epoch, run_epochs
from .fit_plan import FitPlan, plan_fit, take_rows
from .lbfgs import LBFGS, FullBatchObjective, run_lbfgs
from .optimizers import Optimizer
from .progress import in_ci, should_show
from .step import NonFiniteLossError

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


# --------------------------------------------------------------------------- fit
Callback = Callable[["MLP", int, History], Any]


class _FitEpochs:
    """``fit``'s policy for :func:`~backprop.epochs.run_epochs` (and its L-BFGS iterations): the plan's
    schedule and shuffles, its step function (or the data-parallel step), the :class:`History`, validation
    after each epoch, the callbacks, and a :class:`~backprop.network.NonFiniteLossError` naming the failed step."""

    def __init__(self, net: MLP, plan: FitPlan, history: History) -> None:
        self.net, self.plan, self.history = net, plan, history
        self.start = time.perf_counter()

    def _staging(self, rows: int) -> tuple[Any, Any]:
        ws = step.workspace(self.net, rows)
        return ws.x, ws.t

    def begin_epoch(self, epoch: int) -> np.ndarray | None:
        plan = self.plan
        if plan.lrs is not None:
            plan.optimizer.lr = plan.lrs[epoch - 1]
        plan.optimizer.check(self.net.dtype)  # callbacks may have changed its settings
        self.start = time.perf_counter()
        return plan.rng.permutation(plan.data.n) if plan.shuffle else None

    def steps(self, order: np.ndarray | None, guard: step.Guard) -> Iterator[int]:
        net, plan = self.net, self.plan
        optimizer, parallel, run_step = plan.optimizer, plan.parallel, plan.run_step
        if parallel is None:
            for rows, xb, tb in plan.data.epoch(plan.batch_size, order, self._staging):
                run_step(net, step.workspace(net, rows), xb, tb, optimizer, guard, weight=rows)
                yield rows
            return
        for number, (rows, mine, xb, tb) in enumerate(parallel.epoch(plan.data, plan.batch_size, order,
                                                                     self._staging), 1):
            parallel.train_step(xb, tb, mine, rows, plan.batch_size, optimizer, guard, number)
            yield rows

    def read(self, guard: step.Guard, epoch: int) -> step.GuardState:
        return guard.read() if self.plan.parallel is None else self.plan.parallel.read(guard, epoch)

    def diverged(self, epoch: int, state: step.GuardState, order: np.ndarray | None) -> None:
        # met by every rank alike: they all applied the same reduced gradients
        cause = _failed_step_cause(self.net, self.plan, order, state.failed_step)
        raise NonFiniteLossError(f"training stopped at epoch {epoch}, step {state.failed_step}: {cause}; this step "
                                 "was not applied (try a smaller learning rate)")

    def record(self, epoch: int, state: step.GuardState) -> None:
        self.history.loss.append(state.loss_sum / self.plan.data.n)
        self.history.lr.append(float(self.plan.optimizer.lr))

    def validate(self, epoch: int) -> None:
        """Validation metrics (each rank scoring its share of the rows in a data-parallel fit), then the
        epoch's time, counted from :meth:`begin_epoch` (or the previous L-BFGS iteration)."""
        plan, history = self.plan, self.history
        if plan.val is not None:
            # in minibatches of the training size: bounded memory, never costlier than the epoch itself,
            # and the same GEMM shapes as training (a multithreaded BLAS switching its threading
            # between shapes can stall on a busy machine)
            vl, va = (evaluate(self.net, *plan.val, batch_size=plan.batch_size) if plan.parallel is None
                      else plan.parallel.evaluate(evaluation_sums, *plan.val, batch_size=plan.batch_size, epoch=epoch))
            history.val_loss.append(vl)
            if va is not None:
                history.val_accuracy.append(va)
        history.epoch_time.append(time.perf_counter() - self.start)

    def metrics(self) -> dict[str, str]:
        return _metrics(self.history, self.plan.lrs is not None)

    def log(self) -> None:
        """No log without a bar."""

    def should_stop(self, epoch: int) -> bool:
        """Every callback runs (a checkpoint still saves the epoch at which early stopping fires); any that
        returns True stops training (``history`` then says which and when), on every rank of a data-parallel fit."""
        history, callbacks = self.history, self.plan.callbacks
        stops = [cb(self.net, epoch, history) is True for cb in callbacks]
        stop = any(stops)
        if stop:
            if history.stopped_epoch is None:
                history.stopped_epoch = epoch
            if history.stop_reason is None:
                first = callbacks[stops.index(True)]
                name = getattr(first, "__name__", None) or type(first).__name__
                history.stop_reason = f"callback {name} returned True"
        parallel = self.plan.parallel
        if parallel is not None and parallel.end_epoch(epoch, stop) and not stop:
            history.stopped_epoch, history.stop_reason = epoch, "another rank's callback asked to stop"
            stop = True
        return stop


def _failed_step_cause(net: MLP, plan: FitPlan, order: np.ndarray | None, failed: int) -> str:
    """What went wrong in step ``failed`` of the epoch (:func:`backprop.step.failure_cause`)."""
    data, batch_size = plan.data, plan.global_batch
    lo = (failed - 1) * batch_size
    rows = np.arange(lo, min(lo + batch_size, data.n)) if order is None else order[lo:lo + batch_size]
    k = net.backend.kernels
    x, t = take_rows(k, data.X, rows, net.dtype), take_rows(k, data.T, rows, net.dtype)
    if not k.owns(x):
        x, t = k.to_device(x, net.dtype), k.to_device(t, net.dtype)
    return step.failure_cause(net, step.workspace(net, len(rows)), x, t, plan.optimizer)


def _fit_lbfgs(net: MLP, plan: FitPlan, policy: _FitEpochs, bar: _ProgressBar | None) -> None:
    """``fit`` with the full-batch :class:`~backprop.lbfgs.LBFGS` (:func:`~backprop.lbfgs.run_lbfgs`): one epoch
    per L-BFGS iteration, at most ``epochs`` of them. A loss or gradient that is not finite stops training with
    :class:`~backprop.network.NonFiniteLossError`, the parameters left at the last iterate."""
    opt, history = plan.optimizer, policy.history
    assert isinstance(opt, LBFGS)
    objective = FullBatchObjective.over(net, plan.data, opt.chunk, opt.weight_decay)
    done = [0]

    def iteration_done(epoch: int, xk: np.ndarray) -> bool:
        done[0] = epoch
        loss = objective.value_at(xk)  # the network holds xk afterwards (the last evaluation, or this one)
        net.set_flat_params(xk)
        history.loss.append(loss)
        history.lr.append(float("nan"))
        stop = end_epoch(policy, epoch, bar)
        policy.start = time.perf_counter()
        return stop

    if bar is not None:
        bar.start_epoch(1)
    policy.start = time.perf_counter()
    try:
        run = run_lbfgs(objective, max_iter=plan.epochs, max_fun=opt.max_fun, tol=opt.tol, memory=opt.memory,
                        after_iteration=iteration_done)
    finally:
        opt.steps += done[0]
        opt.evaluations += objective.evaluations
    if run.failure is not None:
        raise NonFiniteLossError(f"L-BFGS stopped in iteration {run.iterations + 1}: {run.failure}; the parameters "
                                 f"are those of iteration {run.iterations}") from run.failure
    opt.message = str(run.result.message)
    if history.stop_reason is None and run.iterations < plan.epochs:
        history.stop_reason = f"L-BFGS stopped: {opt.message}"


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
    plan = plan_fit(net, X, T, epochs=epochs, batch_size=batch_size, optimizer=optimizer, shuffle=shuffle,
                    validation_data=validation_data, progress=progress, callbacks=callbacks, schedule=schedule,
                    seed=seed, validation_split=validation_split, early_stopping=early_stopping, patience=patience,
                    min_delta=min_delta, monitor=monitor, restore_best=restore_best, graph=graph,
                    distributed=distributed)
    return _run(net, plan)


def _run(net: MLP, plan: FitPlan) -> History:
    """Train ``net`` as ``plan`` says: the callbacks' begin and end hooks around the epochs (or the L-BFGS
    iterations), the bar and its closing line; a data-parallel run first agrees on every setting and takes rank
    0's parameters, and a failure on one rank (other than a non-finite step, met by all) ends the job."""
    parallel = plan.parallel
    if parallel is not None:  # every rank's settings alike, then rank 0's parameters and optimizer state everywhere
        parallel.start(plan.optimizer, plan.settings(net))
    history = History()
    for cb in plan.callbacks:
        hook = getattr(cb, "on_train_begin", None)
        if hook is not None:
            hook(net, history)
    bar = _ProgressBar(plan.epochs) if plan.show else None
    policy = _FitEpochs(net, plan, history)
    try:
        if plan.full_batch:
            _fit_lbfgs(net, plan, policy, bar)
        else:
            run_epochs(policy, plan.optimizer, net.backend.kernels, plan.epochs, plan.steps_per_epoch, bar)
    except (NonFiniteLossError, DistributedError):
        raise  # met by every rank at once
    except BaseException as exc:
        if parallel is not None:  # the other ranks wait for this one: end the job
            parallel.fail(exc, f"epoch {len(history.loss) + 1} of fit")
        raise
    finally:
        if bar is not None:
            bar.close()
    for cb in plan.callbacks:
        hook = getattr(cb, "on_train_end", None)
        if hook is not None:
            hook(net, history)
    if plan.show:
        line = closing_line(history)
        if line:  # under the bar, which stays at the epoch where training stopped
            print(line, file=sys.stderr, flush=True)
    return history
