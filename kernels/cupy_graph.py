"""CUDA-graph replay of a whole training step for the CuPy backend (``train_step(..., graph=True)``).

A step is recorded once per (network, input and target shapes, optimizer and its settings,
parameter and optimizer-state buffers, TF32 mode) and replayed afterwards, which removes the
per-kernel launch and Python overhead of the dozens of small launches a step makes:

1. The first call for such a key runs an ordinary step (``net.train_step_device``): it creates the
   optimizer's buffers, compiles the kernels and lets cuBLAS pick its algorithms, and returns that
   step's loss. It then records the step, without running it, into two graphs on a private stream:
   *forward* (forward pass, loss and output delta, reading static input buffers) and *backward*
   (backward pass and every parameter update), made of the same kernel calls, in the same order,
   as the ordinary step, so the numbers are the same. Should recording fail, a RuntimeWarning says
   why and that network runs ordinary steps for that key.
2. Later calls copy ``x`` and ``t`` into the static buffers, launch *forward*, read the loss (the one
   synchronization, as in the ordinary step), raise :class:`NonFiniteLossError` with the parameters
   untouched if it is not finite, else launch *backward*.

Everything the graphs allocate while being recorded comes from a memory pool of their own, kept
with them and used by nothing else, so no later allocation can take over an address a graph writes.
The graphs also hold the addresses of the weights, biases and optimizer buffers: those are part
of the key, so replacing them (``set_params``, ``optimizer.reset()``) or changing ``lr``, the
momentum, the weight decay or the TF32 mode records a new pair (at most
:data:`MAX_GRAPHS_PER_NET` are kept per network, least recently used first out).

Plain SGD, momentum and Nesterov momentum are supported. Adam is refused: its bias correction
``1 - beta^step`` changes at every step, which a recorded graph would freeze.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import OrderedDict
from typing import Any

#: Graphs kept per network (each pair holds its own activations and buffers).
MAX_GRAPHS_PER_NET = 4

_graphs: weakref.WeakKeyDictionary[Any, OrderedDict[tuple, _StepGraph | None]] = weakref.WeakKeyDictionary()


class _StepGraph:
    """The two recorded halves of a step and everything they read and write."""

    def __init__(self) -> None:
        self.x: Any = None
        self.t: Any = None
        self.loss: Any = None
        self.forward: Any = None
        self.backward: Any = None
        self.pool: Any = None
        self.stream: Any = None
        self.keep: tuple = ()

    def replay(self, x: Any, t: Any, optimizer: Any) -> float:
        import cupy

        from backprop.network import NonFiniteLossError

        stream = cupy.cuda.get_current_stream()
        cupy.copyto(self.x, x)
        cupy.copyto(self.t, t)
        self.forward.launch(stream)
        loss = float(self.loss.get())
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss}; parameters left as they were before this step")
        optimizer.begin_step()
        self.backward.launch(stream)
        return loss


def _slot_addresses(optimizer: Any, layers: list) -> tuple:
    """Addresses of the optimizer's buffers for each layer (``None`` where it has none yet)."""
    state = getattr(optimizer, "_state", None) or {}
    out = []
    for layer in layers:
        entry = state.get(id(layer))
        if entry is None or entry[0] is not layer:
            out.append(None)
        else:
            out.append(tuple(sorted((name, int(a.data.ptr)) for name, a in entry[1].items())))
    return tuple(out)


def _key(net: Any, x: Any, t: Any, optimizer: Any) -> tuple:
    import cupy

    k = net.backend.kernels
    layers = tuple((int(L.W.data.ptr), int(L.b.data.ptr), L.W.shape, L.W.dtype.char, L.activation.name,
                    L.activation.alpha) for L in net.layers)
    settings = (type(optimizer), id(optimizer), optimizer.lr, optimizer.momentum, optimizer.nesterov,
                optimizer.weight_decay)
    return (cupy.cuda.Device().id, x.shape, t.shape, x.dtype.char, t.dtype.char, net.output.name, net.output.alpha,
            net.loss_fn.name, net.loss_fn.param, layers, _slot_addresses(optimizer, net.layers), settings,
            bool(k.tf32_enabled()))


