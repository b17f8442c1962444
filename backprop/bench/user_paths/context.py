"""What every section shares: the run's :class:`Context` (options, device backend, PyTorch, the timer) and the
small helpers that make nets and data, format the tables and measure the reference GEMM rate."""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

import numpy as np

from ...backend import Backend, resolve_backend
from ...kernels import BACKEND_MODULES
from ...network import MLP
from ..nets import flop_counts
from ..sections import SkipSection
from ..timing import Timing, time_ops
from ..torch_peer import TorchPeer

__all__ = ["DTYPE", "Context", "fmt_ms", "fmt_ratio", "gemm_rate", "make_net", "random_batch",
           "release_device_memory", "step_flops", "switch_of", "switched", "timing_dict"]

DTYPE = np.float32


def fmt_ms(seconds: float | None) -> str:
    """``seconds`` in milliseconds, 4 significant digits; ``-`` for none or not finite."""
    return "-" if seconds is None or not np.isfinite(seconds) else f"{seconds * 1e3:.4g}"


def fmt_ratio(ratio: float | None) -> str:
    """``ratio`` to 3 significant digits; ``-`` for none or not finite."""
    return "-" if ratio is None or not np.isfinite(ratio) else f"{ratio:.3g}"


def random_batch(sizes: list[int], batch: int, head: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Host inputs ``x`` (standard normal) and targets ``t`` (one-hot classes for ``multiclass``, standard normal
    otherwise), float32."""
    x = rng.standard_normal((batch, sizes[0])).astype(DTYPE)
    if head == "multiclass":
        t = np.eye(sizes[-1], dtype=DTYPE)[rng.integers(0, sizes[-1], batch)]
    else:
        t = rng.standard_normal((batch, sizes[-1])).astype(DTYPE)
    return x, t


def make_net(sizes: list[int], activation: str, head: str, backend: Backend) -> MLP:
    """A float32 net on ``backend``, seed 0 (the PyTorch twin copies its parameters)."""
    return MLP(sizes, activation=activation, head=head, dtype="float32", seed=0, backend=backend.name)


def release_device_memory(backend: Backend) -> None:
    """Collect the garbage and hand the backend's cached device memory back, where it keeps a pool."""
    gc.collect()
    if backend.capabilities.memory_pool:
        backend.kernels.release_memory()


def step_flops(sizes: list[int], batch: int) -> int:
    """FLOPs of one training step: forward + weight gradients + input deltas."""
    f = flop_counts(sizes, batch)
    return f["forward"] + f["weight_gradients"] + f["input_deltas"]


def timing_dict(t: Timing) -> dict[str, Any]:
    """A timing as the JSON records it."""
    return t.to_dict()


#: The switch each switchable capability brings: ``Capabilities`` field -> (its setter's name, the setter of a
#: kernels module).
SWITCHES: dict[str, tuple[str, Callable[[Any], Callable[[bool], None]]]] = {
    "fused_mlp": ("set_fused_mlp", lambda k: k.set_fused_mlp),
    "epilogues": ("set_epilogues", lambda k: k.set_epilogues),
    "tf32": ("set_tf32", lambda k: k.set_tf32),
}


def switch_of(backend: Backend, capability: str, what: str) -> Callable[[bool], None]:
    """The backend's switch of ``capability`` (``"fused_mlp"``, ``"epilogues"``, ``"tf32"``: ``set_fused_mlp``,
    ...), or a skipped section naming ``what`` where the backend's ``CAPABILITIES`` lacks it."""
    setter, of = SWITCHES[capability]
    if not getattr(backend.capabilities, capability):
        raise SkipSection(f"backend {backend.name!r} has no {what} (no {setter}: CAPABILITIES.{capability} is false)")
    return of(backend.kernels)


def switched(switch: Callable[[bool], None], on: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with a backend switch (``set_epilogues``) set to ``on`` first: the timed
    sides of an off/on comparison, interleaved by ``Context.time``."""
    def run() -> Any:
        switch(on)
        return fn()
    return run


class Context:
    """What every section needs: the options, the device backend (or why none), PyTorch (or why not)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = bool(args.quick)
        self.repeats = args.repeats if args.repeats is not None else (2 if self.quick else 7)
        self.min_sample_time = args.min_sample_time if args.min_sample_time is not None else \
            (0.002 if self.quick else 0.05)
        self.device, self.device_reason = self._device_backend(args.backend)
        self.peer: TorchPeer | None = None
        self.peer_reason = "--no-torch"
        if not args.no_torch:
            peer = TorchPeer(args.threads)
            if peer.available:
                self.peer = peer
                peer.set_tf32(False)  # PyTorch's default for matrix products; TF32 is the tf32 section's business
            else:
                self.peer_reason = peer.reason
        self.compile_budget = args.compile_budget
        self.compile_spent = 0.0

    @staticmethod
    def _device_backend(spec: str) -> tuple[Backend | None, str]:
        """The backend ``spec`` names, or for ``auto`` the first GPU backend that works here (not the CUDA
        simulator); ``None`` and why where there is none."""
        if spec != "auto":
            try:
                return resolve_backend(spec), ""
            except ValueError as exc:
                return None, str(exc)
        reasons = []
        for name in BACKEND_MODULES:
            try:
                backend = resolve_backend(name)
            except ValueError as exc:
                reasons.append(f"{name}: {str(exc).split('; available here')[0]}")
                continue
            if backend.is_gpu and not backend.is_simulated:
                return backend, ""
            if backend.is_gpu:
                reasons.append(f"{name}: runs on the CUDA simulator, whose timings say nothing about a GPU")
        return None, "no GPU backend works here (" + "; ".join(reasons) + ")"

    def require_device(self) -> Backend:
        """The device backend, or a skipped section saying why there is none."""
        if self.device is None:
            raise SkipSection(self.device_reason)
        return self.device

    def torch_device(self, backend: Backend) -> tuple[str | None, str]:
        """PyTorch's device for ``backend`` (``cuda`` for a GPU backend), or ``None`` and why."""
        if self.peer is None:
            return None, f"PyTorch not measured: {self.peer_reason}"
        device, why = self.peer.device_for(backend)
        return device, ("" if device else f"PyTorch not measured: {why}")

    def sync(self, backend: Backend, device: str | None) -> Callable[[], None]:
        """The synchronisation that brackets each sample: the backend's, and PyTorch's on ``device`` if any."""
        if device is None or self.peer is None:
            return backend.synchronize
        torch_sync = self.peer.synchronizer(device)

        def both() -> None:
            backend.synchronize()
            torch_sync()

        return both

    def time(self, ops: dict[str, Callable[[], Any]], sync: Callable[[], None], *, repeats: int | None = None,
             warmup: int = 2, min_sample_time: float | None = None) -> dict[str, Timing]:
        """:func:`~backprop.bench.timing.time_ops` with the run's repeats and sample time unless given."""
        return time_ops(ops, repeats=repeats or self.repeats, warmup=warmup,
                        min_sample_time=self.min_sample_time if min_sample_time is None else min_sample_time,
                        sync=sync)


def gemm_rate(backend: Backend, n: int, ctx: Context) -> float:
    """FLOP/s of one ``n x n x n`` float32 GEMM, ``2 n^3 / t``, through the backend's own layer call
    (``layer_forward`` with the identity: the GEMM and a bias add), with the backend's current settings."""
    k = backend.kernels
    rng = np.random.default_rng(2)
    x = k.to_device(rng.standard_normal((n, n), dtype=np.float32), DTYPE)
    W = k.to_device(rng.standard_normal((n, n), dtype=np.float32), DTYPE)
    bias = k.zeros((n,), DTYPE)
    y = k.zeros((n, n), DTYPE)
    tm = ctx.time({"gemm": lambda: k.layer_forward(x, W, bias, "identity", 0.0, False, y=y)}, backend.synchronize)
    return 2.0 * n**3 / tm["gemm"].median
