"""One record per activation and per loss: everything each backend needs to compute it.

Adding an activation is one :class:`Activation` entry in :mod:`~backprop.kernels.registry.activations` (or one
call of :func:`add_activation` before a backend is first used); a loss is one :class:`Loss` entry in
:mod:`~backprop.kernels.registry.losses` (or :func:`add_loss`). A record holds, side by side:

* its name, aliases, the range of its parameter ``alpha`` and its weight initialization;
* the NumPy forms ``f(u)`` and its slope, written with ufuncs into ``out`` (they also run on CuPy arrays);
* one scalar form of each, compiled by both Numba backends (CPU and CUDA) from the same source;
* the CUDA C expressions of the CuPy backend (and any device helper they call).

Every backend builds its dispatch from these records: an activation or loss missing here cannot be computed
anywhere, and an unknown code gives NaN in the kernels, never another formula. The record types, their
constants and the scalar language live in :mod:`~backprop.kernels.registry.records`.

This module holds the tables (:data:`ACTIVATIONS`, :data:`LOSSES`) and what is derived from them: the outputs
each loss goes with, :data:`FUSED_PAIRS`, the lookups by name or alias, the additions, :func:`close` (a backend
has numbered the codes) and :func:`registry_key` (the digest the Numba on-disk cache is keyed on).
"""

from __future__ import annotations

import hashlib
from typing import Any

# the records and the constants, re-exported: ``from backprop.kernels.registry import ONE, Activation, scalar``
from .activations import (  # noqa: F401
    ACTIVATIONS, ELU, EXP, GELU, GELU_TANH, IDENTITY, LEAKY_RELU, RELU, SELU, SIGMOID, SILU, SOFTMAX, SOFTPLUS, STEP,
    TANH,
)
from .losses import BCE, CROSS_ENTROPY, HUBER, LOSSES, MAE, MSE, POISSON  # noqa: F401
from .records import (  # noqa: F401
    CUBIC, CUBIC3, GELU_TANH_CUBIC, HALF, INV_SQRT2, INV_SQRT_2PI, NAN, ONE, S_ALPHA, S_LAMBDA, S_LAMBDA_ALPHA,
    SCALAR_FUNCTIONS, SELU_ALPHA, SELU_LAMBDA, SQRT_2_OVER_PI, ZERO, Activation, Loss, NumpyForm, consts, scalar,
)

__all__ = [
    "ACTIVATIONS", "LOSSES", "FUSED_PAIRS", "SELU_ALPHA", "SELU_LAMBDA", "Activation", "Loss",
    "ActivationSpec", "LossSpec", "add_activation", "add_loss", "activation_name", "loss_name", "scalar",
    "registry_key",
]


# ----------------------------------------------------------------------------- derived tables
#: loss name -> the output activations it goes with (emptied whenever a record is added)
_OUTPUTS: dict[str, tuple[str, ...]] = {}


def _outputs_of(loss: Loss) -> tuple[str, ...]:
    outputs = _OUTPUTS.get(loss.name)
    if outputs is None:
        outputs = loss.allowed_outputs
        if outputs is None:
            outputs = tuple(n for n, a in ACTIVATIONS.items() if a.output)
        _OUTPUTS[loss.name] = outputs
    return outputs


def loss_outputs(name: str) -> tuple[str, ...]:
    """The output activations that loss ``name`` goes with."""
    return _outputs_of(LOSSES[name])


def _fused_pairs() -> set[tuple[str, str]]:
    return {(o, n) for n, loss in LOSSES.items() if loss.fused for o in _outputs_of(loss)}


#: Output/loss pairs whose delta is computed from the logits in one stable step.
FUSED_PAIRS: set[tuple[str, str]] = _fused_pairs()


def activation_name(name: str) -> str | None:
    """The registry name of activation ``name`` or of one of its aliases (any case); ``None`` if unknown."""
    key = name.strip().lower()
    for a in ACTIVATIONS.values():
        if key == a.name or key in a.aliases:
            return a.name
    return None


def loss_name(name: str) -> str | None:
    """The registry name of loss ``name`` or of one of its aliases (any case); ``None`` if unknown."""
    key = name.strip().lower()
    for loss in LOSSES.values():
        if key == loss.name or key in loss.aliases:
            return loss.name
    return None


# ----------------------------------------------------------------------------- additions
#: Set by a backend when it builds its dispatch from the registry: after that, the tables are closed.
_BUILT_BY: list[str] = []


def _open() -> None:
    if _BUILT_BY:
        raise RuntimeError(f"the registry is closed: backend {_BUILT_BY[0]!r} has built its kernels from it; "
                           "add activations and losses before any backend is first used")


def add_activation(record: Activation) -> None:
    """Register a new activation: every backend then computes it (call before a backend is first used)."""
    if not isinstance(record, Activation):
        raise TypeError(f"add_activation takes an Activation record, got {type(record).__name__}")
    _open()
    names = {record.name, *record.aliases}
    taken = [n for n in names if activation_name(n) is not None]
    if taken:
        raise ValueError(f"activation name {taken[0]!r} is taken")
    for fn in (record.scalar_f, record.scalar_phi):
        if fn is not None and fn not in SCALAR_FUNCTIONS:
            scalar(fn)
    # softmax stays last: the row-wise record keeps its code after every elementwise one
    items = list(ACTIVATIONS.items())
    ACTIVATIONS.clear()
    ACTIVATIONS.update([*[(n, a) for n, a in items if not a.rowwise], (record.name, record),
                        *[(n, a) for n, a in items if a.rowwise]])
    _OUTPUTS.clear()
    FUSED_PAIRS.clear()
    FUSED_PAIRS.update(_fused_pairs())


def add_loss(record: Loss) -> None:
    """Register a new loss (call before a backend is first used)."""
    if not isinstance(record, Loss):
        raise TypeError(f"add_loss takes a Loss record, got {type(record).__name__}")
    _open()
    taken = [n for n in (record.name, *record.aliases) if loss_name(n) is not None]
    if taken:
        raise ValueError(f"loss name {taken[0]!r} is taken")
    for fn in (record.scalar_value, record.scalar_grad):
        if fn is not None and fn not in SCALAR_FUNCTIONS:
            scalar(fn)
    LOSSES[record.name] = record
    _OUTPUTS.clear()
    FUSED_PAIRS.clear()
    FUSED_PAIRS.update(_fused_pairs())


def close(backend: str) -> None:
    """Called by a backend as it builds its dispatch: the tables stay as they are from now on."""
    if not _BUILT_BY:
        _BUILT_BY.append(backend)


def _code_key(code: Any) -> bytes:
    """Bytes that identify a code object's behaviour (stable across processes, unlike ``marshal``)."""
    parts = [code.co_code, repr(code.co_names).encode(), repr(code.co_varnames).encode()]
    for const in code.co_consts:
        parts.append(_code_key(const) if hasattr(const, "co_code") else repr(const).encode())
    return b"\x00".join(parts)


def registry_key() -> str:
    """A digest of every scalar form and of the codes' order: the Numba kernels that dispatch on the codes
    key their on-disk cache on it, so that a changed registry never loads a kernel compiled from another."""
    h = hashlib.sha256()
    for name in (*ACTIVATIONS, "|", *LOSSES):
        h.update(name.encode() + b"\x00")
    for fn in SCALAR_FUNCTIONS:
        h.update(fn.__name__.encode() + _code_key(fn.__code__))
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- former names
#: The record types under the names of the earlier table module.
ActivationSpec = Activation
LossSpec = Loss
