"""CuPy and the device: whether the backend can run, arrays, memory, device facts, and the buffers every
primitive checks or reuses.

Importing this module never fails for want of CuPy or a GPU: :func:`is_available` says why it cannot run.
It holds the one lock of the backend (the availability probe and the per-device caches take it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

try:  # CuPy imports fine without a GPU; only its CUDA calls fail there
    import cupy as _cupy
except Exception as _exc:  # ImportError, or a broken CUDA installation  # pragma: no cover - depends on machine
    _cupy = None
    _IMPORT_ERROR: str = f"{type(_exc).__name__}: {_exc}"
else:
    _IMPORT_ERROR = ""

NAME = "cupy"
Array = Any

#: The array module of this backend (``None`` when CuPy is not installed).
xp = _cupy

_lock = threading.Lock()
_reason: str | None = None


# --------------------------------------------------------------------------- availability
def _probe() -> str:
    if _cupy is None:
        return (f"CuPy is not installed ({_IMPORT_ERROR}); install the CUDA extra, "
                "pip install 'backprop-kernels[cuda12]' or 'backprop-kernels[cuda13]'")
    try:
        n = _cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no usable CUDA GPU ({type(exc).__name__}: {exc})"
    if n < 1:
        return "no CUDA GPU found"
    try:
        import cupy.cublas  # noqa: F401
        from cupy_backends.cuda.libs import cublas  # noqa: F401
    except Exception as exc:
        return f"cuBLAS cannot be loaded ({type(exc).__name__}: {exc})"
    try:  # a real kernel: compiles with NVRTC, launches, reads back
        probe = _cupy.arange(4, dtype=_cupy.float32) * 2
        if float(probe.sum()) != 12.0:
            return "the GPU returned a wrong result for a trivial kernel"
    except Exception as exc:
        return f"CuPy cannot run a kernel on this GPU ({type(exc).__name__}: {exc})"
    return ""


def unavailable_reason() -> str:
    """Why this backend cannot run here ("" when it can); probed once."""
    global _reason
    if _reason is None:
        with _lock:
            if _reason is None:
                _reason = _probe()
    return _reason


def is_available() -> bool:
    """True when CuPy is installed and a CUDA GPU runs its kernels."""
    return unavailable_reason() == ""


def is_simulated() -> bool:
    """CuPy runs on a GPU, never on a simulator."""
    return False


# --------------------------------------------------------------------------- arrays
def to_device(a: Any, dtype: Any) -> Array:
    """Copy host (or device) data into a new C-contiguous CuPy array of ``dtype``."""
    return _cupy.array(a, dtype=dtype, order="C", copy=True)


def to_host(a: Array) -> np.ndarray:
    """Return ``a`` as a NumPy array (a device-to-host copy for CuPy arrays)."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return a.get()
    return np.asarray(a)


def zeros(shape: tuple[int, ...], dtype: Any) -> Array:
    """A new array of zeros; refused while this thread records a CUDA graph (:func:`refuse_while_recording`)."""
    refuse_while_recording(f"zeros({tuple(shape)}, {np.dtype(dtype)})")
    return _cupy.zeros(shape, dtype=dtype)


def synchronize() -> None:
    """Block until the device has finished all queued work."""
    _cupy.cuda.Device().synchronize()


def all_finite(a: Array) -> bool:
    """True when no element of ``a`` is NaN or infinite."""
    return bool(_cupy.isfinite(a).all())


def owns(a: Any) -> bool:
    """True when ``a`` is a CuPy array on the current device."""
    return _cupy is not None and isinstance(a, _cupy.ndarray) and a.device.id == _cupy.cuda.Device().id


def as_array(a: Array, dtype: Any) -> Array:
    """``a`` itself when it is a C-contiguous CuPy array of ``dtype`` on the current device, else a
    converted C-contiguous copy made on the device (no trip through the host for a CuPy array)."""
    if owns(a) and a.dtype == np.dtype(dtype) and a.flags.c_contiguous:
        return a
    return _cupy.ascontiguousarray(a, dtype=dtype)


# --------------------------------------------------------------------------- memory and device facts
def device_memory_free() -> int:
    """Bytes free for new arrays on the current device: what the driver has free plus the blocks CuPy's
    memory pool holds unused."""
    return int(_cupy.cuda.runtime.memGetInfo()[0]) + int(_cupy.get_default_memory_pool().free_bytes())


