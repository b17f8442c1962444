"""Data-parallel training over processes: MPI through mpi4py for host arrays, NCCL for GPU arrays.

Every process (a *rank*) builds the same network and passes the same training data; ``net.fit(...,
distributed=True)`` then trains as one process would with ``size`` times the batch. Each step takes the
global minibatch of ``M = size * batch_size`` rows of the shared shuffled order (fewer in the last step);
rank ``r`` computes the gradient of rows ``r, r + size, r + 2 size, ...`` of it, and one all-reduce over one
flat buffer sums the ranks' ``[gradients | loss]``:

    E = (1/M) sum_i L_i = sum_r (1/M) sum_{i in rank r} L_i,     dE/dW = sum_r (1/M) sum_{i in rank r} dL_i/dW

so each rank's share is its rows' loss weighted by ``1/M`` (the kernels' row weights), and after the
sum every rank holds the gradient of the global minibatch and applies the same update: the same
parameters as one process with batch ``M``, to float rounding.

>>> import backprop as bp                                     # run as: mpiexec -n 2 python train.py
>>> comm = bp.distributed.init()                              # doctest: +SKIP
>>> net.fit(X, y, epochs=10, batch_size=64, distributed=True) # doctest: +SKIP
>>> if comm.rank == 0: net.save("net.npz")                    # doctest: +SKIP

- **Start.** The parameters and the optimizer's state are broadcast from rank 0, and the run's seed is
  rank 0's, so every rank draws the same shuffles. Every setting (data shape and checksum, network, epochs,
  batch size, optimizer, schedule, ...) is compared across the ranks first: a rank that differs, or whose
  arguments fail their checks, makes every rank raise the same error instead of waiting for it.
- **Engines.** Host arrays (``numpy``, ``numba``) go to MPI's ``Allreduce`` in place; a GPU backend with a
  ``collective`` hook (``cupy``: NCCL, bootstrapped over MPI) reduces on the device; other GPU backends
  stage through the host, with a warning.
- **Faults.** :func:`init` makes an uncaught exception on any rank abort the whole job (as ``python -m
  mpi4py`` does), and an exception raised on one rank inside ``fit``'s epochs aborts the job with a message
  naming the rank, since the others would wait for it forever. A collective that waits longer than
  ``timeout`` seconds (a rank that died or hangs) aborts the job too. Errors every rank meets together (a
  non-finite loss, bad arguments) are raised normally.
- **Checks.** At the end of every epoch the ranks compare a digest of their parameters; a difference
  raises :class:`DistributedError`.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from . import step

if TYPE_CHECKING:
    from .network import MLP
    from .optimizers import Optimizer
    from .staging import Batches

__all__ = ["DEFAULT_TIMEOUT", "Communicator", "DataParallel", "DistributedError", "init", "is_initialized",
           "rank", "rows_of_rank", "size", "world"]

Array = Any

#: Seconds a collective may wait for the other ranks before the job is aborted (``init(timeout=...)``).
DEFAULT_TIMEOUT = 600.0
#: Seconds between printing why the job is aborted and aborting it (MPICH's launcher may drop output still
#: on its way when a process aborts).
ABORT_GRACE = 0.5


class DistributedError(RuntimeError):
    """The ranks of a data-parallel run disagree, or another rank failed."""


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except Exception as exc:  # ImportError, or an mpi4py that finds no MPI library (RuntimeError)
        raise ImportError("distributed training needs mpi4py and an MPI library: pip install "
                          "'backprop-kernels[mpi]' (mpi4py and MPICH from the package index)") from exc
    return MPI


# --------------------------------------------------------------------------- engines: one all-reduce per step
class _HostEngine:
    """MPI on the backend's arrays themselves: host memory (``CAPABILITIES.gpu`` false)."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm

    def all_reduce(self, recv: Array, send: Array | None = None) -> None:
        MPI = _mpi()
        self.comm.mpi.Allreduce(MPI.IN_PLACE if send is None else send, recv, op=MPI.SUM)

    def broadcast(self, a: Array, root: int = 0) -> None:
        self.comm.mpi.Bcast(a, root=root)


