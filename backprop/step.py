"""The training step, written once: forward pass keeping what backward needs, error at the output,
backward pass into one flat gradient buffer, guarded update of the flat parameter buffer.

    u^l = W^l x^{l-1} + b^l,  x^l = f(u^l)                 (forward)
    delta^L = dE/du^L                                      (error at the output)
    delta^{l-1} = f'(u^{l-1}) * (W^l)^T delta^l             (backward)
    dE/dW^l = delta^l (x^{l-1})^T,  dE/db^l = sum delta^l   (gradients)
    W^l <- W^l - eta dE/dW^l,  b^l <- b^l - eta dE/db^l     (update, by the optimizer)

Every buffer lives in a :class:`Workspace`, allocated once per (network, thread, batch size) and
reused, so a steady-state step allocates nothing and threads never share one. The whole step reads
nothing back to the host: a device-side guard (:func:`~backprop.kernels.numpy_ref.guard_step`)
decides whether the update may be applied: the loss and every gradient must be finite, and then every update is probed
(computed without being written) before any is applied, so that an update which would itself
overflow fails the step too. The updates of a failed step are skipped on the device, leaving
the parameters and the optimizer's state bit for bit as they were.
``MLP.train_step``, ``MLP.loss_and_grads``, ``fit``, evaluation and graph capture all run the
functions of this module.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from .kernels.contract import GUARD_FAILED, GUARD_LOSS_SUM, GUARD_SIZE, GUARD_STEPS

if TYPE_CHECKING:
    from .network import MLP
    from .optimizers import Optimizer

__all__ = ["FusedPasses", "Guard", "LAYER_BY_LAYER", "LayerByLayer", "NonFiniteLossError", "Workspace",
           "Workspaces", "apply_update", "backward", "failure_cause", "flat_views", "forward", "fused",
           "gradient_buffers", "gradients", "n_params", "n_weights", "output_error", "passes", "train_step",
           "workspace"]

Array = Any

class NonFiniteLossError(FloatingPointError):
    """A training step was not finite (its loss, a gradient, or the update itself, which would have overflowed);
    the parameters and the optimizer's state are those after the last finite step."""


#: Workspaces kept per network and thread (a training batch size, its last partial batch, evaluation, ...).
MAX_WORKSPACES = 4


class Workspace:
    """The buffers of one step of ``net`` at batch size ``batch``, each made on first use.

    ``y[l]``, ``u[l]``: each layer's output and (where the backward pass or the loss reads it)
    pre-activation; ``delta[l]``: each layer's error; ``grads``: one flat buffer holding every
    ``dE/dW^l`` and ``dE/db^l``, with ``dW[l]`` and ``db[l]`` views into it; ``loss``: the step's
    mean loss, a 0-d array; ``x``, ``t``: staging buffers for a batch gathered on the backend.
    ``reduced``: ``grads`` followed by ``loss``, one contiguous buffer (what a data-parallel step sums over
    the processes in one call). An inference pass only ever makes ``y`` and ``u``.
    """

    def __init__(self, net: MLP, batch: int) -> None:
        self._kernels = net.backend.kernels
        self._dtype = net.dtype
        self._net_sizes = net.sizes
        self._shapes = [(L.n_out, L.n_in) for L in net.layers]
        self.batch = batch
        last = len(net.layers) - 1
        k, dt = self._kernels, self._dtype
        widths = [L.n_out for L in net.layers]
        self.keep_u = tuple(_keeps_u(net, i, last) for i in range(len(widths)))
        # each layer's y (and kept u) is a view into one flat buffer, layer after layer: the layout the fused
        # kernels of a narrow network read and write (kernels' mlp_forward / mlp_backward)
        self.y_flat = k.zeros((batch * sum(widths),), dt)
        self.u_flat = k.zeros((max(batch * sum(n for n, keep in zip(widths, self.keep_u) if keep), 1),), dt)
        self.y: list[Array] = _views(self.y_flat, batch, widths, [True] * len(widths))
        self.u: list[Array | None] = _views(self.u_flat, batch, widths, self.keep_u)
        # what a backend's training forward pass hands to its backward pass besides y and u (the ReLU mask
        # of a cuBLASLt epilogue): its layer_aux hook says, per layer; None elsewhere
        with_aux = k.CAPABILITIES.layer_aux
        self.aux: list[Any] = [k.layer_aux(L.activation.name, batch, L.n_out, dt) if with_aux and i < last else None
                               for i, L in enumerate(net.layers)]
        #: the last forward pass into this workspace was a layer-by-layer training pass (it wrote ``aux``)
        self.aux_written = False

    def make_buffers(self) -> None:
        """Make now every buffer still to be made on first use (before a CUDA graph records a step: memory
        allocated while recording would be the graph's, freed with it)."""
        for name, attr in vars(Workspace).items():
            if isinstance(attr, cached_property):
                getattr(self, name)

    @cached_property
    def delta(self) -> list[Array]:
        return [self._kernels.zeros(y.shape, self._dtype) for y in self.y]

    @cached_property
    def reduced(self) -> Array:
        return self._kernels.zeros((n_params(self._shapes) + 1,), self._dtype)

    @cached_property
    def _gradients(self) -> tuple[Array, list[Array], list[Array]]:
        flat = self.reduced[:-1]
        dW, db = flat_views(flat, self._shapes)
        return flat, dW, db

    @property
    def grads(self) -> Array:
        return self._gradients[0]

    @property
    def dW(self) -> list[Array]:
        return self._gradients[1]

    @property
    def db(self) -> list[Array]:
        return self._gradients[2]

    @cached_property
    def grad_pieces(self) -> tuple[Array, Array]:
        """``grads`` as the two pieces of the parameters' layout: every ``dE/dW``, then every ``dE/db``."""
        nw = n_weights(self._shapes)
        return self.grads[:nw], self.grads[nw:]

    @cached_property
    def loss(self) -> Array:
        return self.reduced[-1:].reshape(())

    @cached_property
    def x(self) -> Array:
        return self._kernels.zeros((self.batch, self._net_sizes[0]), self._dtype)

    @cached_property
    def t(self) -> Array:
        return self._kernels.zeros((self.batch, self._net_sizes[-1]), self._dtype)


