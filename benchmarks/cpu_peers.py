#!/usr/bin/env python
"""The CPU path against its peers, in one run: the SGEMM rate, each CPU path's training step against PyTorch's, and
the scikit-learn estimators against scikit-learn's.

    python benchmarks/cpu_peers.py                                         # 1 and 2 threads, both parts
    python benchmarks/cpu_peers.py --json benchmarks/results/cpu/cpu_peers.json
    python benchmarks/cpu_peers.py --quick                                 # a smoke run (small shapes, 2 rounds)

**Steps** (per thread count, every pool limited to it: BLAS and OpenMP through threadpoolctl, Numba, PyTorch's
intra-op pool): first the SGEMM rate (``2048 x 2048`` float32 ``np.matmul``, the ceiling of every figure), then
one training step (float32, SGD) of each shape in :data:`SHAPES` on each path: the ``numpy`` and ``numba``
backends layer by layer, the ``numba`` backend's fused passes (``set_fused_mlp(True)``), and PyTorch's CPU step
(``zero_grad``, forward, loss, ``backward``, ``SGD.step``). backprop is timed through ``train_step_device`` (the
kernels on arrays already on the backend, as ``fit`` runs them), and the gradient alone (forward, error, backward)
against the forward pass alone: ``grad / fwd``, the notes' cost ratio. All paths take turns in ``--rounds``
interleaved rounds (each sample at least ``--sample-ms``); medians. A step's FLOPs are
``2 B sum(n_in n_out)`` (forward) ``+`` the same (weight gradients) ``+ 2 B sum`` over the layers after the first
(delta); ``% SGEMM`` = the step's FLOP rate over the SGEMM rate measured at the same thread count.

**Estimators**: ``backprop.sklearn.MLPClassifier`` on the default backend (what ``pip install -e ".[numba]"``
gives) against ``sklearn.neural_network.MLPClassifier``, float32 data in both, an MNIST-sized problem
(``--samples`` rows of 784 features, 10 classes, ``make_classification`` with 60 informative features), hidden
``(256, 256)``, batch 256, Adam, ``--epochs`` epochs, no early stopping: fit time (median of ``--fits``) and test
accuracy on 20% held out.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import backprop as bp
from backprop import step
from backprop.backend import resolve_backend
from backprop.bench.cli import doc_parser, json_path
from backprop.bench.machine import machine_info, restore_threads, set_threads

#: (name, sizes, batch): narrow and deep, MNIST-like, GEMM-bound.
SHAPES = [("narrow", [64] * 6 + [1], 8192), ("mnist_like", [784, 256, 256, 10], 256),
          ("gemm_bound", [784, 1024, 1024, 10], 1024)]
QUICK_SHAPES = [("narrow", [32] * 4 + [1], 1024), ("mnist_like", [784, 64, 10], 128)]
#: The paths of a step: (label, backend, fused switch).
PATHS = [("numpy", "numpy", False), ("numba", "numba", False), ("numba fused", "numba", True)]


def step_flops(sizes: list[int], batch: int) -> float:
    """FLOPs of one training step: forward and weight gradients ``2 B n_in n_out`` each, delta after layer 1."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    return 2.0 * batch * (2 * sum(i * o for i, o in pairs) + sum(i * o for i, o in pairs[1:]))


def sample(fn: Callable[[], Any], min_s: float) -> float:
    """Seconds per call of ``fn``, calling it until ``min_s`` has passed (at least once)."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / n


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, min_s: float) -> dict[str, float]:
    """Median seconds per call of each of ``fns``, all taking turns in each round (two warm-up calls each)."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(sample(fn, min_s))
    return {k: statistics.median(v) for k, v in times.items()}


def sgemm_rate(rounds: int) -> float:
    """FLOP/s of a ``2048 x 2048`` float32 GEMM through NumPy's BLAS (median of ``rounds``)."""
    rng = np.random.default_rng(0)
    a, b = rng.random((2048, 2048), dtype=np.float32), rng.random((2048, 2048), dtype=np.float32)
    out = np.empty_like(a)
    t = interleaved({"sgemm": lambda: np.matmul(a, b, out=out)}, rounds, 0.05)["sgemm"]
    return 2.0 * 2048**3 / t


def _torch_step(sizes: list[int], x: np.ndarray, t: np.ndarray) -> Callable[[], Any] | None:
    try:
        import torch
    except ImportError:
        return None
    layers: list[Any] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)

    def run() -> float:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xt), tt)
        loss.backward()
        opt.step()
        return float(loss.item())

    return run


