"""Losses by name, the output/loss pairs that make sense, and the four classic heads."""

from __future__ import annotations

from dataclasses import dataclass

from .kernels.registry import FUSED_PAIRS, LOSSES, LossSpec, loss_name
from .validation import check_number

__all__ = ["FUSED_PAIRS", "HEADS", "LOSSES", "Loss", "LossLike", "as_loss", "check_output_loss"]

#: head -> (output activation, loss)
HEADS: dict[str, tuple[str, str]] = {
    "regression": ("identity", "mse"),
    "binary": ("sigmoid", "bce"),
    "multilabel": ("sigmoid", "bce"),
    "multiclass": ("softmax", "cross_entropy"),
}


@dataclass(frozen=True)
class Loss:
    """A loss with its parameter (``param`` is Huber's threshold, default 1.0)."""

    name: str
    param: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"loss name must be a string, got {type(self.name).__name__}")
        key = loss_name(self.name)
        if key is None:
            raise ValueError(f"unknown loss {self.name!r}; known: {', '.join(sorted(LOSSES))}")
        object.__setattr__(self, "name", key)
        param = LOSSES[key].default_param if self.param is None else check_number(self.param, f"loss {key!r}: param")
        LOSSES[key].check_param(param)
        object.__setattr__(self, "param", param)

    @property
    def spec(self) -> LossSpec:
        return LOSSES[self.name]


LossLike = str | Loss


def as_loss(loss: LossLike) -> Loss:
    """Accept a name or a :class:`Loss`; anything else is a ``TypeError`` naming the loss."""
    if isinstance(loss, Loss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a loss name or a backprop.Loss, got {type(loss).__name__}")
    return Loss(loss)


def check_output_loss(output: str, loss: str) -> None:
    """Raise ``ValueError`` for an output/loss pair that makes no sense (say softmax with mae)."""
    allowed = LOSSES[loss].outputs
    if output not in allowed:
        raise ValueError(
            f"output activation {output!r} does not go with loss {loss!r}; "
            f"{loss!r} takes outputs: {', '.join(allowed)}"
        )