def _views(flat: Array, batch: int, widths: list[int], wanted: Any) -> list[Any]:
    """``(batch, n)`` views into ``flat``, one after another, for each width ``n`` that is ``wanted``
    (``None`` for the others)."""
    out: list[Any] = []
    offset = 0
    for n, want in zip(widths, wanted):
        out.append(flat[offset:offset + batch * n].reshape(batch, n) if want else None)
        offset += batch * n if want else 0
    return out


def _keeps_u(net: MLP, i: int, last: int) -> bool:
    """Layer ``i`` keeps ``u`` when its slope needs it (GELU, SiLU) or the loss reads the logits."""
    return net.layers[i].activation.needs_u or i == last


def n_weights(shapes: list[tuple[int, int]]) -> int:
    """How many weights the layers of ``shapes`` ``(n_out, n_in)`` hold (the biases follow them in a flat
    buffer)."""
    return sum(n_out * n_in for n_out, n_in in shapes)


def n_params(shapes: list[tuple[int, int]]) -> int:
    """How many parameters (weights and biases) the layers of ``shapes`` ``(n_out, n_in)`` hold."""
    return sum(n_out * (n_in + 1) for n_out, n_in in shapes)


def flat_views(flat: Array, shapes: list[tuple[int, int]]) -> tuple[list[Array], list[Array]]:
    """Each layer's ``W`` ``(n_out, n_in)`` and ``b`` ``(n_out,)`` as views into the flat buffer ``flat``,
    laid out ``[W^1 | W^2 | ... | W^L | b^1 | ... | b^L]`` (rows of ``W`` in order): the weights, which take
    weight decay, in one piece, and the biases in another. The network's parameters, their gradients and
    the optimizer's state all use this layout, so that an optimizer updates every layer in one call per piece."""
    W, b = [], []
    offset = 0
    for n_out, n_in in shapes:
        W.append(flat[offset:offset + n_out * n_in].reshape(n_out, n_in))
        offset += n_out * n_in
    for n_out, _ in shapes:
        b.append(flat[offset:offset + n_out])
        offset += n_out
    return W, b


def gradient_buffers(kernels: Any, dtype: Any, shapes: list[tuple[int, int]]) -> tuple[Array, list[Array], list[Array]]:
    """One flat buffer for the gradients of layers with weights of ``shapes`` ``(n_out, n_in)``, and each
    layer's ``dE/dW`` and ``dE/db`` views into it, in the layout of :func:`flat_views` (one buffer, so that
    one reduction checks them all, and one update per piece applies them)."""
    flat = kernels.zeros((n_params(shapes),), dtype)
    dW, db = flat_views(flat, shapes)
    return flat, dW, db


