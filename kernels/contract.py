"""The backend contract: what a kernel module must provide, and what it may provide.

A backend is one module of this package. :class:`KernelModule` lists, as a typed protocol, the
names it must define (``numpy_ref`` is the reference implementation and the test oracle of
each); its ``CAPABILITIES`` (a :class:`Capabilities` record) declares what else it can do, each
true field promising the functions :data:`CAPABILITY_FUNCTIONS` names. Nothing above this layer
looks at a backend's name or at the type of its arrays, or probes a module for a name: it asks
the module (``owns``, ``as_array``, ``array_stats``) and reads its record instead.

Conventions shared by every primitive:

* a batch is ``(batch, n)`` C-contiguous, ``W`` is ``(n_out, n_in)``, ``b`` is ``(n_out,)``;
* ``delta`` is ``dE/du`` of the mean loss ``E``;
* ``weights`` (``output_error``): ``None`` or a 1-D backend array of ``batch`` row weights ``w`` in ``y``'s
  dtype; then ``E = sum_i w_i L_i / batch`` (``L_i`` row ``i``'s loss) and row ``i`` of ``delta`` is ``w_i``
  times its unweighted value (``w_i = s_i batch / sum(s)`` gives the mean of the losses weighted by ``s``);
  without weights the results are those of an unweighted call, bit for bit, and so are they with weights
  of ones. Weights of another shape or dtype raise a ``ValueError`` (:func:`check_weights`) before anything
  is written;
* keyword buffers (``y=``, ``u=``, ``out=``, ``delta=``, ``value=``, ``dW=``, ``db=``) are
  C-contiguous backend arrays of the right shape and dtype that receive the result, and are
  returned; without them the primitive allocates. A training step that passes them allocates
  nothing;
* ``guard`` is the ``(4,)`` float64 status array of :func:`guard_step`; an update given a guard
  changes nothing (bit for bit) unless ``guard[0] == 1``;
* ``probe=True`` (updates, with a guard): write nothing but the guard. When the update would
  leave a value that is not finite in ``p`` or in the optimizer's state, the step fails as if
  its gradient were not finite (``guard[0] = 0``, ``guard[2] = guard[1]`` unless an earlier
  step failed). A step probes every update before it applies any, so an update that itself
  overflows is never applied; the probe computes what the update computes, term for term.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import numpy as np

Array = Any

#: Layout of the guard array written by ``guard_step`` (float64, length ``GUARD_SIZE``).
GUARD_OK = 0  #: 1.0 when the current step may be applied, else 0.0
GUARD_STEPS = 1  #: steps seen since the guard was made
GUARD_FAILED = 2  #: number (from 1) of the first step that was not finite; 0.0 while none was
GUARD_LOSS_SUM = 3  #: sum of ``weight * loss`` over the steps with finite loss and gradients (read while none failed)
GUARD_SIZE = 4

#: Layout of the host array returned by ``array_stats`` (float64, length ``STATS_SIZE``).
STAT_NONFINITE = 0  #: how many elements are NaN or infinite
STAT_FIRST_NONFINITE = 1  #: flat index of the first of them (-1 when none)
STAT_MIN = 2  #: smallest element (over all elements; NaN may leak in when some are not finite)
STAT_MAX = 3  #: largest element
STAT_NON_INTEGER = 4  #: how many elements are not whole numbers
STAT_ROW_SUM_ERROR = 5  #: ``max_i |sum_j a[i, j] - 1|`` for a 2-D array, 0 for others
STATS_SIZE = 6


@runtime_checkable
class KernelModule(Protocol):
    """What every backend module defines (the signatures of :mod:`backprop.kernels.numpy_ref`)."""

    NAME: str
    #: The NumPy-like module of this backend's arrays, or ``None`` when there is none.
    xp: Any
    #: What it can do beyond these functions (:class:`Capabilities`).
    CAPABILITIES: Capabilities

    # ---------------------------------------------------------------- availability and arrays
    def is_available(self) -> bool: ...
    def unavailable_reason(self) -> str: ...
    def is_simulated(self) -> bool:
        """Runs on a simulator (the CUDA simulator): correct and slow; ``"auto"`` never picks it."""
    def owns(self, a: Any) -> bool:
        """True when ``a`` is an array of this backend (on the current device for a GPU)."""
    def as_array(self, a: Array, dtype: Any) -> Array:
        """``a`` (an array this backend owns) as a C-contiguous array of ``dtype``: ``a`` itself when
        it already is one, else a converted copy made where the array lives (no trip to the host)."""
    def to_device(self, a: Any, dtype: Any) -> Array:
        """A new C-contiguous backend array of ``dtype`` holding host data ``a``."""
    def to_host(self, a: Array) -> np.ndarray: ...
    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array: ...
    def copy_into(self, dst: Array, src: Array) -> None:
        """``dst[...] = src`` where the arrays live, for arrays of one shape and dtype (capturable on a GPU)."""
    def synchronize(self) -> None: ...
    def all_finite(self, a: Array) -> bool: ...
    def array_stats(self, a: Array, integers: bool = True, row_sums: bool = True) -> np.ndarray:
        """The ``STATS_SIZE`` float64 facts of the ``STAT_*`` layout about ``a``, reduced where ``a``
        lives and read back in one copy; ``STAT_NON_INTEGER`` and ``STAT_ROW_SUM_ERROR`` are 0 unless
        asked for (``integers``, ``row_sums``)."""
    def one_hot(self, labels: Array, n_classes: int, dtype: Any, out: Array | None = None) -> Array:
        """Rows ``e_{labels[i]}`` of length ``n_classes`` for whole-number labels in range."""
    def gather_rows(self, src: Array, idx: Array, out: Array) -> Array:
        """``out[i] = src[idx[i]]`` (``idx`` an int64 array of this backend)."""

    # ---------------------------------------------------------------- the equations
    def layer_forward(self, x: Array, W: Array, b: Array, act: str, alpha: float = 0.0, keep_u: bool = False, *,
                      y: Array | None = None, u: Array | None = None) -> tuple[Array, Array | None]: ...
    def delta_backward(self, delta: Array, W: Array, y_prev: Array, u_prev: Array | None, act_prev: str,
                       alpha_prev: float = 0.0, *, out: Array | None = None) -> Array: ...
    def weight_gradients(self, delta: Array, x_prev: Array, dW: Array | None = None,
                         db: Array | None = None) -> tuple[Array, Array]: ...
    def output_error(self, y: Array, u: Array | None, t: Array, output: str, loss: str, param: float = 0.0,
                     alpha: float = 0.0, *, delta: Array | None = None, value: Array | None = None,
                     weights: Array | None = None) -> tuple[Array, Array]: ...

    def count_correct(self, y: Array, t: Array, rule: str, total: Array) -> None:
        """``total[0] +=`` the rows whose prediction ``y`` matches the target ``t``: by the position of the
        row maximum (``rule="argmax"``) or in every column at the 0.5 threshold (``"threshold"``); on the
        backend (``total`` a float64 ``(1,)`` array)."""
    def add_sum_of_squares(self, total: Array, a: Array) -> None:
        """``total[0] += sum(a^2)`` in float64, on the backend (``total`` a float64 ``(1,)`` array)."""

    # ---------------------------------------------------------------- the guarded updates
    def guard_step(self, guard: Array, loss: Array, grads: Array, weight: float = 1.0) -> None: ...
    def sgd_update(self, p: Array, g: Array, lr: float, weight_decay: float = 0.0,
                   guard: Array | None = None, probe: bool = False) -> None: ...
    def momentum_update(self, p: Array, g: Array, v: Array, lr: float, momentum: float, nesterov: bool = False,
                        weight_decay: float = 0.0, guard: Array | None = None, probe: bool = False) -> None: ...
    def adam_corrections(self, count: Array, lr: float, beta1: float, beta2: float, out: Array) -> None:
        """Adam's bias corrections for the coming step, kept on the backend: ``t = count[0] + 1``
        (``count`` a float64 ``(1,)`` array of the applied steps, left as it is), ``out[0] = lr / (1 -
        beta1^t)``, ``out[1] = 1 - beta2^t``, in float64 rounded to ``out``'s dtype (a ``(2,)`` array of
        the parameters' dtype). One single-thread kernel on a GPU, no host read."""
    def count_step(self, count: Array, guard: Array | None = None) -> None:
        """``count[0] += 1`` (a float64 ``(1,)`` array) unless ``guard`` says the step is not applied:
        the device's count of applied steps (Adam's ``t``), advanced after the step's updates."""
    def adam_update(self, p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float, beta2: float,
                    eps: float, step: int | Array, weight_decay: float = 0.0, guard: Array | None = None,
                    probe: bool = False) -> None:
        """Adam in place; ``step`` the step number ``t`` (corrections from the host, from ``lr``) or the
        ``out`` array of :meth:`adam_corrections` (``lr / c1`` and ``c2`` read on the device, ``lr``
        ignored); both forms give the same bits for the same ``t``."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the required primitives, declared once as ``CAPABILITIES``.

    ``gpu`` says where the arrays live; every other field, when true, promises the functions that
    :data:`CAPABILITY_FUNCTIONS` lists for it (``check_capabilities`` verifies the promise), and the API
    calls them only then. A field left false costs nothing: the API takes its plain path.
    """

    gpu: bool = False  #: the arrays live on a GPU (staging, data-parallel reduction through the host)
    device_queries: bool = False  #: bytes free and a description of the current device
    memory_pool: bool = False  #: a memory pool whose cached blocks can be given back
    device_choice: bool = False  #: one GPU per process, chosen by index
    graphs: bool = False  #: a training step recorded once as a CUDA graph and replayed
    collectives: bool = False  #: all-reduce and broadcast of its own arrays across processes (NCCL)
    tf32: bool = False  #: float32 GEMMs on TF32 tensor cores, behind a switch (off by default)
    fused_mlp: bool = False  #: a narrow network's passes as single fused launches, behind a switch
    one_launch_update: bool = False  #: a step's guard, probes and updates in one launch
    epilogues: bool = False  #: bias, activation, slope and bias gradient in cuBLASLt epilogues, behind a switch
    layer_aux: bool = False  #: a training forward pass hands a buffer to the backward pass (the ReLU mask)
    layer_paths: bool = False  #: reports what served each GEMM of a layer (``MLP.describe``)