def _check_optimizer(optimizer: Any) -> None:
    from backprop.optimizers import SGD

    if not isinstance(optimizer, SGD):
        raise ValueError(
            f"graph=True supports SGD (plain, momentum or Nesterov) only, not {type(optimizer).__name__}: "
            "Adam's bias correction changes at every step and a recorded CUDA graph would freeze it; "
            "train with graph=False")


def _end(stream: Any) -> Any:
    return stream.end_capture()


def _abandon(stream: Any) -> None:
    """End a capture that failed half-way, ignoring the error an invalidated capture raises."""
    try:
        stream.end_capture()
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


def _record(net: Any, shape_x: tuple, shape_t: tuple, dtype: Any, optimizer: Any) -> _StepGraph:
    """Record the forward and backward halves of a step of ``net`` (nothing runs)."""
    import cupy

    k = net.backend.kernels
    g = _StepGraph()
    g.x = cupy.empty(shape_x, dtype=dtype)
    g.t = cupy.empty(shape_t, dtype=dtype)
    k._ones(shape_x[0], dtype)  # read by the bias GEMVs: made now, outside the private pool
    g.pool = cupy.cuda.MemoryPool()
    g.stream = cupy.cuda.Stream(non_blocking=True)
    with cupy.cuda.using_allocator(g.pool.malloc), g.stream:
        g.stream.begin_capture()
        try:
            cache = net._forward_train(g.x)
            value, delta = net._output_error(cache, g.t)
        except BaseException:
            _abandon(g.stream)
            raise
        g.forward = _end(g.stream)
        g.stream.begin_capture()
        try:
            d = delta
            for i in range(len(net.layers) - 1, -1, -1):
                layer = net.layers[i]
                x_prev = cache[i - 1][0] if i > 0 else g.x
                # as in MLP.train_step_device: delta^{l-1} reads the old W^l, so it comes first
                d_prev = net._delta_backward(i, d, cache) if i > 0 else None
                optimizer.update_layer(k, layer, layer.W, layer.b, d, x_prev)
                d = d_prev
        except BaseException:
            _abandon(g.stream)
            raise
        g.backward = _end(g.stream)
    g.loss = value
    g.keep = (cache, delta)
    return g


def capture_train_step(net: Any, x: Any, t: Any, optimizer: Any) -> float:
    """One training step of ``net`` on ``(x, t)`` (CuPy arrays of the network's dtype), replayed from a
    CUDA graph; the first call for a new key runs an ordinary step and records the graphs for the next."""
    _check_optimizer(optimizer)
    per_net = _graphs.get(net)
    if per_net is None:
        per_net = OrderedDict()
        _graphs[net] = per_net
    key = _key(net, x, t, optimizer)
    if key in per_net:
        per_net.move_to_end(key)
        g = per_net[key]
        if g is None:  # recording failed before: ordinary steps (warned then)
            return net.train_step_device(x, t, optimizer)
        return g.replay(x, t, optimizer)
    loss = net.train_step_device(x, t, optimizer)
    key = _key(net, x, t, optimizer)  # the optimizer's buffers exist now
    try:
        per_net[key] = _record(net, x.shape, t.shape, x.dtype, optimizer)
    except Exception as exc:  # the step itself has run; keep training without a graph
        warnings.warn(f"could not record the training step as a CUDA graph ({type(exc).__name__}: {exc}); "
                      "this network runs ordinary steps for these shapes and settings", RuntimeWarning, stacklevel=3)
        per_net[key] = None
    while len(per_net) > MAX_GRAPHS_PER_NET:
        per_net.popitem(last=False)
    return loss


def clear(net: Any | None = None) -> None:
    """Drop the recorded graphs of ``net`` (of every network when ``None``) and their memory."""
    if net is None:
        _graphs.clear()
    else:
        _graphs.pop(net, None)


def recorded(net: Any) -> int:
    """How many step graphs are kept for ``net`` (recordings that failed not counted)."""
    return sum(g is not None for g in _graphs.get(net, {}).values())


__all__ = ["MAX_GRAPHS_PER_NET", "capture_train_step", "clear", "recorded"]
