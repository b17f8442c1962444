"""CUDA-graph replay of the training step (``net.train_step(..., graph=True)``).

The step is :func:`backprop.step.train_step`, the same function an ordinary step runs, recorded
once with the capture primitives of a backend whose ``CAPABILITIES.graphs`` is true (``capture``,
``replay``; see :class:`backprop.kernels.contract.Capabilities`) and replayed afterwards. That removes the launch and
Python overhead of its dozens of small kernels and GEMMs, and gives the same numbers, since the
same kernels run in the same order on the same buffers.

1. The first call for a key (below) runs an ordinary step, which creates the optimizer's state,
   compiles the kernels and lets cuBLAS pick its algorithms. It then records, without running it,
   ``train_step(net, ws, ws.x, ws.t, optimizer, graph_guard, weight)``: the workspace's staging
   buffers stand for the batch and ``graph_guard`` is a guard owned by the graph. Recording does
   not count as a step (``optimizer.steps`` is put back). Recording allocates nothing: the workspace's
   buffers are all made first (``Workspace.make_buffers``) and the ordinary step has made the backend's
   cached ones (a backend refuses to make one while recording: its memory would be the graph's, freed
   with it). Should recording fail, a ``RuntimeWarning`` says why, and that key runs ordinary steps
   from then on.
2. Later calls copy the batch into ``ws.x`` and ``ws.t`` (unless it is already there), the
   caller's guard into ``graph_guard``, count the step (``optimizer.begin_step()``), replay, and
   copy ``graph_guard`` back. So the caller's guard behaves as in an ordinary step: a step whose
   loss or gradients are not finite changes nothing, the failure is sticky, the weighted loss is
   summed, and one guard can serve a whole epoch. Nothing is read back to the host here.

A graph holds the addresses of everything it touches, so its key is everything that decides
them, or the numbers the kernels were given: the workspace, the batch's shapes and dtype, each
layer's ``W`` and ``b`` arrays (by identity: ``set_params`` makes new ones), the optimizer (its
type, identity, settings such as ``lr``, momentum, Adam's betas and ``eps``, and weight decay, and
its state arrays:
``optimizer.reset()`` drops them), the activations and the loss, the TF32 mode of backends that
have one, and the step's weight. The graph keeps every one of those arrays alive, so no identity
in a live key is ever reused. At most :data:`MAX_GRAPHS_PER_NET` graphs are kept per network,
least recently used first out.

Plain SGD, momentum, Nesterov momentum and Adam are supported. Adam's bias corrections
``1 - beta^t`` change at every step: they are device data (``Adam.prepare`` runs the
``adam_corrections`` kernel, which writes ``lr / c1`` and ``c2`` for the coming step from the
device's count of applied steps, and ``Adam.finish`` runs ``count_step``, which advances that
count after the updates), so the recorded graph computes them afresh at each replay; a step the
guard refuses, in its checks or in its probes, leaves that count as it was. Its key holds Adam's ``lr``,
betas, ``eps`` and weight decay, and the count and corrections arrays.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from numbers import Number
from typing import TYPE_CHECKING, Any

from . import step
from .kernels.contract import switch_settings
from .optimizers import SGD, Adam

if TYPE_CHECKING:
    from .network import MLP
    from .optimizers import Optimizer
    from .step import Guard, Workspace

__all__ = ["MAX_GRAPHS_PER_NET", "check_graph_support", "clear", "graphed_train_step", "recorded"]

#: Graphs kept per network (each holds the addresses of its workspace and parameters).
MAX_GRAPHS_PER_NET = 4

class _StepGraph:
    """One recorded step and everything it reads or writes (kept alive with it)."""

    def __init__(self, graph: Any, ws: Workspace, guard: Guard, keep: tuple) -> None:
        self.graph = graph
        self.ws = ws
        self.guard = guard
        self.keep = keep  # parameters, optimizer and its state: their identities are in the key

    def run(self, kernels: Any, x: Any, t: Any, optimizer: Optimizer, guard: Guard) -> None:
        if x is not self.ws.x:
            kernels.copy_into(self.ws.x, x)
        if t is not self.ws.t:
            kernels.copy_into(self.ws.t, t)
        kernels.copy_into(self.guard.array, guard.array)
        optimizer.begin_step()
        kernels.replay(self.graph)
        kernels.copy_into(guard.array, self.guard.array)


_graphs: weakref.WeakKeyDictionary[Any, OrderedDict[tuple, _StepGraph | None]] = weakref.WeakKeyDictionary()


def check_graph_support(net: MLP, optimizer: Optimizer) -> Any:
    """The network's kernels, if they can record this step (``ValueError`` otherwise)."""
    k = net.backend.kernels
    if not k.CAPABILITIES.graphs:
        raise ValueError(f"backend {net.backend.name!r} cannot record a training step as a CUDA graph; "
                         "graph=True needs the cupy backend")
    reason = k.capture_unavailable_reason()
    if reason:
        raise ValueError(f"graph=True cannot record a CUDA graph on backend {net.backend.name!r}: {reason}")
    if not isinstance(optimizer, (SGD, Adam)):
        raise ValueError(
            f"graph=True supports SGD (plain, momentum or Nesterov) and Adam, not {type(optimizer).__name__}: "
            "a recorded CUDA graph would freeze any number the optimizer computes on the host per step; "
            "train with graph=False")
    return k