class Workspaces:
    """The workspaces of one network, kept per thread: each thread that runs a pass on the network gets buffers
    of its own (at most :data:`MAX_WORKSPACES` batch sizes, the least recently used dropped first), so passes
    run by several threads at once never share a buffer, and a thread's steady-state passes allocate nothing.
    A thread's workspaces are freed when the thread ends; a copied or unpickled network starts with none."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (Workspaces, ())

    def _mine(self) -> OrderedDict[int, Workspace]:
        """This thread's workspaces, by batch size, least recently used first."""
        cache: OrderedDict[int, Workspace] | None = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = OrderedDict()
        return cache

    def get(self, net: MLP, batch: int) -> Workspace:
        """This thread's workspace of ``net`` for ``batch`` rows, made on first use."""
        cache = self._mine()
        ws = cache.get(batch)
        if ws is None:
            ws = cache[batch] = Workspace(net, batch)
            while len(cache) > MAX_WORKSPACES:
                cache.popitem(last=False)
        else:
            cache.move_to_end(batch)
        return ws

    def last_batch(self) -> int | None:
        """The batch size of this thread's most recent pass, ``None`` before its first."""
        cache = self._mine()
        return next(reversed(cache)) if cache else None

    def __len__(self) -> int:
        """How many workspaces this thread holds."""
        return len(self._mine())


def workspace(net: MLP, batch: int) -> Workspace:
    """The calling thread's workspace of ``net`` for ``batch`` rows (see :class:`Workspaces`)."""
    return net.workspaces.get(net, batch)


# --------------------------------------------------------------------------- the passes: two strategies
class LayerByLayer:
    """The passes layer after layer: each layer's GEMM and elementwise kernels (every backend)."""

    name = "layer by layer"
    #: whether the step's whole update may go in one launch (``Optimizer.apply_in_one_launch``)
    one_launch_update = False

    def forward(self, net: MLP, ws: Workspace, x: Array, keep: bool, out: Array | None) -> Array:
        """``x^l = f(W^l x^{l-1} + b^l)`` for ``l = 1..L``, each layer's ``y`` (and kept ``u``) into ``ws``."""
        k = net.backend.kernels
        last = len(net.layers) - 1
        for i, layer in enumerate(net.layers):
            a = layer.activation
            y = out if (i == last and out is not None) else ws.y[i]
            keep_u = keep and ws.u[i] is not None
            aux = {"aux": ws.aux[i]} if keep and ws.aux[i] is not None else {}
            x, _ = k.layer_forward(x, layer.W, layer.b, a.name, a.alpha, keep_u, y=y, u=ws.u[i], **aux)
        ws.aux_written = keep
        return x

    def forward_error(self, net: MLP, ws: Workspace, x: Array, t: Array, weights: Array | None) -> None:
        """The training forward pass, then the error at the output (:func:`output_error`)."""
        self.forward(net, ws, x, True, None)
        output_error(net, ws, t, weights)

    def backward(self, net: MLP, ws: Workspace, x: Array, dW: list[Array], db: list[Array]) -> None:
        """``dE/dW^l = delta^l (x^{l-1})^T``, ``dE/db^l = sum delta^l``, then
        ``delta^{l-1} = f'(u^{l-1}) * (W^l)^T delta^l``, for ``l = L..1``."""
        k = net.backend.kernels
        for i in range(len(net.layers) - 1, -1, -1):
            x_prev = ws.y[i - 1] if i > 0 else x
            k.weight_gradients(ws.delta[i], x_prev, dW[i], db[i])
            if i > 0:
                prev = net.layers[i - 1].activation
                aux = {"aux_prev": ws.aux[i - 1]} if ws.aux_written and ws.aux[i - 1] is not None else {}
                k.delta_backward(ws.delta[i], net.layers[i].W, ws.y[i - 1], ws.u[i - 1], prev.name, prev.alpha,
                                 out=ws.delta[i - 1], **aux)


