#!/usr/bin/env python
"""``solver="lbfgs"``: backprop's MLPClassifier against scikit-learn's on the digits data, time to the same loss.

    python benchmarks/lbfgs_vs_sklearn.py                      # numpy and numba, float64 and float32, 5 repeats
    python benchmarks/lbfgs_vs_sklearn.py --repeats 3 --json lbfgs.json
    python benchmarks/lbfgs_vs_sklearn.py --backends numba --dtypes float32 --hidden-layer-sizes 128,64

The data: ``sklearn.datasets.load_digits`` (1797 images of 8 x 8 pixels, 10 classes), scaled to [0, 1] by
dividing by 16. Every estimator gets the same parameters: ``solver="lbfgs"``, ``hidden_layer_sizes``,
``alpha``, ``max_iter``, ``random_state`` and ``tol`` (default 0, so that ``max_iter`` stops L-BFGS-B, not the
projected gradient; SciPy's own ``ftol`` may still stop it earlier, which is then reported). scikit-learn's
``MLPClassifier`` runs in float64, backprop's on each backend (``--backends``) in each dtype (``--dtypes``).

Timing: :func:`backprop.bench.timing.time_ops` with one fit per sample: one warm-up fit of each estimator (its
time is reported apart: JIT compilation or a cache load), then ``--repeats`` rounds in which each estimator is
fitted once, in turn (interleaved, so that load from other work falls on all alike). Reported: the median fit
time, its ratio ``scikit-learn / backprop`` (above 1: backprop is faster) as a ratio of medians and as the
median of the per-round ratios ("paired"), and each fit's ``loss_`` and ``n_iter_``. BLAS, OpenMP and Numba are
limited to ``--threads`` threads (default 1: a fair and steady comparison), and the load average is printed.

Time to the same loss: the target is scikit-learn's final ``loss_`` times ``1 + 1e-6`` for a float64 fit and
``1 + 1e-4`` for a float32 one. In float64 backprop's iterates follow scikit-learn's to rounding error, but
L-BFGS magnifies rounding differences over many iterations, so after ``max_iter`` iterations either may be a
little ahead. One further, untimed-by-the-rounds fit of each backprop estimator is traced: up to
``--trace-max-iter`` iterations (default twice ``max_iter``), recording the loss and the clock after each
iteration (through the estimator's ``verbose`` hook). Reported: the first iteration whose loss is at most the
target ("target it"), and the time to reach it, the median fit time scaled by the traced time to that
iteration over the traced time to iteration ``max_iter`` ("to target s"), with its ratio to scikit-learn's
median fit time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

try:
    from backprop.bench.cli import (
        backend_name, doc_parser, json_path, non_negative_float, positive_int, require_backends, threads_int,
    )
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from backprop.bench.cli import (
        backend_name, doc_parser, json_path, non_negative_float, positive_int, require_backends, threads_int,
    )
from backprop.backend import resolve_backend
from backprop.bench.machine import load_average, machine_info, restore_threads, set_threads
from backprop.bench.timing import paired_ratio, time_ops
from backprop.kernels import BACKEND_MODULES

PROG = "python benchmarks/lbfgs_vs_sklearn.py"
#: Relative tolerance on scikit-learn's final loss, by backprop's dtype.
TARGET_RTOL = {"float64": 1e-6, "float32": 1e-4}
SKLEARN = "scikit-learn"
#: Largest ``--random-state`` (NumPy's ``RandomState`` takes 32-bit seeds).
MAX_RANDOM_STATE = 2**32 - 1
#: Largest width of a hidden layer, and number of hidden layers.
MAX_WIDTH, MAX_HIDDEN_LAYERS = 1 << 20, 1000


# --------------------------------------------------------------------------- tracing
@contextlib.contextmanager
def traced_objective(records: list[tuple[float, float, float]]) -> Iterator[None]:
    """While active, backprop's L-BFGS objective appends ``(clock, seconds spent, loss)`` to ``records`` each
    time the estimator's ``verbose`` hook asks it for the loss at an iterate (once per iteration). Relies on
    ``backprop.sklearn._LbfgsObjective.value_at``: a ``RuntimeError`` if that is gone."""
    import backprop.sklearn as bps

    base = getattr(bps, "_LbfgsObjective", None)
    if base is None or not callable(getattr(base, "value_at", None)):
        raise RuntimeError("backprop.sklearn._LbfgsObjective.value_at is gone: the trace needs another hook")

    class Traced(base):  # type: ignore[misc, valid-type]
        def value_at(self, theta: np.ndarray) -> float:
            start = time.perf_counter()
            value = super().value_at(theta)
            records.append((start, time.perf_counter() - start, float(value)))
            return value

    bps._LbfgsObjective = Traced
    try:
        yield
    finally:
        bps._LbfgsObjective = base


def trace_fit(template: Any, X: np.ndarray, y: np.ndarray, max_iter: int) -> list[tuple[int, float, float]]:
    """Fit a clone of ``template`` for up to ``max_iter`` iterations: ``(iteration, seconds since the fit
    started, loss)`` after each iteration (the time the trace itself took left out)."""
    from sklearn.base import clone

    records: list[tuple[float, float, float]] = []
    est = clone(template).set_params(max_iter=max_iter, verbose=True)
    with traced_objective(records), contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        est.fit(X, y)
    trace, spent = [], 0.0
    for i, (clock, took, loss) in enumerate(records, 1):
        trace.append((i, clock - start - spent, loss))
        spent += took
    return trace


def first_at_most(trace: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """``(iteration, seconds)`` of the first entry of ``trace`` whose loss is at most ``target``."""
    for it, seconds, loss in trace:
        if loss <= target:
            return it, seconds
    return None


# --------------------------------------------------------------------------- command line
def hidden_sizes(text: str) -> tuple[int, ...]:
    """``--hidden-layer-sizes``: comma-separated widths, such as ``64`` or ``128,64``."""
    items = [s.strip() for s in text.split(",")]
    try:
        sizes = tuple(int(s) for s in items)
    except ValueError:
        sizes = ()
    if not sizes or not all(1 <= s <= MAX_WIDTH for s in sizes) or len(sizes) > MAX_HIDDEN_LAYERS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_HIDDEN_LAYERS} comma-separated widths from 1 to "
                                         f"{MAX_WIDTH}, such as 64 or 128,64, got {text!r}")
    return sizes


def random_state(text: str) -> int:
    """``--random-state``: an integer from 0 to 2**32 - 1."""
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_RANDOM_STATE:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_RANDOM_STATE}, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__)
    p.add_argument("--backends", nargs="+", type=backend_name, default=["numpy", "numba"],
                   help=f"backprop's backends (default: numpy numba); known: {', '.join(BACKEND_MODULES)}")
    p.add_argument("--dtypes", nargs="+", choices=sorted(TARGET_RTOL), default=["float64", "float32"],
                   help="backprop's dtypes (default: float64 float32)")
    p.add_argument("--hidden-layer-sizes", type=hidden_sizes, default=(64,),
                   help="widths of the hidden layers, comma-separated (default 64)")
    p.add_argument("--alpha", type=non_negative_float, default=1e-4, help="L2 penalty (default 1e-4)")
    p.add_argument("--max-iter", type=positive_int, default=200, help="L-BFGS iterations (default 200)")
    p.add_argument("--tol", type=non_negative_float, default=0.0,
                   help="projected-gradient tolerance (default 0: max_iter stops the fit)")
    p.add_argument("--random-state", type=random_state, default=0, help="seed of the initial weights (default 0)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed fits of each estimator (default 5)")
    p.add_argument("--threads", type=threads_int, default=1, help="BLAS/OpenMP/Numba threads (default 1)")
    p.add_argument("--trace-max-iter", type=positive_int, default=None,
                   help="iterations of the traced fit that finds the target iteration (default: twice --max-iter)")
    p.add_argument("--json", type=json_path, default=None, help="also write the results to this file")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the option types cannot check alone: ``parser.error`` (exit status 2) naming the option."""
    args.backends = list(dict.fromkeys(args.backends))
    args.dtypes = list(dict.fromkeys(args.dtypes))
    if args.trace_max_iter is None:
        args.trace_max_iter = 2 * args.max_iter
    elif args.trace_max_iter < args.max_iter:
        parser.error(f"argument --trace-max-iter: must be at least --max-iter ({args.max_iter}), "
                     f"got {args.trace_max_iter}")
    require_backends(parser, args.backends, ": its timings say nothing")
    try:
        import sklearn  # noqa: F401
        import threadpoolctl  # noqa: F401
    except ImportError as exc:
        parser.error(f"{exc.name} is not installed: pip install 'backprop-kernels[sklearn,bench]'")