#: The functions a true :class:`Capabilities` field promises, with their signatures.
CAPABILITY_FUNCTIONS: dict[str, dict[str, str]] = {
    "gpu": {},
    "device_queries": {
        "device_memory_free": "() -> int | None: bytes free on the device (None where it cannot tell)",
        "device_info": "() -> dict: name, memory_bytes, compute_capability, ... of the current device",
    },
    "memory_pool": {"release_memory": "() -> None: give the cached blocks of the memory pool back to the device"},
    "device_choice": {"use_device": "(index) -> None: make GPU index (modulo the GPUs present) current"},
    "graphs": {
        "capture": "(fn) -> graph: record the device work fn() issues (kernels, copies, BLAS) without running it",
        "capture_unavailable_reason": "() -> str: why capture cannot record here ('' when it can)",
        "replay": "(graph) -> None: launch a graph made by capture on the current stream",
    },
    "collectives": {
        "collective": "(size, rank, share) -> engine: an engine with all_reduce(recv, send=None) (sum over the "
                      "processes) and broadcast(a, root) for this backend's arrays; share(value) gives process 0's "
                      "value everywhere (the bootstrap, over MPI); an ImportError when it cannot",
    },
    "tf32": {
        "set_tf32": "(bool) -> None: let float32 GEMMs use TF32 tensor cores",
        "tf32_enabled": "() -> bool: whether set_tf32 is on",
    },
    "fused_mlp": {
        "set_fused_mlp": "(bool) -> None: run the passes of narrow networks as single fused launches",
        "fused_mlp_enabled": "() -> bool: whether set_fused_mlp is on",
        "fused_mlp_reason": "(sizes, acts, dtype) -> str: why the fused launches do not serve a network ('' when "
                            "they do)",
        "fused_mlp_path": "(dtype) -> str: where the fused launches of a dtype network run",
        "mlp_forward": "(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat) -> None: the forward pass of every "
                       "layer in one launch, each layer's y (and kept u) into flat buffers, layer after layer",
        "mlp_forward_error": "(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat, t, loss, param, *, delta, "
                             "value, weights=None) -> None: mlp_forward, then the error at the output as "
                             "output_error computes it",
        "mlp_backward": "(x, params, sizes, acts, alphas, keep_u, y_flat, u_flat, delta, grads) -> None: from "
                        "delta^L, every gradient into the flat gradient buffer, deterministically",
    },
    "one_launch_update": {
        "guarded_step": "(optimizer, guard, loss, weight, params, grads, state, hyper, count=None) -> bool: "
                        "guard_step, the probes and the updates of a step in one launch (False when it does not "
                        "serve that size)",
    },
    "epilogues": {
        "set_epilogues": "(bool) -> None: let a layer's GEMMs apply bias, activation, slope and bias gradient in "
                         "cuBLASLt epilogues",
        "epilogues_enabled": "() -> bool: whether set_epilogues is on",
        "epilogue_paths": "() -> dict: what served each GEMM the last time it ran, (kind, act, m, n, k, dtype) -> text",
    },
    "layer_aux": {
        "layer_aux": "(act, batch, n_out, dtype) -> aux | None: a buffer a training forward pass hands to the "
                     "backward pass; when given, layer_forward takes it as aux= and delta_backward as aux_prev=",
    },
    "layer_paths": {
        "layer_paths": "(n_in, n_out, act, act_prev, batch, dtype) -> dict: what served a layer's forward, backward "
                       "and gradients GEMMs the last time",
    },
}

