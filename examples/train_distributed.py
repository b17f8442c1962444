"""Data-parallel training on several processes: every rank trains on its share of each minibatch, one
all-reduce per step sums the gradients, and all ranks end with the parameters one process would reach
with the whole minibatch.

    mpiexec -n 2 python examples/train_distributed.py               # 2 processes (pip install mpi4py mpich)
    mpiexec -n 2 python examples/train_distributed.py --check       # rank 0 also trains alone, and compares
    python examples/train_distributed.py                            # one process is a run of one rank

The data (three spirals, 3000 points) is made from a fixed seed, so every rank holds the same set.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import backprop as bp


def spirals(n: int = 3000, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points on ``classes`` noisy interleaved spiral arms, with their arm as the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    r = rng.uniform(0.1, 1.0, n)
    angle = 4.0 * r + 2 * np.pi * y / classes + rng.normal(0, 0.15, n)
    return np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1), y


def network(backend: str) -> bp.MLP:
    return bp.MLP([2, 64, 64, 3], activation="tanh", head="multiclass", dtype="float64", seed=0, backend=backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="backend name (default: the fastest here)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per rank per step")
    parser.add_argument("--check", action="store_true",
                        help="rank 0 also trains one process with the whole minibatch and compares")
    args = parser.parse_args()

    comm = bp.distributed.init()
    X, y = spirals()
    net = network(args.backend)
    start = time.perf_counter()
    history = net.fit(X, y, epochs=args.epochs, batch_size=args.batch_size, optimizer=bp.Adam(5e-3),
                      validation_split=0.2, distributed=True)
    seconds = time.perf_counter() - start
    if comm.rank != 0:
        return
    print(f"{comm.size} rank(s) x batch {args.batch_size} on {net.backend.name}: {history}")
    print(f"training took {seconds:.2f} s; validation accuracy {history.val_accuracy[-1]:.3f}")
    if args.check:
        alone = network(args.backend)
        alone.fit(X, y, epochs=args.epochs, batch_size=args.batch_size * comm.size, optimizer=bp.Adam(5e-3),
                  validation_split=0.2, seed=0)
        a, b = (np.asarray(alone.backend.kernels.to_host(m.params)) for m in (net, alone))
        print(f"one process with batch {args.batch_size * comm.size}: largest relative parameter difference "
              f"{np.max(np.abs(a - b)) / np.max(np.abs(b)):.1e}")


if __name__ == "__main__":
    main()
