"""What every backend computes: the activation and loss tables shared by all kernels.

A backend module implements the primitives of :mod:`backprop.kernels.numpy_ref` for
the activations and output/loss pairs listed here. The derivative of each activation is
written, where the activation is invertible, as the notes' slope of the neural output

    phi(y) = f'(f^{-1}(y)),

so the forward pass keeps only ``y = f(u)`` per layer. GELU and SiLU are not invertible
and keep ``u`` as well.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActivationSpec:
    """One row of the activation table."""

    name: str
    formula: str
    derivative: str
    needs_u: bool = False
    hidden: bool = True
    default_alpha: float = 0.0
    init: str = "glorot"


ACTIVATIONS: dict[str, ActivationSpec] = {
    s.name: s
    for s in (
        ActivationSpec("identity", "u", "phi(y) = 1"),
        ActivationSpec("step", "1 if u > 0 else 0", "phi(y) = 0 (perceptrons only)"),
        ActivationSpec("sigmoid", "1 / (1 + exp(-u))", "phi(y) = y (1 - y)"),
        ActivationSpec("tanh", "tanh(u)", "phi(y) = 1 - y^2"),
        ActivationSpec("relu", "max(u, 0)", "phi(y) = 1 if y > 0 else 0", init="he"),
        ActivationSpec(
            "leaky_relu", "u if u > 0 else alpha u", "phi(y) = 1 if y > 0 else alpha",
            default_alpha=0.01, init="he",
        ),
        ActivationSpec(
            "elu", "u if u > 0 else alpha (exp(u) - 1)", "phi(y) = 1 if y > 0 else y + alpha",
            default_alpha=1.0, init="he",
        ),
        ActivationSpec(
            "selu", "lambda (u if u > 0 else alpha (exp(u) - 1))",
            "phi(y) = lambda if y > 0 else y + lambda alpha", init="lecun_normal",
        ),
        ActivationSpec("softplus", "log(1 + exp(u))", "phi(y) = 1 - exp(-y)", init="he"),
        ActivationSpec(
            "gelu", "u Phi(u), Phi(u) = (1 + erf(u / sqrt 2)) / 2",
            "f'(u) = Phi(u) + u exp(-u^2 / 2) / sqrt(2 pi)  (keeps u)", needs_u=True, init="he",
        ),
        ActivationSpec(
            "silu", "u sigmoid(u)", "f'(u) = s (1 + u (1 - s)), s = sigmoid(u)  (keeps u)",
            needs_u=True, init="he",
        ),
        ActivationSpec(
            "softmax", "exp(u_i) / sum_j exp(u_j)", "fused with cross_entropy: delta = (y - t) / batch",
            hidden=False,
        ),
    )
}

SELU_LAMBDA = 1.0507009873554805
SELU_ALPHA = 1.6732632423543772


@dataclass(frozen=True)
class LossSpec:
    """One row of the loss table; ``outputs`` lists the output activations it accepts."""

    name: str
    per_sample: str
    delta: str
    outputs: tuple[str, ...]
    default_param: float = 0.0


_ELEMENTWISE_OUTPUTS = tuple(n for n, s in ACTIVATIONS.items() if s.hidden and n != "step")

LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec("mse", "1/2 sum_i (d_i - y_i)^2", "(y - d) phi(y) / batch", _ELEMENTWISE_OUTPUTS),
        LossSpec("mae", "sum_i |d_i - y_i|", "sign(y - d) phi(y) / batch", _ELEMENTWISE_OUTPUTS),
        LossSpec(
            "huber", "sum_i h(y_i - d_i), h(r) = r^2/2 if |r| <= k else k (|r| - k/2)",
            "clip(y - d, -k, k) phi(y) / batch", _ELEMENTWISE_OUTPUTS, default_param=1.0,
        ),
        LossSpec(
            "bce", "-sum_i [d_i log y_i + (1 - d_i) log(1 - y_i)], from logits",
            "(y - d) / batch", ("sigmoid",),
        ),
        LossSpec(
            "cross_entropy", "-sum_i d_i log y_i, from logits with log-sum-exp",
            "(y - d) / batch", ("softmax",),
        ),
    )
}

#: Output/loss pairs whose delta is computed from the logits in one stable step.
FUSED_PAIRS = {("sigmoid", "bce"), ("softmax", "cross_entropy")}
