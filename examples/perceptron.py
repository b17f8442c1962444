"""The perceptron rule ``w <- w + y x`` (on each misclassified sample) separates a linearly separable set
in finitely many updates, and never settles on XOR, which no line separates.

    python examples/perceptron.py
"""

from __future__ import annotations

import sys

import numpy as np

import backprop as bp


def separable(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points in the square [-1, 1]^2 on both sides of the line ``2 x1 - x2 + 0.3 = 0``, none closer to it than
    0.05; labels -1/+1."""
    rng = np.random.default_rng(seed)
    w_true, b_true = np.array([2.0, -1.0]), 0.3
    X = rng.uniform(-1, 1, size=(4 * n, 2))
    margin = (X @ w_true + b_true) / np.linalg.norm(w_true)
    keep = np.abs(margin) > 0.05
    return X[keep][:n], np.where(margin[keep][:n] > 0, 1, -1)


def main() -> int:
    X, y = separable()
    p = bp.Perceptron(lr=1.0, max_epochs=1000).fit(X, y)
    accuracy = float((p.predict(X) == y).mean())
    print(f"separable set: {len(y)} points ({int((y > 0).sum())} positive), converged={p.converged_} "
          f"after {p.epochs_} epochs, w = {np.round(p.w, 3)}, b = {p.b:.3f}, training accuracy {accuracy:.3f}")

    X_xor = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
    y_xor = np.array([-1, 1, 1, -1])
    q = bp.Perceptron(max_epochs=100).fit(X_xor, y_xor)
    print(f"XOR: converged={q.converged_} after {q.epochs_} epochs (no line separates it: see examples/xor.py)")
    return 0 if p.converged_ and accuracy == 1.0 and not q.converged_ else 1


if __name__ == "__main__":
    sys.exit(main())
