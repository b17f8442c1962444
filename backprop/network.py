"""The multilayer perceptron: forward pass, error at the output, backward pass, updates.

    x^0 --W^1,b^1--> x^1 --W^2,b^2--> ... --W^L,b^L--> x^L

Each step is one primitive of the active backend's kernels; this module never looks at which
backend that is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .activations import Activation, ActivationLike, as_activation
from .backend import Backend, get_backend, resolve_backend
from .losses import HEADS, Loss, LossLike, as_loss, check_output_loss
from .npz import Npz, seed_from_words, seed_to_words, write_atomically
from .lbfgs import LBFGS
from .optimizers import Optimizer, check_optimizer
from . import step
from .concurrency import exclusive, holding
from .step import NonFiniteLossError
from .validation import cast_finite, check_inputs, check_seed, check_targets, real_array

if TYPE_CHECKING:
    from .distributed import Communicator
    from .training import Callback, History

__all__ = ["MLP", "Layer", "NonFiniteLossError"]

Array = Any


class Layer:
    """One layer of synapses and the neurons it feeds: ``x = f(W x_prev + b)``.

    ``W`` and ``b`` are views into the network's flat parameter buffer (:attr:`MLP.params`): read them, or
    change their elements in place; replace them through :meth:`MLP.set_params`.
    """

    __slots__ = ("_W", "_b", "activation")

    def __init__(self, W: Array, b: Array, activation: Activation) -> None:
        self._W, self._b, self.activation = W, b, activation

    @property
    def W(self) -> Array:
        return self._W

    @property
    def b(self) -> Array:
        return self._b

    @property
    def n_in(self) -> int:
        return int(self._W.shape[1])

    @property
    def n_out(self) -> int:
        return int(self._W.shape[0])

    def __repr__(self) -> str:
        return f"Layer({self.n_in} -> {self.n_out}, {self.activation.name})"


class OptimizerKey:
    """What an optimizer keys a network's state (velocities, moments) on: one per network, kept across
    :meth:`MLP.set_params`, and holding nothing, so that an optimizer never keeps a network alive."""

    __slots__ = ("__weakref__",)


def _init_weights(rng: np.random.Generator, n_out: int, n_in: int, scheme: str) -> np.ndarray:
    """Glorot uniform (sigmoid, tanh, softmax, identity), He normal (ReLU family), LeCun normal (SELU)."""
    if scheme == "glorot":
        limit = np.sqrt(6.0 / (n_in + n_out))
        return rng.uniform(-limit, limit, size=(n_out, n_in))
    if scheme == "he":
        return rng.normal(0.0, np.sqrt(2.0 / n_in), size=(n_out, n_in))
    return rng.normal(0.0, np.sqrt(1.0 / n_in), size=(n_out, n_in))  # lecun_normal


def _check_dtype(dtype: Any) -> np.dtype:
    if dtype is None:  # np.dtype(None) would silently be float64
        raise TypeError("dtype must be float32 or float64, got None")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt.name}")
    return dt


class MLP:
    """A multilayer perceptron trained by backpropagation.

    Parameters
    ----------
    sizes: ``[n0, n1, ..., nL]``, the widths of the ``L + 1`` layers of neurons.
    activation: hidden activation, a name (or :class:`Activation`), or one per hidden layer.
    output, loss: output activation (default ``"identity"``) and loss (default ``"mse"``); an output/loss pair
        that makes no sense is refused.
    head: shortcut for ``(output, loss)``: ``"regression"`` (identity, mse), ``"binary"`` and ``"multilabel"``
        (sigmoid, bce), ``"multiclass"`` (softmax, cross_entropy). Giving ``output`` or ``loss`` as well is
        allowed only when it is the head's own; a different one is a ``ValueError``.
    dtype: ``"float32"`` (default) or ``"float64"``.
    seed: seeds the initialization (and the shuffling in :meth:`fit`); same seed, same network.
    backend: backend name; default the active one (see :func:`backprop.set_backend`).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: ActivationLike | Sequence[ActivationLike] = "relu",
        output: ActivationLike | None = None,
        loss: LossLike | None = None,
        *,
        head: str | None = None,
        dtype: Any = "float32",
        seed: int | None = 0,
        backend: str | None = None,
    ) -> None:
        sizes = self._check_sizes(sizes)
        out_act, loss_fn = self._resolve_head(head, output, loss)  # before anything is built
        n_hidden = len(sizes) - 2
        if isinstance(activation, (str, Activation)):
            hidden = [as_activation(activation)] * n_hidden
        elif isinstance(activation, Iterable):
            hidden = [as_activation(a, f"activation {i + 1}") for i, a in enumerate(activation)]
            if len(hidden) != n_hidden:
                raise ValueError(f"{len(hidden)} activations given for {n_hidden} hidden layers")
        else:
            raise TypeError("activation must be an activation name, a backprop.Activation or a sequence of them "
                            f"(one per hidden layer), got {type(activation).__name__}")
        for a in hidden:
            if not a.spec.hidden:
                raise ValueError(f"activation {a.name!r} is for the output layer only")
        self.loss_fn: Loss = loss_fn
        check_output_loss(out_act.name, self.loss_fn.name)
        if out_act.spec.rowwise and sizes[-1] < 2:  # softmax
            raise ValueError(f"a {out_act.name} output needs at least 2 units")
        self.dtype = _check_dtype(dtype)
        seed = check_seed(seed)
        self.backend: Backend = get_backend() if backend is None else resolve_backend(backend)
        self.seed = seed
        rng = np.random.default_rng(seed)
        acts = hidden + [out_act]
        self.layers: list[Layer] = []
        for n_in, n_out, act in zip(sizes[:-1], sizes[1:], acts):
            self.layers.append(Layer(_init_weights(rng, n_out, n_in, act.spec.init), np.zeros(n_out), act))
        self._bind(self._packed([(L.W, L.b) for L in self.layers]))
        #: each thread's buffers for the passes over this network (see :class:`backprop.step.Workspaces`)
        self.workspaces = step.Workspaces()
        #: what optimizers key this network's state on (see :class:`OptimizerKey`)
        self.optimizer_key = OptimizerKey()

    @staticmethod
    def _resolve_head(head: str | None, output: ActivationLike | None,
                      loss: LossLike | None) -> tuple[Activation, Loss]:
        """The output activation and loss from ``head``, ``output`` and ``loss``: the head's pair, where an
        explicit ``output`` or ``loss`` must be the head's own (a ``ValueError`` naming both otherwise)."""
        if head is None:
            return (as_activation("identity" if output is None else output, "output"),
                    as_loss("mse" if loss is None else loss))
        if not isinstance(head, str):
            raise TypeError(f"head must be a string, one of {', '.join(HEADS)}; got {type(head).__name__}")
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
        head_output, head_loss = HEADS[head]
        out_act, loss_fn = as_activation(head_output, "output"), as_loss(head_loss)
        conflicts = []
        if output is not None and as_activation(output, "output") != out_act:
            conflicts.append(f"output={output!r}")
        if loss is not None and as_loss(loss) != loss_fn:
            conflicts.append(f"loss={loss!r}")
        if conflicts:
            raise ValueError(f"head={head!r} sets output={head_output!r} and loss={head_loss!r}; got "
                             f"{' and '.join(conflicts)} (give the head alone, or output and loss without it)")
        return out_act, loss_fn

    # ------------------------------------------------------------------ description
    @staticmethod
    def _check_sizes(sizes: Sequence[int]) -> list[int]:
        try:
            sizes = list(sizes)
        except TypeError:
            raise TypeError(f"sizes must be a sequence of layer widths, got {type(sizes).__name__}") from None
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least an input and an output width, got {sizes}")
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
                raise TypeError(f"layer widths must be integers, got {s!r}")
            if s < 1:
                raise ValueError(f"layer widths must be positive, got {sizes}")
        return [int(s) for s in sizes]

    @property
    def sizes(self) -> list[int]:
        return [self.layers[0].n_in] + [layer.n_out for layer in self.layers]

    @property
    def output(self) -> Activation:
        return self.layers[-1].activation

    @property
    def n_params(self) -> int:
        """Number of weights and biases, the notes' N."""
        return step.n_params(self._shapes)

    @property
    def n_weights(self) -> int:
        """Number of weights: ``params[:n_weights]`` holds every ``W``, ``params[n_weights:]`` every ``b``."""
        return self._n_weights

    @property
    def params(self) -> Array:
        """Every parameter in one flat array of the backend, ``[W^1 | ... | W^L | b^1 | ... | b^L]`` (each
        ``W`` row by row): each layer's ``W`` and ``b`` are views into it, and an optimizer updates all of them
        in two calls (weights, biases). Change it in place, or replace it with :meth:`set_params`."""
        return self._params

    @property
    def param_pieces(self) -> tuple[Array, Array]:
        """:attr:`params` as its two pieces, views made once: every weight (``params[:n_weights]``), then every
        bias (``params[n_weights:]``); what an optimizer updates and what an L2 penalty sums over."""
        return self._pieces

    @property
    def _shapes(self) -> list[tuple[int, int]]:
        return [(L.n_out, L.n_in) for L in self.layers]

    def _packed(self, params: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Host ``[(W, b)]`` in the flat layout of :attr:`params`, in the network's dtype."""
        return np.concatenate([np.ravel(W) for W, _ in params] + [np.ravel(b) for _, b in params]).astype(
            self.dtype, copy=False)

    def set_flat_params(self, flat: Any) -> None:
        """Replace every parameter at once from ``flat``, a host array in the layout of :attr:`params` (every
        ``W`` row by row, then every ``b``): real numbers of shape ``(n_params,)``, finite once cast to the
        network's dtype (a ``TypeError``/``ValueError`` naming the problem otherwise, with nothing changed).
        One copy to the backend, no array split or joined."""
        arr = real_array(flat, "flat parameters")
        if arr.shape != (self.n_params,):
            raise ValueError(f"flat parameters must have shape ({self.n_params},), got {arr.shape}")
        cast = cast_finite(arr, self.dtype, "flat parameters")
        with exclusive(self, "MLP.set_flat_params"):
            self._bind(cast)

    def _bind(self, flat_host: np.ndarray) -> None:
        """Move the flat parameters to the backend and point every layer's ``W`` and ``b`` into them."""
        self._params = self.backend.kernels.to_device(flat_host, self.dtype)
        shapes = self._shapes
        W, b = step.flat_views(self._params, shapes)
        for layer, Wl, bl in zip(self.layers, W, b):
            layer._W, layer._b = Wl, bl
        self._n_weights = nw = step.n_weights(shapes)
        #: the two pieces an optimizer updates, every weight and every bias: made once, not per step
        self._pieces = (self._params[:nw], self._params[nw:])

    def __repr__(self) -> str:
        acts = ", ".join(layer.activation.name for layer in self.layers)
        return (f"MLP({self.sizes}, activations=[{acts}], loss={self.loss_fn.name!r}, "
                f"dtype={self.dtype.name}, backend={self.backend.name!r})")

    def describe(self, batch: int | None = None) -> str:
        """How the backend runs each layer: one line per layer with what served its forward, backward and
        gradient GEMMs the last time a step ran at ``batch`` rows (default: the last batch size used), as the
        backend reports it (its ``layer_paths``: a cuBLASLt epilogue, or the GEMM and kernel and why), or the
        fused narrow-network launches."""
        lines = [repr(self)]
        k = self.backend.kernels
        if step.fused(self):
            on = k.fused_mlp_path(self.dtype)
            return "\n".join(lines + ["  every layer: the fused narrow-network kernels, one launch per pass, "
                                       f"on the {on}"])
        if batch is None:
            batch = self.workspaces.last_batch()
        paths = k.layer_paths if k.CAPABILITIES.layer_paths else None
        for i, L in enumerate(self.layers):
            head = f"  layer {i + 1}: {L.n_in} -> {L.n_out} {L.activation.name}"
            if paths is None or batch is None:
                lines.append(f"{head}: a GEMM and an elementwise kernel per pass" if paths is None
                             else f"{head}: not run yet")
                continue
            prev = self.layers[i - 1].activation.name if i else None
            got = paths(L.n_in, L.n_out, L.activation.name, prev, int(batch), self.dtype)
            lines.append(f"{head} (batch {batch}): " + "; ".join(f"{kind} {path}" for kind, path in got.items()))
        return "\n".join(lines)

    # ------------------------------------------------------------------ data
    def _inputs(self, X: Any) -> Array:
        return check_inputs(X, self.sizes[0], self.backend.kernels, self.dtype)

    def _targets(self, T: Any, batch: int) -> Array:
        return check_targets(T, self.sizes[-1], self.loss_fn.name, batch, self.backend.kernels, self.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, X: Any) -> Array:
        """Forward pass ``x^l = f(W^l x^{l-1} + b^l)`` for ``l = 1..L``; returns ``x^L``, a new array of the
        backend (data already there is checked there, never copied to the host)."""
        x = self._inputs(X)
        return self.forward_device(x, out=self.backend.kernels.zeros((x.shape[0], self.sizes[-1]), self.dtype))

    def forward_device(self, x: Array, out: Array | None = None) -> Array:
        """Inference pass on a batch already on the backend (unchecked). Returns ``x^L`` in ``out`` when given,
        else in the calling thread's workspace for this batch size: no allocation, but overwritten by the
        thread's next call with as many rows."""
        return step.forward(self, step.workspace(self, x.shape[0]), x, keep=False, out=out)

    def predict(self, X: Any) -> np.ndarray:
        """The output ``x^L`` as a NumPy array."""
        return self.backend.kernels.to_host(self.forward(X))

    # ------------------------------------------------------------------ loss and gradients
    def loss(self, X: Any, T: Any) -> float:
        """Mean loss ``E`` over the samples of ``(X, T)``."""
        x = self._inputs(X)
        t = self._targets(T, x.shape[0])
        ws = step.workspace(self, x.shape[0])
        step.forward(self, ws, x)
        return float(self.backend.kernels.to_host(step.output_error(self, ws, t)))

    def loss_and_grads(self, X: Any, T: Any) -> tuple[float, list[tuple[Array, Array]]]:
        """Mean loss and its gradients ``[(dE/dW^l, dE/db^l) for l = 1..L]`` by backpropagation, in new
        arrays of the backend."""
        x = self._inputs(X)
        t = self._targets(T, x.shape[0])
        ws = step.workspace(self, x.shape[0])
        step.forward(self, ws, x)
        value = step.output_error(self, ws, t)
        _, dW, db = step.gradient_buffers(self.backend.kernels, self.dtype, [(L.n_out, L.n_in) for L in self.layers])
        step.backward(self, ws, x, dW, db)
        return float(self.backend.kernels.to_host(value)), list(zip(dW, db))

    def loss_and_grads_device(self, x: Array, t: Array,
                              weights: Array | None = None) -> tuple[Array, list[tuple[Array, Array]]]:
        """:meth:`loss_and_grads` on a batch already on the backend (unchecked), with nothing allocated: the
        loss (a 0-d array) and the gradients are the calling thread's workspace's, overwritten by its next call
        with as many rows. ``weights``: the rows' weights of the kernels' ``output_error``
        (``sum_i w_i L_i / batch``)."""
        ws = step.workspace(self, x.shape[0])
        step.gradients(self, ws, x, t, weights)
        return ws.loss, list(zip(ws.dW, ws.db))

    # ------------------------------------------------------------------ training
    def train_step(self, X: Any, T: Any, optimizer: Optimizer, graph: bool = False) -> float:
        """One forward pass, error, backward pass and update; returns the loss before the update.

        Raises :class:`NonFiniteLossError`, leaving the parameters and the optimizer's state untouched,
        if the loss or a gradient is not finite, or if the update would make a parameter or the optimizer's
        state overflow (an ``lr`` too large for the gradients). ``graph=True`` replays the step as a captured CUDA
        graph on backends that can capture one.
        """
        x = self._inputs(X)
        t = self._targets(T, x.shape[0])
        return self.train_step_device(x, t, optimizer, graph=graph)

    @holding("MLP.train_step")
    def train_step_device(self, x: Array, t: Array, optimizer: Optimizer, graph: bool = False) -> float:
        """:meth:`train_step` on a batch already on the backend (unchecked): one read of the result."""
        check_optimizer(optimizer, dtype=self.dtype)
        ws = step.workspace(self, x.shape[0])
        guard = step.Guard(self.backend.kernels)
        if graph:
            from .graph import graphed_train_step

            graphed_train_step(self, ws, x, t, optimizer, guard)
        else:
            step.train_step(self, ws, x, t, optimizer, guard)
        state = guard.read()
        if state.failed:
            optimizer.steps -= 1
            raise NonFiniteLossError(f"{step.failure_cause(self, ws, x, t, optimizer)}; this step was not applied")
        return state.loss_sum

    def fit(self, X: Any, T: Any, *, epochs: int = 10, batch_size: int = 32,
            optimizer: Optimizer | LBFGS | None = None,
            shuffle: bool = True, validation_data: tuple[Any, Any] | None = None, progress: bool | None = False,
            callbacks: Iterable[Callback] | None = (), schedule: Callable[[int], float] | None = None,
            seed: int | None = None, validation_split: float = 0.0, early_stopping: bool = False,
            patience: int = 10, min_delta: float = 0.0, monitor: str = "auto", restore_best: bool = True,
            graph: bool = False, distributed: bool | Communicator = False) -> History:
        """Train by minibatch backpropagation for ``epochs`` passes over ``(X, T)``; returns a :class:`History`.

        The options (keyword only) are those of :func:`backprop.training.fit`, which documents each:
        ``optimizer`` (default ``SGD(lr=0.01)``; :class:`~backprop.LBFGS` trains full-batch, one epoch per
        L-BFGS iteration), ``shuffle`` and ``seed``, ``validation_data`` or
        ``validation_split``, ``early_stopping`` with ``patience``, ``min_delta``, ``monitor`` and
        ``restore_best``, ``schedule(epoch) -> lr``, ``callbacks``, ``progress``, ``graph`` and ``distributed``
        (data-parallel training over MPI processes: :mod:`backprop.distributed`).
        """
        from .training import fit

        return fit(self, X, T, epochs=epochs, batch_size=batch_size, optimizer=optimizer, shuffle=shuffle,
                   validation_data=validation_data, progress=progress, callbacks=callbacks, schedule=schedule,
                   seed=seed, validation_split=validation_split, early_stopping=early_stopping,
                   patience=patience, min_delta=min_delta, monitor=monitor, restore_best=restore_best,
                   graph=graph, distributed=distributed)

    # ------------------------------------------------------------------ parameters
    def get_params(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Copies of ``[(W^l, b^l)]`` as NumPy arrays."""
        flat = np.array(self.backend.kernels.to_host(self._params), copy=True)  # one copy to the host
        W, b = step.flat_views(flat, self._shapes)
        return list(zip(W, b))

    def set_params(self, params: Sequence[tuple[Any, Any]]) -> None:
        """Replace ``[(W^l, b^l)]``, a sequence of one ``(W, b)`` pair per layer. Each array must hold real
        numbers (integers or floats), have its layer's shape and be finite once cast to the network's dtype;
        nothing changes unless every array passes."""
        if isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Sequence):
            raise TypeError(f"params must be a sequence of (W, b) pairs, one per layer, got {type(params).__name__}")
        if len(params) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} (W, b) pairs, got {len(params)}")
        checked = []
        for i, (pair, layer) in enumerate(zip(params, self.layers)):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"layer {i + 1}: expected a (W, b) pair, got {type(pair).__name__}"
                                + (f" of length {len(pair)}" if isinstance(pair, (tuple, list)) else ""))
            W, b = (real_array(a, f"layer {i + 1}: {n}") for a, n in zip(pair, "Wb"))
            if W.shape != (layer.n_out, layer.n_in) or b.shape != (layer.n_out,):
                raise ValueError(f"layer {i + 1}: expected W {(layer.n_out, layer.n_in)} and b {(layer.n_out,)}, "
                                 f"got {W.shape} and {b.shape}")
            checked.append((cast_finite(W, self.dtype, f"layer {i + 1}: W"),
                            cast_finite(b, self.dtype, f"layer {i + 1}: b")))
        with exclusive(self, "MLP.set_params"):
            self._bind(self._packed(checked))

    def to_backend(self, name: str) -> MLP:
        """A copy of this network whose arrays live on backend ``name``."""
        clone = MLP.__new__(MLP)
        clone.__dict__.update(self.__dict__)
        clone.workspaces = step.Workspaces()  # its own buffers, on its own backend
        clone.backend = resolve_backend(name)
        params = self.get_params()
        clone.layers = [Layer(W, b, L.activation) for (W, b), L in zip(params, self.layers)]
        clone._bind(self._packed(params))
        clone.optimizer_key = OptimizerKey()  # its own optimizer state, on its own backend
        return clone

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Save to ``.npz`` at exactly ``path`` (no pickles): sizes, activations, loss, dtype, seed and every
        ``W``, ``b``. The file is written next to ``path`` and renamed over it, so a failed save leaves any
        previous file intact."""
        arrays: dict[str, np.ndarray] = {
            "sizes": np.array(self.sizes, dtype=np.int64),
            "activations": np.array([L.activation.name for L in self.layers]),
            "alphas": np.array([L.activation.alpha for L in self.layers], dtype=np.float64),
            "loss": np.array(self.loss_fn.name),
            "loss_param": np.array(self.loss_fn.param, dtype=np.float64),
            "dtype": np.array(self.dtype.name),
            "seed": seed_to_words(self.seed),
        }
        for i, (W, b) in enumerate(self.get_params()):
            arrays[f"W{i}"], arrays[f"b{i}"] = W, b
        write_atomically(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike[str], backend: str | None = None) -> MLP:
        """Load a network written by :meth:`save` (exact round trip, seed included).

        Every array of the file is checked (names, dtypes, shapes against ``sizes``, finite values in the
        saved dtype) before the network is built; a damaged or foreign file is a ``ValueError`` naming the
        file and the problem. Files of the earlier format (no seed) load with ``seed=None``.
        """
        backend_name = (get_backend() if backend is None else resolve_backend(backend)).name
        name = os.fspath(path)
        with open(path, "rb") as fh:
            npz = Npz(fh, name)
            widths = npz.read("sizes", "iu", lambda s: len(s) == 1, "a 1-D array of integers")
            if widths.size < 2 or (widths < 1).any():
                raise npz.error(f"sizes must hold at least 2 positive layer widths, got {widths.tolist()}")
            sizes = [int(n) for n in widths]
            n_layers = len(sizes) - 1
            dtype_name = npz.read("dtype", "U", lambda s: s == (), "a string").item()
            names = npz.read("activations", "U", lambda s: s == (n_layers,), f"{n_layers} names")
            alphas = npz.read("alphas", "iuf", lambda s: s == (n_layers,), f"{n_layers} numbers")
            loss_name = npz.read("loss", "U", lambda s: s == (), "a string").item()
            loss_param = npz.read("loss_param", "iuf", lambda s: s == (), "a number").item()
            seed = npz.read("seed", "iu", lambda s: len(s) == 1, "a 1-D array of integers") \
                if npz.has("seed") else None
            try:
                dtype = _check_dtype(dtype_name)
                acts = [Activation(str(n), float(a)) for n, a in zip(names, alphas)]
                loss = Loss(loss_name, float(loss_param))
                seed = None if seed is None else seed_from_words(seed)
            except (TypeError, ValueError) as exc:
                raise npz.error(str(exc)) from None
            shapes = {}
            for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
                shapes[f"W{i}"], shapes[f"b{i}"] = (n_out, n_in), (n_out,)
            for key, shape in shapes.items():  # every header first: nothing is read for a file that lacks W1
                npz.header(key, "iuf", lambda s, shape=shape: s == shape, f"shape {shape}")
            arrays = {key: cast_finite(npz.read(key, "iuf", lambda s, shape=shape: s == shape, f"shape {shape}"),
                                        dtype, key, npz.error) for key, shape in shapes.items()}
        try:
            net = cls(sizes, acts[:-1], acts[-1], loss, dtype=dtype, seed=seed, backend=backend_name)
        except (TypeError, ValueError) as exc:  # an activation/loss pair that the network refuses
            raise npz.error(str(exc)) from None
        net.set_params([(arrays[f"W{i}"], arrays[f"b{i}"]) for i in range(n_layers)])
        return net