class _StagedEngine:
    """MPI through host copies, for a GPU backend without a ``collective`` hook (a copy each way per call)."""

    def __init__(self, comm: Communicator, kernels: Any) -> None:
        self.comm, self.kernels = comm, kernels

    def _back(self, dst: Array, host: np.ndarray) -> None:
        k = self.kernels
        k.copy_into(dst, k.to_device(host, host.dtype))

    def all_reduce(self, recv: Array, send: Array | None = None) -> None:
        host = np.array(self.kernels.to_host(recv if send is None else send), copy=True)
        _HostEngine(self.comm).all_reduce(host)
        self._back(recv, host)

    def broadcast(self, a: Array, root: int = 0) -> None:
        host = np.array(self.kernels.to_host(a), copy=True)
        _HostEngine(self.comm).broadcast(host, root)
        self._back(a, host)


# --------------------------------------------------------------------------- the communicator
class Communicator:
    """The processes of one data-parallel job over an MPI communicator (``mpi``, by default
    ``MPI.COMM_WORLD``): ``rank``, ``size``, ``local_rank`` (the rank among the processes of this
    machine, which picks its GPU), the engines that reduce each backend's arrays, and the watchdog.

    ``timeout``: seconds any collective may wait before the job is aborted (``None``: wait forever);
    ``abort_on_error``: abort the job when a rank fails alone (see the module docstring)."""

    def __init__(self, mpi: Any = None, timeout: float | None = DEFAULT_TIMEOUT, abort_on_error: bool = True) -> None:
        MPI = _mpi()
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)):
                raise TypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}")
            timeout = float(timeout)
            if not (np.isfinite(timeout) and timeout > 0):
                raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout}")
        self.mpi = MPI.COMM_WORLD if mpi is None else mpi
        self.rank: int = self.mpi.Get_rank()
        self.size: int = self.mpi.Get_size()
        machine = self.mpi.Split_type(MPI.COMM_TYPE_SHARED)  # the processes of this machine
        self.local_rank: int = machine.Get_rank()
        machine.Free()
        self.timeout = timeout
        self.abort_on_error = bool(abort_on_error)
        self._engines: dict[int, tuple[Any, Any]] = {}
        self._waiting: tuple[str, float] | None = None
        self._watchdog: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    # ---------------------------------------------------------------- faults
    def abort(self, message: str, code: int = 1) -> None:
        """Print ``message`` naming this rank on stderr and end every process of the job (after
        :data:`ABORT_GRACE` seconds, in which the launcher forwards the message: an abort ends its output too)."""
        print(f"backprop.distributed: rank {self.rank} of {self.size}: {message}; aborting all {self.size} ranks",
              file=sys.stderr, flush=True)
        time.sleep(ABORT_GRACE)
        self.mpi.Abort(code)

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Mark a collective (``what``) as under way: the watchdog aborts the job if it lasts past ``timeout``."""
        if self.timeout is not None and self.size > 1 and self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="backprop-watchdog", daemon=True)
            self._watchdog.start()
        outer, self._waiting = self._waiting, (what, time.monotonic())
        try:
            yield
        finally:
            self._waiting = outer  # a collective inside another (an engine's start) hands the watch back

    def _watch(self) -> None:
        assert self.timeout is not None
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            pending = self._waiting
            if pending is not None and time.monotonic() - pending[1] > self.timeout:
                self.abort(f"{pending[0]} waited more than {self.timeout:g} s for the other ranks (one may have "
                           "failed or hang)", code=2)

    # ---------------------------------------------------------------- host objects
    def allgather(self, value: Any, what: str) -> list[Any]:
        """Every rank's ``value`` (small Python objects), in rank order."""
        with self.waiting(what):
            return self.mpi.allgather(value)

    def share(self, value: Any, what: str, root: int = 0) -> Any:
        """Rank ``root``'s ``value`` on every rank."""
        with self.waiting(what):
            return self.mpi.bcast(value, root=root)

    def agree(self, error: BaseException | None, what: str) -> None:
        """Every rank says whether ``what`` went well (``error`` is ``None``); if one failed, every rank raises:
        the failing ones their own error, the others a :class:`DistributedError` naming the first failure."""
        said = self.allgather(None if error is None else f"{type(error).__name__}: {error}", what)
        failed = [(r, text) for r, text in enumerate(said) if text is not None]
        if error is not None:
            raise error
        if failed:
            r, text = failed[0]
            raise DistributedError(f"{what} failed on rank {r} of {self.size}: {text}")

    def check_same(self, settings: dict[str, Any], what: str) -> None:
        """A :class:`DistributedError` on every rank unless every rank passed equal ``settings``, naming the
        first that differs and each rank's value."""
        said = self.allgather(settings, what)
        for name, mine in said[0].items():
            values = [s.get(name) for s in said]
            if any(not _equal(v, mine) for v in values[1:]):
                each = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
                raise DistributedError(f"{what}: the ranks disagree on {name} ({each}); every rank must pass the "
                                       "same network, data and options")

    # ---------------------------------------------------------------- backend arrays
    def engine(self, kernels: Any) -> Any:
        """The engine that reduces ``kernels``' arrays over the ranks, made on first use."""
        entry = self._engines.get(id(kernels))
        if entry is not None and entry[0] is kernels:
            return entry[1]
        caps = kernels.CAPABILITIES
        engine: Any = None
        if caps.collectives:
            try:
                engine = kernels.collective(self.size, self.rank,
                                            lambda v: self.share(v, "the device communicator's start"))
            except ImportError as exc:
                warnings.warn(f"backend {kernels.NAME!r}: no device collectives ({exc}); reducing through the "
                              "host instead (a copy each way per step)", RuntimeWarning, stacklevel=3)
        if engine is None:
            if caps.gpu:
                if not caps.collectives:
                    warnings.warn(f"backend {kernels.NAME!r} has no device collectives; reducing through the host "
                                  "(a copy each way per step)", RuntimeWarning, stacklevel=3)
                engine = _StagedEngine(self, kernels)
            else:
                engine = _HostEngine(self)
        self._engines[id(kernels)] = (kernels, engine)
        return engine

    def all_reduce(self, kernels: Any, recv: Array, send: Array | None = None, what: str = "an all-reduce") -> None:
        """``recv = sum over the ranks of send`` (``send`` defaults to ``recv`` itself), elementwise, in place."""
        with self.waiting(what):
            self.engine(kernels).all_reduce(recv, send)

    def broadcast(self, kernels: Any, a: Array, root: int = 0, what: str = "a broadcast") -> None:
        """``a`` = rank ``root``'s ``a`` on every rank, in place."""
        with self.waiting(what):
            self.engine(kernels).broadcast(a, root)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # pragma: no cover - values that do not compare
        return repr(a) == repr(b)


