#!/usr/bin/env python
"""Scaling of data-parallel ``fit(distributed=True)`` over MPI processes on the CPU (weak scaling).

    python benchmarks/distributed_scaling.py                          # 1 and 2 ranks, numba, 5 rounds
    python benchmarks/distributed_scaling.py --ranks 1,2,4 --backend numpy --json scaling.json --md scaling.md

Each rank keeps ``--batch`` rows per step (the global minibatch grows with the ranks) and one thread
(BLAS, OpenMP, Numba), so N ranks use N cores. One epoch over ``--rows`` rows of ``--sizes`` is timed
after ``--warmup`` epochs (JIT compilation, first touches), as the median of ``--epochs`` epochs of one
``fit``; the runs of each rank count are interleaved over ``--rounds`` rounds (each a fresh ``mpiexec``), and
the median over the rounds is reported. Throughput is rows per second; the efficiency of N ranks is their
throughput over N times that of one rank (1.0: perfect). Apart, each rank count's all-reduce of the
gradient buffer (``[every dW | every db | loss]``) is timed alone (median of 200 calls), times the steps of an
epoch: the share of the epoch that communication takes at least.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    from backprop.bench.cli import backend_name, json_path, positive_int
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from backprop.bench.cli import backend_name, json_path, positive_int
from backprop.bench.machine import load_average, machine_info

PROG = "python benchmarks/distributed_scaling.py"


def _ranks(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be rank counts separated by commas, got {text!r}") from None
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"must be distinct positive rank counts, got {text!r}")
    return values


def _sizes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be layer widths separated by commas, got {text!r}") from None
    if len(values) < 2 or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be at least two positive layer widths, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=_ranks, default=[1, 2], help="rank counts to time (default 1,2)")
    p.add_argument("--backend", type=backend_name, default="numba")
    p.add_argument("--sizes", type=_sizes, default=[784, 256, 256, 10], help="layer widths (default 784,256,256,10)")
    p.add_argument("--rows", type=positive_int, default=16384, help="rows of the training set (default 16384)")
    p.add_argument("--batch", type=positive_int, default=64, help="rows per rank per step (default 64)")
    p.add_argument("--epochs", type=positive_int, default=3, help="timed epochs per fit (default 3)")
    p.add_argument("--warmup", type=positive_int, default=1, help="untimed epochs first (default 1)")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--json", type=json_path, help="write the results here")
    p.add_argument("--md", type=json_path, help="write a Markdown table here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return p


# --------------------------------------------------------------------------- one mpiexec run
def worker(args: argparse.Namespace) -> None:
    """Run inside ``mpiexec``: time the epochs of one distributed fit and the all-reduce alone; rank 0
    writes the JSON to ``args.worker``."""
    import backprop as bp
    from backprop import step

    bp.set_num_threads(1, strict=False)
    comm = bp.distributed.init()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.rows, args.sizes[0])).astype(args.dtype)
    y = rng.integers(0, args.sizes[-1], args.rows)
    net = bp.MLP(args.sizes, activation="relu", head="multiclass", dtype=args.dtype, seed=0, backend=args.backend)
    history = net.fit(X, y, epochs=args.warmup + args.epochs, batch_size=args.batch, optimizer=bp.SGD(0.01),
                      distributed=True)
    k = net.backend.kernels
    buffer = step.workspace(net, args.batch).reduced
    times = []
    for _ in range(200):
        comm.mpi.Barrier()
        start = time.perf_counter()
        comm.all_reduce(k, buffer)
        times.append(time.perf_counter() - start)
    worst = comm.mpi.allreduce(float(np.median(times)), op=_max())
    if comm.rank == 0:
        epochs = history.epoch_time[args.warmup:]
        steps = -(-args.rows // (args.batch * comm.size))
        args.worker.write_text(json.dumps({"ranks": comm.size, "epoch_s": float(np.median(epochs)),
                                           "epochs_s": epochs, "allreduce_s": worst, "steps": steps,
                                           "buffer_elements": int(buffer.size)}))


def _max() -> Any:
    from mpi4py import MPI

    return MPI.MAX


def _mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else "mpiexec"


def run_ranks(args: argparse.Namespace, argv: list[str], n: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [_mpiexec(), "-n", str(n), sys.executable, __file__, *argv, "--worker", str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- the report
def summarize(args: argparse.Namespace, rounds: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    rows = []
    base = None  # one rank's throughput, when timed
    for n in sorted(args.ranks):
        epoch = float(np.median([r["epoch_s"] for r in rounds[n]]))
        allreduce = float(np.median([r["allreduce_s"] for r in rounds[n]]))
        steps = rounds[n][0]["steps"]
        throughput = args.rows / epoch
        if n == 1:
            base = throughput
        rows.append({"ranks": n, "global_batch": n * args.batch, "steps_per_epoch": steps, "epoch_s": epoch,
                     "rows_per_s": throughput,
                     "efficiency": None if base is None else throughput / (n * base),
                     "allreduce_s": allreduce, "allreduce_share": allreduce * steps / epoch,
                     "epoch_s_rounds": [r["epoch_s"] for r in rounds[n]]})
    return {"benchmark": "distributed_scaling", "date": time.strftime("%Y-%m-%d"), "command": args.command,
            "backend": args.backend, "sizes": args.sizes, "rows": args.rows, "batch_per_rank": args.batch,
            "dtype": args.dtype, "epochs": args.epochs, "warmup": args.warmup, "rounds": args.rounds,
            "buffer_elements": rounds[args.ranks[0]][0]["buffer_elements"], "results": rows,
            "load_average": load_average(), "machine": machine_info()}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# Data-parallel scaling on the CPU ({report['date']})", "",
             f"`{report['command']}`", "",
             f"{report['backend']}, {report['dtype']}, sizes {report['sizes']}, {report['rows']} rows, "
             f"{report['batch_per_rank']} rows per rank per step, one thread per rank; median of "
             f"{report['rounds']} interleaved rounds of {report['epochs']} timed epochs. "
             f"Machine: {m.get('cpu', '?')}, {m.get('cpus_usable') or m.get('cpu_count')} usable cores, "
             f"backprop {m.get('backprop')} at {str(m.get('git_commit'))[:10]}; load average at the end "
             f"{report['load_average']}.", "",
             "| ranks | global batch | epoch s | rows/s | efficiency | all-reduce per step | its share of the epoch |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        lines.append(f"| {r['ranks']} | {r['global_batch']} | {r['epoch_s']:.3f} | {r['rows_per_s']:.0f} | {eff} | "
                     f"{r['allreduce_s'] * 1e6:.0f} us | {r['allreduce_share']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.worker is not None:
        worker(args)
        return 0
    args.command = " ".join([PROG, *argv])
    shared = ["--backend", args.backend, "--sizes", ",".join(map(str, args.sizes)), "--rows", str(args.rows),
              "--batch", str(args.batch), "--epochs", str(args.epochs), "--warmup", str(args.warmup),
              "--dtype", args.dtype]  # what the workers time
    rounds: dict[int, list[dict[str, Any]]] = {n: [] for n in args.ranks}
    for r in range(args.rounds):
        for n in args.ranks:
            result = run_ranks(args, shared, n)
            rounds[n].append(result)
            print(f"round {r + 1}/{args.rounds}, {n} rank(s): epoch {result['epoch_s']:.3f} s, all-reduce "
                  f"{result['allreduce_s'] * 1e6:.0f} us", file=sys.stderr, flush=True)
    report = summarize(args, rounds)
    text = markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