# --------------------------------------------------------------------------- the run
def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from sklearn.base import clone
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier as SkMLPClassifier

    from backprop.sklearn import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    params = {"hidden_layer_sizes": args.hidden_layer_sizes, "solver": "lbfgs", "alpha": args.alpha,
              "max_iter": args.max_iter, "tol": args.tol, "random_state": args.random_state}
    templates: dict[str, Any] = {SKLEARN: SkMLPClassifier(**params)}
    configs: dict[str, tuple[str, str]] = {}
    for backend in args.backends:
        for dtype in args.dtypes:
            key = f"{backend} {dtype}"
            configs[key] = (backend, dtype)
            templates[key] = MLPClassifier(**params, backend=backend, dtype=dtype)

    fitted: dict[str, Any] = {}

    def op(key: str) -> Any:
        return lambda: fitted.__setitem__(key, clone(templates[key]).fit(X, y))

    load_before = load_average()
    print(f"lbfgs on digits ({X.shape[0]} x {X.shape[1]}, {len(np.unique(y))} classes, X / 16): hidden "
          f"{args.hidden_layer_sizes}, alpha {args.alpha:g}, max_iter {args.max_iter}, tol {args.tol:g}, "
          f"random_state {args.random_state}")
    print(f"threads {args.threads} ({'; '.join(args.threads_limited) or 'nothing limited'}); {args.repeats} "
          f"repeats after one warm-up fit; load average before: {load_before}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        timings = time_ops({key: op(key) for key in templates}, repeats=args.repeats, warmup=0, inner=1)
        traces = {key: trace_fit(templates[key], X, y, args.trace_max_iter) for key in configs}
    load_after = load_average()

    sk, sk_t = fitted[SKLEARN], timings[SKLEARN]
    sk_loss = float(sk.loss_)
    print(f"\n{SKLEARN} float64: loss_ {sk_loss:.8e}, n_iter_ {sk.n_iter_}, fit {sk_t.median:.3f} s "
          f"(median; warm-up fit {sk_t.first_call:.3f} s)\n")
    head = (f"{'backend':<8} {'dtype':<8} {'loss_':>14} {'vs sk':>9} {'n_iter_':>7} {'target it':>9} "
            f"{'fit s':>7} {'warm-up s':>9} {'to target s':>11} {'sk/bp fit':>9} {'paired':>7} {'sk/bp target':>12}")
    print(head)
    results = []
    stopped_early = [] if sk.n_iter_ == args.max_iter else [SKLEARN]
    for key, (backend, dtype) in configs.items():
        est, t, trace = fitted[key], timings[key], traces[key]
        loss = float(est.loss_)
        target = sk_loss * (1 + TARGET_RTOL[dtype])
        hit = first_at_most(trace, target)
        at_max = trace[min(est.n_iter_, len(trace)) - 1] if trace else None  # the trace at the fit's end
        to_target = None
        if hit is not None and at_max is not None and at_max[1] > 0:
            to_target = t.median * hit[1] / at_max[1]
        if est.n_iter_ != args.max_iter:
            stopped_early.append(key)
        row = {"backend": backend, "dtype": dtype, "loss": loss, "loss_vs_sklearn": loss / sk_loss - 1,
               "n_iter": int(est.n_iter_), "target": target, "target_rtol": TARGET_RTOL[dtype],
               "target_iteration": hit[0] if hit else None, "fit_s": t.median, "warm_up_fit_s": t.first_call,
               "time_to_target_s": to_target, "sklearn_over_backprop_fit": sk_t.median / t.median,
               "paired_ratio": paired_ratio(sk_t, t),
               "sklearn_over_backprop_to_target": None if to_target is None else sk_t.median / to_target,
               "trace_loss_at_n_iter": at_max[2] if at_max else None, "timing": t.to_dict(),
               "trace": [list(e) for e in trace]}
        results.append(row)
        target_it = str(hit[0]) if hit else f">{len(trace)}"
        print(f"{backend:<8} {dtype:<8} {loss:>14.8e} {row['loss_vs_sklearn']:>+9.1e} {est.n_iter_:>7} "
              f"{target_it:>9} {t.median:>7.3f} {t.first_call:>9.3f} "
              f"{'-' if to_target is None else f'{to_target:.3f}':>11} "
              f"{_fmt_ratio(row['sklearn_over_backprop_fit']):>9} {_fmt_ratio(row['paired_ratio']):>7} "
              f"{_fmt_ratio(row['sklearn_over_backprop_to_target']):>12}")
    print(f"\nload average after: {load_after}")
    print("vs sk: loss_ / scikit-learn's loss_ - 1\n"
          "target it: the first iteration whose loss is at most scikit-learn's loss_ x (1 + 1e-6) in float64,\n"
          f"  x (1 + 1e-4) in float32, in a traced fit of up to {args.trace_max_iter} iterations ('>N': not within "
          "them)\n"
          "to target s: the median fit time x the traced time to that iteration / the traced time to n_iter_\n"
          "sk/bp: scikit-learn's median fit time / backprop's (above 1: backprop is faster); paired: the median of "
          "that ratio\n  within each round; sk/bp target: scikit-learn's median fit time / backprop's to target s")
    drift = [r["backend"] + " " + r["dtype"] for r in results
             if r["trace_loss_at_n_iter"] is None or r["trace_loss_at_n_iter"] != r["loss"]]
    if drift:
        print(f"note: the traced fit did not end where the timed one did (its loss at n_iter_ differs): "
              f"{', '.join(drift)}")
    if stopped_early:
        print(f"note: stopped before max_iter (SciPy's ftol, or tol): {', '.join(stopped_early)}")
    if args.json:
        doc = {"command": PROG + "".join(" " + shlex.quote(a) for a in argv),
               "settings": {**params, "hidden_layer_sizes": list(args.hidden_layer_sizes), "repeats": args.repeats,
                            "threads": args.threads, "threads_limited": args.threads_limited,
                            "trace_max_iter": args.trace_max_iter, "data": "load_digits, X / 16"},
               "machine": machine_info([resolve_backend(b) for b in args.backends]),
               "load_average": {"before": load_before, "after": load_after},
               "sklearn": {"loss": sk_loss, "n_iter": int(sk.n_iter_), "fit_s": sk_t.median,
                           "warm_up_fit_s": sk_t.first_call, "timing": sk_t.to_dict()},
               "stopped_before_max_iter": stopped_early, "results": results}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Returns 0, or 2 on a bad option."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # every option's value is checked by its type ...
        check_args(parser, args)  # ... and the backends (each must work here), here
    except SystemExit as exc:  # --help, or a usage error argparse has already reported
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        args.threads_limited = set_threads(args.threads)  # after check_args loaded the backends (Numba)
        return run(args, argv)
    finally:
        restore_threads()


if __name__ == "__main__":
    sys.exit(main())