#: The backend switches a capability brings: ``(capability, query)``; a graph recorded under one setting is
#: not replayed under another.
SWITCHES: tuple[tuple[str, str], ...] = (("tf32", "tf32_enabled"), ("fused_mlp", "fused_mlp_enabled"),
                                         ("epilogues", "epilogues_enabled"))


def check_capabilities(module: Any) -> list[str]:
    """What ``module`` promises in its ``CAPABILITIES`` and does not define (empty when it keeps every promise)."""
    caps = getattr(module, "CAPABILITIES", None)
    if not isinstance(caps, Capabilities):
        return ["CAPABILITIES (a backprop.kernels.contract.Capabilities record)"]
    return [name for field in fields(Capabilities) if getattr(caps, field.name)
            for name in CAPABILITY_FUNCTIONS[field.name] if not callable(getattr(module, name, None))]


def switch_settings(module: Any) -> tuple[bool | None, ...]:
    """The current setting of each of :data:`SWITCHES` on ``module`` (``None`` for a capability it lacks)."""
    caps = module.CAPABILITIES
    return tuple(bool(getattr(module, query)()) if getattr(caps, cap) else None for cap, query in SWITCHES)


#: The functions of :class:`KernelModule` (every backend module defines them).
FUNCTIONS: tuple[str, ...] = tuple(n for n, v in vars(KernelModule).items() if not n.startswith("_") and callable(v))

#: Every name of :class:`KernelModule`: its functions and its constants.
REQUIRED: tuple[str, ...] = FUNCTIONS + ("NAME", "xp", "CAPABILITIES")


def check_weights(weights: Any, batch: int, dtype: Any) -> None:
    """A ``ValueError`` naming ``weights`` unless it is ``None`` or a 1-D array of ``batch`` elements of
    ``dtype`` (the row weights of ``output_error``)."""
    if weights is None:
        return
    shape, wdtype = getattr(weights, "shape", None), getattr(weights, "dtype", None)
    if shape is None or wdtype is None:
        raise ValueError(f"weights must be None or a 1-D array of {batch} {np.dtype(dtype)} row weights, "
                         f"got {type(weights).__name__}")
    if tuple(shape) != (batch,) or np.dtype(wdtype) != np.dtype(dtype):
        raise ValueError(f"weights must be a 1-D array of {batch} {np.dtype(dtype)} row weights, "
                         f"got {np.dtype(wdtype)} {tuple(shape)}")


def missing_names(module: Any) -> list[str]:
    """The required names ``module`` lacks (empty for a complete backend)."""
    return [n for n in REQUIRED if not hasattr(module, n)]
