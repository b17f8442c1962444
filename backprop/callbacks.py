"""Per-epoch hooks for :func:`backprop.training.fit`: early stopping and checkpointing.

A callback is any callable ``cb(net, epoch, history)``, run after each epoch with the number of the epoch
just completed (epochs count from 1, as everywhere ``fit`` and :class:`~backprop.training.History` name one:
``epoch`` is also the number of epochs completed, and ``history.loss[epoch - 1]`` is this epoch's loss);
returning ``True`` stops training (``history.stopped_epoch``, ``history.stop_reason``). A callback may also
define ``on_train_begin(net, history)`` and ``on_train_end(net, history)``, which ``fit`` calls before the
first epoch and after the last one (not when training ends with an exception), and ``check_setup(net,
setup)``, which ``fit`` calls with the run's :class:`FitSetup` after checking the data and its own options and
before ``on_train_begin``: a callback that cannot work in this run (a metric that will never be recorded, a
path it cannot write) raises there, before any parameter changes.

>>> import backprop as bp
>>> net = bp.MLP([4, 8, 3], head="multiclass")
>>> cbs = [bp.callbacks.checkpoint("best.npz", best_only=True)]    # doctest: +SKIP
>>> history = net.fit(X, y, epochs=100, validation_split=0.1, callbacks=cbs)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .validation import check_positive

if TYPE_CHECKING:
    from .network import MLP
    from .training import History

__all__ = ["Callback", "Checkpoint", "EarlyStopping", "FitSetup", "checkpoint", "early_stopping"]

_METRICS = ("loss", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class FitSetup:
    """What a run of :func:`~backprop.training.fit` will record, given to ``check_setup`` hooks before the
    first step: ``epochs``; ``validation``: whether ``val_loss`` is recorded; ``accuracy``: whether
    ``val_accuracy`` is (validation data and a classification head); ``loss``: the network's loss."""

    epochs: int
    validation: bool
    accuracy: bool
    loss: str


class Callback:
    """Base class (optional): override ``__call__`` and, if needed, the begin/end hooks."""

    def check_setup(self, net: MLP, setup: FitSetup) -> None:
        """Called once before the first step; raise ``ValueError``/``TypeError`` to refuse the run."""

    def on_train_begin(self, net: MLP, history: History) -> None:
        """Called once before the first epoch."""

    def __call__(self, net: MLP, epoch: int, history: History) -> bool | None:
        """Called after each epoch; return ``True`` to stop training."""
        return None

    def on_train_end(self, net: MLP, history: History) -> None:
        """Called once after the last epoch."""


def _check_monitor(monitor: str) -> str:
    if monitor not in _METRICS + ("auto",):
        raise ValueError(f"monitor must be one of {', '.join(_METRICS)} or 'auto', got {monitor!r}")
    return monitor


def _resolve_monitor(monitor: str, history: History) -> str:
    """``'auto'`` is ``val_loss`` when there is validation data, else ``loss``."""
    if monitor == "auto":
        return "val_loss" if history.val_loss else "loss"
    if monitor != "loss" and not getattr(history, monitor):
        raise ValueError(f"cannot monitor {monitor!r}: fit has no validation data"
                         + (" with accuracy (classification heads only)" if monitor == "val_accuracy" else "")
                         + "; pass validation_data or validation_split")
    return monitor