# --------------------------------------------------------------------------- the process-wide communicator
_world: Communicator | None = None
_lock = threading.Lock()


def init(timeout: float | None = DEFAULT_TIMEOUT, abort_on_error: bool = True) -> Communicator:
    """Start data-parallel training in this process (once; later calls return the same communicator).

    Initializes MPI through mpi4py (run the script under ``mpiexec -n N``; a plain ``python`` run is one
    rank), makes the active backend use this machine's GPU number ``local_rank`` where it has
    ``use_device`` (choose the backend before calling ``init``), and, with ``abort_on_error``, makes an
    uncaught exception on any rank print its traceback and abort every rank, instead of leaving the others
    waiting. ``timeout``: see :class:`Communicator`."""
    global _world
    with _lock:
        if _world is not None:
            return _world
        comm = Communicator(timeout=timeout, abort_on_error=abort_on_error)
        from .backend import get_backend

        kernels = get_backend().kernels
        if kernels.CAPABILITIES.device_choice:
            kernels.use_device(comm.local_rank)
        if abort_on_error and comm.size > 1:
            _abort_on_uncaught(comm)
        _world = comm
        return comm


def _abort_on_uncaught(comm: Communicator) -> None:
    previous: Callable[..., Any] = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        previous(kind, value, tb)
        comm.abort(f"uncaught {kind.__name__}: {value}")

    sys.excepthook = hook


def is_initialized() -> bool:
    """Whether :func:`init` has run in this process."""
    return _world is not None


