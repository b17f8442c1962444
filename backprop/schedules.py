"""Learning-rate schedules: callables ``epoch -> lr`` for ``fit(..., schedule=...)``.

A schedule's argument is the number of epochs completed before the epoch whose rate it gives:
:func:`backprop.training.fit` sets ``optimizer.lr = schedule(e - 1)`` at the start of epoch ``e`` (epochs count
from 1 everywhere they are named: callbacks, ``History``, messages), so ``schedule(0)`` is the rate of the first
epoch and ``history.lr[i] == schedule(i)``. It is the count a callback receives, taken before the epoch
instead of after it. The formulas below are written in that count, ``e = 0, 1, 2, ...``.

>>> import backprop as bp
>>> s = bp.schedules.step_decay(0.1, drop=0.5, every=10)
>>> s(0), s(9), s(10), s(25)
(0.1, 0.1, 0.05, 0.025)
>>> c = bp.schedules.cosine_annealing(0.1, epochs=100, lr_min=0.001)
>>> round(c(0), 6), round(c(50), 6), round(c(100), 6)
(0.1, 0.0505, 0.001)

The schedules are small immutable objects (picklable, with a readable ``repr``); any function of the number
of completed epochs returning a non-negative learning rate works as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .validation import check_positive

__all__ = [
    "Constant",
    "CosineAnnealing",
    "ExponentialDecay",
    "Schedule",
    "StepDecay",
    "constant",
    "cosine_annealing",
    "exponential_decay",
    "step_decay",
]


def _epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not float(epoch).is_integer() or epoch < 0:
        raise ValueError(f"epoch (the number of epochs completed) must be a non-negative integer, got {epoch!r}")
    return int(epoch)


class Schedule:
    """Base class of the schedules: ``schedule(e) -> lr``, ``e`` the number of epochs completed (0 first)."""

    def __call__(self, epoch: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Constant(Schedule):
    """``lr`` at every epoch."""

    lr: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", check_positive(self.lr, "lr"))

    def __call__(self, epoch: int) -> float:
        _epoch(epoch)
        return self.lr


@dataclass(frozen=True)
class StepDecay(Schedule):
    """``lr0 * drop ** (e // every)``: multiply by ``drop`` every ``every`` epochs (``e``: epochs completed,
    so with ``every=10`` epochs 1-10 run at ``lr0`` and epoch 11 at ``lr0 * drop``)."""

    lr0: float
    drop: float = 0.5
    every: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr0", check_positive(self.lr0, "lr0"))
        drop = check_positive(self.drop, "drop")
        if drop > 1:
            raise ValueError(f"drop must lie in (0, 1], got {drop}")
        object.__setattr__(self, "drop", drop)
        object.__setattr__(self, "every", check_positive(self.every, "every", integer=True))

    def __call__(self, epoch: int) -> float:
        return self.lr0 * self.drop ** (_epoch(epoch) // self.every)


@dataclass(frozen=True)
class ExponentialDecay(Schedule):
    """``lr0 * rate ** e`` (``e``: epochs completed, so ``lr0`` for the first epoch), floored at ``lr_min``."""

    lr0: float
    rate: float = 0.95
    lr_min: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr0", check_positive(self.lr0, "lr0"))
        rate = check_positive(self.rate, "rate")
        if rate > 1:
            raise ValueError(f"rate must lie in (0, 1], got {rate}")
        object.__setattr__(self, "rate", rate)
        lr_min = check_positive(self.lr_min, "lr_min", allow_zero=True)
        if lr_min > self.lr0:
            raise ValueError(f"lr_min ({lr_min}) must not exceed lr0 ({self.lr0})")
        object.__setattr__(self, "lr_min", lr_min)

    def __call__(self, epoch: int) -> float:
        return max(self.lr0 * self.rate ** _epoch(epoch), self.lr_min)


@dataclass(frozen=True)
class CosineAnnealing(Schedule):
    """Half a cosine from ``lr0`` (``e = 0``: the first epoch) down to ``lr_min`` at ``e = epochs`` (after the
    last of ``epochs`` epochs, so ``fit(epochs=N)`` with ``cosine_annealing(lr0, N)`` never quite reaches it),
    then ``lr_min`` (or, with ``restart=True``, again from ``lr0`` every ``epochs`` epochs: SGDR without growth).

    ``lr(e) = lr_min + (lr0 - lr_min) (1 + cos(pi e / epochs)) / 2``, ``e``: the number of epochs completed.
    """

    lr0: float
    epochs: int
    lr_min: float = 0.0
    restart: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr0", check_positive(self.lr0, "lr0"))
        object.__setattr__(self, "epochs", check_positive(self.epochs, "epochs", integer=True))
        lr_min = check_positive(self.lr_min, "lr_min", allow_zero=True)
        if lr_min > self.lr0:
            raise ValueError(f"lr_min ({lr_min}) must not exceed lr0 ({self.lr0})")
        object.__setattr__(self, "lr_min", lr_min)
        object.__setattr__(self, "restart", bool(self.restart))

    def __call__(self, epoch: int) -> float:
        e = _epoch(epoch)
        e = e % self.epochs if self.restart else min(e, self.epochs)
        return self.lr_min + (self.lr0 - self.lr_min) * (1 + math.cos(math.pi * e / self.epochs)) / 2


def constant(lr: float) -> Constant:
    """The same learning rate at every epoch."""
    return Constant(lr)


def step_decay(lr0: float, drop: float = 0.5, every: int = 10) -> StepDecay:
    """``lr0 * drop ** (e // every)``, ``e``: the number of epochs completed (0 for the first)."""
    return StepDecay(lr0, drop, every)


def exponential_decay(lr0: float, rate: float = 0.95, lr_min: float = 0.0) -> ExponentialDecay:
    """``max(lr0 * rate ** e, lr_min)``, ``e``: the number of epochs completed (0 for the first)."""
    return ExponentialDecay(lr0, rate, lr_min)


def cosine_annealing(lr0: float, epochs: int, lr_min: float = 0.0, restart: bool = False) -> CosineAnnealing:
    """Cosine from ``lr0`` down to ``lr_min`` over ``epochs`` epochs (pass the ``epochs`` of ``fit``)."""
    return CosineAnnealing(lr0, epochs, lr_min, restart)
