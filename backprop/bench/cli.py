"""``backprop-bench`` / ``python -m backprop.bench``: the command line of the benchmark suite."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ..backend import Backend, available_backends, resolve_backend
from ..kernels import BACKEND_MODULES
from .machine import cpu_pressure, load_average, machine_info, restore_threads, set_threads, tune_malloc
from .nets import parse_sizes
from .peers import KNOWN_PEERS, TorchPeer, make_peer
from .progress import Progress
from .report import mark_fit_points, markdown_report, terminal_report, write_json
from .sweep import (
    BATCH_RULE,
    DEFAULT_BATCH_CPU,
    DEFAULT_BATCH_GPU,
    DEFAULT_SIZES_CPU,
    DEFAULT_SIZES_GPU,
    QUICK_SIZES,
    BenchConfig,
    run_backend,
)

__all__ = ["build_parser", "main"]

JSON_NAME, MD_NAME, PNG_NAME = "results.json", "report.md", "scaling.png"

#: (normal, --quick) defaults of the options that --quick changes
_QUICK = {"repeats": (7, 3), "warmup": (2, 1), "min_sample_time": (0.01, 0.002), "fd_max_n": (3e4, 5e3),
          "fd_repeats": (3, 1)}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` (those options say in words what they default to)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="backprop-bench",
        description=(
            "Measure the cost of the gradient: forward pass, forward + backward and a full training step "
            "over nets whose parameter count N spans several decades, their ratios against the operation "
            "count (about 3) and Kakade's bound (5), the fitted exponents of T ~ N^k (about 1), and the naive "
            "finite-difference gradient (about N^2) at small N. Writes a JSON file with every timing, a "
            "Markdown report and a PNG plot."),
        epilog=(f"Sizes: comma-separated parameter counts (1e5), log ranges (1e3:1e7:17) or layer widths "
                f"(784-256-10); counts become --depth square layers. Defaults: {DEFAULT_SIZES_CPU} on a CPU, "
                f"{DEFAULT_SIZES_GPU} on a GPU, {QUICK_SIZES} with --quick; sizes that do not fit in memory are "
                f"skipped. Batch: {DEFAULT_BATCH_GPU} on a GPU backend, {DEFAULT_BATCH_CPU} on a CPU backend unless "
                f"--batch is given (at batch {DEFAULT_BATCH_CPU} no size of the sweep is GEMM-bound on a large GPU, "
                "and its exponent fit would fall back to the three largest sizes). "
                "Example: backprop-bench --backends numpy --out bench-out"),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--backends", default="auto",
                   help="comma-separated backend names, or 'auto' for every available one (simulated ones skipped); "
                        f"known: {', '.join(BACKEND_MODULES)}")
    p.add_argument("--sizes", default=None, help="sweep specification (see below); default depends on the device")
    p.add_argument("--depth", type=int, default=3, help="weight layers of the nets built from a parameter count")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch size of the timed passes (default: {DEFAULT_BATCH_GPU} on a GPU backend, so that the "
                        f"large nets are GEMM-bound; {DEFAULT_BATCH_CPU} on a CPU backend)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per measurement (default 7, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls after the first (default 2, quick 1)")
    p.add_argument("--min-sample-time", type=float, default=None,
                   help="seconds each sample lasts at least, looping small calls (default 0.01, quick 0.002)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--out", default="bench-out", help="output directory for results.json, report.md, scaling.png")
    p.add_argument("--quick", action="store_true", help="a small sweep that finishes well under a minute")
    p.add_argument("--no-fd", action="store_true", help="skip the finite-difference baseline")
    p.add_argument("--fd-max-n", type=float, default=None,
                   help="largest N at which the finite-difference gradient is run in full, all N + 1 passes "
                        "(default 3e4, quick 5e3); above, one pass is timed and multiplied by N + 1")
    p.add_argument("--no-fd-extrapolation", action="store_true",
                   help="finite differences only where run in full (no per-pass estimate at larger N)")
    p.add_argument("--fd-batch", type=int, default=None, help="batch for finite differences (default: --batch)")
    p.add_argument("--fd-repeats", type=int, default=None, help="finite-difference runs per size (default 3, quick 1)")
    p.add_argument("--fd-time-limit", type=float, default=30.0,
                   help="run the finite differences in full only where one run is predicted to take at most this "
                        "many seconds; also the time budget for repeating a run")
    p.add_argument("--fit-min-n", type=float, default=None,
                   help="fit the exponents over N >= this (default: the GEMM-bound sizes, see --overhead-factor)")
    p.add_argument("--overhead-factor", type=float, default=30.0,
                   help="a size is GEMM-bound when its forward time is at least this multiple of the fixed per-call "
                        "overhead (forward time of a width-1 net at batch 1)")
    p.add_argument("--peers", default="", help=f"other frameworks to time on the same nets: {', '.join(KNOWN_PEERS)}")
    p.add_argument("--threads", type=int, default=None,
                   help="limit BLAS/OpenMP/Numba (and PyTorch) threads (default: the libraries' own choice)")
    p.add_argument("--lr", type=float, default=1e-7, help="SGD learning rate of the timed training steps (tiny: "
                                                          "thousands of steps must not diverge)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    p.add_argument("--retries", type=int, default=1,
                   help="time a size again (keeping the steadier attempt) when a median's interquartile range "
                        "exceeds 10%% of it, as other work on the machine causes")
    p.add_argument("--no-malloc-tune", action="store_true",
                   help="leave glibc's malloc as it is; by default the benchmark keeps freed memory in the process so "
                        "that the arrays each pass allocates do not page-fault in afresh on every call")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _config(args: argparse.Namespace) -> BenchConfig:
    q = 1 if args.quick else 0
    vals = {name: getattr(args, name) if getattr(args, name) is not None else pair[q] for name, pair in _QUICK.items()}
    return BenchConfig(
        sizes=args.sizes, depth=args.depth, batch=args.batch, dtype=args.dtype, lr=args.lr, seed=args.seed,
        fd=not args.no_fd, fd_extrapolate=not args.no_fd_extrapolation, fd_batch=args.fd_batch,
        fd_time_limit=args.fd_time_limit, fit_min_n=args.fit_min_n,
        overhead_factor=args.overhead_factor, quick=args.quick, retries=args.retries,
        peers=[p.strip() for p in args.peers.split(",") if p.strip()], **vals,
    )


def _check(cfg: BenchConfig) -> None:
    for name in ("depth", "batch", "repeats", "fd_repeats"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.warmup < 0:
        raise ValueError("--warmup must not be negative")
    if cfg.fd_batch is not None and cfg.fd_batch < 1:
        raise ValueError("--fd-batch must be at least 1")
    if not cfg.lr > 0:
        raise ValueError("--lr must be positive")
    if cfg.sizes:
        parse_sizes(cfg.sizes, cfg.depth)
    for p in cfg.peers:
        if p not in KNOWN_PEERS:
            raise ValueError(f"unknown peer {p!r}; known: {', '.join(KNOWN_PEERS)}")


def _backends(spec: str) -> tuple[list[Backend], dict[str, str]]:
    skipped: dict[str, str] = {}
    chosen: list[Backend] = []
    key = spec.strip().lower()
    if key in ("auto", "all", ""):
        names = list(BACKEND_MODULES)
        for name in names:
            if name not in available_backends():
                try:
                    resolve_backend(name)
                except ValueError as exc:
                    skipped[name] = str(exc).split("; available here")[0]
    else:
        names = [n.strip().lower() for n in spec.split(",") if n.strip()]
        for name in names:
            if name not in BACKEND_MODULES:
                raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKEND_MODULES)} or 'auto'")
    for name in names:
        if name in skipped:
            continue
        try:
            backend = resolve_backend(name)
        except ValueError as exc:
            skipped[name] = str(exc)
            continue
        if backend.is_simulated:
            skipped[name] = "simulated (CUDA simulator): its timings say nothing about a GPU"
            continue
        if backend not in chosen:
            chosen.append(backend)
    return chosen, skipped


def _busy(load: list[float] | None, pressure: dict[str, float] | None) -> str:
    """Why the machine looks busy before the run starts, or ``""``."""
    cpus = os.cpu_count() or 1
    if pressure and pressure.get("avg10", 0.0) > 20:
        return (f"other work competes for the CPUs (runnable tasks waited {pressure['avg10']:.0f}% of the last 10 s, "
                "/proc/pressure/cpu)")
    if load and load[0] > cpus:
        return f"the load average ({load[0]:.1f}) exceeds the {cpus} CPUs"
    return ""


def run(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        cfg = _config(args)
        _check(cfg)
        backends, skipped = _backends(args.backends)
    except ValueError as exc:
        print(f"backprop-bench: error: {exc}", file=sys.stderr)
        return 2
    for name, why in skipped.items():
        print(f"backend {name} skipped: {why}", file=sys.stderr)
    if not backends:
        print("backprop-bench: no backend to measure", file=sys.stderr)
        return 2
    malloc = "" if args.no_malloc_tune else tune_malloc()
    threads_info: list[str] = []
    if args.threads:
        threads_info = set_threads(args.threads)
    peers: list[TorchPeer] = []
    peer_info: dict[str, Any] = {}
    for name in cfg.peers:
        peer = make_peer(name, args.threads)
        peer_info[name] = peer.info()
        if not peer.available:
            print(f"peer {name}: {peer.reason}", file=sys.stderr)
        peers.append(peer)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start, pressure_start = load_average(), cpu_pressure()
    busy = _busy(load_start, pressure_start)
    if busy:
        print(f"warning: {busy}: the timings will be noisy; rerun on a quiet machine for figures to quote",
              file=sys.stderr)
    machine = machine_info(backends)
    t0 = time.perf_counter()
    results = []
    with Progress(sum(len(cfg.sizes_for(b)) for b in backends), enabled=not args.no_progress) as progress:
        for backend in backends:
            results.append(run_backend(backend, cfg, progress, peers))
    duration = time.perf_counter() - t0
    doc: dict[str, Any] = {
        "schema": "backprop-bench/1",
        "command": "backprop-bench " + " ".join(shlex.quote(a) for a in argv),
        "config": {**cfg.to_dict(), "batch_rule": BATCH_RULE if cfg.batch is None else "--batch",
                   "threads": args.threads, "threads_limited": threads_info, "malloc": malloc},
        "machine": machine,
        "load_average": {"start": load_start, "end": load_average()},
        "cpu_pressure": {"start": pressure_start, "end": cpu_pressure()},
        "busy_at_start": busy,
        "duration_s": duration,
        "peers": peer_info,
        "backends": results,
        "skipped_backends": skipped,
    }
    for res in results:
        mark_fit_points(res)

    png: str | None = None
    if not args.no_plot:
        from .plot import plot_results

        why = plot_results(doc, out / PNG_NAME)
        if why:
            print(f"plot skipped: {why}", file=sys.stderr)
        else:
            png = PNG_NAME
    write_json(out / JSON_NAME, doc)
    (out / MD_NAME).write_text(markdown_report(doc, png))
    print(terminal_report(doc))
    written = [JSON_NAME, MD_NAME] + ([PNG_NAME] if png else [])
    print(f"\nwrote {', '.join(str(out / n) for n in written)} ({duration:.0f} s)")
    return 1 if any(r["errors"] for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``backprop-bench``; returns the exit status (0 fine, 1 some size failed, 2 bad usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already reported
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        return run(args, argv)
    except KeyboardInterrupt:
        print("backprop-bench: interrupted", file=sys.stderr)
        return 130
    finally:
        restore_threads()
