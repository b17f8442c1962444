"""Other frameworks timed on the same nets, the same data and the same timer: PyTorch.

The PyTorch twin of a benchmarked net (:meth:`TorchPeer.twin`) is ``nn.Sequential`` of ``Linear`` +
activation layers holding the same weights, on the CPU for a CPU backend and on CUDA for a GPU backend,
with the same loss: ``0.5 * sum((y - t)^2) / B`` for an identity output with the squared error, the
mean softmax cross-entropy (class labels) for the multiclass head. What it can time:

* :meth:`TorchPeer.time_net`: the three measurements of the sweep, on the same nets: the forward pass under
  ``torch.inference_mode()``; forward + ``backward()`` into fresh gradients (``zero_grad(set_to_none=True)``);
  and that plus ``torch.optim.SGD.step()`` and ``loss.item()`` (as :meth:`MLP.train_step_device` reads its
  loss);
* :meth:`TorchPeer.step_fn`: one training step as a typical eager loop writes it, or with the model
  under ``torch.compile`` (:meth:`TorchPeer.compile_reason` says why that cannot run here);
* :meth:`TorchPeer.epoch_fn`: one epoch of a typical loop with the data on the device: a random
  permutation drawn there, minibatches gathered there, SGD with momentum, the loss summed there and
  read once at the end of the epoch (as :meth:`MLP.fit` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .timing import Timing, time_ops

if TYPE_CHECKING:
    from ..backend import Backend
    from ..network import MLP

__all__ = ["KNOWN_PEERS", "TorchPeer", "make_peer"]

KNOWN_PEERS = ("torch",)

#: backprop's activation names -> a factory of the PyTorch module, given the activation's alpha
_ACTIVATIONS: dict[str, Callable[[Any, float], Any]] = {
    "relu": lambda nn, a: nn.ReLU(),
    "tanh": lambda nn, a: nn.Tanh(),
    "sigmoid": lambda nn, a: nn.Sigmoid(),
    "leaky_relu": lambda nn, a: nn.LeakyReLU(a),
    "elu": lambda nn, a: nn.ELU(a),
}


class TorchPeer:
    """PyTorch, if it imports; ``reason`` says why not otherwise."""

    name = "torch"

    def __init__(self, threads: int | None = None) -> None:
        self.torch: Any = None
        self.reason = ""
        self._compile_reason: str | None = None
        try:
            import torch
        except ImportError as exc:
            self.reason = (f"PyTorch is not installed ({exc}); install it (pip install torch) to time the same nets "
                           "with PyTorch")
            return
        except Exception as exc:  # noqa: BLE001 - a broken install must not stop the benchmark
            self.reason = f"PyTorch failed to import ({type(exc).__name__}: {exc})"
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

    # ---------------------------------------------------------------- device helpers
    def synchronizer(self, device: str) -> Callable[[], None]:
        """Waits for the queued work of ``device`` (a no-op on the CPU)."""
        if str(device).startswith("cuda"):
            return self.torch.cuda.synchronize
        return lambda: None

    def set_tf32(self, enabled: bool) -> None:
        """TF32 for PyTorch's float32 matrix products (and cuDNN) on or off."""
        self.torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        self.torch.backends.cudnn.allow_tf32 = bool(enabled)

    def release(self, device: str) -> None:
        """Give PyTorch's cached device memory back (after a big net)."""
        if str(device).startswith("cuda"):
            self.torch.cuda.empty_cache()

    # ---------------------------------------------------------------- the twin
    def twin(self, net: MLP, device: str) -> Any:
        """``nn.Sequential`` with the layers, activations and current weights of ``net``."""
        torch = self.torch
        nn = torch.nn
        dtype = {"float32": torch.float32, "float64": torch.float64}[net.dtype.name]
        dev = torch.device(device)
        modules: list[Any] = []
        params = net.get_params()
        last = len(net.layers) - 1
        for i, ((W, b), layer) in enumerate(zip(params, net.layers)):
            lin = nn.Linear(W.shape[1], W.shape[0], device=dev, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(W)))
                lin.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
            modules.append(lin)
            act = layer.activation
            if i < last:
                if act.name not in _ACTIVATIONS:
                    raise NotImplementedError(f"no PyTorch twin for the hidden activation {act.name!r}")
                modules.append(_ACTIVATIONS[act.name](nn, float(act.alpha or 0.0)))
        self._check_head(net)
        return nn.Sequential(*modules)

    @staticmethod
    def _check_head(net: MLP) -> None:
        pair = (net.output.name, net.loss_fn.name)
        if pair not in (("identity", "mse"), ("softmax", "cross_entropy")):
            raise NotImplementedError(f"no PyTorch twin for the output/loss {pair}: identity + mse (regression) "
                                      "or softmax + cross_entropy (multiclass)")

    def loss(self, net: MLP) -> Callable[[Any, Any], Any]:
        """The loss of ``net`` on the twin's output: ``loss(out, target)`` (targets from :meth:`targets`)."""
        self._check_head(net)
        F = self.torch.nn.functional
        if net.loss_fn.name == "cross_entropy":  # the twin outputs logits; softmax is in the loss
            return lambda out, target: F.cross_entropy(out, target)
        return lambda out, target: F.mse_loss(out, target, reduction="sum") * (0.5 / out.shape[0])

    def targets(self, net: MLP, t_host: np.ndarray, device: str) -> Any:
        """``t_host`` as the twin's loss wants it: class labels (int64) for cross-entropy, else as is."""
        torch = self.torch
        if net.loss_fn.name == "cross_entropy":
            labels = t_host if t_host.ndim == 1 else np.argmax(t_host, axis=1)
            return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(device)
        dtype = {"float32": torch.float32, "float64": torch.float64}[net.dtype.name]
        return torch.from_numpy(np.ascontiguousarray(t_host)).to(device=device, dtype=dtype)

    def inputs(self, net: MLP, x_host: np.ndarray, device: str) -> Any:
        torch = self.torch
        dtype = {"float32": torch.float32, "float64": torch.float64}[net.dtype.name]
        return torch.from_numpy(np.ascontiguousarray(x_host)).to(device=device, dtype=dtype)

    # ---------------------------------------------------------------- torch.compile
    def compile_reason(self) -> str:
        """Why ``torch.compile`` cannot be used here, or ``""`` (a cheap check; compiling can still fail,
        which :meth:`step_fn` reports on its first call)."""
        if self.torch is None:
            return self.reason
        if not hasattr(self.torch, "compile"):
            return f"PyTorch {self.torch.__version__} has no torch.compile"
        return self._compile_reason or ""

    def compile(self, model: Any) -> Any:
        """``torch.compile(model)``; remembers a failure so later nets skip at once."""
        reason = self.compile_reason()
        if reason:
            raise RuntimeError(reason)
        try:
            return self.torch.compile(model)
        except Exception as exc:  # noqa: BLE001
            self._compile_reason = f"torch.compile failed: {type(exc).__name__}: {exc}"
            raise RuntimeError(self._compile_reason) from exc

    def compile_failed(self, exc: BaseException) -> str:
        """Record that a compiled model failed on its first call (no backend compiler, ...); returns why."""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        self._compile_reason = f"torch.compile failed: {type(exc).__name__}: {first[:300]}"
        return self._compile_reason

    # ---------------------------------------------------------------- what can be timed
    def step_fn(self, net: MLP, x_host: np.ndarray, t_host: np.ndarray, device: str, *, lr: float,
                momentum: float = 0.0, compiled: bool = False, read_loss: bool = True) -> Callable[[], Any]:
        """One training step of the twin on a fixed batch: ``zero_grad``, forward, loss, ``backward``,
        ``SGD.step`` and (``read_loss``) ``loss.item()``. ``compiled``: the model under ``torch.compile``
        (compiles on the first call, which raises if the compiler cannot run). The function's ``model`` and
        ``optimizer`` attributes are the twin and its optimizer."""
        torch = self.torch
        model = self.twin(net, device)
        run = self.compile(model) if compiled else model
        x = self.inputs(net, x_host, device)
        t = self.targets(net, t_host, device)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        loss_fn = self.loss(net)

        def step() -> Any:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(run(x), t)
            loss.backward()
            opt.step()
            return float(loss.item()) if read_loss else loss

        step.model, step.optimizer = model, opt  # type: ignore[attr-defined]
        return step

    def forward_fn(self, net: MLP, x_host: np.ndarray, device: str) -> Callable[[], Any]:
        """The inference pass of the twin under ``torch.inference_mode()``."""
        torch = self.torch
        model = self.twin(net, device)
        x = self.inputs(net, x_host, device)

        def forward() -> Any:
            with torch.inference_mode():
                return model(x)

        return forward

    def epoch_fn(self, net: MLP, X_host: np.ndarray, T_host: np.ndarray, device: str, *, batch_size: int,
                 lr: float, momentum: float = 0.9, seed: int = 0) -> Callable[[], float]:
        """One epoch of a typical PyTorch loop with the data on ``device``: ``torch.randperm`` drawn there,
        each minibatch gathered there, SGD (with ``momentum``), the loss summed on the device and read
        once at the end (returns the epoch's mean loss)."""
        torch = self.torch
        model = self.twin(net, device)
        X = self.inputs(net, X_host, device)
        T = self.targets(net, T_host, device)
        n = int(X.shape[0])
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        loss_fn = self.loss(net)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

        def epoch() -> float:
            perm = torch.randperm(n, device=device, generator=gen)
            total = torch.zeros((), device=device, dtype=torch.float64)
            for lo in range(0, n, batch_size):
                idx = perm[lo:lo + batch_size]
                xb, tb = X[idx], T[idx]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), tb)
                loss.backward()
                opt.step()
                total += loss.detach() * idx.shape[0]
            return float(total.item()) / n

        return epoch

    def time_net(self, net: MLP, x_host: np.ndarray, t_host: np.ndarray, device: str, *, lr: float,
                 repeats: int, warmup: int, min_sample_time: float) -> dict[str, Timing]:
        """Time forward, gradient and step of the PyTorch twin of ``net`` on ``(x_host, t_host)``."""
        torch = self.torch
        model = self.twin(net, device)
        x = self.inputs(net, x_host, device)
        t = self.targets(net, t_host, device)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        loss_fn = self.loss(net)

        def forward() -> Any:
            with torch.inference_mode():
                return model(x)

        def gradient() -> Any:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), t)
            loss.backward()
            return loss

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), t)
            loss.backward()
            opt.step()
            return float(loss.item())

        try:
            return time_ops({"forward": forward, "gradient": gradient, "step": step}, repeats=repeats,
                            warmup=warmup, min_sample_time=min_sample_time, sync=self.synchronizer(device))
        finally:
            model = opt = x = t = None
            self.release(device)


def make_peer(name: str, threads: int | None = None) -> TorchPeer:
    """The peer called ``name`` (only ``"torch"`` so far)."""
    if name != "torch":
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(KNOWN_PEERS)}")
    return TorchPeer(threads)