def release_memory() -> None:
    """Give the unused blocks of CuPy's memory pool back to the device."""
    _cupy.get_default_memory_pool().free_all_blocks()


def use_device(index: int) -> None:
    """Make GPU ``index`` (modulo the GPUs present) this process's current device: with one process per
    GPU, each takes the GPU of its rank among the processes of its machine."""
    _cupy.cuda.Device(int(index) % _cupy.cuda.runtime.getDeviceCount()).use()


def device_info() -> dict[str, Any]:
    """Name, memory, compute capability and CUDA versions of the current device (for benchmark reports)."""
    dev = _cupy.cuda.Device()
    props = _cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props.get("name", b"")
    return {"name": name.decode() if isinstance(name, bytes) else str(name),
            "memory_bytes": int(props.get("totalGlobalMem", 0)),
            "compute_capability": dev.compute_capability,
            "cuda_runtime": _cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": _cupy.cuda.runtime.driverGetVersion()}


def _per_device(cache: dict[int, Any], make: Callable[[], Any]) -> Any:
    """``cache``'s object for the current device, made by ``make()`` on first use (once, under the lock;
    an exception from ``make`` caches nothing)."""
    dev = _cupy.cuda.Device().id
    obj = cache.get(dev)
    if obj is None:
        with _lock:
            obj = cache.get(dev)
            if obj is None:
                obj = cache[dev] = make()
    return obj


# --------------------------------------------------------------------------- graph recording
class CaptureAllocationError(RuntimeError):
    """A buffer meant to outlive a CUDA graph's recording was asked to be made during it."""


_recording = threading.local()


@contextmanager
def recording() -> Iterator[None]:
    """Mark the calling thread as recording a CUDA graph (:func:`~.graphs.capture`) while the block runs."""
    _recording.depth = getattr(_recording, "depth", 0) + 1
    try:
        yield
    finally:
        _recording.depth -= 1


def refuse_while_recording(what: str) -> None:
    """Raise :class:`CaptureAllocationError` if this thread is recording a CUDA graph. Memory allocated then
    comes from the graph's private pool and is freed with the graph, and a fill (``zeros``, ``ones``) is
    recorded, not run: a buffer kept after the recording (a cached scratch, a workspace's) must be made before."""
    if getattr(_recording, "depth", 0):
        raise CaptureAllocationError(
            f"{what} was asked for while a CUDA graph was being recorded: its memory would be the graph's "
            "(freed with it) and its contents unset until a replay; run the work once before recording it")


# --------------------------------------------------------------------------- buffers
def _contiguous(a: Array) -> Array:
    return a if a.flags.c_contiguous else _cupy.ascontiguousarray(a)


def _buffer(buf: Array | None, shape: tuple[int, ...], dtype: Any, name: str) -> Array:
    """``buf`` checked against what a primitive writes into it, or a new array when it is ``None``."""
    if buf is None:
        return _cupy.empty(shape, dtype=dtype)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != np.dtype(dtype) or not buf.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape {tuple(shape)}, "
                         f"got {buf.dtype} {tuple(buf.shape)}{'' if buf.flags.c_contiguous else ' (not contiguous)'}")
    return buf


_scratch_cache: dict[tuple[int, str, tuple[int, ...], str, int], Array] = {}


def _scratch(tag: str, shape: tuple[int, ...], dtype: Any) -> Array:
    """A device scratch buffer for ``tag`` (its use), reused by every call from the same host thread with the
    same device, shape and dtype (threads enqueueing on one stream never share one); never handed out to
    callers. Never evicted: a captured CUDA graph may hold its address; so never first made while recording one."""
    key = (_cupy.cuda.Device().id, tag, tuple(shape), np.dtype(dtype).char, threading.get_ident())
    buf = _scratch_cache.get(key)
    if buf is None:
        refuse_while_recording(f"the scratch buffer {tag!r} {tuple(shape)} {np.dtype(dtype)}")
        buf = _cupy.empty(shape, dtype=dtype)
        _scratch_cache[key] = buf
    return buf


def _scalar(value: float, dtype: Any) -> Any:
    return np.dtype(dtype).type(value)
