"""Optimizers: how the gradients ``dE/dW``, ``dE/db`` become a parameter update.

A training step calls :meth:`Optimizer.apply` once for the whole network: ``W`` is every layer's weights
and ``b`` every bias, the two pieces of the network's flat parameter buffer (:attr:`backprop.MLP.params`),
with the matching pieces of the flat gradient buffer, and the optimizer's state is flat the same way. So an
update is two fused in-place kernels (weights, biases) whatever the depth, given the step's guard: a step
whose loss or gradients are not finite, or whose update would leave a parameter or a state value
that is not finite (an ``lr`` too large for the gradients), changes neither the parameters nor
the optimizer's state (see :mod:`backprop.step`). Weight decay (L2) applies to weights, not biases.

Hyper-parameters are checked whenever they are set (``opt.lr = ...`` between steps, as schedules
do) and again, against the network's dtype, when a step uses them (:meth:`Optimizer.check`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from .validation import check_positive

__all__ = ["SGD", "Adam", "Optimizer", "check_optimizer"]


def _fraction(value: Any, name: str) -> float:
    """A number in ``[0, 1)`` (momentum, Adam's betas)."""
    value = check_positive(value, name, allow_zero=True)
    if value >= 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return value


class Hyper:
    """A hyper-parameter checked by ``check(value, name)`` each time it is set; it lives in the
    instance's ``__dict__`` under its own name (so ``vars(opt)`` lists it)."""

    def __init__(self, check: Any) -> None:
        self.check = check
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else obj.__dict__[self.name]

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = self.check(value, self.name)


def _positive(value: Any, name: str) -> float:
    return check_positive(value, name)


def _non_negative(value: Any, name: str) -> float:
    return check_positive(value, name, allow_zero=True)


class Optimizer(ABC):
    """Base class. ``lr`` may be changed between steps (learning-rate schedules do so; 0 makes a step
    that changes nothing); the constructors want it positive."""

    lr = Hyper(_non_negative)
    weight_decay = Hyper(_non_negative)

    def __init__(self) -> None:
        self.steps = 0
        self._state: dict[int, tuple[Any, dict[str, Any]]] = {}

    @property
    def learning_rate(self) -> float:
        """``lr`` under the name scikit-learn's optimizers give it (read only)."""
        return self.lr

    def begin_step(self) -> None:
        """Called once per training step, before the parameters are updated."""
        self.steps += 1

    def prepare(self, kernels: ModuleType, guard: Any, dtype: Any) -> None:
        """Called once per training step by :func:`backprop.step.train_step`, after ``guard_step`` and
        before the layers' :meth:`apply`: device work the whole step shares (Adam's bias corrections).
        It must read nothing back to the host (a CUDA graph records it). The base does nothing."""

    def finish(self, kernels: ModuleType, guard: Any) -> None:
        """Called once per training step after every layer's :meth:`apply`: device work the whole step
        shares once the updates are done (Adam counts the applied step). The base does nothing."""

    def check(self, dtype: Any = None) -> None:
        """Check every hyper-parameter again (a step is about to use them) and, given the parameters'
        ``dtype``, that each survives the cast to it: ``lr`` neither 0 nor infinite there."""
        for name, value in vars(self).items():
            attr = getattr(type(self), name, None)
            if isinstance(attr, Hyper):
                attr.check(value, name)
        if dtype is not None:
            _representable(self.lr, "lr", dtype)

    def reset(self) -> None:
        """Forget all state (velocities, moments, the step count)."""
        self.steps = 0
        self._state.clear()

    def checkpoint(self, kernels: ModuleType) -> Callable[[], None]:
        """A function that puts this optimizer back as it is now: its hyper-parameters, step count and state
        (velocities, moments, device counters: arrays of ``kernels``) bit for bit, each state array rewritten
        in place; state made after this call is forgotten. Each state array is copied once, now."""
        attrs = dict(vars(self))
        tables = {name: dict(value) for name, value in attrs.items() if isinstance(value, dict)}
        saved = []
        for a in self.state_arrays():
            copy = kernels.zeros(a.shape, a.dtype)
            kernels.copy_into(copy, a)
            saved.append((a, copy))

        def restore() -> None:
            for a, copy in saved:
                kernels.copy_into(a, copy)
            for name, table in tables.items():
                attrs[name].clear()
                attrs[name].update(table)
            vars(self).clear()
            vars(self).update(attrs)

        return restore

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

    def apply_in_one_launch(self, kernels: ModuleType, owner: Any, W: Any, b: Any, dW: Any, db: Any, guard: Any,
                            loss: Any, weight: float, dtype: Any) -> bool:
        """The step's whole guarded update (the guard's verdict on ``loss`` and the gradients, the probes, the
        updates, and any step-wide work) in one launch, through the backend's ``guarded_step``; ``False``,
        with nothing done, where the backend has none or it does not serve this size (the caller then runs
        ``guard_step``, :meth:`prepare`, :meth:`apply` twice and :meth:`finish`)."""
        if not kernels.CAPABILITIES.one_launch_update:
            return False
        spec = self._one_launch(kernels, owner, W, b, dtype)
        if spec is None:
            return False
        kind, state, hyper, count = spec
        return bool(kernels.guarded_step(kind, guard, loss, weight, (W, b), (dW, db), state, hyper, count=count))

    def _one_launch(self, kernels: ModuleType, owner: Any, W: Any, b: Any,
                    dtype: Any) -> tuple[str, tuple, dict, Any] | None:
        """``(kind, state pairs, hyper-parameters, count)`` for ``guarded_step``; ``None`` for an optimizer it
        does not know: the base, and a subclass with an ``apply`` of its own (the one-launch kernels compute
        the built-in updates)."""
        return None

    @abstractmethod
    def apply(self, kernels: ModuleType, owner: Any, W: Any, b: Any, dW: Any, db: Any, guard: Any = None,
              probe: bool = False) -> None:
        """Update ``W`` and ``b`` in place from their gradients ``dW``, ``db`` (when ``guard`` allows);
        ``probe=True``: change nothing, but fail the step in ``guard`` if the update would leave a value
        that is not finite (see :mod:`backprop.kernels.contract`). ``W`` takes the weight decay, ``b`` does
        not; the step passes the network's flat weights and biases, and ``owner`` (the network's
        ``optimizer_key``) keys the state (velocities, moments: arrays shaped as ``W`` and ``b``)."""


def _representable(value: float, name: str, dtype: Any) -> None:
    """``value`` (non-negative) must stay finite, and positive when it is, once cast to ``dtype``."""
    dt = np.dtype(dtype)
    with np.errstate(over="ignore", under="ignore"):
        cast = float(dt.type(value))
    if not (np.isfinite(cast) and (cast > 0 or value == 0)):
        raise ValueError(f"{name}={value} is {cast} in {dt.name}: the parameters' dtype cannot hold it")


class SGD(Optimizer):
    """Stochastic gradient descent, ``W <- W - eta dE/dW``, with optional (Nesterov) momentum."""

    momentum = Hyper(_fraction)

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__()
        self.lr = check_positive(lr, "lr")
        self.momentum = momentum
        self.nesterov = bool(nesterov)
        self.weight_decay = weight_decay
        self.check()

    def check(self, dtype: Any = None) -> None:
        super().check(dtype)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0")

    def __repr__(self) -> str:
        return (f"SGD(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay})")

    def _one_launch(self, kernels: ModuleType, owner: Any, W: Any, b: Any,
                    dtype: Any) -> tuple[str, tuple, dict, Any] | None:
        if type(self).apply is not SGD.apply:
            return None
        hyper = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.momentum == 0:
            return "sgd", (), hyper, None
        s = self._slots(owner, kernels, W, b, ("velocity",))
        hyper.update(momentum=self.momentum, nesterov=self.nesterov)
        return "momentum", ((s["velocity_W"], s["velocity_b"]),), hyper, None

    def apply(self, kernels: ModuleType, owner: Any, W: Any, b: Any, dW: Any, db: Any, guard: Any = None,
              probe: bool = False) -> None:
        if self.momentum == 0:
            kernels.sgd_update(W, dW, self.lr, self.weight_decay, guard=guard, probe=probe)
            kernels.sgd_update(b, db, self.lr, 0.0, guard=guard, probe=probe)
            return
        s = self._slots(owner, kernels, W, b, ("velocity",))
        kernels.momentum_update(W, dW, s["velocity_W"], self.lr, self.momentum, self.nesterov, self.weight_decay,
                                guard=guard, probe=probe)
        kernels.momentum_update(b, db, s["velocity_b"], self.lr, self.momentum, self.nesterov, 0.0, guard=guard,
                                probe=probe)


class Adam(Optimizer):
    """Adam (Kingma and Ba), with bias-corrected first and second moments."""

    beta1 = Hyper(_fraction)
    beta2 = Hyper(_fraction)
    eps = Hyper(_positive)

    def __init__(self, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__()
        self.lr = check_positive(lr, "lr")
        self.beta1, self.beta2 = beta1, beta2
        self.eps = eps
        self.weight_decay = weight_decay
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

    def check(self, dtype: Any = None) -> None:
        """:meth:`Optimizer.check`, and ``eps`` must not round to 0 in ``dtype`` (a zero gradient would
        then give ``0 / 0``)."""
        super().check(dtype)
        if dtype is not None:
            _representable(self.eps, "eps", dtype)

    def begin_step(self) -> None:
        super().begin_step()
        self._corrections = None

    def prepare(self, kernels: ModuleType, guard: Any, dtype: Any) -> None:
        """The step's bias corrections on the device (``kernels.adam_corrections``): ``corrections = (lr /
        (1 - beta1^t), 1 - beta2^t)`` for ``t`` = the device's count of applied steps + 1."""
        count, corrections = self._counter(kernels, dtype)
        kernels.adam_corrections(count, self.lr, self.beta1, self.beta2, corrections)
        self._corrections = corrections

    def finish(self, kernels: ModuleType, guard: Any) -> None:
        """The device count goes up by one, unless the guard says the step was not applied (then nothing
        changed, as the host's ``steps`` is put back)."""
        if self._corrections is not None:
            kernels.count_step(self._counter(kernels, self._corrections.dtype)[0], guard)

    def state_arrays(self, owners: Any = None) -> list[Any]:
        """The moments held for ``owners``, then the device step counts and corrections (every step
        reads and writes them, whatever the layers)."""
        return super().state_arrays(owners) + [a for _, *arrays in self._device.values() for a in arrays]

    def _one_launch(self, kernels: ModuleType, owner: Any, W: Any, b: Any,
                    dtype: Any) -> tuple[str, tuple, dict, Any] | None:
        if type(self).apply is not Adam.apply:
            return None
        s = self._slots(owner, kernels, W, b, ("m", "v"))
        hyper = {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                 "weight_decay": self.weight_decay}
        return "adam", ((s["m_W"], s["m_b"]), (s["v_W"], s["v_b"])), hyper, self._counter(kernels, dtype)[0]

    def apply(self, kernels: ModuleType, owner: Any, W: Any, b: Any, dW: Any, db: Any, guard: Any = None,
              probe: bool = False) -> None:
        s = self._slots(owner, kernels, W, b, ("m", "v"))
        # the device corrections of this step (prepare), else the host count (an update without prepare)
        t: Any = self._corrections
        if t is None or t.dtype != W.dtype:
            t = max(self.steps, 1)
        kernels.adam_update(W, dW, s["m_W"], s["v_W"], self.lr, self.beta1, self.beta2, self.eps, t,
                            self.weight_decay, guard=guard, probe=probe)
        kernels.adam_update(b, db, s["m_b"], s["v_b"], self.lr, self.beta1, self.beta2, self.eps, t, 0.0,
                            guard=guard, probe=probe)


def check_optimizer(optimizer: Any, name: str = "optimizer", dtype: Any = None) -> Any:
    """Check that ``optimizer`` is an optimizer instance (``SGD(...)``, ``Adam(...)``), not a name or a class,
    and its hyper-parameters (against the parameters' ``dtype`` when given: see ``Optimizer.check``)."""
    if isinstance(optimizer, Optimizer):
        optimizer.check(dtype)
        return optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        raise TypeError(f"{name} must be an optimizer instance such as {optimizer.__name__}(lr=0.01), "
                        f"got the class {optimizer.__name__} itself")
    what = repr(optimizer) if isinstance(optimizer, str) or optimizer is None else type(optimizer).__name__
    raise TypeError(f"{name} must be a backprop optimizer (SGD, Adam), got {what}")
