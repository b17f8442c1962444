"""Optimizers: how one layer's gradients ``dE/dW``, ``dE/db`` become a parameter update.

Each update is one fused in-place kernel per parameter array, given the step's guard: a step
whose loss or gradients are not finite changes neither the parameters nor the optimizer's state
(see :mod:`backprop.step`). Weight decay (L2) applies to weights, not biases.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import ModuleType
from typing import Any

import numpy as np

from .validation import check_positive

__all__ = ["SGD", "Adam", "Optimizer"]


class Optimizer(ABC):
    """Base class. ``lr`` may be changed between steps (learning-rate schedules do so)."""

    lr: float
    weight_decay: float

    def __init__(self) -> None:
        self.steps = 0
        self._state: dict[int, tuple[Any, dict[str, Any]]] = {}

    def begin_step(self) -> None:
        """Called once per training step, before the layers are updated."""
        self.steps += 1

    def prepare(self, kernels: ModuleType, guard: Any, dtype: Any) -> None:
        """Called once per training step by :func:`backprop.step.train_step`, after ``guard_step`` and
        before the layers' :meth:`apply`: device work the whole step shares (Adam's bias corrections).
        It must read nothing back to the host (a CUDA graph records it). The base does nothing."""

    def reset(self) -> None:
        """Forget all state (velocities, moments, the step count)."""
        self.steps = 0
        self._state.clear()

    def _slots(self, owner: Any, kernels: ModuleType, W: Any, b: Any, names: tuple[str, ...]) -> dict[str, Any]:
        key = id(owner)
        entry = self._state.get(key)
        if entry is None or entry[0] is not owner:
            slots = {}
            for n in names:
                slots[n + "_W"] = kernels.zeros(W.shape, W.dtype)
                slots[n + "_b"] = kernels.zeros(b.shape, b.dtype)
            entry = (owner, slots)
            self._state[key] = entry
        return entry[1]

    def state_arrays(self, owners: Any = None) -> list[Any]:
        """The state arrays (velocities, moments) held for ``owners`` (for all when ``None``), in a stable
        order; a captured CUDA graph keys on them."""
        return [a for owner, slots in self._state.values()
                if owners is None or any(owner is o for o in owners)
                for _, a in sorted(slots.items())]

    @abstractmethod
    def apply(self, kernels: ModuleType, owner: Any, W: Any, b: Any, dW: Any, db: Any, guard: Any = None) -> None:
        """Update ``W`` and ``b`` in place from their gradients ``dW``, ``db`` (when ``guard`` allows)."""


class SGD(Optimizer):
    """Stochastic gradient descent, ``W <- W - eta dE/dW``, with optional (Nesterov) momentum."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__()
        self.lr = check_positive(lr, "lr")
        self.momentum = check_positive(momentum, "momentum", allow_zero=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        self.nesterov = bool(nesterov)
        self.weight_decay = check_positive(weight_decay, "weight_decay", allow_zero=True)

    def __repr__(self) -> str:
        return (f"SGD(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay})")

    def apply(self, kernels: ModuleType, owner: Any, W: Any, b: Any, dW: Any, db: Any, guard: Any = None) -> None:
        if self.momentum == 0:
            kernels.sgd_update(W, dW, self.lr, self.weight_decay, guard=guard)
            kernels.sgd_update(b, db, self.lr, 0.0, guard=guard)
            return
        s = self._slots(owner, kernels, W, b, ("velocity",))
        kernels.momentum_update(W, dW, s["velocity_W"], self.lr, self.momentum, self.nesterov, self.weight_decay,
                                guard=guard)
        kernels.momentum_update(b, db, s["velocity_b"], self.lr, self.momentum, self.nesterov, 0.0, guard=guard)


class Adam(Optimizer):
    """Adam (Kingma and Ba), with bias-corrected first and second moments."""

    def __init__(self, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__()
        self.lr = check_positive(lr, "lr")
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            check_positive(beta, name, allow_zero=True)
            if beta >= 1:
                raise ValueError(f"{name} must lie in [0, 1), got {beta}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.eps = check_positive(eps, "eps")
        self.weight_decay = check_positive(weight_decay, "weight_decay", allow_zero=True)
        #: (id(kernels), dtype) -> (kernels, step count, bias corrections) on that backend's device
        self._device: dict[tuple[int, str], tuple[Any, Any, Any]] = {}
        self._corrections: Any = None  # the corrections of the current step, set by prepare

    def __repr__(self) -> str:
        return (f"Adam(lr={self.lr}, beta1={self.beta1}, beta2={self.beta2}, eps={self.eps}, "
                f"weight_decay={self.weight_decay})")

    def reset(self) -> None:
        super().reset()
        self._device.clear()
        self._corrections = None

    def _counter(self, kernels: ModuleType, dtype: Any) -> tuple[Any, Any]:
        """The device step count (float64 ``(1,)``) and bias corrections (``(2,)`` of ``dtype``) for
        ``kernels``' arrays, made on first use (per backend and dtype) with ``kernels.zeros``."""
        key = (id(kernels), np.dtype(dtype).str)
        entry = self._device.get(key)
        if entry is None or entry[0] is not kernels:
            entry = (kernels, kernels.zeros((1,), np.float64), kernels.zeros((2,), dtype))
            self._device[key] = entry
        return entry[1], entry[2]

    def begin_step(self) -> None:
        super().begin_step()
        self._corrections = None

    def prepare(self, kernels: ModuleType, guard: Any, dtype: Any) -> None:
        """The step's bias corrections on the device (``kernels.adam_corrections``): the device count
        goes up by one and ``corrections = (lr / (1 - beta1^t), 1 - beta2^t)``, unless the guard says
        the step is not applied (then nothing changes, as the host's ``steps`` is put back)."""
        count, corrections = self._counter(kernels, dtype)
        kernels.adam_corrections(count, self.lr, self.beta1, self.beta2, corrections, guard=guard)
        self._corrections = corrections

    def state_arrays(self, owners: Any = None) -> list[Any]:
        """The moments held for ``owners``, then the device step counts and corrections (every step
        reads and writes them, whatever the layers)."""
        return super().state_arrays(owners) + [a for _, *arrays in self._device.values() for a in arrays]

    def apply(self, kernels: ModuleType, owner: Any, W: Any, b: Any, dW: Any, db: Any, guard: Any = None) -> None:
        s = self._slots(owner, kernels, W, b, ("m", "v"))
        # the device corrections of this step (prepare), else the host count (an update without prepare)
        t: Any = self._corrections
        if t is None or t.dtype != W.dtype:
            t = max(self.steps, 1)
        kernels.adam_update(W, dW, s["m_W"], s["v_W"], self.lr, self.beta1, self.beta2, self.eps, t,
                            self.weight_decay, guard=guard)
        kernels.adam_update(b, db, s["m_b"], s["v_b"], self.lr, self.beta1, self.beta2, self.eps, t, 0.0,
                            guard=guard)
