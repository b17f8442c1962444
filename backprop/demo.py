"""Demo on real data, no network access: ``python -m backprop.demo`` or the ``backprop-demo`` command.

    backprop-demo digits                      # scikit-learn's bundled 8x8 digits (needs scikit-learn)
    backprop-demo digits --compare-sklearn    # also sklearn's MLPClassifier, same settings, same machine
    backprop-demo --mnist ~/data/mnist        # MNIST from its four IDX files (plain or .gz)

Trains a multilayer perceptron on the default backend (or ``--backend``) with a progress bar, then prints
the test accuracy and the training time. With ``--compare-sklearn`` it trains
``sklearn.neural_network.MLPClassifier`` with the same hidden layers, epochs, batch size, initial
learning rate, L2 penalty and Adam, on the same arrays (so in the same float precision), and prints both.
backprop's run adds what scikit-learn's estimator does not have: He initialization for ReLU and a cosine
learning-rate schedule. The progress bar's ``val_*`` figures are on the test set, for monitoring only:
nothing is tuned or stopped on them.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["main"]

#: per data set: hidden layers, epochs, batch size, initial learning rate, L2 (scikit-learn's alpha)
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(hidden=[128], epochs=60, batch_size=32, lr=3e-3, alpha=1e-3),
    "mnist": dict(hidden=[256], epochs=10, batch_size=128, lr=2e-3, alpha=1e-3),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="backprop-demo",
        description="Train a multilayer perceptron by backpropagation on real data (no download) and report "
                    "test accuracy and training time.",
    )
    p.add_argument("dataset", nargs="?", choices=sorted(DEFAULTS), default=None,
                   help="digits (scikit-learn's bundled 8x8 digits; default) or mnist (needs --mnist PATH)")
    p.add_argument("--mnist", metavar="PATH", help="directory holding MNIST's IDX files (plain or .gz); "
                                                     "implies the mnist data set")
    p.add_argument("--hidden", type=int, nargs="+", metavar="N", help="hidden layer widths (digits: 128)")
    p.add_argument("--epochs", type=int, help="passes over the training set (digits: 60)")
    p.add_argument("--batch-size", type=int, help="minibatch size (digits: 32)")
    p.add_argument("--lr", type=float, help="initial (peak) learning rate of Adam (digits: 0.003)")
    p.add_argument("--alpha", type=float, help="L2 penalty, scikit-learn's alpha (digits: 0.001)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initialization and the shuffling")
    p.add_argument("--backend", help="backend name (default: the active one, see backprop.available_backends())")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--compare-sklearn", action="store_true",
                   help="also train sklearn.neural_network.MLPClassifier with the same settings and print both")
    p.add_argument("--repeat", type=int, default=1, metavar="R",
                   help="train R times and report the fastest time (the results are identical each time)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="show the progress bar (default: on a terminal, not when $CI is set)")
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--plot", metavar="PNG", help="save the training curves there")
    p.add_argument("--save", metavar="NPZ", help="save the trained network there (backprop.MLP.load reads it)")
    return p


def _load(dataset: str, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    if dataset == "mnist":
        from .datasets import load_mnist

        (X_train, y_train), (X_test, y_test) = load_mnist(args.mnist, dtype=args.dtype)
        return X_train, y_train.astype(np.int64), X_test, y_test.astype(np.int64), f"MNIST from {args.mnist}"
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit("backprop-demo digits needs scikit-learn (its bundled digits data set): "
                         "pip install 'backprop-kernels[sklearn]'") from None
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(args.dtype)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=args.seed, stratify=y)
    return X_train, y_train, X_test, y_test, "scikit-learn's digits (8x8 images), 75/25 stratified split"


def _train_backprop(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
                    cfg: dict[str, Any], args: argparse.Namespace, progress: bool | None) -> tuple[Any, Any, float]:
    import backprop as bp

    from .schedules import cosine_annealing

    n_classes = int(max(y_train.max(), y_test.max())) + 1
    sizes = [X_train.shape[1], *cfg["hidden"], n_classes]

    def run(show: bool | None) -> tuple[Any, Any, float]:
        net = bp.MLP(sizes, activation="relu", head="multiclass", dtype=args.dtype, seed=args.seed,
                     backend=args.backend)
        opt = bp.Adam(cfg["lr"], weight_decay=cfg["alpha"] / cfg["batch_size"])
        start = time.perf_counter()
        history = net.fit(X_train, y_train, epochs=cfg["epochs"], batch_size=cfg["batch_size"], optimizer=opt,
                          schedule=cosine_annealing(cfg["lr"], cfg["epochs"]), validation_data=(X_test, y_test),
                          progress=show, seed=args.seed)
        return net, history, time.perf_counter() - start

    net, history, best = run(progress)
    for _ in range(args.repeat - 1):
        best = min(best, run(False)[2])
    return net, history, best


def _warm_up(args: argparse.Namespace, dtype: str) -> tuple[str, float]:
    """One tiny training step, so that a JIT backend compiles (or loads its cache) outside the timing."""
    import backprop as bp

    start = time.perf_counter()
    net = bp.MLP([4, 3, 3], activation="relu", head="multiclass", dtype=dtype, backend=args.backend)
    net.fit(np.zeros((2, 4)), [0, 1], epochs=1, batch_size=2, optimizer=bp.Adam(), progress=False)
    net.predict(np.zeros((2, 4)))
    return net.backend.name, time.perf_counter() - start


def _train_sklearn(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
                   cfg: dict[str, Any], args: argparse.Namespace) -> tuple[float, float, int]:
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        raise SystemExit("--compare-sklearn needs scikit-learn: pip install 'backprop-kernels[sklearn]'") from None
    best = float("inf")
    for _ in range(args.repeat):
        clf = MLPClassifier(hidden_layer_sizes=tuple(cfg["hidden"]), activation="relu", solver="adam",
                            alpha=cfg["alpha"], batch_size=cfg["batch_size"], learning_rate_init=cfg["lr"],
                            max_iter=cfg["epochs"], tol=0.0, n_iter_no_change=cfg["epochs"],
                            random_state=args.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            start = time.perf_counter()
            clf.fit(X_train, y_train)
            best = min(best, time.perf_counter() - start)
    return float(clf.score(X_test, y_test)), best, int(clf.n_iter_)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (0 on success)."""
    args = _parser().parse_args(argv)
    if args.dataset == "mnist" and not args.mnist:
        _parser().error("the mnist data set needs --mnist PATH (a directory holding its IDX files)")
    if args.mnist and args.dataset == "digits":
        _parser().error("--mnist PATH trains on MNIST; leave out 'digits'")
    dataset = "mnist" if args.mnist else (args.dataset or "digits")
    cfg = dict(DEFAULTS[dataset])
    for key in ("hidden", "epochs", "batch_size", "lr", "alpha"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["epochs"] < 1 or cfg["batch_size"] < 1 or args.repeat < 1 or any(h < 1 for h in cfg["hidden"]):
        _parser().error("--epochs, --batch-size, --hidden and --repeat must be positive")
    if not cfg["lr"] > 0 or cfg["alpha"] < 0:
        _parser().error("--lr must be positive and --alpha non-negative")

    try:
        X_train, y_train, X_test, y_test, source = _load(dataset, args)
        backend, warm = _warm_up(args, args.dtype)
    except (OSError, ValueError) as exc:
        print(f"backprop-demo: {exc}", file=sys.stderr)
        return 1
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    print(f"{source}: {X_train.shape[0]} training / {X_test.shape[0]} test samples, "
          f"{X_train.shape[1]} features, {n_classes} classes")
    print(f"settings: hidden {tuple(cfg['hidden'])} relu, {cfg['epochs']} epochs, batch {cfg['batch_size']}, "
          f"Adam lr {cfg['lr']:g}, alpha (L2) {cfg['alpha']:g}, seed {args.seed}")
    print(f"backprop: backend {backend}, {args.dtype}, He init, cosine schedule "
          f"(backend warm-up {warm:.2f} s, not timed)", flush=True)

    net, history, seconds = _train_backprop(X_train, y_train, X_test, y_test, cfg, args, args.progress)
    accuracy = float((net.predict(X_test).argmax(axis=1) == y_test).mean())
    timing = f"{seconds:.3f} s" + (f" (best of {args.repeat})" if args.repeat > 1 else "")
    print(f"backprop      test accuracy {accuracy:.4f}   training time {timing}", flush=True)
    if args.plot:
        history.plot(args.plot)
        print(f"training curves saved to {args.plot}")
    if args.save:
        net.save(args.save)
        print(f"network saved to {args.save}")

    if args.compare_sklearn:
        sk_acc, sk_seconds, sk_iter = _train_sklearn(X_train, y_train, X_test, y_test, cfg, args)
        sk_timing = f"{sk_seconds:.3f} s" + (f" (best of {args.repeat})" if args.repeat > 1 else "")
        print(f"scikit-learn  test accuracy {sk_acc:.4f}   training time {sk_timing}   "
              f"(MLPClassifier, {sk_iter} epochs, {X_train.dtype.name})")
        print(f"backprop vs scikit-learn: accuracy {accuracy - sk_acc:+.4f}, "
              f"{sk_seconds / seconds:.2f}x the speed")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
