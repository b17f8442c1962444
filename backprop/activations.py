"""Activation functions by name, with their parameter; the records live in ``backprop.kernels.registry``."""

from __future__ import annotations

from dataclasses import dataclass

from .kernels.registry import ACTIVATIONS, ActivationSpec, activation_name
from .validation import check_number

__all__ = ["ACTIVATIONS", "Activation", "ActivationLike", "as_activation"]


@dataclass(frozen=True)
class Activation:
    """An activation ``f`` with its parameter ``alpha`` (leaky ReLU slope, ELU alpha).

    >>> Activation("leaky_relu", alpha=0.2)
    Activation(name='leaky_relu', alpha=0.2)
    """

    name: str
    alpha: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"activation name must be a string, got {type(self.name).__name__}")
        key = activation_name(self.name)
        if key is None:
            raise ValueError(
                f"unknown activation {self.name!r}; known: {', '.join(sorted(ACTIVATIONS))}"
            )
        object.__setattr__(self, "name", key)
        alpha = ACTIVATIONS[key].default_alpha if self.alpha is None else self.alpha
        alpha = check_number(alpha, f"activation {key!r}: alpha")
        ACTIVATIONS[key].check_alpha(alpha)
        object.__setattr__(self, "alpha", alpha)

    @property
    def spec(self) -> ActivationSpec:
        return ACTIVATIONS[self.name]

    @property
    def needs_u(self) -> bool:
        """True when the slope needs the pre-activation ``u`` (GELU, SiLU)."""
        return self.spec.needs_u


ActivationLike = str | Activation


def as_activation(a: ActivationLike, name: str = "activation") -> Activation:
    """Accept a name or an :class:`Activation`; anything else is a ``TypeError`` naming ``name``."""
    if isinstance(a, Activation):
        return a
    if not isinstance(a, str):
        raise TypeError(f"{name} must be an activation name or a backprop.Activation, got {type(a).__name__}")
    return Activation(a)
