"""The perceptron learning rule, the single-layer ancestor of backpropagation."""

from __future__ import annotations

from typing import Any

import numpy as np

from .kernels import numpy_ref
from .validation import check_inputs, check_positive

__all__ = ["Perceptron"]


def _show(labels: np.ndarray, most: int = 10) -> str:
    shown = ", ".join(repr(v.item() if isinstance(v, np.generic) else v) for v in labels[:most])
    return f"[{shown}{', ...' if len(labels) > most else ''}]"


class Perceptron:
    """Linear threshold unit ``y = step(w . x + b)`` for two classes.

    Trained by the rule ``w <- w + eta y x``, ``b <- b + eta y`` applied to each misclassified
    sample; on a linearly separable set it stops after finitely many updates.

    The labels may be any two values, as in scikit-learn (``-1``/``+1``, ``0``/``1``, ``"a"``/``"b"``, ...):
    ``classes_`` holds them sorted; ``classes_[0]`` is ``y = -1`` and ``classes_[1]`` is ``y = +1`` in the rule,
    and :meth:`predict` returns the original labels.
    """

    def __init__(self, lr: float = 1.0, max_epochs: int = 1000) -> None:
        self.lr = check_positive(lr, "lr")
        self.max_epochs = check_positive(max_epochs, "max_epochs", integer=True)
        self.w: np.ndarray | None = None
        self.b = 0.0
        self.classes_: np.ndarray | None = None
        self.epochs_ = 0
        self.converged_ = False

    @staticmethod
    def _classes(y: Any, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """The two sorted labels of ``y`` and the targets ``-1`` / ``+1`` of its samples."""
        y = np.asarray(y).ravel()
        if y.shape[0] != n_samples:
            raise ValueError(f"y has {y.shape[0]} labels but X has {n_samples} samples")
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise ValueError("perceptron labels must be finite (y holds NaN or inf)")
        if y.dtype.kind in "cVMm":
            raise TypeError(f"perceptron labels must be numbers, strings or booleans, got dtype {y.dtype}")
        try:
            classes, index = np.unique(y, return_inverse=True)
        except TypeError:
            raise TypeError("perceptron labels must be comparable values of one kind (numbers or strings), "
                            f"got {_show(y)}") from None
        if any(c != c for c in classes):  # NaN in an object array
            raise ValueError("perceptron labels must not be NaN")
        if len(classes) != 2:
            raise ValueError(f"the perceptron separates two classes; y holds {len(classes)}: {_show(classes)}")
        return classes, np.where(index.ravel() == 1, 1.0, -1.0)

    def fit(self, X: Any, y: Any) -> Perceptron:
        X = np.asarray(X)
        Xh = check_inputs(X, X.shape[1] if X.ndim == 2 else -1, numpy_ref, np.float64)
        classes, y = self._classes(y, Xh.shape[0])
        w = np.zeros(Xh.shape[1])
        b = 0.0
        converged = False
        for epoch in range(1, self.max_epochs + 1):
            mistakes = 0
            for xi, yi in zip(Xh, y):
                if yi * (xi @ w + b) <= 0:
                    w += self.lr * yi * xi
                    b += self.lr * yi
                    mistakes += 1
            if mistakes == 0:
                converged = True
                break
        self.w, self.b, self.classes_, self.epochs_, self.converged_ = w, b, classes, epoch, converged
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """``w . x + b`` per sample: positive for ``classes_[1]``."""
        if self.w is None:
            raise RuntimeError("call fit first")
        return check_inputs(X, self.w.shape[0], numpy_ref, np.float64) @ self.w + self.b

    def predict(self, X: Any) -> np.ndarray:
        """``classes_[1]`` where ``w . x + b > 0``, else ``classes_[0]`` (``+1`` / ``-1`` for labels ``-1``/``+1``)."""
        scores = self.decision_function(X)
        assert self.classes_ is not None
        return self.classes_[(scores > 0).astype(np.intp)]