def world() -> Communicator:
    """The communicator of :func:`init` (which it calls, with its defaults, when it has not run)."""
    return _world if _world is not None else init()


def rank() -> int:
    """This process's rank: 0 when :func:`init` has not run (a single process is rank 0)."""
    return 0 if _world is None else _world.rank


def size() -> int:
    """How many processes train together: 1 when :func:`init` has not run."""
    return 1 if _world is None else _world.size


# --------------------------------------------------------------------------- the data-parallel step
def rows_of_rank(total: int, rank: int, size: int) -> int:
    """How many of a global minibatch's ``total`` rows rank ``rank`` of ``size`` takes (rows ``rank, rank +
    size, ...``): ``ceil((total - rank) / size)``, possibly 0 in a short last step."""
    return max(0, -(-(total - rank) // size))


def _digest(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values).view(np.uint8), digest_size=16).hexdigest()


class DataParallel:
    """The data-parallel side of one ``fit`` of ``net`` over ``comm`` (see the module docstring)."""

    def __init__(self, comm: Communicator, net: MLP) -> None:
        self.comm, self.net = comm, net
        self.kernels = net.backend.kernels
        self._weights: dict[tuple[int, int], Array] = {}
        self._zeros: Array | None = None

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @contextmanager
    def setting_up(self) -> Iterator[None]:
        """Run ``fit``'s checks inside: whichever rank fails them, every rank raises (:meth:`Communicator.agree`)."""
        try:
            yield
        except Exception as exc:
            self.comm.agree(exc, "fit's checks")
            raise
        self.comm.agree(None, "fit's checks")

    def shared_seed(self, seed: Any) -> int:
        """Rank 0's ``seed`` (checked there; fresh entropy when ``None``) on every rank, so that every rank
        shuffles and splits alike; if rank 0's is not a seed, every rank raises."""
        from .validation import check_seed

        said: tuple[str, Any] | None = None
        error: Exception | None = None
        if self.rank == 0:
            try:
                value = check_seed(seed)
                said = ("seed", int(np.random.SeedSequence().entropy % (1 << 63)) if value is None else value)
            except (TypeError, ValueError) as exc:
                error, said = exc, ("error", f"{type(exc).__name__}: {exc}")
        kind, value = self.comm.share(said, "sharing the seed")
        if error is not None:
            raise error
        if kind == "error":
            raise DistributedError(f"rank 0's seed is not a seed: {value}")
        return int(value)

    def data_checksum(self, *arrays: Array) -> list[str]:
        """``sum(a^2)`` of each array in float64 (on the backend for its arrays, by chunks of rows for host
        arrays), to 10 significant digits: equal for equal data whatever the order of summation."""
        k = self.kernels
        out = []
        for a in arrays:
            if k.owns(a):
                total = k.zeros((1,), np.float64)
                k.add_sum_of_squares(total, a)
                value = float(k.to_host(total)[0])
            else:
                value = 0.0
                for lo in range(0, a.shape[0], 1 << 16):
                    chunk = np.asarray(a[lo:lo + (1 << 16)], dtype=np.float64).ravel()
                    value += float(np.dot(chunk, chunk))
            out.append(f"{value:.10g}")
        return out

    def start(self, optimizer: Optimizer, settings: dict[str, Any]) -> None:
        """Compare ``settings`` across the ranks, then give every rank rank 0's parameters and optimizer state."""
        net = self.net
        state = optimizer.state_arrays([net.optimizer_key])
        settings = dict(settings, optimizer_steps=optimizer.steps,
                        optimizer_state=[(tuple(a.shape), str(a.dtype)) for a in state])
        self.comm.check_same(settings, "distributed fit")
        self.comm.broadcast(self.kernels, net.params, what="broadcasting the parameters")
        for a in state:
            self.comm.broadcast(self.kernels, a, what="broadcasting the optimizer's state")

    def epoch(self, data: Batches, batch_size: int, order: np.ndarray | None,
              buffers: Any) -> Iterator[tuple[int, int, Array | None, Array | None]]:
        """Yield ``(total, rows, x, t)`` for each step of an epoch: the global minibatch's ``total`` rows and
        this rank's ``rows`` of them (``x``, ``t``; ``None`` when it has none in a short last step)."""
        n, r, N = data.n, self.rank, self.size
        own = (np.arange(n) if order is None else order)[r::N]
        local = data.epoch(batch_size, own, buffers)
        for lo in range(0, n, N * batch_size):
            total = min(N * batch_size, n - lo)
            expect = rows_of_rank(total, r, N)
            if expect == 0:
                yield total, 0, None, None
                continue
            rows, x, t = next(local)
            assert rows == expect, (rows, expect)
            yield total, rows, x, t

    def _row_weights(self, rows: int, total: int) -> Array:
        key = (rows, total)
        w = self._weights.get(key)
        if w is None:
            w = self._weights[key] = self.kernels.to_device(np.full(rows, rows / total), self.net.dtype)
        return w

    def train_step(self, x: Array | None, t: Array | None, rows: int, total: int, batch_size: int,
                   optimizer: Optimizer, guard: step.Guard, step_number: int) -> None:
        """One data-parallel step: this rank's ``[gradients | loss]`` of its ``rows`` of the ``total``, weighted
        ``1/total`` per row, summed over the ranks by one all-reduce, then the update every rank applies."""
        net, k = self.net, self.kernels
        ws = step.workspace(net, rows if rows else batch_size)
        what = f"the all-reduce of step {step_number}"
        if rows:
            step.gradients(net, ws, x, t, None if rows == total else self._row_weights(rows, total))
            self.comm.all_reduce(k, ws.reduced, what=what)
        else:  # no rows of this step here: add nothing
            if self._zeros is None or self._zeros.shape != ws.reduced.shape:
                self._zeros = k.zeros(ws.reduced.shape, net.dtype)
            self.comm.all_reduce(k, ws.reduced, send=self._zeros, what=what)
        step.apply_update(net, ws, optimizer, guard, weight=total)

    def read(self, guard: step.Guard, epoch: int) -> step.GuardState:
        """The guard, read under the watchdog (on a GPU the read waits for the epoch's reductions)."""
        with self.comm.waiting(f"the end of epoch {epoch}"):
            return guard.read()

    def evaluate(self, sums: Callable[..., tuple[float, float | None]], X: Array, T: Array, batch_size: int,
                 epoch: int) -> tuple[float, float | None]:
        """Validation over the ranks: rank ``r`` scores its contiguous share of the rows with ``sums(net, X, T,
        batch_size)`` (the loss summed over them, and the rows classified correctly), and every rank adds the
        ranks' sums in rank order: the mean loss and accuracy over all rows, the same on every rank."""
        n = int(X.shape[0])
        lo, hi = (n * self.rank) // self.size, (n * (self.rank + 1)) // self.size
        scored = self.net.loss_fn.spec.correct_rule is not None
        mine = sums(self.net, X[lo:hi], T[lo:hi], batch_size) if hi > lo else (0.0, 0.0 if scored else None)
        said = self.comm.allgather(mine, f"the validation of epoch {epoch}")
        loss = sum(s[0] for s in said) / n
        return loss, (sum(s[1] for s in said) / n if scored else None)

    def end_epoch(self, epoch: int, stop: bool) -> bool:
        """Compare the ranks' parameters (a digest each) and whether a callback asked to stop; returns True
        when any rank stops (then all do)."""
        digest = _digest(np.asarray(self.kernels.to_host(self.net.params)))
        said = self.comm.allgather((digest, bool(stop)), f"the end of epoch {epoch}")
        if len({d for d, _ in said}) > 1:
            groups = ", ".join(f"rank {r}: {d[:8]}" for r, (d, _) in enumerate(said))
            raise DistributedError(f"the ranks' parameters differ after epoch {epoch} ({groups}): the all-reduce "
                                   "did not give every rank the same sum")
        return any(s for _, s in said)

    def fail(self, exc: BaseException, where: str) -> None:
        """An exception on this rank inside the epochs: the other ranks are waiting (or will wait) for it, so
        abort the job with its traceback, unless ``abort_on_error`` is off or this is the only rank."""
        if self.size == 1 or not self.comm.abort_on_error:
            return
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        self.comm.abort(f"{type(exc).__name__} in {where}: {exc}")