class _Monitor:
    """Tracks the best value of one metric of the history."""

    def __init__(self, monitor: str, min_delta: float) -> None:
        self.monitor = _check_monitor(monitor)
        self.min_delta = check_positive(min_delta, "min_delta", allow_zero=True)
        self.reset()

    def check(self, setup: FitSetup, owner: str) -> None:
        """Refuse a metric that the run described by ``setup`` will never record."""
        if self.monitor in ("auto", "loss") or (self.monitor == "val_loss" and setup.validation):
            return
        if self.monitor == "val_accuracy" and setup.accuracy:
            return
        if not setup.validation:
            why = "fit has no validation data; pass validation_data or validation_split"
        else:
            why = (f"no accuracy is recorded for loss {setup.loss!r} (classification heads only: cross_entropy, "
                   "bce); monitor 'val_loss' instead")
        raise ValueError(f"{owner} cannot monitor {self.monitor!r}: {why}")

    def reset(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None

    def improved(self, epoch: int, history: History) -> bool:
        """Record the metric of ``epoch``; ``True`` if it beats the best so far by more than ``min_delta``."""
        name = _resolve_monitor(self.monitor, history)
        value = getattr(history, name)[-1]
        bigger_is_better = name == "val_accuracy"
        if not math.isfinite(value):
            return False
        if self.best is None:
            better = True
        elif bigger_is_better:
            better = value > self.best + self.min_delta
        else:
            better = value < self.best - self.min_delta
        if better:
            self.best, self.best_epoch = value, epoch
        return better


class EarlyStopping(Callback):
    """Stop once the monitored metric has gone ``patience`` epochs in a row without improving by more than
    ``min_delta`` (``patience=0``: at the first epoch that does not improve).

    ``monitor``: ``"val_loss"``, ``"val_accuracy"``, ``"loss"`` or ``"auto"`` (``val_loss`` when there is
    validation data, else ``loss``). With ``restore_best`` the network gets back the parameters of its best
    epoch when training ends. ``history.best_epoch``, ``history.stopped_epoch``, ``history.stop_reason`` (e.g.
    ``"no val_loss improvement for 10 epochs"``) and ``history.restored_epoch`` record what happened.
    """

    def __init__(self, patience: int = 10, min_delta: float = 0.0, monitor: str = "auto",
                 restore_best: bool = True) -> None:
        self.patience = check_positive(patience, "patience", integer=True, allow_zero=True)
        self._monitor = _Monitor(monitor, min_delta)
        self.restore_best = bool(restore_best)
        self._best_params: list[Any] | None = None
        self._wait = 0

    @property
    def monitor(self) -> str:
        return self._monitor.monitor

    @property
    def best_epoch(self) -> int | None:
        return self._monitor.best_epoch

    def __repr__(self) -> str:
        return (f"EarlyStopping(patience={self.patience}, min_delta={self._monitor.min_delta}, "
                f"monitor={self.monitor!r}, restore_best={self.restore_best})")

    def check_setup(self, net: MLP, setup: FitSetup) -> None:
        self._monitor.check(setup, "early stopping")

    def on_train_begin(self, net: MLP, history: History) -> None:
        self._monitor.reset()
        self._best_params = None
        self._wait = 0

    def __call__(self, net: MLP, epoch: int, history: History) -> bool:
        if self._monitor.improved(epoch, history):
            self._wait = 0
            history.best_epoch = epoch
            if self.restore_best:
                self._best_params = net.get_params()
            return False
        self._wait += 1
        if self._wait >= self.patience:
            history.stopped_epoch = epoch
            name = _resolve_monitor(self.monitor, history)
            by = f" by more than {self._monitor.min_delta:g}" if self._monitor.min_delta else ""
            history.stop_reason = (f"no {name} improvement{by} for {self._wait} "
                                   f"epoch{'' if self._wait == 1 else 's'}")
            return True
        return False

    def on_train_end(self, net: MLP, history: History) -> None:
        if self.restore_best and self._best_params is not None and self._monitor.best_epoch != history.epochs:
            net.set_params(self._best_params)
            history.restored_epoch = self._monitor.best_epoch


class Checkpoint(Callback):
    """Save the network with :meth:`MLP.save` every ``every`` epochs, or only when the monitored metric
    improves (``best_only=True``).

    ``path`` may hold ``{epoch}`` (``"ckpt-{epoch:03d}.npz"``) to keep one file per save. Each save writes
    a temporary file next to ``path`` and renames it, so an interrupted save never leaves a broken file.
    Before the first step ``fit`` checks that the directory of ``path`` can be created and written (a parent
    that is a regular file is refused), and that ``best_only`` has a metric to watch: validation data, or
    ``monitor="loss"`` explicitly.
    ``self.saved`` lists the paths written, ``self.best_epoch`` the epoch of the best save. In a data-parallel
    run (:mod:`backprop.distributed`), where every rank holds the same parameters, only rank 0 writes.
    """

    def __init__(self, path: str | os.PathLike[str], every: int = 1, best_only: bool = False,
                 monitor: str = "auto", min_delta: float = 0.0) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or path, got {type(path).__name__}")
        self.path = os.fspath(path)
        try:
            self.path.format(epoch=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"path may hold only the placeholder {{epoch}}: {exc}") from None
        self.every = check_positive(every, "every", integer=True)
        self.best_only = bool(best_only)
        self._monitor = _Monitor(monitor, min_delta)
        self.saved: list[str] = []

    @property
    def best_epoch(self) -> int | None:
        return self._monitor.best_epoch

    def __repr__(self) -> str:
        return (f"Checkpoint({self.path!r}, every={self.every}, best_only={self.best_only}, "
                f"monitor={self._monitor.monitor!r})")

    def check_setup(self, net: MLP, setup: FitSetup) -> None:
        if self.best_only:
            if self._monitor.monitor == "auto" and not setup.validation:
                raise ValueError("checkpoint(best_only=True) needs validation data to tell the best epoch: pass "
                                 "validation_data or validation_split (or monitor='loss' to keep the epoch of "
                                 "lowest training loss)")
            self._monitor.check(setup, "checkpoint(best_only=True)")
        self._check_writable(Path(self.path.format(epoch=1)))

    @staticmethod
    def _check_writable(target: Path) -> None:
        """Refuse a path whose directory cannot be created or written; leaves no directory or file behind."""
        created: list[Path] = []
        try:
            if target.is_dir():
                raise ValueError(f"checkpoint path {target} is a directory; name a file in it, e.g. "
                                 f"{target / 'net.npz'}")
            ancestor = target.parent
            missing = []
            while not ancestor.exists() and ancestor != ancestor.parent:
                missing.append(ancestor)
                ancestor = ancestor.parent
            if not ancestor.is_dir():
                raise ValueError(f"checkpoint path {target}: its parent {ancestor} is a regular file, not a directory")
            for d in reversed(missing):
                d.mkdir()
                created.append(d)
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".probe"):
                pass
        except OSError as exc:
            raise ValueError(f"checkpoint path {target}: cannot create or write its directory {target.parent} "
                             f"({exc.strerror or exc})") from None
        finally:
            for d in reversed(created):
                try:
                    d.rmdir()
                except OSError:
                    pass

    def on_train_begin(self, net: MLP, history: History) -> None:
        self._monitor.reset()
        self.saved = []

    def __call__(self, net: MLP, epoch: int, history: History) -> bool:
        if self.best_only:
            due = self._monitor.improved(epoch, history)
        else:
            due = epoch % self.every == 0
        if due:
            self._save(net, self.path.format(epoch=epoch))
        return False

    def _save(self, net: MLP, path: str) -> None:
        from .distributed import rank

        if rank() != 0:  # the same parameters on every rank: one writer
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        net.save(target)  # atomic: a failed save leaves the previous file
        self.saved.append(str(target))


def checkpoint(path: str | os.PathLike[str], every: int = 1, best_only: bool = False, monitor: str = "auto",
               min_delta: float = 0.0) -> Checkpoint:
    """A callback saving the network to ``path`` every ``every`` epochs, or on each improvement of
    ``monitor`` with ``best_only=True`` (reload with ``bp.MLP.load(path)``)."""
    return Checkpoint(path, every=every, best_only=best_only, monitor=monitor, min_delta=min_delta)


def early_stopping(patience: int = 10, min_delta: float = 0.0, monitor: str = "auto",
                   restore_best: bool = True) -> EarlyStopping:
    """A callback stopping training once ``monitor`` stalls for ``patience`` epochs (see :class:`EarlyStopping`)."""
    return EarlyStopping(patience=patience, min_delta=min_delta, monitor=monitor, restore_best=restore_best)
