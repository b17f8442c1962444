"""CUDA-graph replay of a whole training step, for backends that can capture one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .network import MLP
    from .optimizers import Optimizer

__all__ = ["graphed_train_step"]


def graphed_train_step(net: MLP, x: Any, t: Any, optimizer: Optimizer) -> float:
    """Run one training step of ``net`` as a captured graph (captured on first use per shape)."""
    capture = getattr(net.backend.kernels, "capture_train_step", None)
    if capture is None:
        raise ValueError(f"backend {net.backend.name!r} cannot capture a training step as a CUDA graph; "
                         "graph=True needs a GPU backend that supports it (cupy)")
    return capture(net, x, t, optimizer)
