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

``--against REV`` compares this checkout's working tree with git revision ``REV``, in one run:

    python benchmarks/compare_train_step.py --backends numba --against HEAD~1

Each version is copied into a temporary folder (with its own Numba cache) and runs in a worker process of
its own; the workers build the same network, then take turns, round after round (the order alternating),
each timing ``--steps`` steps of its own and reporting the time per step. Reported per backend and network:
the median per step of each version and the ratio ``REV / working tree`` (above 1: the working tree is
faster), as a ratio of medians and as the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = [
    ([784, 256, 256, 10], 256),
    ([784, 1024, 1024, 10], 1024),
    ([64] * 6, 8192),
]


#: The optimizers a step may use, by name.
OPTIMIZERS = {
    "sgd": lambda bp: bp.SGD(lr=0.01),
    "momentum": lambda bp: bp.SGD(lr=0.01, momentum=0.9),
    "adam": lambda bp: bp.Adam(lr=1e-3),
}


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
    ap.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZERS), help="the step's optimizer")
    ap.add_argument("--against", metavar="REV", help="compare the working tree with git revision REV (see above)")
    ap.add_argument("--worker", metavar="SITE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    if args.against:
        return _against(args)

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
            opt = OPTIMIZERS[args.optimizer](bp)
            ops[be.name] = (lambda n, a, b, o: lambda: n.train_step_device(a, b, o))(net, x, t, opt)
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


# --------------------------------------------------------------------------- --against
def _copy_site(src: Path, site: Path) -> None:
    """Lay out an importable ``backprop`` package from a tree's ``backprop/`` and ``kernels/`` folders."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")
    shutil.copytree(src / "backprop", site / "backprop", ignore=ignore)
    shutil.copytree(src / "kernels", site / "backprop" / "kernels", ignore=ignore)


def _site_of_revision(root: Path, rev: str, dest: Path) -> None:
    tar = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", rev, "backprop", "kernels"],
                         capture_output=True, check=False)
    if tar.returncode != 0:
        raise SystemExit(f"--against: git archive {rev} failed: {tar.stderr.decode().strip()}")
    src = dest / "src"
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        archive.extractall(src, filter="data")
    _copy_site(src, dest / "site")


class _Worker:
    """A process that runs one version's training step on request."""

    def __init__(self, site: Path, cache: Path, job: dict) -> None:
        env = {**os.environ, "PYTHONPATH": str(site), "NUMBA_CACHE_DIR": str(cache), "BACKPROP_QUIET": "1"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(site)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd="/")
        self.first_step = float(self.ask(json.dumps(job)))

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise SystemExit(f"a worker stopped (exit {self.proc.wait()})")
        return answer.strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _worker(site: str) -> int:
    """Build the job's network from ``site``'s backprop, then time ``N`` steps for each line ``N`` read."""
    import backprop as bp

    if not str(Path(bp.__file__).resolve()).startswith(str(Path(site).resolve())):
        raise SystemExit(f"the worker imported backprop from {bp.__file__}, not from {site}")
    job = json.loads(sys.stdin.readline())
    be = bp.set_backend(job["backend"])
    sizes, batch, dtype = job["sizes"], job["batch"], job["dtype"]
    rng = np.random.default_rng(0)
    X = rng.normal(size=(batch, sizes[0])).astype(dtype)
    T = np.eye(sizes[-1], dtype=dtype)[rng.integers(0, sizes[-1], batch)]
    net = bp.MLP(sizes, activation="relu", output="softmax", loss="cross_entropy", dtype=dtype, seed=0,
                 backend=be.name)
    k = be.kernels
    x, t = k.to_device(X, dtype), k.to_device(T, dtype)
    opt = OPTIMIZERS[job["optimizer"]](bp)

    def run(n: int) -> float:
        be.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            net.train_step_device(x, t, opt)
        be.synchronize()
        return (time.perf_counter() - t0) / n

    print(run(1), flush=True)  # the first step: compilation or a cache load
    for line in sys.stdin:
        print(run(int(line)), flush=True)
    return 0


def _against(args: argparse.Namespace) -> int:
    from backprop.bench.machine import load_average
    from backprop.bench.timing import Timing, paired_ratio

    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="compare-against-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    _copy_site(root, tmp / "this" / "site")
    _site_of_revision(root, args.against, tmp / "base")
    names = {"this": "working tree", "base": args.against}
    print(f"{names['this']} against {args.against}: dtype {args.dtype}, optimizer {args.optimizer}, "
          f"{args.rounds} rounds; load average before: {load_average()}")
    results = []
    for backend in args.backends:
        for sizes, batch in args.config or CONFIGS:
            job = {"backend": backend, "sizes": sizes, "batch": batch, "dtype": args.dtype,
                   "optimizer": args.optimizer}
            workers = {v: _Worker(tmp / v / "site", tmp / v / "numba-cache", job) for v in ("this", "base")}
            try:
                for w in workers.values():
                    for _ in range(max(0, args.warmup)):
                        w.ask("1")
                est = min(float(w.ask("3")) for w in workers.values())
                steps = args.steps or max(1, int(0.05 / max(est, 1e-9)))
                samples: dict[str, list[float]] = {v: [] for v in workers}
                for i in range(args.rounds):
                    for v in (("this", "base") if i % 2 == 0 else ("base", "this")):
                        samples[v].append(float(workers[v].ask(str(steps))))
            finally:
                for w in workers.values():
                    w.close()
            this, base = Timing(samples["this"], steps), Timing(samples["base"], steps)
            row = {"backend": backend, "config": f"{sizes} batch {batch}", "steps_per_round": steps,
                   "this_ms": this.median * 1e3, "base_ms": base.median * 1e3, "ratio": base.median / this.median,
                   "paired_ratio": paired_ratio(base, this), "this": this.to_dict(), "base": base.to_dict()}
            results.append(row)
            print(f"{backend:<8} {row['config']:<32} this {row['this_ms']:8.3f} ms  {args.against} "
                  f"{row['base_ms']:8.3f} ms  ratio {row['ratio']:.3f}  paired {row['paired_ratio']:.3f}")
    print(f"load average after: {load_average()}")
    print(f"ratio = {args.against}'s median / the working tree's (above 1: the working tree is faster)")
    if args.json:
        args.json.write_text(json.dumps({"against": args.against, "dtype": args.dtype, "optimizer": args.optimizer,
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
