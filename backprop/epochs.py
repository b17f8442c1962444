"""Epochs of minibatch steps, written once: the loop that :func:`backprop.training.fit` and the scikit-learn
estimators' ``"sgd"``/``"adam"`` solvers both drive.

Each epoch runs its steps on the backend under one :class:`~backprop.step.Guard` and reads nothing back but
the guard, once at its end (and, with a progress bar, at the bar's throttled redraws). A step that was not
finite was skipped on the backend with every later one: the optimizer's step count is put back to the steps
applied and the policy reports the failure (it raises, or records the epoch and training ends). Otherwise the
policy records the epoch, scores the validation data, the bar shows the epoch's metrics (the policy logs them
when there is no bar), and the policy says whether training stops there.

What differs between ``fit`` and the estimators (the order of the rows and the random numbers drawn for it,
how a step is taken, the bookkeeping, the stopping rules, the messages) is the :class:`EpochPolicy`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from . import step

if TYPE_CHECKING:
    from .optimizers import Optimizer
    from .step import GuardState

__all__ = ["EpochPolicy", "end_epoch", "run_epochs"]


class EpochPolicy(Protocol):
    """What a training run decides for :func:`run_epochs`; epochs count from 1."""

    def begin_epoch(self, epoch: int) -> np.ndarray | None:
        """Set the epoch up (learning rate, clocks); the order of its rows (``None``: the stored order)."""

    def steps(self, order: np.ndarray | None, guard: step.Guard) -> Iterable[int]:
        """Take the epoch's steps under ``guard``, yielding the rows of each after queuing it."""

    def read(self, guard: step.Guard, epoch: int) -> GuardState:
        """The epoch's guard, read once."""

    def diverged(self, epoch: int, state: GuardState, order: np.ndarray | None) -> None:
        """Step ``state.failed_step`` of ``epoch`` was not finite: raise, or record it (training then ends)."""

    def record(self, epoch: int, state: GuardState) -> None:
        """Record the finished epoch's loss (``state.loss_sum``: the steps' losses, weighted, summed)."""

    def validate(self, epoch: int) -> None:
        """Score the validation data (if any) and keep what the stopping rules need."""

    def metrics(self) -> dict[str, str]:
        """The epoch's metrics as the progress bar shows them."""

    def log(self) -> None:
        """Report the epoch when there is no progress bar (or do nothing)."""

    def should_stop(self, epoch: int) -> bool:
        """Whether training ends after ``epoch`` (callbacks, early stopping, convergence)."""


def end_epoch(policy: EpochPolicy, epoch: int, bar: Any | None) -> bool:
    """What follows a recorded epoch (or L-BFGS iteration): validation, the bar or the log, the stopping
    rules; whether training stops."""
    policy.validate(epoch)
    if bar is not None:
        bar.update(policy.metrics())
    else:
        policy.log()
    return policy.should_stop(epoch)


def run_epochs(policy: EpochPolicy, optimizer: Optimizer, kernels: Any, epochs: int, steps_per_epoch: int,
               bar: Any | None = None) -> None:
    """Run up to ``epochs`` epochs of ``policy``'s steps (``steps_per_epoch`` each, as the bar counts them)
    with ``optimizer`` on the backend of ``kernels`` (module docstring). ``bar``: a progress bar with
    ``start_epoch(steps)``, ``after_step(rows, guard)`` and ``update(metrics)``, or ``None``; its owner closes it."""
    for epoch in range(1, epochs + 1):
        order = policy.begin_epoch(epoch)
        guard = step.Guard(kernels)
        steps_before = optimizer.steps
        if bar is None:
            for _ in policy.steps(order, guard):
                pass
        else:
            bar.start_epoch(steps_per_epoch)
            for rows in policy.steps(order, guard):
                bar.after_step(rows, guard)  # reads the guard a few times a second at most
        state = policy.read(guard, epoch)  # the one read of the epoch (without a bar)
        if state.failed:  # that step and every later one were skipped on the backend
            optimizer.steps = steps_before + state.failed_step - 1
            policy.diverged(epoch, state, order)
            return
        policy.record(epoch, state)
        if end_epoch(policy, epoch, bar):
            return
