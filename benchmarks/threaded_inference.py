#!/usr/bin/env python
"""Inference from two Python threads against one, the same total work, on one shared network.

    python benchmarks/threaded_inference.py                       # numpy, numba and torch
    python benchmarks/threaded_inference.py --json benchmarks/results/cpu/threaded_inference.json

Each framework holds one network; ``2 C`` inference calls on a batch of ``--batch`` rows are timed as one
thread making all of them, then as two threads making ``C`` each (started together at a barrier). The
two layouts take turns for ``--rounds`` rounds (interleaved, so drift in the machine's load hits both
alike); reported: the median time of each and the speed-up ``one thread / two threads`` (2.0 is perfect:
the calls ran at the same time; 1.0: they ran one after another, as Python code holding the GIL does).

The BLAS pool (threadpoolctl) and PyTorch's intra-op pool are limited to one thread, so that the only
parallelism measured is that of the two Python threads: the GEMMs release the GIL (NumPy's BLAS, PyTorch),
and so do the Numba kernels (``nogil=True``). backprop is timed through ``MLP.predict`` (host arrays in
and out: the checks and the copy included) and ``MLP.forward_device`` (the kernels alone, each thread in
its own workspace); PyTorch through ``model(x)`` under ``torch.inference_mode()``.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import backprop as bp
from backprop.bench.cli import doc_parser, json_path
from backprop.bench.machine import machine_info, set_threads

NETS = {
    "narrow_deep": ([64] * 6 + [1], "tanh", "regression"),
    "mnist_like": ([784, 256, 256, 10], "relu", "multiclass"),
}


def _time(fn: Callable[[], Any], calls: int, threads: int) -> float:
    """Seconds for ``calls`` calls of ``fn`` shared out over ``threads`` threads started at a barrier."""
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        for _ in range(calls // threads):
            fn()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return time.perf_counter() - start


def _compare(fn: Callable[[], Any], rounds: int, seconds: float) -> dict[str, float]:
    """Median seconds per call on one thread and on two (same total calls), and the speed-up."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    calls = max(2, 2 * int(seconds / max(time.perf_counter() - t0, 1e-6) / 2))
    one, two = [], []
    for r in range(rounds):
        for threads in ((1, 2) if r % 2 == 0 else (2, 1)):
            (one if threads == 1 else two).append(_time(fn, calls, threads) / calls)
    m1, m2 = statistics.median(one), statistics.median(two)
    return {"calls": calls, "one_thread_ms_per_call": m1 * 1e3, "two_threads_ms_per_call": m2 * 1e3,
            "speedup": m1 / m2}


def _torch_twin(net: bp.MLP) -> tuple[Any, Any] | None:
    """The PyTorch model of ``net`` (same weights) and ``torch``, or ``None`` without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    acts = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}
    layers: list[Any] = []
    for i, (W, b) in enumerate(net.get_params()):
        lin = torch.nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if i < len(net.layers) - 1:
            layers.append(acts[net.layers[i].activation.name]())
    return torch.nn.Sequential(*layers).eval(), torch


def main(argv: list[str] | None = None) -> int:
    parser = doc_parser("threaded_inference.py", __doc__)
    parser.add_argument("--backends", nargs="+", default=["numpy", "numba"], choices=["numpy", "numba"])
    parser.add_argument("--batch", type=int, default=256, help="rows per call (default 256)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of each layout (default 7)")
    parser.add_argument("--seconds", type=float, default=0.3, help="about how long one layout runs (default 0.3)")
    parser.add_argument("--json", type=json_path, help="also write the figures (and a .md table beside them)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or not args.seconds > 0:
        parser.error("--batch and --rounds must be at least 1, --seconds positive")
    limited = set_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for name, (sizes, act, head) in NETS.items():
        X = rng.normal(size=(args.batch, sizes[0])).astype(np.float32)
        ref = None
        for backend in args.backends:
            net = bp.MLP(sizes, act, head=head, backend=backend, seed=0)
            ref = net
            x = net.backend.kernels.to_device(X, net.dtype)
            for api, fn in (("predict", lambda: net.predict(X)), ("forward_device", lambda: net.forward_device(x))):
                rows.append({"net": name, "framework": f"backprop {backend}", "call": api,
                             **_compare(fn, args.rounds, args.seconds)})
                print(_line(rows[-1]), flush=True)
        twin = _torch_twin(ref) if ref is not None else None
        if twin is not None:
            model, torch = twin
            xt = torch.from_numpy(X)

            def infer() -> Any:
                with torch.inference_mode():
                    return model(xt)

            rows.append({"net": name, "framework": "torch", "call": "model(x)",
                         **_compare(infer, args.rounds, args.seconds)})
            print(_line(rows[-1]), flush=True)
    if args.json is not None:
        info = machine_info()
        args.json.write_text(json.dumps({"machine": info, "limited": limited, "batch": args.batch, "rows": rows},
                                        indent=1) + "\n")
        md = [f"# Inference from two threads against one ({info['date'][:10]}, {info['cpu']}, "
              f"{info['cpus_usable']} CPUs usable, batch {args.batch}, BLAS and torch on one thread each)", "",
              "`python benchmarks/threaded_inference.py --json ...`: median ms per call, same total calls; "
              "speed-up = one thread / two threads (2.0: the calls ran at the same time).", "",
              "| net | framework | call | one thread ms | two threads ms | speed-up |", "|---|---|---|---|---|---|"]
        md += [f"| {r['net']} | {r['framework']} | {r['call']} | {r['one_thread_ms_per_call']:.3f} | "
               f"{r['two_threads_ms_per_call']:.3f} | {r['speedup']:.2f}x |" for r in rows]
        Path(args.json).with_suffix(".md").write_text("\n".join(md) + "\n")
    return 0


def _line(r: dict[str, Any]) -> str:
    return (f"{r['net']:12s} {r['framework']:16s} {r['call']:15s} one thread {r['one_thread_ms_per_call']:.3f} ms, "
            f"two threads {r['two_threads_ms_per_call']:.3f} ms per call: {r['speedup']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