def measure_steps(shapes: list[tuple[str, list[int], int]], threads: int, rounds: int, min_s: float) -> dict:
    """One thread count's SGEMM rate and its rows of step timings (module docstring)."""
    import numba

    set_threads(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    numba_kernels = resolve_backend("numba").kernels if "numba" in bp.available_backends() else None
    rate = sgemm_rate(rounds)
    rows = []
    rng = np.random.default_rng(1)
    for name, sizes, batch in shapes:
        x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
        t = rng.standard_normal((batch, sizes[-1])).astype(np.float32)
        fns: dict[str, Callable[[], Any]] = {}
        grads: dict[str, Callable[[], Any]] = {}
        fwds: dict[str, Callable[[], Any]] = {}
        for label, backend, fused in PATHS:
            if backend not in bp.available_backends():
                continue
            calls = _backprop_calls(sizes, backend, fused, x, t, numba_kernels)
            if calls is not None:
                fns[label], grads[label], fwds[label] = calls
        peer = _torch_step(sizes, x, t)
        if peer is not None:
            fns["torch"] = peer
        steps = interleaved(fns, rounds, min_s)
        costs = interleaved({**{f"{k} grad": v for k, v in grads.items()},
                             **{f"{k} fwd": v for k, v in fwds.items()}}, rounds, min_s)
        flops = step_flops(sizes, batch)
        for label, seconds in steps.items():
            row = {"shape": name, "sizes": sizes, "batch": batch, "threads": threads, "path": label,
                   "step_ms": seconds * 1e3, "gflops": flops / seconds / 1e9, "sgemm_pct": 100 * flops / seconds / rate}
            if "torch" in steps and label != "torch":
                row["torch_over_path"] = steps["torch"] / seconds
            if f"{label} grad" in costs:
                row["grad_over_fwd"] = costs[f"{label} grad"] / costs[f"{label} fwd"]
            rows.append(row)
            print(_step_line(row), flush=True)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    restore_threads()
    return {"threads": threads, "sgemm_gflops": rate / 1e9, "rows": rows}


def _backprop_calls(sizes: list[int], backend: str, fused: bool, x: np.ndarray, t: np.ndarray,
                    numba_kernels: Any) -> tuple[Callable[[], Any], ...] | None:
    """``(step, gradient, forward)`` of a fresh network on one path, each switching the fused passes as the path
    wants before it runs (the paths take turns in one process); ``None`` for the fused path of a network it does not
    serve (a layer wider than the fused kernels take)."""
    net = bp.MLP(sizes, activation="relu", output="identity", loss="mse", backend=backend, dtype="float32", seed=0)
    k = net.backend.kernels
    if fused and k.fused_mlp_reason(net.sizes, [L.activation.name for L in net.layers], net.dtype):
        return None
    xd, td = k.to_device(x, net.dtype), k.to_device(t, net.dtype)
    opt = bp.SGD(lr=1e-4)
    ws = step.workspace(net, x.shape[0])

    def switch() -> None:
        if numba_kernels is not None:
            numba_kernels.set_fused_mlp(fused)

    def train() -> None:
        switch()
        net.train_step_device(xd, td, opt)

    def gradient() -> None:
        switch()
        step.gradients(net, ws, xd, td)

    def forward() -> None:
        switch()
        step.forward(net, ws, xd, keep=False)

    return train, gradient, forward


def _step_line(r: dict[str, Any]) -> str:
    extra = f", torch/path {r['torch_over_path']:.2f}x" if "torch_over_path" in r else ""
    extra += f", grad/fwd {r['grad_over_fwd']:.2f}" if "grad_over_fwd" in r else ""
    return (f"{r['threads']}T {r['shape']:10s} {r['path']:12s} {r['step_ms']:8.3f} ms  {r['gflops']:6.1f} GFLOP/s "
            f"({r['sgemm_pct']:.0f}% SGEMM){extra}")


def mnist_sized(samples: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """An MNIST-sized 10-class problem: ``samples`` rows of 784 float32 features in ``[0, 1]``; 80/20 split."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    X, y = make_classification(n_samples=samples, n_features=784, n_informative=60, n_redundant=20,
                               n_classes=10, n_clusters_per_class=2, class_sep=1.5, random_state=seed)
    X = (X - X.min(axis=0)) / (np.ptp(X, axis=0) + 1e-12)
    return tuple(train_test_split(X.astype(np.float32), y, test_size=0.2, random_state=seed))


def measure_estimators(samples: int, epochs: int, fits: int) -> list[dict[str, Any]]:
    """Fit time and test accuracy of both estimators on :func:`mnist_sized` (module docstring)."""
    from sklearn.neural_network import MLPClassifier as SkMLP

    from backprop.sklearn import MLPClassifier as BpMLP

    X_train, X_test, y_train, y_test = mnist_sized(samples)
    params = dict(hidden_layer_sizes=(256, 256), batch_size=256, max_iter=epochs, random_state=0, tol=0.0,
                  n_iter_no_change=epochs + 1)
    makers = {"scikit-learn": lambda: SkMLP(**params),
              f"backprop ({bp.get_backend().name})": lambda: BpMLP(**params, dtype="float32")}
    BpMLP(hidden_layer_sizes=(8,), max_iter=1, dtype="float32").fit(X_train[:512], y_train[:512])  # compile once
    times: dict[str, list[float]] = {k: [] for k in makers}
    scores: dict[str, list[float]] = {k: [] for k in makers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter reached before convergence: wanted here
        for _ in range(fits):
            for name, make in makers.items():
                est = make()
                start = time.perf_counter()
                est.fit(X_train, y_train)
                times[name].append(time.perf_counter() - start)
                scores[name].append(float(est.score(X_test, y_test)))
    ref = statistics.median(times["scikit-learn"])
    rows = []
    for name in makers:
        row = {"estimator": name, "fit_s": statistics.median(times[name]), "accuracy": statistics.median(scores[name]),
               "samples": samples, "epochs": epochs, "speedup_vs_sklearn": ref / statistics.median(times[name])}
        rows.append(row)
        print(f"{name:22s} fit {row['fit_s']:.3f} s  accuracy {row['accuracy']:.4f}  "
              f"{row['speedup_vs_sklearn']:.2f}x scikit-learn", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = doc_parser("cpu_peers.py", __doc__)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--sample-ms", type=float, default=60.0, help="least time of one sample (default 60)")
    parser.add_argument("--parts", default="steps,estimators", help="steps, estimators or both (default)")
    parser.add_argument("--samples", type=int, default=25000, help="rows of the estimators' problem (default 25000)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each fit (default 8)")
    parser.add_argument("--fits", type=int, default=3, help="fits of each estimator (default 3)")
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds, a small problem")
    parser.add_argument("--json", type=json_path, help="also write the figures (and a .md table beside them)")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"steps", "estimators"} or not parts:
        parser.error(f"--parts takes steps and/or estimators, got {args.parts!r}")
    if min(args.threads) < 1 or args.rounds < 1 or args.fits < 1 or args.epochs < 1 or args.samples < 100:
        parser.error("--threads, --rounds, --fits and --epochs must be at least 1, --samples at least 100")
    if args.quick:
        args.rounds, args.sample_ms, args.samples, args.epochs, args.fits = 2, 5.0, 2000, 1, 1
    shapes = QUICK_SHAPES if args.quick else SHAPES
    doc: dict[str, Any] = {"machine": machine_info(), "command": " ".join(["python benchmarks/cpu_peers.py",
                                                                          *(argv or sys.argv[1:])])}
    if "steps" in parts:
        doc["steps"] = [measure_steps(shapes, n, args.rounds, args.sample_ms / 1e3) for n in args.threads]
    if "estimators" in parts:
        doc["estimators"] = measure_estimators(args.samples, args.epochs, args.fits)
    doc["machine_after"] = {"load_average": machine_info()["load_average"]}
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        Path(args.json).with_suffix(".md").write_text(markdown(doc))
    return 0


def markdown(doc: dict[str, Any]) -> str:
    """The tables of a run, with the machine and versions."""
    m = doc["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    md = [f"# The CPU path against its peers ({m['date'][:10]})", "",
          f"- machine: {m['cpu']}, {m['cpus_usable']} CPUs usable; {m['platform']}; Python {m['python']}",
          f"- versions: {versions}", f"- backprop {m['backprop']} ({m['git_commit']})",
          f"- load average at start {m['load_average']}, at end {doc['machine_after']['load_average']}",
          f"- command: `{doc['command']}`", ""]
    for block in doc.get("steps", []):
        md += [f"## Training step, {block['threads']} thread(s): SGEMM {block['sgemm_gflops']:.0f} GFLOP/s", "",
               "| shape | sizes @ batch | path | step ms | GFLOP/s | % SGEMM | torch / path | grad / fwd |",
               "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in block["rows"]:
            ratio = f"{r['torch_over_path']:.2f}x" if "torch_over_path" in r else ""
            gf = f"{r['grad_over_fwd']:.2f}" if "grad_over_fwd" in r else ""
            md.append(f"| {r['shape']} | {r['sizes']} @ {r['batch']} | {r['path']} | {r['step_ms']:.3f} | "
                      f"{r['gflops']:.1f} | {r['sgemm_pct']:.0f}% | {ratio} | {gf} |")
        md.append("")
    if "estimators" in doc:
        e0 = doc["estimators"][0]
        md += [f"## Estimators: MNIST-sized problem ({e0['samples']} rows x 784, 10 classes, (256, 256), batch 256, "
               f"Adam, {e0['epochs']} epochs, float32)", "",
               "| estimator | fit s | test accuracy | speed-up over scikit-learn |", "|---|---:|---:|---:|"]
        md += [f"| {r['estimator']} | {r['fit_s']:.3f} | {r['accuracy']:.4f} | {r['speedup_vs_sklearn']:.2f}x |"
               for r in doc["estimators"]]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
