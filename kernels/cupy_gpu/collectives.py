"""NCCL collectives: sums and broadcasts of this backend's arrays over processes, one process per GPU
(:func:`collective` makes the engine; MPI carries NCCL's unique id)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .device import Array, _cupy


def _nccl() -> Any:
    """CuPy's NCCL module (an ``ImportError`` when CuPy was built without it)."""
    try:
        from cupy.cuda import nccl
    except Exception as exc:  # ImportError, or a missing libnccl
        raise ImportError(f"CuPy's NCCL is not usable here ({type(exc).__name__}: {exc})") from exc
    return nccl


class NcclEngine:
    """Sums and broadcasts of this backend's arrays over processes, by NCCL on the current stream (no host
    wait: the collective is queued after the step's kernels, and the update's kernels after it)."""

    def __init__(self, nccl: Any, comm: Any) -> None:
        self.nccl, self.comm = nccl, comm

    def _type(self, a: Array) -> int:
        types = {"float32": self.nccl.NCCL_FLOAT32, "float64": self.nccl.NCCL_FLOAT64}
        try:
            return types[np.dtype(a.dtype).name]
        except KeyError:
            raise ValueError(f"NCCL reduces float32 or float64 arrays here, got {a.dtype}") from None

    def all_reduce(self, recv: Array, send: Array | None = None) -> None:
        """``recv = sum over the processes of send`` (``recv`` itself when ``send`` is ``None``)."""
        src = recv if send is None else send
        self.comm.allReduce(src.data.ptr, recv.data.ptr, recv.size, self._type(recv), self.nccl.NCCL_SUM,
                            _cupy.cuda.get_current_stream().ptr)

    def broadcast(self, a: Array, root: int = 0) -> None:
        """``a`` = process ``root``'s ``a``, in place."""
        self.comm.bcast(a.data.ptr, a.size, self._type(a), root, _cupy.cuda.get_current_stream().ptr)


def collective(size: int, rank: int, share: Any) -> NcclEngine:
    """The engine that sums this backend's arrays over ``size`` processes: NCCL through CuPy, one process
    per GPU. ``share(value)`` returns process 0's ``value`` on every process (MPI carries NCCL's unique id)."""
    nccl = _nccl()
    uid = share(nccl.get_unique_id() if rank == 0 else None)
    return NcclEngine(nccl, nccl.NcclCommunicator(size, uid, rank))