class FusedPasses(LayerByLayer):
    """Each pass of a narrow network as one launch over every layer (a backend with
    ``CAPABILITIES.fused_mlp``, its switch on, and no objection from its ``fused_mlp_reason``): the same
    equations, each layer's ``y`` and ``u`` in the workspace's flat buffers, the gradients into ``ws.grads``."""

    name = "fused"
    one_launch_update = True

    def __init__(self, sizes: tuple[int, ...], acts: tuple[str, ...], alphas: tuple[float, ...]) -> None:
        self.spec = (sizes, acts, alphas)

    def forward(self, net: MLP, ws: Workspace, x: Array, keep: bool, out: Array | None) -> Array:
        k = net.backend.kernels
        ws.aux_written = False
        k.mlp_forward(x, net.params, *self.spec, ws.keep_u, ws.y_flat, ws.u_flat)
        if out is None:
            return ws.y[-1]
        k.copy_into(out, ws.y[-1])
        return out

    def forward_error(self, net: MLP, ws: Workspace, x: Array, t: Array, weights: Array | None) -> None:
        """The forward pass computes the error at its end, in the same launch."""
        ws.aux_written = False
        loss = net.loss_fn
        net.backend.kernels.mlp_forward_error(x, net.params, *self.spec, ws.keep_u, ws.y_flat, ws.u_flat, t,
                                              loss.name, loss.param, delta=ws.delta[-1], value=ws.loss,
                                              weights=weights)

    def backward(self, net: MLP, ws: Workspace, x: Array, dW: list[Array], db: list[Array]) -> None:
        """Every layer in one launch (and a reduction), into the workspace's flat gradients."""
        if dW is not ws.dW or db is not ws.db:  # gradients wanted elsewhere: the layer-by-layer kernels
            LayerByLayer.backward(self, net, ws, x, dW, db)
            return
        net.backend.kernels.mlp_backward(x, net.params, *self.spec, ws.keep_u, ws.y_flat, ws.u_flat, ws.delta[-1],
                                         ws.grads)


LAYER_BY_LAYER = LayerByLayer()


def passes(net: MLP) -> LayerByLayer:
    """How the backend runs ``net``'s passes, decided here and only here: :class:`FusedPasses` where its
    ``CAPABILITIES.fused_mlp`` is true, the switch (``set_fused_mlp``) is on and ``fused_mlp_reason`` has no
    objection to the network (a narrow one), else :data:`LAYER_BY_LAYER`."""
    k = net.backend.kernels
    if not k.CAPABILITIES.fused_mlp or not k.fused_mlp_enabled():
        return LAYER_BY_LAYER
    acts = tuple(L.activation.name for L in net.layers)
    if k.fused_mlp_reason(net.sizes, acts, net.dtype):
        return LAYER_BY_LAYER
    return FusedPasses(tuple(net.sizes), acts, tuple(float(L.activation.alpha) for L in net.layers))


def fused(net: MLP) -> bool:
    """Whether ``net``'s passes run as single fused launches (:func:`passes`)."""
    return isinstance(passes(net), FusedPasses)


# --------------------------------------------------------------------------- the step
def forward(net: MLP, ws: Workspace, x: Array, keep: bool = True, out: Array | None = None) -> Array:
    """Forward pass ``x^l = f(W^l x^{l-1} + b^l)`` into the workspace; returns ``x^L``.

    ``keep``: keep each layer's ``u`` where backward or the loss needs it. ``out``: where the last
    layer writes (a fresh array handed to the caller), instead of the workspace. The passes run as
    :func:`passes` decides.
    """
    return passes(net).forward(net, ws, x, keep, out)


def output_error(net: MLP, ws: Workspace, t: Array, weights: Array | None = None) -> Array:
    """Error at the output: the mean loss into ``ws.loss`` and ``delta^L = dE/du^L`` into the workspace.

    ``weights``: ``None``, or a backend array of one weight ``w_i`` per row in the network's dtype; the loss is
    then ``sum_i w_i L_i / batch`` and ``delta^L`` its gradient (see the kernels' ``output_error``)."""
    out = net.output
    loss = net.loss_fn
    value, _ = net.backend.kernels.output_error(ws.y[-1], ws.u[-1], t, out.name, loss.name, loss.param, out.alpha,
                                                delta=ws.delta[-1], value=ws.loss, weights=weights)
    return value


def backward(net: MLP, ws: Workspace, x: Array, dW: list[Array] | None = None,
             db: list[Array] | None = None) -> None:
    """Backward pass from ``delta^L``: ``dE/dW^l = delta^l (x^{l-1})^T``, ``dE/db^l = sum delta^l``,
    then ``delta^{l-1} = f'(u^{l-1}) * (W^l)^T delta^l``, for ``l = L..1``; the gradients go to the
    workspace (or to ``dW``/``db``). No parameter changes."""
    passes(net).backward(net, ws, x, ws.dW if dW is None else dW, ws.db if db is None else db)


