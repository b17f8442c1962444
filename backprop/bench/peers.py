"""Other frameworks timed on the same nets, the same data and the same timer: PyTorch.

The PyTorch twin of a benchmarked net is ``nn.Sequential`` of ``Linear`` + ``ReLU`` layers holding the
same weights, on the CPU for a CPU backend and on CUDA for a GPU backend, with the same three
measurements: the forward pass under ``torch.inference_mode()``; forward + ``backward()`` of the same
loss ``0.5 * sum((y - t)^2) / B`` into fresh gradients (``zero_grad(set_to_none=True)``); and that plus
``torch.optim.SGD.step()`` (and ``loss.item()``, as :meth:`MLP.train_step_device` reads its loss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .timing import Timing, time_ops

if TYPE_CHECKING:
    from ..backend import Backend
    from ..network import MLP

__all__ = ["KNOWN_PEERS", "TorchPeer", "make_peer"]

KNOWN_PEERS = ("torch",)


class TorchPeer:
    """PyTorch, if it imports; ``reason`` says why not otherwise."""

    name = "torch"

    def __init__(self, threads: int | None = None) -> None:
        self.torch: Any = None
        self.reason = ""
        try:
            import torch
        except ImportError as exc:
            self.reason = (f"PyTorch is not installed ({exc}); --peers torch skipped. "
                           "Install it (pip install torch) to time the same nets with PyTorch.")
            return
        except Exception as exc:  # noqa: BLE001 - a broken install must not stop the benchmark
            self.reason = f"PyTorch failed to import ({type(exc).__name__}: {exc}); --peers torch skipped."
            return
        self.torch = torch
        if threads:
            torch.set_num_threads(int(threads))

    @property
    def available(self) -> bool:
        return self.torch is not None

    def info(self) -> dict[str, Any]:
        if self.torch is None:
            return {"status": "unavailable", "message": self.reason}
        torch = self.torch
        info: dict[str, Any] = {"status": "ok", "version": torch.__version__, "cpu_threads": torch.get_num_threads(),
                                "cuda_available": bool(torch.cuda.is_available())}
        if torch.cuda.is_available():
            info.update(cuda=torch.version.cuda, device=torch.cuda.get_device_name(0),
                        allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
        return info

    def device_for(self, backend: Backend) -> tuple[str | None, str]:
        """PyTorch's device matching ``backend`` (CUDA for a GPU backend), or ``None`` and why."""
        if self.torch is None:
            return None, self.reason
        if backend.is_gpu:
            if not self.torch.cuda.is_available():
                return None, f"PyTorch has no CUDA device here; no GPU peer for backend {backend.name!r}"
            return "cuda", ""
        return "cpu", ""

    def time_net(self, net: MLP, x_host: np.ndarray, t_host: np.ndarray, device: str, *, lr: float,
                 repeats: int, warmup: int, min_sample_time: float) -> dict[str, Timing]:
        """Time forward, gradient and step of the PyTorch twin of ``net`` on ``(x_host, t_host)``."""
        torch = self.torch
        for layer in net.layers[:-1]:
            if layer.activation.name != "relu":
                raise NotImplementedError(f"the PyTorch twin has ReLU hidden layers, not {layer.activation.name}")
        if net.output.name != "identity" or net.loss_fn.name != "mse":
            raise NotImplementedError("the PyTorch twin has an identity output and the MSE loss")
        dtype = {"float32": torch.float32, "float64": torch.float64}[net.dtype.name]
        dev = torch.device(device)
        modules = []
        params = net.get_params()
        for i, (W, b) in enumerate(params):
            lin = torch.nn.Linear(W.shape[1], W.shape[0], device=dev, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(W)))
                lin.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
            modules.append(lin)
            if i < len(params) - 1:
                modules.append(torch.nn.ReLU())
        model = torch.nn.Sequential(*modules)
        x = torch.from_numpy(np.ascontiguousarray(x_host)).to(device=dev, dtype=dtype)
        t = torch.from_numpy(np.ascontiguousarray(t_host)).to(device=dev, dtype=dtype)
        batch = x.shape[0]
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        mse = torch.nn.functional.mse_loss

        def forward() -> Any:
            with torch.inference_mode():
                return model(x)

        def gradient() -> Any:
            model.zero_grad(set_to_none=True)
            loss = mse(model(x), t, reduction="sum") * (0.5 / batch)
            loss.backward()
            return loss

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = mse(model(x), t, reduction="sum") * (0.5 / batch)
            loss.backward()
            opt.step()
            return float(loss.item())

        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        try:
            return time_ops({"forward": forward, "gradient": gradient, "step": step}, repeats=repeats,
                            warmup=warmup, min_sample_time=min_sample_time, sync=sync)
        finally:
            model = opt = x = t = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def make_peer(name: str, threads: int | None = None) -> TorchPeer:
    """The peer called ``name`` (only ``"torch"`` so far)."""
    if name != "torch":
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(KNOWN_PEERS)}")
    return TorchPeer(threads)
