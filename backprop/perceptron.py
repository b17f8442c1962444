"""The perceptron learning rule, the single-layer ancestor of backpropagation."""

from __future__ import annotations

from typing import Any

import numpy as np

from .kernels import numpy_ref
from .validation import check_inputs, check_positive

__all__ = ["Perceptron"]


class Perceptron:
    """Linear threshold unit ``y = step(w . x + b)`` with labels in ``{-1, +1}``.

    Trained by the rule ``w <- w + eta y x``, ``b <- b + eta y`` applied to each misclassified
    sample; on a linearly separable set it stops after finitely many updates.
    """

    def __init__(self, lr: float = 1.0, max_epochs: int = 1000) -> None:
        self.lr = check_positive(lr, "lr")
        self.max_epochs = check_positive(max_epochs, "max_epochs", integer=True)
        self.w: np.ndarray | None = None
        self.b = 0.0
        self.epochs_ = 0
        self.converged_ = False

    def fit(self, X: Any, y: Any) -> Perceptron:
        X = np.asarray(X)
        Xh = check_inputs(X, X.shape[1] if X.ndim == 2 else -1, numpy_ref, np.float64)
        y = np.asarray(y, dtype=np.float64).ravel()
        if y.shape[0] != Xh.shape[0]:
            raise ValueError(f"y has {y.shape[0]} labels but X has {Xh.shape[0]} samples")
        if not np.isin(y, (-1.0, 1.0)).all():
            raise ValueError("perceptron labels must be -1 or +1")
        w = np.zeros(Xh.shape[1])
        b = 0.0
        for epoch in range(1, self.max_epochs + 1):
            mistakes = 0
            for xi, yi in zip(Xh, y):
                if yi * (xi @ w + b) <= 0:
                    w += self.lr * yi * xi
                    b += self.lr * yi
                    mistakes += 1
            if mistakes == 0:
                self.converged_ = True
                break
        self.w, self.b, self.epochs_ = w, b, epoch
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        if self.w is None:
            raise RuntimeError("call fit first")
        return check_inputs(X, self.w.shape[0], numpy_ref, np.float64) @ self.w + self.b

    def predict(self, X: Any) -> np.ndarray:
        """Labels ``+1`` where ``w . x + b > 0``, else ``-1``."""
        return np.where(self.decision_function(X) > 0, 1, -1)
