"""``fit``'s options checked into a plan: :func:`plan_fit` validates every option and the data (the same
``ValueError``/``TypeError`` messages as ever, each naming the option) before anything changes, and returns a
frozen :class:`FitPlan` that :func:`backprop.training.fit` then runs.

Building the plan moves the training data to the backend once (see :mod:`backprop.staging`), splits off the
validation rows of ``validation_split``, draws nothing else from the run's random generator, calls
``schedule`` once per epoch and every callback's ``check_setup``. In a data-parallel fit every rank checks
alike and, when one fails, every rank raises (:meth:`backprop.distributed.DataParallel.setting_up`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import step
from .distributed import Communicator, DataParallel, world
from .lbfgs import LBFGS
from .optimizers import SGD, Optimizer, check_optimizer
from .progress import should_show
from .staging import Batches, fits_on_device
from .validation import check_inputs, check_positive, check_seed, check_targets

if TYPE_CHECKING:
    from .network import MLP

__all__ = ["FitPlan", "plan_fit", "take_rows"]

#: a callback ``cb(net, epoch, history)`` (:data:`backprop.training.Callback`)
Callback = Callable[..., Any]


@dataclass(frozen=True)
class FitPlan:
    """A checked run of :func:`~backprop.training.fit`: every option as it will be used.

    ``optimizer``: the minibatch optimizer (default ``SGD(lr=0.01)``) or :class:`~backprop.lbfgs.LBFGS`
    (``full_batch``); ``lrs``: every epoch's scheduled learning rate (``None`` without a schedule);
    ``show``: whether this process draws the bar; ``callbacks``: the user's, then early stopping's;
    ``rng``: the generator of the shuffles (its validation split already drawn); ``X``, ``T``: the checked
    training rows, ``data`` their minibatches; ``val``: the validation pair or ``None``; ``run_step``: the
    step function (:func:`backprop.step.train_step` or its CUDA-graph replay); ``parallel``: the
    data-parallel side, or ``None``; ``stopping``: the early-stopping options, as the ranks compare them.
    """

    epochs: int
    batch_size: int
    optimizer: Optimizer | LBFGS
    full_batch: bool
    shuffle: bool
    show: bool
    callbacks: tuple[Callback, ...]
    rng: np.random.Generator
    X: Any
    T: Any
    data: Batches
    val: tuple[Any, Any] | None
    run_step: Callable[..., Any]
    lrs: list[float] | None
    parallel: DataParallel | None
    validation_split: float
    stopping: tuple[Any, ...]

    @property
    def global_batch(self) -> int:
        """The rows of one step (every rank's minibatch together in a data-parallel fit)."""
        return self.batch_size * (1 if self.parallel is None else self.parallel.size)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.data.n // self.global_batch)

    def settings(self, net: MLP) -> dict[str, Any]:
        """What every rank of a distributed fit must agree on: the network, the data (shapes and a checksum),
        the validation data's shapes and the options."""
        assert self.parallel is not None
        val = self.val
        return dict(
            network=(tuple(net.sizes), [(L.activation.name, L.activation.alpha) for L in net.layers],
                     net.loss_fn.name, net.loss_fn.param, str(np.dtype(net.dtype)), net.backend.name),
            data=(tuple(self.X.shape), tuple(self.T.shape)),
            data_checksum=self.parallel.data_checksum(self.X, self.T),
            validation=None if val is None else (tuple(val[0].shape), tuple(val[1].shape)),
            epochs=self.epochs, batch_size=self.batch_size, shuffle=self.shuffle, lrs=self.lrs,
            optimizer=repr(self.optimizer), validation_split=self.validation_split, callbacks=len(self.callbacks),
            early_stopping=self.stopping,
        )


def take_rows(kernels: Any, A: Any, idx: np.ndarray, dtype: np.dtype) -> Any:
    """``A[idx]`` for a checked array, made where ``A`` lives."""
    if not kernels.owns(A):
        return A[idx]
    out = kernels.zeros((len(idx), A.shape[1]), dtype)
    return kernels.gather_rows(A, kernels.to_device(idx, np.int64), out)


def plan_fit(net: MLP, X: Any, T: Any, *, epochs: int, batch_size: int, optimizer: Optimizer | LBFGS | None,
             shuffle: bool, validation_data: tuple[Any, Any] | None, progress: bool | None,
             callbacks: Iterable[Callback] | None, schedule: Callable[[int], float] | None, seed: int | None,
             validation_split: float, early_stopping: bool, patience: int, min_delta: float, monitor: str,
             restore_best: bool, graph: bool, distributed: bool | Communicator) -> FitPlan:
    """Check every option of :func:`~backprop.training.fit` (which documents them) and the data; the plan."""
    from .callbacks import EarlyStopping

    parallel = data_parallel(net, distributed)
    shared_seed = None if parallel is None else parallel.shared_seed(net.seed if seed is None else seed)
    with nullcontext() if parallel is None else parallel.setting_up():  # on a failed check, every rank raises
        epochs = check_positive(epochs, "epochs", integer=True)
        batch_size = check_positive(batch_size, "batch_size", integer=True)
        optimizer = _checked_optimizer(net, optimizer, schedule, graph, parallel)
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable epoch -> lr, got {type(schedule).__name__}")
        seed = check_seed(seed)
        validation_split = _check_fraction(validation_split, "validation_split")
        show = should_show(progress) and (parallel is None or parallel.rank == 0)  # one bar, rank 0's
        callbacks = _checked_callbacks(callbacks)
        k = net.backend.kernels
        Xd = check_inputs(X, net.sizes[0], k, net.dtype, keep_host=True)
        Td = check_targets(T, net.sizes[-1], net.loss_fn.name, Xd.shape[0], k, net.dtype, keep_host=True)
        rng = np.random.default_rng(shared_seed if parallel is not None else net.seed if seed is None else seed)
        Xd, Td, val = _validation_rows(net, Xd, Td, validation_data, validation_split, rng)
        if early_stopping:
            if val is None and monitor != "loss":
                raise ValueError("early_stopping=True needs validation data: pass validation_split or validation_data "
                                 "(or monitor='loss' to watch the training loss)")
            callbacks.append(EarlyStopping(patience=patience, min_delta=min_delta, monitor=monitor,
                                           restore_best=restore_best))
        run_step = _step_function(net, optimizer, graph, parallel)
        lrs = _scheduled_rates(schedule, epochs)
        _check_setups(net, callbacks, epochs, val)
        data = Batches(k, Xd, Td, net.dtype)
        if val is not None and not k.owns(val[0]) and fits_on_device(k, val[0].nbytes + val[1].nbytes):
            val = (k.to_device(val[0], net.dtype), k.to_device(val[1], net.dtype))
    return FitPlan(epochs=epochs, batch_size=batch_size, optimizer=optimizer, full_batch=isinstance(optimizer, LBFGS),
                   shuffle=shuffle, show=show, callbacks=tuple(callbacks), rng=rng, X=Xd, T=Td, data=data, val=val,
                   run_step=run_step, lrs=lrs, parallel=parallel, validation_split=validation_split,
                   stopping=(early_stopping, patience, min_delta, monitor, restore_best))


def data_parallel(net: MLP, distributed: Any) -> DataParallel | None:
    """The data-parallel side of a fit: ``None`` for ``distributed=False``, else over :func:`world` or the
    communicator given."""
    if distributed is False or distributed is None:
        return None
    if distributed is True:
        return DataParallel(world(), net)
    if isinstance(distributed, Communicator):
        return DataParallel(distributed, net)
    raise TypeError(f"distributed must be True, False or a backprop.distributed.Communicator, got {distributed!r}")


def _check_fraction(value: Any, name: str) -> float:
    value = check_positive(value, name, allow_zero=True)
    if value >= 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return value


def _checked_optimizer(net: MLP, optimizer: Optimizer | LBFGS | None, schedule: Any, graph: Any,
                       parallel: DataParallel | None) -> Optimizer | LBFGS:
    """The optimizer checked (``SGD(lr=0.01)`` for ``None``); L-BFGS refuses a schedule, graphs and
    data-parallel training."""
    if not isinstance(optimizer, LBFGS):
        return check_optimizer(SGD(lr=0.01) if optimizer is None else optimizer, dtype=net.dtype)
    optimizer.check()
    if schedule is not None or graph:
        raise ValueError("the LBFGS optimizer takes no schedule (it has no learning rate) and no graph=True")
    if parallel is not None:
        raise ValueError("distributed=True trains with the minibatch optimizers (SGD, Adam), not LBFGS")
    return optimizer


def _checked_callbacks(callbacks: Iterable[Callback] | None) -> list[Callback]:
    """The callbacks as a new list (``None``: none); a single callable or a non-callable is a ``TypeError``."""
    if callbacks is None:
        return []
    if callable(callbacks) or isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
        hint = ": wrap a single callback in a list" if callable(callbacks) else ""
        raise TypeError(f"callbacks must be a list of callables cb(net, epoch, history) (or None), got "
                        f"{type(callbacks).__name__}{hint}")
    checked = list(callbacks)
    for cb in checked:
        if not callable(cb):
            raise TypeError(f"callbacks must be callables cb(net, epoch, history), got {type(cb).__name__}")
    return checked


def _validation_rows(net: MLP, X: Any, T: Any, validation_data: Any, validation_split: float,
                     rng: np.random.Generator) -> tuple[Any, Any, tuple[Any, Any] | None]:
    """``(X, T, val)``: the training rows and the validation pair, checked (``validation_data``) or split off
    at random (a fraction ``validation_split``, the training rows keeping their order); ``val`` is ``None``
    without either."""
    k = net.backend.kernels
    if validation_data is not None:
        if validation_split:
            raise ValueError("pass validation_data or validation_split, not both")
        if not isinstance(validation_data, Sequence) or len(validation_data) != 2:
            raise TypeError("validation_data must be a pair (X_val, T_val)")
        Xv = check_inputs(validation_data[0], net.sizes[0], k, net.dtype, "X_val", keep_host=True)
        return X, T, (Xv, check_targets(validation_data[1], net.sizes[-1], net.loss_fn.name, Xv.shape[0], k,
                                        net.dtype, "T_val", keep_host=True))
    if not validation_split:
        return X, T, None
    n_all = int(X.shape[0])
    n_val = int(round(n_all * validation_split))
    if n_val < 1 or n_val >= n_all:
        raise ValueError(f"validation_split={validation_split} of {n_all} samples leaves "
                         f"{n_val} for validation and {n_all - n_val} for training; both need at least one")
    perm = rng.permutation(n_all)
    val = (take_rows(k, X, perm[:n_val], net.dtype), take_rows(k, T, perm[:n_val], net.dtype))
    keep = np.sort(perm[n_val:])
    return take_rows(k, X, keep, net.dtype), take_rows(k, T, keep, net.dtype), val


def _step_function(net: MLP, optimizer: Any, graph: Any, parallel: DataParallel | None) -> Callable[..., Any]:
    """:func:`backprop.step.train_step`, or with ``graph=True`` its CUDA-graph replay (checked supported)."""
    if not isinstance(graph, (bool, np.bool_)):
        raise TypeError(f"graph must be True or False, got {graph!r}")
    if not graph:
        return step.train_step
    if parallel is not None:
        raise ValueError("distributed=True does not replay CUDA graphs: pass graph=False")
    from .graph import check_graph_support, graphed_train_step

    check_graph_support(net, optimizer)
    return graphed_train_step


def _scheduled_rates(schedule: Callable[[int], float] | None, epochs: int) -> list[float] | None:
    """Every epoch's learning rate, ``schedule(e)`` for epoch ``e + 1``, checked before the first step."""
    if schedule is None:
        return None
    return [check_positive(schedule(e), f"scheduled learning rate of epoch {e + 1} (schedule({e}))", allow_zero=True)
            for e in range(epochs)]


def _check_setups(net: MLP, callbacks: list[Callback], epochs: int, val: Any) -> None:
    """Every callback's ``check_setup(net, setup)``, given what the run will record."""
    from .callbacks import FitSetup

    setup = FitSetup(epochs=epochs, validation=val is not None,
                     accuracy=val is not None and net.loss_fn.spec.correct_rule is not None, loss=net.loss_fn.name)
    for cb in callbacks:
        hook = getattr(cb, "check_setup", None)
        if hook is not None:
            hook(net, setup)
