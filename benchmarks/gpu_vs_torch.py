"""Time a training step of backprop's ``cupy`` backend against PyTorch eager on the same GPU.

    python benchmarks/gpu_vs_torch.py [--out DIR] [--repeats N] [--quick] [--no-torch] [--no-tf32]

For each network (float32, plain SGD, the loss read back to the host every step, as both
``MLP.train_step`` and a typical PyTorch loop do) it measures, in one run and interleaved:

* the step of ``backprop`` (``net.train_step_device`` on device arrays) and of PyTorch eager
  (``nn.Sequential`` of ``Linear`` + activation, ``zero_grad``, forward, loss, ``backward``,
  ``optimizer.step``, ``loss.item()``), TF32 off on both; the ratio torch / backprop (above 1:
  backprop is faster);
* the CUDA-graph step (``graph=True``) against the plain step on the small networks;
* the rate of one large float32 cuBLAS GEMM (4096^3, through the backend's own GEMM call), and the
  fraction of it that a step of the GEMM-bound network reaches (its GEMM flops / its time);
* with TF32 on for both (``--no-tf32`` skips it), the GEMM-bound network again.

Each time is the median over ``--repeats`` repeats of a loop of steps (warm-up first, the device
synchronized around each loop). Results go to ``DIR/gpu_vs_torch.json`` and ``.md`` (``DIR``:
``--out``, else ``$OUT``, else ``bench-out``), with the device, versions and date. Imports CuPy and
PyTorch only when run; without PyTorch the torch columns are left empty.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclass
class Case:
    name: str
    sizes: list[int]
    batch: int
    activation: str
    head: str  # "multiclass" (softmax + cross-entropy) or "regression" (identity + mse)
    graph: bool = False  # also time the CUDA-graph step
    gemm_bound: bool = False


CASES = [
    Case("mnist_like", [784, 1024, 1024, 10], 4096, "relu", "multiclass", graph=True),
    Case("narrow_deep", [64] * 6, 2**18, "relu", "regression"),
    Case("gemm_bound", [4096, 4096, 4096, 4096], 4096, "relu", "regression", gemm_bound=True),
    Case("tiny", [64, 64, 10], 256, "tanh", "multiclass", graph=True),
]
QUICK = {"mnist_like": 1024, "narrow_deep": 2**15, "gemm_bound": 1024, "tiny": 256}


@dataclass
class Result:
    case: str
    sizes: list[int]
    batch: int
    gflop_per_step: float
    backprop_ms: float | None = None
    torch_ms: float | None = None
    torch_over_backprop: float | None = None
    graph_ms: float | None = None
    plain_over_graph: float | None = None
    backprop_tflops: float | None = None
    torch_tflops: float | None = None
    backprop_fraction_of_gemm: float | None = None
    torch_fraction_of_gemm: float | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- timing
def median_step_ms(step: Callable[[], Any], sync: Callable[[], None], repeats: int, min_loop_s: float = 0.2,
                   warmup: int = 3) -> tuple[float, list[float]]:
    """Median time of one step in ms: warm-up, then ``repeats`` loops of n steps (n so that a loop
    lasts about ``min_loop_s``), synchronized before and after each loop."""
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, min(1000, int(min_loop_s / one)))
    samples = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        samples.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(samples), samples


def interleaved(steps: dict[str, Callable[[], Any]], sync: Callable[[], None], repeats: int) -> dict[str, float]:
    """Median step time of each callable, the repeats of all of them interleaved (drift hits all)."""
    for fn in steps.values():  # warm-up, compilation, graph recording
        for _ in range(3):
            fn()
    sync()
    samples: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            med, _ = median_step_ms(fn, sync, 1, warmup=0)
            samples[name].append(med)
    return {k: statistics.median(v) for k, v in samples.items()}


# --------------------------------------------------------------------------- the two sides
def backprop_side(case: Case, batch: int, rng: np.random.Generator, graph: bool = False):
    from backprop import MLP, SGD
    from backprop.backend import resolve_backend

    k = resolve_backend("cupy").kernels
    net = MLP(case.sizes, activation=case.activation, head=case.head, dtype="float32", seed=0, backend="cupy")
    opt = SGD(lr=1e-3)
    X = rng.normal(size=(batch, case.sizes[0])).astype(np.float32)
    if case.head == "multiclass":
        T = np.eye(case.sizes[-1], dtype=np.float32)[rng.integers(0, case.sizes[-1], batch)]
    else:
        T = rng.normal(size=(batch, case.sizes[-1])).astype(np.float32)
    x, t = k.to_device(X, np.float32), k.to_device(T, np.float32)
    if graph:
        return lambda: k.capture_train_step(net, x, t, opt)
    return lambda: net.train_step_device(x, t, opt)


def torch_side(case: Case, batch: int, rng: np.random.Generator):
    import torch

    dev = torch.device("cuda")
    layers: list[Any] = []
    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[case.activation]
    for i, (n_in, n_out) in enumerate(zip(case.sizes[:-1], case.sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(case.sizes) - 2:
            layers.append(act())
    model = torch.nn.Sequential(*layers).to(dev, torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.as_tensor(rng.normal(size=(batch, case.sizes[0])), dtype=torch.float32, device=dev)
    if case.head == "multiclass":
        y = torch.as_tensor(rng.integers(0, case.sizes[-1], batch), dtype=torch.int64, device=dev)
        crit: Any = torch.nn.CrossEntropyLoss()
    else:
        y = torch.as_tensor(rng.normal(size=(batch, case.sizes[-1])), dtype=torch.float32, device=dev)
        crit = torch.nn.MSELoss()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def gemm_rate_tflops(n: int = 4096, repeats: int = 7, tf32: bool = False) -> float:
    """Rate of a float32 n^3 GEMM through the backend's cuBLAS path, in TFLOP/s (CUDA events)."""
    import cupy

    from backprop.kernels import cupy_gpu as k

    rng = np.random.default_rng(0)
    a = cupy.asarray(rng.normal(size=(n, n)), dtype=cupy.float32)
    b = cupy.asarray(rng.normal(size=(n, n)), dtype=cupy.float32)
    out = cupy.empty((n, n), dtype=cupy.float32)
    old = k.tf32_enabled()
    k.set_tf32(tf32)
    try:
        for _ in range(3):
            k._gemm("N", "T", a, b, out)
        times = []
        for _ in range(repeats):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            for _ in range(10):
                k._gemm("N", "T", a, b, out)
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) / 10 / 1e3)
    finally:
        k.set_tf32(old)
    return 2 * n**3 / statistics.median(times) / 1e12


