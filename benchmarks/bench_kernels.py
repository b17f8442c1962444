"""Microbenchmarks of the kernel primitives, on every available backend (pytest-benchmark).

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-group-by=func --benchmark-columns=median,iqr,ops

One benchmark per primitive of a training step: the fused forward (``u = x W^T + b``, ``y = f(u)``), the
output error, the delta propagation (``delta W * f'``), the weight gradients (``delta^T x``), the fused
SGD update from the delta, and the momentum and Adam optimizer steps. Each call is followed by
``synchronize()`` so GPU figures cover the work, not its launch. ``extra_info`` holds the shapes and the
operation count, so GFLOP/s can be read off the JSON (``--benchmark-json``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from backprop.backend import Backend

pytest.importorskip("pytest_benchmark")

BATCH = 256
WIDTHS = [256, 1024]
DTYPE = np.float32


def _arrays(backend: Backend, n: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    k = backend.kernels
    host = {
        "x": rng.standard_normal((BATCH, n)),
        "W": rng.standard_normal((n, n)) / np.sqrt(n),
        "b": np.zeros(n),
        "delta": rng.standard_normal((BATCH, n)) / BATCH,
        "t": rng.standard_normal((BATCH, n)),
    }
    dev = {name: k.to_device(a, DTYPE) for name, a in host.items()}
    y, u = k.layer_forward(dev["x"], dev["W"], dev["b"], "relu", 0.0, True)
    dev["y"], dev["u"] = y, u
    onehot = np.zeros((BATCH, n))
    onehot[np.arange(BATCH), rng.integers(0, n, BATCH)] = 1
    dev["onehot"] = k.to_device(onehot, DTYPE)
    return dev


def _run(benchmark: Any, backend: Backend, fn: Callable[[], Any], flops: int, n: int) -> None:
    def call() -> None:
        fn()
        backend.synchronize()

    benchmark.extra_info.update(backend=backend.name, batch=BATCH, width=n, dtype=np.dtype(DTYPE).name, flops=flops)
    benchmark(call)


@pytest.mark.parametrize("n", WIDTHS)
def test_layer_forward(benchmark: Any, backend: Backend, n: int) -> None:
    """Fused forward of one ReLU layer, inference (nothing kept for backward)."""
    a, k = _arrays(backend, n), backend.kernels
    _run(benchmark, backend, lambda: k.layer_forward(a["x"], a["W"], a["b"], "relu", 0.0, False), 2 * BATCH * n * n, n)


@pytest.mark.parametrize("n", WIDTHS)
def test_layer_forward_train(benchmark: Any, backend: Backend, n: int) -> None:
    """Fused forward keeping the pre-activation ``u`` (as the output layer does in training)."""
    a, k = _arrays(backend, n), backend.kernels
    _run(benchmark, backend, lambda: k.layer_forward(a["x"], a["W"], a["b"], "relu", 0.0, True), 2 * BATCH * n * n, n)


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("head", ["identity-mse", "softmax-cross_entropy"])
def test_output_error(benchmark: Any, backend: Backend, n: int, head: str) -> None:
    """Loss and ``delta^L`` at the output, one fused step."""
    a, k = _arrays(backend, n), backend.kernels
    out, loss = head.split("-")
    if out == "softmax":
        y = k.layer_forward(a["x"], a["W"], a["b"], "softmax", 0.0, True)[0]
        args = (y, a["u"], a["onehot"])
    else:
        args = (a["u"], a["u"], a["t"])
    _run(benchmark, backend, lambda: k.output_error(*args, out, loss, 0.0, 0.0), 0, n)


@pytest.mark.parametrize("n", WIDTHS)
def test_delta_backward(benchmark: Any, backend: Backend, n: int) -> None:
    """Delta propagation through one ReLU layer: ``(delta W) * f'(u_prev)``."""
    a, k = _arrays(backend, n), backend.kernels
    _run(benchmark, backend, lambda: k.delta_backward(a["delta"], a["W"], a["y"], None, "relu", 0.0),
         2 * BATCH * n * n, n)


@pytest.mark.parametrize("n", WIDTHS)
def test_weight_gradients(benchmark: Any, backend: Backend, n: int) -> None:
    """``dE/dW = delta^T x_prev`` and ``dE/db``, into preallocated buffers."""
    a, k = _arrays(backend, n), backend.kernels
    dW, db = k.zeros((n, n), DTYPE), k.zeros((n,), DTYPE)
    _run(benchmark, backend, lambda: k.weight_gradients(a["delta"], a["x"], dW, db), 2 * BATCH * n * n, n)


@pytest.mark.parametrize("n", WIDTHS)
def test_sgd_update(benchmark: Any, backend: Backend, n: int) -> None:
    """Plain SGD on one ``n x n`` weight matrix from its gradient, in place, guarded as in a training step."""
    a, k = _arrays(backend, n), backend.kernels
    g = k.to_device(np.full((n, n), 1e-3), DTYPE)
    guard = k.to_device(np.array([1.0, 0.0, 0.0, 0.0]), np.float64)  # the step may be applied
    _run(benchmark, backend, lambda: k.sgd_update(a["W"], g, 1e-7, 0.0, guard=guard), 0, n)


@pytest.mark.parametrize("n", WIDTHS)
def test_momentum_update(benchmark: Any, backend: Backend, n: int) -> None:
    """Optimizer step, SGD with Nesterov momentum, on one ``n x n`` weight matrix."""
    a, k = _arrays(backend, n), backend.kernels
    g, v = k.to_device(np.full((n, n), 1e-3), DTYPE), k.zeros((n, n), DTYPE)
    _run(benchmark, backend, lambda: k.momentum_update(a["W"], g, v, 1e-7, 0.9, True, 0.0), 0, n)


@pytest.mark.parametrize("n", WIDTHS)
def test_adam_update(benchmark: Any, backend: Backend, n: int) -> None:
    """Optimizer step, Adam with bias correction, on one ``n x n`` weight matrix."""
    a, k = _arrays(backend, n), backend.kernels
    g = k.to_device(np.full((n, n), 1e-3), DTYPE)
    m, v = k.zeros((n, n), DTYPE), k.zeros((n, n), DTYPE)
    _run(benchmark, backend, lambda: k.adam_update(a["W"], g, m, v, 1e-7, 0.9, 0.999, 1e-8, 10, 0.0), 0, n)
