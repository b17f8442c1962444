"""XOR with the notes' 2-2-1 network, learned by backpropagation.

XOR is not linearly separable, so no perceptron learns it; one hidden layer of two units does. A 2-2-1
network can also get stuck in a local minimum (one hidden unit saturated), so the script restarts from the
next seed if a run does not solve the problem.

    python examples/xor.py
"""

from __future__ import annotations

import sys

import numpy as np

import backprop as bp

X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
T = np.array([0, 1, 1, 0])


def learn(activation: str, seeds: range = range(10)) -> bp.MLP | None:
    """Train 2-2-1 nets (hidden ``activation``, sigmoid output, cross-entropy) until one solves XOR."""
    for seed in seeds:
        net = bp.MLP([2, 2, 1], activation=activation, output="sigmoid", loss="bce", dtype="float64", seed=seed)
        history = net.fit(X, T, epochs=1000, batch_size=4, optimizer=bp.SGD(lr=0.5, momentum=0.9))
        if np.array_equal(net.predict(X).ravel() > 0.5, T == 1):
            print(f"{activation}: solved with seed {seed}, final loss {history.loss[-1]:.4f}")
            return net
        print(f"{activation}: seed {seed} landed in a local minimum (loss {history.loss[-1]:.3f}); restarting")
    return None


def main() -> int:
    solved = True
    for activation in ("tanh", "sigmoid"):
        net = learn(activation)
        if net is None:
            print(f"{activation}: not solved")
            solved = False
            continue
        y = net.predict(X).ravel()
        for x, t, out in zip(X.astype(int).tolist(), T.tolist(), y):
            print(f"  x = {tuple(x)}  target {t}  output {out:.3f}")
    return 0 if solved else 1


if __name__ == "__main__":
    sys.exit(main())