def train_step(net: MLP, ws: Workspace, x: Array, t: Array, optimizer: Optimizer, guard: Guard,
               weight: float = 1.0, weights: Array | None = None) -> None:
    """One step on the batch ``(x, t)``: forward, error, backward, then the update, applied only when
    the guard finds the loss and every gradient finite and no update would leave a value that is
    not finite (see the module docstring). Nothing is read back; ``guard`` keeps the tally
    (``weight * loss`` summed over the steps whose loss and gradients were finite). ``weights``: the
    rows' weights of the loss (:func:`output_error`), ``None`` for the plain mean."""
    gradients(net, ws, x, t, weights)
    apply_update(net, ws, optimizer, guard, weight)


def gradients(net: MLP, ws: Workspace, x: Array, t: Array, weights: Array | None = None) -> None:
    """The first half of a step: forward, error, backward on ``(x, t)``, leaving the mean loss in
    ``ws.loss`` and every gradient in ``ws.grads`` (together ``ws.reduced``). No parameter changes."""
    how = passes(net)
    how.forward_error(net, ws, x, t, weights)
    how.backward(net, ws, x, ws.dW, ws.db)


def apply_update(net: MLP, ws: Workspace, optimizer: Optimizer, guard: Guard, weight: float = 1.0) -> None:
    """The second half of a step: the guard's verdict on ``ws.loss`` and ``ws.grads``, then the optimizer's
    update of every parameter from ``ws.grads``, applied only when the guard allows (module docstring)."""
    k = net.backend.kernels
    g = guard.array
    (W, b), (dW, db) = net.param_pieces, ws.grad_pieces
    optimizer.begin_step()
    # a narrow network's step on fused kernels: the whole update in one launch, where the backend can
    if passes(net).one_launch_update and optimizer.apply_in_one_launch(k, net.optimizer_key, W, b, dW, db, g, ws.loss,
                                                                weight, net.dtype):
        return
    k.guard_step(g, ws.loss, ws.grads, weight)
    optimizer.prepare(k, g, net.dtype)  # step-wide device work (Adam's bias corrections)
    # every layer at once: the weights in one piece of the flat buffers, the biases in the other
    optimizer.apply(k, net.optimizer_key, W, b, dW, db, g, probe=True)
    optimizer.apply(k, net.optimizer_key, W, b, dW, db, g)
    optimizer.finish(k, g)  # step-wide device work after the updates (Adam counts the applied step)


def failure_cause(net: MLP, ws: Workspace, x: Array, t: Array, optimizer: Optimizer) -> str:
    """Why the guard refused the step on the batch ``(x, t)``: its forward and backward passes run again
    on the unchanged parameters (only on this rare path, with two reads), and the first of these that
    holds is named: the loss is not finite, a gradient is not finite, or else the update itself would
    have overflowed."""
    k = net.backend.kernels
    forward(net, ws, x)
    loss = float(k.to_host(output_error(net, ws, t)))
    if not np.isfinite(loss):
        return f"the loss is {loss}"
    backward(net, ws, x)
    if not k.all_finite(ws.grads):
        return f"a gradient is not finite (loss {loss:.6g})"
    return (f"the update would have made a parameter or the optimizer's state overflow (loss {loss:.6g}, "
            f"lr={optimizer.lr:g}, gradients finite): the learning rate is too large for these gradients")


# --------------------------------------------------------------------------- the guard
class Guard:
    """The device-side status of a run of steps (see :func:`~backprop.kernels.numpy_ref.guard_step`):
    how many steps ran, the first that was not finite, and the weighted sum of the losses.

    Reading it (:meth:`read`) is the one copy to the host; a training loop does it once per epoch,
    or a few times a second for a progress bar.
    """

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels
        self.array = kernels.zeros((GUARD_SIZE,), np.float64)

    def read(self) -> GuardState:
        """Copy the status to the host (waits for the queued steps)."""
        return GuardState(np.array(self.kernels.to_host(self.array), dtype=np.float64))


class GuardState:
    """What a :class:`Guard` said when it was read."""

    def __init__(self, values: np.ndarray) -> None:
        self.steps = int(values[GUARD_STEPS])
        self.failed_step = int(values[GUARD_FAILED])  # counting from 1; 0 when every step was finite
        self.loss_sum = float(values[GUARD_LOSS_SUM])

    @property
    def failed(self) -> bool:
        return self.failed_step > 0
