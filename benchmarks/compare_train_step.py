#!/usr/bin/env python
"""Time one full training step (``net.train_step_device``, SGD) on several backends, same run.

    python benchmarks/compare_train_step.py --backends numpy numba
    python benchmarks/compare_train_step.py --backends numpy numba --cold     # JIT from scratch

For each network the batch is put on the backend once; every backend then gets the same
weights, the same batch and ``bp.SGD(lr=0.01)``. The timing is :func:`backprop.bench.timing.time_ops`:
the first step of a backend is timed on its own (it includes JIT compilation, or loading Numba's
cache) and reported separately; then ``--warmup`` more steps, then ``--rounds`` rounds in which the
backends take turns running ``--steps`` steps each (default: enough for about 0.05 s; interleaved, so
drift in the machine's load hits all of them alike), each bracketed by the backend's synchronisation.
Reported: the median (and min) over rounds of the time per step, and each backend's ratio to the
first backend listed, both as a ratio of medians and as the median of the per-round ratios (each
round times the backends back to back, so that ratio is robust to a machine whose load drifts). The
load average is printed before and after: on a shared machine, compare only figures taken in one run.
``--json`` also writes the figures with the machine's description (:func:`backprop.bench.machine.machine_info`).

``--cold`` points ``NUMBA_CACHE_DIR`` at a fresh temporary folder before Numba is imported,
so the first-step column shows real compile time rather than a cache load.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
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
    try:
        import backprop as bp
    except ImportError:  # a checkout that is not installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import backprop as bp
    from backprop.bench.machine import load_average, machine_info
    from backprop.bench.timing import paired_ratio, time_ops

    configs = args.config or CONFIGS
    backends = [bp.set_backend(name) for name in args.backends]
    machine = machine_info(backends)
    print(f"python {machine['python']}, numpy {np.__version__}, cpu count {machine['cpu_count']}, dtype {args.dtype}")
    if "numba" in sys.modules:
        import numba

        print(f"numba {numba.__version__}, threads {numba.get_num_threads()}, "
              f"cache {'fresh (cold)' if args.cold else 'default (may be warm)'}")
    load_before = load_average()
    print(f"load average before: {load_before}")

    def sync() -> None:
        for be in backends:
            be.synchronize()

    results = []
    for sizes, batch in configs:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(batch, sizes[0])).astype(args.dtype)
        T = np.eye(sizes[-1], dtype=args.dtype)[rng.integers(0, sizes[-1], batch)]
        ops = {}
        for be in backends:
            net = bp.MLP(sizes, activation="relu", output="softmax", loss="cross_entropy", dtype=args.dtype,
                         seed=0, backend=be.name)
            k = be.kernels
            x, t = k.to_device(X, args.dtype), k.to_device(T, args.dtype)
            ops[be.name] = (lambda n, a, b, o: lambda: n.train_step_device(a, b, o))(net, x, t, bp.SGD(lr=0.01))
        timings = time_ops(ops, repeats=args.rounds, warmup=args.warmup, min_sample_time=0.05,
                           inner=args.steps or None, sync=sync)
        first_name = backends[0].name
        base = timings[first_name]
        label = f"{sizes} batch {batch}"
        steps = ", ".join(f"{name} {t.inner}" for name, t in timings.items())
        print(f"\n{label}: {args.rounds} rounds; steps per round: {steps}")
        print(f"  {'backend':<12} {'median ms':>10} {'min ms':>9} {'ratio':>7} {'paired':>7} {'first step s':>13}")
        for name, t in timings.items():
            paired = paired_ratio(base, t)
            print(f"  {name:<12} {t.median * 1e3:>10.3f} {t.min * 1e3:>9.3f} {base.median / t.median:>6.2f}x "
                  f"{paired:>6.2f}x {t.first_call:>13.3f}")
            results.append({"config": label, "backend": name, "median_ms": t.median * 1e3, "min_ms": t.min * 1e3,
                            "ratio": base.median / t.median, "paired_ratio": paired, "first_step_s": t.first_call,
                            "steps_per_round": t.inner, "rounds": args.rounds, "timing": t.to_dict()})
    load_after = load_average()
    print(f"\nload average after: {load_after}")
    print("ratio = median of the first backend listed / median of this one (above 1: faster); paired = median over "
          "rounds of the same ratio within a round (robust to load that drifts between rounds)")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                                         "machine": machine, "load_average": {"before": load_before,
                                                                              "after": load_after},
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