def _state_arrays(optimizer: Optimizer, net: MLP) -> tuple:
    """The optimizer's state arrays (velocities, moments, Adam's device step count and corrections) for
    the network ``net``, in a stable order; none before its first step with it and after ``reset()``."""
    return tuple(optimizer.state_arrays([net.optimizer_key]))


def _settings(optimizer: Optimizer) -> tuple:
    """The optimizer's public numeric settings (``lr``, ``momentum``, ...), not its step count."""
    return tuple(sorted((name, value) for name, value in vars(optimizer).items()
                        if not name.startswith("_") and name != "steps" and isinstance(value, (Number, str))))


def _key(net: MLP, ws: Workspace, x: Any, t: Any, optimizer: Optimizer, weight: float, kernels: Any) -> tuple:
    layers = (id(net.params),) + tuple((L.activation.name, L.activation.alpha) for L in net.layers)
    state = tuple(id(a) for a in _state_arrays(optimizer, net))
    modes = switch_settings(kernels)  # a graph recorded under one setting of a switch is not replayed under another
    return (id(ws), tuple(x.shape), tuple(t.shape), str(x.dtype), str(t.dtype), net.loss_fn.name, net.loss_fn.param,
            layers, type(optimizer), id(optimizer), _settings(optimizer), state, modes, float(weight))


def _record(net: MLP, ws: Workspace, optimizer: Optimizer, weight: float, kernels: Any) -> _StepGraph:
    """Record ``train_step`` on the workspace's staging buffers and a guard of the graph's own."""
    ws.make_buffers()  # every one now: nothing may be allocated while recording
    x, t = ws.x, ws.t
    guard = step.Guard(kernels)
    steps = optimizer.steps
    try:
        graph = kernels.capture(lambda: step.train_step(net, ws, x, t, optimizer, guard, weight))
    finally:
        optimizer.steps = steps  # recording runs nothing
    keep = (net.params, tuple((L.W, L.b) for L in net.layers), optimizer, _state_arrays(optimizer, net))
    return _StepGraph(graph, ws, guard, keep)


def graphed_train_step(net: MLP, ws: Workspace, x: Any, t: Any, optimizer: Optimizer, guard: Guard,
                       weight: float = 1.0) -> None:
    """:func:`backprop.step.train_step` of ``net`` on ``(x, t)``, replayed from a CUDA graph (recorded by
    the first call for its key, which runs an ordinary step). ``guard`` is used as by an ordinary step.

    Raises ``ValueError``, before anything runs, on a backend that cannot record a graph and for an
    optimizer other than :class:`~backprop.optimizers.SGD` and :class:`~backprop.optimizers.Adam`.
    """
    k = check_graph_support(net, optimizer)
    per_net = _graphs.get(net)
    if per_net is None:
        per_net = _graphs[net] = OrderedDict()
    key = _key(net, ws, x, t, optimizer, weight, k)
    if key in per_net:
        per_net.move_to_end(key)
        entry = per_net[key]
        if entry is None:  # its recording failed (and warned): ordinary steps
            step.train_step(net, ws, x, t, optimizer, guard, weight)
        else:
            entry.run(k, x, t, optimizer, guard)
        return
    step.train_step(net, ws, x, t, optimizer, guard, weight)
    key = _key(net, ws, x, t, optimizer, weight, k)  # the optimizer's state exists now
    try:
        per_net[key] = _record(net, ws, optimizer, weight, k)
    except Exception as exc:  # the step itself has run; go on without a graph for this key
        warnings.warn(f"could not record the training step as a CUDA graph ({type(exc).__name__}: {exc}); "
                      "this network runs ordinary steps for these shapes and settings", RuntimeWarning,
                      stacklevel=3)
        per_net[key] = None
    per_net.move_to_end(key)
    while len(per_net) > MAX_GRAPHS_PER_NET:
        per_net.popitem(last=False)


def clear(net: MLP | None = None) -> None:
    """Drop the recorded graphs of ``net`` (of every network when ``None``), freeing what they hold."""
    if net is None:
        _graphs.clear()
    else:
        _graphs.pop(net, None)


def recorded(net: MLP) -> int:
    """How many step graphs are kept for ``net`` (keys whose recording failed not counted)."""
    return sum(entry is not None for entry in _graphs.get(net, {}).values())
