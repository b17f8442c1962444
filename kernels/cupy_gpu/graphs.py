"""CUDA graphs: :func:`capture` records what a function issues (kernels, copies, cuBLAS calls) into a graph,
:func:`replay` launches it, :func:`copy_into` is a capturable copy; :mod:`backprop.graph` builds the graph of a
whole training step from them. Recording needs nvmath-python (CuPy 14's cuBLAS wrappers refuse to run while a
stream is being captured)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import blas as blas_mod  # CUBLAS_WORKSPACE_BYTES is read there, when a graph is recorded
from .blas import _NVMATH_HINT, _blas, _nvmath_reason
from .device import Array, _cupy, recording, unavailable_reason


def capture_unavailable_reason() -> str:
    """Why :func:`capture` cannot record here ("" when it can)."""
    reason = unavailable_reason()
    if reason:
        return reason
    if _blas() is None:
        return f"recording cuBLAS calls into a CUDA graph needs nvmath-python ({_nvmath_reason()}): {_NVMATH_HINT}"
    return ""


class CapturedGraph:
    """A recorded CUDA graph and what it needs alive: the stream it was recorded on, the memory pool
    that served anything allocated while recording (used by nothing else, so no later allocation
    can take an address the graph writes), and the cuBLAS workspace its GEMMs use. The arrays the
    recorded work reads and writes are the caller's to keep alive."""

    __slots__ = ("graph", "stream", "pool", "workspace")

    def __init__(self, graph: Any, stream: Any, pool: Any, workspace: Array) -> None:
        self.graph, self.stream, self.pool, self.workspace = graph, stream, pool, workspace


def _abandon(stream: Any) -> None:
    """End a capture that failed half-way, ignoring the error an invalidated capture raises."""
    try:
        stream.end_capture()
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


def capture(fn: Callable[[], Any]) -> CapturedGraph:
    """Record every kernel, copy and cuBLAS call ``fn()`` issues into a CUDA graph, without running
    them, on a private non-blocking stream with its own memory pool (kept with the graph). Our
    cuBLAS handle is bound to that stream, with a workspace of the graph's own, before the capture
    begins. On an error the capture is ended and the error re-raised. ``fn`` must not read device
    data back to the host (nothing runs while recording), nor make a buffer that outlives the graph: a
    cached scratch, ones vector or fused layout first asked for, or ``zeros``, raises
    :class:`~.device.CaptureAllocationError` (run ``fn`` once before recording it)."""
    reason = capture_unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot record a CUDA graph: {reason}")
    blas = _blas()
    assert blas is not None
    workspace = _cupy.empty((blas_mod.CUBLAS_WORKSPACE_BYTES,), dtype=np.uint8)
    pool = _cupy.cuda.MemoryPool()
    stream = _cupy.cuda.Stream(non_blocking=True)
    try:
        with _cupy.cuda.using_allocator(pool.malloc), stream:
            blas.bind(int(stream.ptr), workspace)
            stream.begin_capture()
            try:
                with recording():
                    fn()
            except BaseException:
                _abandon(stream)
                raise
            graph = stream.end_capture()
    finally:
        blas.stream = None  # the next direct call binds the current stream and the direct workspace
    return CapturedGraph(graph, stream, pool, workspace)


def replay(graph: CapturedGraph) -> None:
    """Launch a graph made by :func:`capture` on the current stream."""
    graph.graph.launch(_cupy.cuda.get_current_stream())


def copy_into(dst: Array, src: Array) -> None:
    """``dst[...] = src``: a device-to-device copy on the current stream (capturable) between arrays of
    the same shape and dtype."""
    if tuple(dst.shape) != tuple(src.shape) or dst.dtype != src.dtype:
        raise ValueError(f"copy_into needs arrays of one shape and dtype, got {dst.dtype} {tuple(dst.shape)} "
                         f"and {src.dtype} {tuple(src.shape)}")
    _cupy.copyto(dst, src)