# --------------------------------------------------------------------------- environment
def environment() -> dict[str, Any]:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "compute_capability": cupy.cuda.Device().compute_capability,
        "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
        "cupy": cupy.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
    except ImportError:
        env["torch"] = None
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the machine, or not a checkout
        env["commit"] = None
    return env


def have_torch_cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return False, "PyTorch sees no CUDA device"
    return True, ""


# --------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict[str, Any]:
    from backprop.backend import resolve_backend
    from backprop.kernels import cupy_gpu as k

    resolve_backend("cupy")  # ValueError with the reason when the backend cannot run
    use_torch, torch_reason = (False, "--no-torch") if args.no_torch else have_torch_cuda()
    if use_torch:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch_sync = torch.cuda.synchronize
    k.set_tf32(False)
    sync = k.synchronize

    def both_sync() -> None:
        sync()
        if use_torch:
            torch_sync()

    rng = np.random.default_rng(0)
    report: dict[str, Any] = {"environment": environment(), "torch": use_torch or torch_reason, "results": [],
                              "settings": {"repeats": args.repeats, "quick": args.quick}}
    gemm = gemm_rate_tflops(args.gemm_size, repeats=args.repeats)
    report["gemm_tflops_fp32"] = gemm
    report["gemm_size"] = args.gemm_size
    print(f"cuBLAS float32 GEMM {args.gemm_size}^3: {gemm:.1f} TFLOP/s", flush=True)
    cases = [c for c in CASES if not args.cases or c.name in args.cases]
    for case in cases:
        batch = QUICK[case.name] if args.quick else case.batch
        flops = k.flop_count(case.sizes, batch)
        res = Result(case.name, case.sizes, batch, flops / 1e9)
        steps: dict[str, Callable[[], Any]] = {"backprop": backprop_side(case, batch, rng)}
        if use_torch:
            steps["torch"] = torch_side(case, batch, rng)
        if case.graph:
            steps["graph"] = backprop_side(case, batch, rng, graph=True)
        times = interleaved(steps, both_sync, args.repeats)
        res.backprop_ms = times["backprop"]
        res.backprop_tflops = flops / (times["backprop"] / 1e3) / 1e12
        if "torch" in times:
            res.torch_ms = times["torch"]
            res.torch_over_backprop = times["torch"] / times["backprop"]
            res.torch_tflops = flops / (times["torch"] / 1e3) / 1e12
        if "graph" in times:
            res.graph_ms = times["graph"]
            res.plain_over_graph = times["backprop"] / times["graph"]
        if case.gemm_bound:
            res.backprop_fraction_of_gemm = res.backprop_tflops / gemm
            if res.torch_tflops is not None:
                res.torch_fraction_of_gemm = res.torch_tflops / gemm
        report["results"].append(asdict(res))
        print(json.dumps(asdict(res)), flush=True)
        del steps
    if not args.no_tf32:
        report["tf32"] = tf32_section(args, use_torch, both_sync, rng)
    return report


