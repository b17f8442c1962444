"""The guard and the optimizer updates, on the device.

* Guard: :func:`guard_step` checks the loss and the whole flat gradient buffer on the device, in two kernels
  (per-block counts of non-finite elements, then one block that adds them and keeps the tally in the float64
  guard). Nothing is read back to the host.
* Updates: plain SGD, momentum and Adam are each one fused in-place elementwise kernel per parameter array,
  reading a gradient buffer. Adam's bias corrections can live on the device (:func:`adam_corrections`, one
  thread), so that a recorded CUDA graph replays them correctly. Given the guard, they read ``guard[0]`` on
  the device and leave the parameters and the optimizer state untouched unless it is ``1.0``.
* One-launch update: :func:`guarded_step` does the guard, the probes and the update of SGD, momentum or Adam
  in one launch of one block (networks up to ``STEP_MAX_PARAMS`` parameters; the fused narrow-network step
  uses it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import cupy_sources as src
from ..contract import GUARD_SIZE
from .compiled import _ew, _raw
from .device import Array, _contiguous, _scalar, _scratch


def _guard_bits(guard: Array) -> Array:
    """The int64 view of the float64 guard the guarded kernels read (``guard[0]`` compared by its bits)."""
    if guard.dtype != np.float64 or guard.shape != (GUARD_SIZE,) or not guard.flags.c_contiguous:
        raise ValueError(f"guard must be a contiguous float64 array of shape ({GUARD_SIZE},), "
                         f"got {guard.dtype} {tuple(guard.shape)}")
    return guard.view(np.int64)


# --------------------------------------------------------------------------- guard
def guard_step(guard: Array, loss: Array, grads: Array, weight: float = 1.0) -> None:
    """The guard's verdict on this step, on the device (no host read): count the step; it is ok when no
    earlier step failed and ``loss`` and every element of ``grads`` are finite, and then ``weight *
    loss`` is added to the sum, else the first failing step's number is kept. Two kernels: per-block
    counts of non-finite gradients (``bp_guard_scan``), then one block adds them and updates ``guard``
    (``bp_guard_finish``). The per-block counts live in a cached scratch buffer."""
    _guard_bits(guard)  # checks it
    if loss.dtype != grads.dtype:
        raise TypeError(f"dtype mismatch: loss {loss.dtype}, gradients {grads.dtype}")
    grads = _contiguous(grads)
    dtype = grads.dtype
    n = grads.size
    blocks = max(1, min((n + src.BLOCK - 1) // src.BLOCK, src.MAX_GUARD_BLOCKS))
    partial = _scratch("guard_partial", (blocks,), dtype)
    _raw("bp_guard_scan", dtype)((blocks,), (src.BLOCK,), (grads, partial, np.int64(n)))
    _raw("bp_guard_finish", dtype)((1,), (src.BLOCK,),
                                   (guard, _contiguous(loss), partial, np.int64(blocks), np.float64(weight)))


# --------------------------------------------------------------------------- optimizers
def _update(name: str, guard: Array | None, ins: tuple, outs: tuple, probe: bool = False) -> None:
    """Launch update kernel ``name`` on ``ins`` (gradient and scalars) and ``outs`` (updated in place), or
    its guarded variant, which reads ``guard[0]`` on the device and writes nothing unless it is 1.0, or
    (``probe``) its raw ``_probe`` twin, which writes nothing but the guard's verdict."""
    if probe:
        if guard is None:
            raise ValueError("probe=True needs the step's guard")
        n = outs[0].size
        if n:
            blocks = max(1, min((n + src.BLOCK - 1) // src.BLOCK, src.MAX_GUARD_BLOCKS))
            _raw(f"{name}_probe", outs[0].dtype)((blocks,), (src.BLOCK,),
                                                 (*ins, *outs, _guard_bits(guard), np.int64(n)))
    elif guard is None:
        _ew(name)(*ins, *outs)
    else:
        _ew(f"{name}_guarded")(*ins, _guard_bits(guard), *outs)


def sgd_update(p: Array, g: Array, lr: float, weight_decay: float = 0.0, guard: Array | None = None,
               probe: bool = False) -> None:
    """Plain SGD, in place, one fused kernel: ``p <- p - eta (g + lambda p)``."""
    d = p.dtype
    _update("bp_sgd", guard, (g, _scalar(lr, d), _scalar(weight_decay, d)), (p,), probe)


def momentum_update(
    p: Array, g: Array, v: Array, lr: float, momentum: float, nesterov: bool = False,
    weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False,
) -> None:
    """SGD with (Nesterov) momentum, in place, one fused kernel: ``v <- mu v + g'``, ``p <- p - eta v``
    (Nesterov: ``p <- p - eta (g' + mu v)``), ``g' = g + lambda p``."""
    d = p.dtype
    _update("bp_momentum", guard,
            (g, _scalar(lr, d), _scalar(momentum, d), _scalar(weight_decay, d), np.int32(bool(nesterov))), (p, v),
            probe)


def _check_count(count: Array) -> None:
    if count.dtype != np.float64 or tuple(count.shape) != (1,):
        raise ValueError(f"count must be a float64 array of shape (1,), got {count.dtype} {tuple(count.shape)}")


def adam_corrections(count: Array, lr: float, beta1: float, beta2: float, out: Array) -> None:
    """Adam's bias corrections for the coming step, kept on the device, one single-thread kernel
    (``bp_adam_corrections``), no host read: ``t = count[0] + 1`` (float64 ``(1,)``, unchanged),
    ``out[0] = lr / (1 - beta1^t)``, ``out[1] = 1 - beta2^t``, in double rounded to ``out``'s dtype."""
    _check_count(count)
    if tuple(out.shape) != (2,):
        raise ValueError(f"out must be an array of shape (2,), got {tuple(out.shape)}")
    _raw("bp_adam_corrections", out.dtype)(
        (1,), (32,), (count, out, np.float64(lr), np.float64(beta1), np.float64(beta2)))


def count_step(count: Array, guard: Array | None = None) -> None:
    """``count[0] += 1`` on the device unless ``guard[0] != 1.0`` (``bp_count_step``, one thread)."""
    _check_count(count)
    if guard is not None:
        _guard_bits(guard)  # checks it
    _raw("bp_count_step", np.float64)((1,), (32,), (count, count if guard is None else guard,
                                                    np.int64(guard is not None)))


def adam_update(
    p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float, beta2: float, eps: float,
    step: Any, weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False,
) -> None:
    """Adam, in place, one fused kernel; bias corrections ``1 - beta^step`` computed on the host from an
    int ``step``, or read on the device from the corrections array of :func:`adam_corrections`
    (``bp_adam_device``; ``lr`` unused), the same bits either way."""
    d = p.dtype
    tail = (_scalar(beta1, d), _scalar(beta2, d), _scalar(1 - beta1, d), _scalar(1 - beta2, d))
    if isinstance(step, (int, np.integer)):
        c1 = 1 - beta1**step
        c2 = 1 - beta2**step
        _update("bp_adam", guard,
                (g, _scalar(lr / c1, d), *tail, _scalar(c2, d), _scalar(eps, d), _scalar(weight_decay, d)), (p, m, v),
                probe)
    else:
        if step.dtype != d or tuple(step.shape) != (2,):
            raise TypeError(f"Adam's corrections must be a (2,) array of {d}, got {step.dtype} {tuple(step.shape)}")
        _update("bp_adam_device", guard, (g, step, *tail, _scalar(eps, d), _scalar(weight_decay, d)), (p, m, v),
                probe)


def guarded_step(optimizer: str, guard: Array, loss: Array, weight: float, params: tuple[Array, Array],
                 grads: tuple[Array, Array], state: tuple[tuple[Array, Array], ...], hyper: dict[str, Any],
                 count: Array | None = None) -> bool:
    """A whole guarded update in one launch of one block (``bp_step_<optimizer>``): :func:`guard_step`, the
    probe of every update, then the updates (and Adam's corrections and step count), with the arithmetic of
    those kernels, so the same bits. ``optimizer``: ``"sgd"`` (``hyper``: ``lr``, ``weight_decay``),
    ``"momentum"`` (also ``momentum``, ``nesterov``; ``state``: the velocities) or ``"adam"`` (``lr``, ``beta1``,
    ``beta2``, ``eps``, ``weight_decay``; ``state``: the moments m, v; ``count``: the applied steps). Every
    pair is (weights, biases); the weights take the decay. ``False``, with nothing launched, above
    ``STEP_MAX_PARAMS`` parameters (then the multi-launch path serves)."""
    W, b = params
    d = W.dtype
    n = W.size + b.size
    if n > src.STEP_MAX_PARAMS or n == 0:
        return False
    _guard_bits(guard)  # checks it
    if loss.dtype != d or loss.size != 1:
        raise TypeError(f"the loss must be one {d} value, got {loss.dtype} of shape {tuple(loss.shape)}")
    loss = _contiguous(loss)
    pieces = [*params, *(a for pair in state for a in pair)]
    if any(a.dtype != d for a in (*pieces, *grads)) or grads[0].shape != W.shape or grads[1].shape != b.shape:
        raise ValueError("guarded_step: parameters, gradients and state must be pieces of one dtype and shape")
    lr, wd = _scalar(hyper["lr"], d), _scalar(hyper.get("weight_decay", 0.0), d)
    if optimizer == "sgd":
        ins: tuple = (*grads, lr, wd)
    elif optimizer == "momentum":
        ins = (*grads, lr, _scalar(hyper["momentum"], d), wd, np.int32(bool(hyper["nesterov"])))
    elif optimizer == "adam":
        if count is None:
            raise ValueError("guarded_step('adam') needs the count of applied steps")
        _check_count(count)
        b1, b2 = hyper["beta1"], hyper["beta2"]
        ins = (*grads, _scalar(b1, d), _scalar(b2, d), _scalar(1 - b1, d), _scalar(1 - b2, d), _scalar(hyper["eps"], d),
               wd, count, np.float64(hyper["lr"]), np.float64(b1), np.float64(b2))
    else:
        raise ValueError(f"unknown optimizer {optimizer!r} (sgd, momentum, adam)")
    args = (*pieces, *ins, guard, loss, np.float64(weight), np.int64(W.size), np.int64(b.size))
    _raw(f"bp_step_{optimizer}", d)((1,), (src.STEP_THREADS,), args)
    return True
