#!/usr/bin/env python
"""Time one full training step (``net.train_step_device``, SGD) on several backends, same run.

    python benchmarks/compare_train_step.py --backends numpy numba
    python benchmarks/compare_train_step.py --backends numpy numba --cold     # JIT from scratch

For each network the batch is put on the backend once; every backend then gets the same
weights, the same batch and ``bp.SGD(lr=0.01)``. The first step of a backend is timed on its
own (it includes JIT compilation, or loading Numba's cache) and reported separately; then
``--warmup`` more steps, then ``--rounds`` rounds in which the backends take turns running
``--steps`` steps each (interleaved, so drift in the machine's load hits all of them alike).
Reported: the median (and min) over rounds of the time per step, and each backend's ratio to
the first backend listed, both as a ratio of medians and as the median of the per-round ratios
(each round times the backends back to back, so that ratio is robust to a machine whose load
drifts). The load average is printed before and after: on a shared machine, compare only
figures taken in one run.

``--cold`` points ``NUMBA_CACHE_DIR`` at a fresh temporary folder before Numba is imported,
so the first-step column shows real compile time rather than a cache load.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = [
    ([784, 256, 256, 10], 256),
    ([784, 1024, 1024, 10], 1024),
    ([64] * 6, 8192),
]


def parse_config(text: str) -> tuple[list[int], int]:
    """``784,256,256,10@256`` -> ([784, 256, 256, 10], 256)."""
    sizes, batch = text.split("@")
    return [int(s) for s in sizes.split(",")], int(batch)


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on Windows
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["numpy", "numba"])
    ap.add_argument("--config", action="append", type=parse_config,
                    help="sizes@batch, e.g. 784,256,256,10@256 (repeatable; default: the three standard nets)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--steps", type=int, default=0, help="steps per round (default: about 0.05 s worth)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="compile Numba kernels from scratch (fresh cache dir)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    if args.cold:
        cache = tempfile.mkdtemp(prefix="numba-cold-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["NUMBA_CACHE_DIR"] = cache
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import backprop as bp

    configs = args.config or CONFIGS
    backends = [bp.set_backend(name) for name in args.backends]
    print(f"python {platform.python_version()}, numpy {np.__version__}, cpu count {os.cpu_count()}, "
          f"dtype {args.dtype}")
    try:
        import numba

        print(f"numba {numba.__version__}, threads {numba.get_num_threads()}, "
              f"cache {'fresh (cold)' if args.cold else 'default (may be warm)'}")
    except ImportError:
        pass
    print(f"load average before: {load_average()}")
    results = []
    for sizes, batch in configs:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(batch, sizes[0])).astype(args.dtype)
        T = np.eye(sizes[-1], dtype=args.dtype)[rng.integers(0, sizes[-1], batch)]
        nets, data, first = {}, {}, {}
        for be in backends:
            net = bp.MLP(sizes, activation="relu", output="softmax", loss="cross_entropy", dtype=args.dtype,
                         seed=0, backend=be.name)
            k = be.kernels
            x, t = k.to_device(X, args.dtype), k.to_device(T, args.dtype)
            opt = bp.SGD(lr=0.01)
            be.synchronize()
            t0 = time.perf_counter()
            net.train_step_device(x, t, opt)
            be.synchronize()
            first[be.name] = time.perf_counter() - t0
            for _ in range(args.warmup):
                net.train_step_device(x, t, opt)
            be.synchronize()
            nets[be.name], data[be.name] = (net, opt), (x, t)
        steps = args.steps
        if steps <= 0:  # about 0.05 s per block on the slowest backend (median of 5 timed steps)
            worst = 0.0
            for be in backends:
                net, opt = nets[be.name]
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    net.train_step_device(*data[be.name], opt)
                    be.synchronize()
                    times.append(time.perf_counter() - t0)
                worst = max(worst, statistics.median(times))
            steps = max(1, min(200, int(0.05 / max(worst, 1e-6))))
        per_step: dict[str, list[float]] = {be.name: [] for be in backends}
        for _ in range(args.rounds):
            for be in backends:
                net, opt = nets[be.name]
                x, t = data[be.name]
                be.synchronize()
                t0 = time.perf_counter()
                for _ in range(steps):
                    net.train_step_device(x, t, opt)
                be.synchronize()
                per_step[be.name].append((time.perf_counter() - t0) / steps)
        first_name = backends[0].name
        base = statistics.median(per_step[first_name])
        label = f"{sizes} batch {batch}"
        print(f"\n{label}: {args.rounds} rounds x {steps} steps")
        print(f"  {'backend':<12} {'median ms':>10} {'min ms':>9} {'ratio':>7} {'paired':>7} {'first step s':>13}")
        for be in backends:
            times = per_step[be.name]
            med = statistics.median(times)
            paired = statistics.median(a / b for a, b in zip(per_step[first_name], times))
            print(f"  {be.name:<12} {med * 1e3:>10.3f} {min(times) * 1e3:>9.3f} {base / med:>6.2f}x "
                  f"{paired:>6.2f}x {first[be.name]:>13.3f}")
            results.append({"config": label, "backend": be.name, "median_ms": med * 1e3, "min_ms": min(times) * 1e3,
                            "ratio": base / med, "paired_ratio": paired, "first_step_s": first[be.name],
                            "steps_per_round": steps, "rounds": args.rounds})
    print(f"\nload average after: {load_average()}")
    print("ratio = median of the first backend listed / median of this one (above 1: faster); paired = median over "
          "rounds of the same ratio within a round (robust to load that drifts between rounds)")
    if args.json:
        args.json.write_text(json.dumps({"load_average": load_average(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