def tf32_section(args: argparse.Namespace, use_torch: bool, sync: Callable[[], None], rng) -> dict[str, Any]:
    from backprop.kernels import cupy_gpu as k

    case = next(c for c in CASES if c.gemm_bound)
    batch = QUICK[case.name] if args.quick else case.batch
    out: dict[str, Any] = {"gemm_tflops": gemm_rate_tflops(args.gemm_size, repeats=args.repeats, tf32=True),
                           "case": case.name}
    k.set_tf32(True)
    if use_torch:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        steps = {"backprop": backprop_side(case, batch, rng)}
        if use_torch:
            steps["torch"] = torch_side(case, batch, rng)
        times = interleaved(steps, sync, args.repeats)
    finally:
        k.set_tf32(False)
        if use_torch:
            torch.backends.cuda.matmul.allow_tf32 = False
    flops = k.flop_count(case.sizes, batch)
    out["backprop_ms"] = times["backprop"]
    out["backprop_fraction_of_gemm"] = flops / (times["backprop"] / 1e3) / 1e12 / out["gemm_tflops"]
    if "torch" in times:
        out["torch_ms"] = times["torch"]
        out["torch_over_backprop"] = times["torch"] / times["backprop"]
    print("tf32:", json.dumps(out), flush=True)
    return out


def _f(v: Any, fmt: str = ".3g") -> str:
    return "" if v is None else format(v, fmt)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# backprop (cupy) vs PyTorch eager: one training step",
        "",
        f"{env['device']} (compute capability {env['compute_capability']}, {env['memory_gib']} GiB), "
        f"CUDA runtime {env['cuda_runtime']}, driver {env['cuda_driver']}, CuPy {env['cupy']}, "
        f"PyTorch {env.get('torch') or 'not installed'}, NumPy {env['numpy']}, Python {env['python']}; "
        f"{env['date']}, commit {env.get('commit') or 'unknown'}.",
        "",
        "float32, plain SGD, TF32 off, loss read back every step; median of "
        f"{report['settings']['repeats']} interleaved repeats. Ratio = torch time / backprop time "
        "(above 1: backprop faster).",
        "",
        "| network | batch | GFLOP/step | backprop ms | torch ms | torch / backprop | graph ms | plain / graph |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['case']} {r['sizes']} | {r['batch']} | {r['gflop_per_step']:.3g} | {_f(r['backprop_ms'])} "
                     f"| {_f(r['torch_ms'])} | {_f(r['torch_over_backprop'])} | {_f(r['graph_ms'])} "
                     f"| {_f(r['plain_over_graph'])} |")
    lines += ["", f"cuBLAS float32 GEMM {report['gemm_size']}^3: {report['gemm_tflops_fp32']:.1f} TFLOP/s."]
    for r in report["results"]:
        if r["backprop_fraction_of_gemm"] is not None:
            lines.append(f"{r['case']}: backprop reaches {r['backprop_tflops']:.1f} TFLOP/s, "
                         f"{100 * r['backprop_fraction_of_gemm']:.0f}% of that rate"
                         + (f"; torch {r['torch_tflops']:.1f} TFLOP/s, {100 * r['torch_fraction_of_gemm']:.0f}%."
                            if r["torch_tflops"] is not None else "."))
    if "tf32" in report:
        t = report["tf32"]
        lines += ["", f"TF32 on (both): GEMM {t['gemm_tflops']:.1f} TFLOP/s; {t['case']} step backprop "
                      f"{t['backprop_ms']:.3g} ms ({100 * t['backprop_fraction_of_gemm']:.0f}% of the TF32 GEMM rate)"
                  + (f", torch {t['torch_ms']:.3g} ms, torch / backprop {t['torch_over_backprop']:.3g}."
                     if "torch_ms" in t else ".")]
    if report["torch"] is not True:
        lines += ["", f"PyTorch not measured: {report['torch']}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-out",
                   help="directory for gpu_vs_torch.json and .md (default: $OUT, else bench-out)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats per measurement (default 7)")
    p.add_argument("--quick", action="store_true", help="smaller batches, for a smoke run")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    p.add_argument("--no-tf32", action="store_true", help="skip the TF32 measurements")
    p.add_argument("--gemm-size", type=int, default=4096, help="n of the n^3 reference GEMM (default 4096)")
    p.add_argument("--cases", nargs="*", choices=[c.name for c in CASES], help="only these networks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except ValueError as exc:  # the cupy backend cannot run here
        print(f"gpu_vs_torch: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_vs_torch.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_vs_torch.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu_vs_torch.json'} and {out / 'gpu_vs_torch.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
