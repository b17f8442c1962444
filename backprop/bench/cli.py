"""``backprop-bench`` / ``python -m backprop.bench``: the command line of the benchmark suite."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import Backend, available_backends, resolve_backend
from ..kernels import BACKEND_MODULES
from .machine import cpu_pressure, load_average, machine_info, restore_threads, set_threads, tune_malloc
from .nets import DEFAULT_DEPTH, n_params, parse_sizes
from .torch_peer import KNOWN_PEERS, TorchPeer, make_peer
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


# --------------------------------------------------------------------------- checked option values
# Every option is checked here, before any work starts and before anything is written: argparse reports
# a bad value as "backprop-bench: error: argument --name: ..." and exits with status 2.

#: Largest value of the integer options (a C ``int``: thread counts, batch dimensions and loop counts go
#: to C libraries).
MAX_INT = 2**31 - 1
#: Largest number of weight layers (``--depth``, or the widths of one explicit net).
MAX_LAYERS = 10_000
#: Largest parameter count of a net in ``--sizes`` (far beyond any memory; such sizes are skipped).
MAX_PARAMS = 1e15
#: Largest number of sizes in one log range of ``--sizes``.
MAX_RANGE_POINTS = 10_000
#: Largest ``--threads``.
MAX_THREADS = 4096
#: Largest ``--min-sample-time``, seconds (a sample loops at most 100000 calls anyway).
MAX_SAMPLE_TIME = 3600.0
#: Largest ``--seed`` (``seed + 1`` seeds the data; both stay within a signed 64-bit integer).
MAX_SEED = 2**63 - 2


def _bad(msg: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(msg)


def _float_type(*, minimum: float, open_min: bool = False, maximum: float | None = None,
                name: str = "number") -> Callable[[str], float]:
    """An argparse ``type``: a finite float ``> minimum`` (``open_min``) or ``>= minimum``, at most ``maximum``."""
    op = ">" if open_min else ">="
    want = f"a finite number {op} {minimum:g}" + (f" and <= {maximum:g}" if maximum is not None else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise _bad(f"must be {want}, got {text!r}") from None
        if not math.isfinite(value) or (value <= minimum if open_min else value < minimum) or \
                (maximum is not None and value > maximum):
            raise _bad(f"must be {want}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


def _int_type(*, minimum: int, maximum: int = MAX_INT, name: str = "integer") -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``minimum`` to ``maximum``."""
    want = f"an integer from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except (TypeError, ValueError):
            raise _bad(f"must be {want}, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise _bad(f"must be {want}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


positive_float = _float_type(minimum=0.0, open_min=True, name="positive_float")
non_negative_float = _float_type(minimum=0.0, name="non_negative_float")
positive_int = _int_type(minimum=1, name="positive_int")
non_negative_int = _int_type(minimum=0, name="non_negative_int")
depth_int = _int_type(minimum=1, maximum=MAX_LAYERS, name="depth")
threads_int = _int_type(minimum=1, maximum=MAX_THREADS, name="threads")
seed_int = _int_type(minimum=0, maximum=MAX_SEED, name="seed")
sample_time_float = _float_type(minimum=0.0, maximum=MAX_SAMPLE_TIME, name="seconds")
_param_count = _float_type(minimum=1.0, maximum=MAX_PARAMS, name="parameter_count")
_range_points = _int_type(minimum=1, maximum=MAX_RANGE_POINTS, name="count")
_width = _int_type(minimum=1, name="width")


def size_spec(text: str) -> str:
    """``--sizes``: parameter counts, log ranges and layer widths (see :func:`~backprop.bench.nets.parse_sizes`),
    each finite and bounded; returned unchanged (the sweep parses it with the chosen ``--depth``)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise _bad(f"no sizes in {text!r}")
    for item in items:
        try:
            if ":" in item:
                parts = item.split(":")
                if len(parts) > 3:
                    raise _bad("a log range is lo:hi or lo:hi:count")
                lo, hi = _param_count(parts[0]), _param_count(parts[1])
                if lo > hi:
                    raise _bad(f"a log range runs upwards, lo <= hi, got {lo:g} > {hi:g}")
                if len(parts) == 3:
                    _range_points(parts[2])
            elif "-" in item.lstrip("-"):
                widths = [_width(w) for w in item.split("-")]
                if len(widths) > MAX_LAYERS + 1:
                    raise _bad(f"at most {MAX_LAYERS} layers, got {len(widths) - 1}")
                if n_params(widths) > MAX_PARAMS:
                    raise _bad(f"the net has {n_params(widths):.3g} parameters, more than {MAX_PARAMS:g}")
            else:
                _param_count(item)
        except argparse.ArgumentTypeError as exc:
            raise _bad(f"cannot read size {item!r}: {exc} (use a parameter count from 1 to {MAX_PARAMS:g} "
                       "such as 1e5, a log range such as 1e3:1e7:13, or layer widths such as 784-256-10)") from None
    try:
        parse_sizes(text, DEFAULT_DEPTH)
    except (ValueError, OverflowError) as exc:
        raise _bad(str(exc)) from None
    return text


def backend_list(text: str) -> str:
    """``--backends``: ``auto`` (or ``all``, or nothing) or comma-separated known backend names; whether each
    works on this machine is found out when the run starts (before anything is written)."""
    key = text.strip().lower()
    if key in ("auto", "all", ""):
        return text
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKEND_MODULES]
    if unknown:
        raise _bad(f"unknown backend(s) {', '.join(map(repr, unknown))}; "
                   f"known: {', '.join(BACKEND_MODULES)} or 'auto'")
    return text


def peer_list(text: str) -> str:
    """``--peers``: comma-separated names of :data:`~backprop.bench.torch_peer.KNOWN_PEERS` (or nothing)."""
    unknown = [p.strip() for p in text.split(",") if p.strip() and p.strip() not in KNOWN_PEERS]
    if unknown:
        raise _bad(f"unknown peer(s) {', '.join(map(repr, unknown))}; known: {', '.join(KNOWN_PEERS)}")
    return text


def doc_parser(prog: str | None, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of a script's docstring ``doc`` and whose epilog is the
    rest, kept as written."""
    doc = doc or ""
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def require_backends(parser: argparse.ArgumentParser, names: Iterable[str], simulated: str) -> None:
    """``parser.error`` (exit status 2, naming ``--backends``) unless every backend of ``names`` works here and
    none runs on the CUDA simulator (``simulated`` says why that is refused)."""
    from ..backend import resolve_backend

    for name in names:
        try:
            backend = resolve_backend(name)
        except ValueError as exc:
            parser.error(f"argument --backends: {name!r} does not work here: {str(exc).splitlines()[0]}")
        if backend.is_simulated:
            parser.error(f"argument --backends: {name!r} runs on the CUDA simulator here{simulated}")


def backend_name(text: str) -> str:
    """``--backends``: a known backend name (whether it works here is checked after parsing)."""
    key = text.strip().lower()
    if key not in BACKEND_MODULES:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; known: {', '.join(BACKEND_MODULES)}")
    return key


def json_path(text: str) -> Path:
    """``--json``: a file path whose folder exists and can be written (checked now, written at the end)."""
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be a file path, got {text!r}")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if os.path.lexists(path) and (not path.is_file() or not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text} exists and cannot be written as a file")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"the folder {parent} is not writable")
    return path


def out_dir(text: str) -> str:
    """``--out``: a non-empty path (whether it can be used is checked after parsing, by :func:`out_problem`)."""
    if not text.strip():
        raise _bad("must be a directory path, got an empty string")
    if "\0" in text:
        raise _bad(f"must be a directory path, got {text!r} (a NUL character)")
    return text


def out_problem(out: str, names: Iterable[str] = (JSON_NAME, MD_NAME, PNG_NAME),
                holds: str = f"{JSON_NAME}, {MD_NAME} and {PNG_NAME}") -> str | None:
    """Why ``out`` cannot be the output directory of the files ``names`` (an existing non-directory, a
    parent that is a file, a directory that cannot be written or created, a file name taken by
    something that cannot be written), or ``None``; ``holds`` says what the directory is for in the
    message. Creates nothing."""
    names = list(names)
    path = Path(out)
    if os.path.isdir(path):
        for name in names:
            target = path / name
            if os.path.lexists(target):
                if not os.path.isfile(target):
                    return f"{target} exists and is not a regular file: the results cannot be written there"
                if not os.access(target, os.W_OK):
                    return f"{target} exists and is not writable"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"the directory {out} is not writable"
        return None
    if os.path.lexists(path):
        what = "a broken symbolic link" if not os.path.exists(path) else "not a directory"
        return f"{out} exists and is {what}; --out names the directory of {holds}"
    missing = [path.name]
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        missing.append(parent.name)
        parent = parent.parent
    if not os.path.isdir(parent):
        what = "a broken symbolic link" if os.path.lexists(parent) and not os.path.exists(parent) else \
            "not a directory" if os.path.lexists(parent) else "missing"
        return f"cannot create the directory {out}: {parent} is {what}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create the directory {out}: {parent} is not writable"
    try:
        name_max = int(os.pathconf(parent, "PC_NAME_MAX"))
    except (OSError, ValueError):
        name_max = 255
    long = [m for m in missing if len(os.fsencode(m)) > name_max]
    if long:
        return f"cannot create the directory {out}: a name longer than {name_max} bytes ({long[0][:40]}...)"
    return None


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks that involve more than one option, or the file system: ``parser.error`` (exit status 2)
    naming the option, before any work starts and before anything is written."""
    if args.sizes is not None:
        try:
            parse_sizes(args.sizes, args.depth)
        except (ValueError, OverflowError) as exc:
            parser.error(f"argument --sizes: {exc} (with --depth {args.depth})")
    dtype = np.dtype(args.dtype)
    info = np.finfo(dtype)
    if not float(info.tiny) <= args.lr <= float(info.max):
        parser.error(f"argument --lr: {args.lr:g} is not a normal {dtype.name} number (--dtype): use a value from "
                     f"{float(info.tiny):g} to {float(info.max):g}")
    why = out_problem(args.out)
    if why:
        parser.error(f"argument --out: {why}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="backprop-bench",
        description=(
            "Measure the cost of the gradient: forward pass, forward + backward and a full training step "
            "over nets whose parameter count N spans several decades, their ratios against the operation "
            "count (about 3) and the bound of 5 of the cheap gradient principle (Baur-Strassen: reverse-mode "
            "differentiation, i.e. backpropagation, costs at most a small constant, 5, times the function "
            "evaluation), the fitted exponents of T ~ N^k (about 1), and the naive finite-difference gradient "
            "(about N^2) at small N. Writes a JSON file with every timing, a Markdown report and a PNG plot; "
            "both say when other work on the machine made the timings noisy."),
        epilog=(f"Sizes: comma-separated parameter counts (1e5), log ranges (1e3:1e7:17) or layer widths "
                f"(784-256-10); counts become --depth square layers. Defaults: {DEFAULT_SIZES_CPU} on a CPU, "
                f"{DEFAULT_SIZES_GPU} on a GPU, {QUICK_SIZES} with --quick; sizes that do not fit in memory are "
                f"skipped. Batch: {DEFAULT_BATCH_GPU} on a GPU backend, {DEFAULT_BATCH_CPU} on a CPU backend unless "
                f"--batch is given (at batch {DEFAULT_BATCH_CPU} no size of the sweep is GEMM-bound on a large GPU, "
                "and its exponent fit would fall back to the three largest sizes). "
                "Example: backprop-bench --backends numpy --out bench-out"),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--backends", type=backend_list, default="auto",
                   help="comma-separated backend names, or 'auto' for every available one (simulated ones skipped); "
                        f"known: {', '.join(BACKEND_MODULES)}")
    p.add_argument("--sizes", type=size_spec, default=None,
                   help="sweep specification (see below); default depends on the device")
    p.add_argument("--depth", type=depth_int, default=DEFAULT_DEPTH,
                   help="weight layers of the nets built from a parameter count")
    p.add_argument("--batch", type=positive_int, default=None,
                   help=f"batch size of the timed passes (default: {DEFAULT_BATCH_GPU} on a GPU backend, so that the "
                        f"large nets are GEMM-bound; {DEFAULT_BATCH_CPU} on a CPU backend)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed samples per measurement (default 7, quick 3)")
    p.add_argument("--warmup", type=non_negative_int, default=None,
                   help="warm-up calls after the first (default 2, quick 1)")
    p.add_argument("--min-sample-time", type=sample_time_float, default=None,
                   help="seconds each sample lasts at least, looping small calls (default 0.01, quick 0.002)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--out", type=out_dir, default="bench-out",
                   help="output directory for results.json, report.md, scaling.png")
    p.add_argument("--quick", action="store_true", help="a small sweep that finishes well under a minute")
    p.add_argument("--no-fd", action="store_true", help="skip the finite-difference baseline")
    p.add_argument("--fd-max-n", type=non_negative_float, default=None,
                   help="largest N at which the finite-difference gradient is run in full, all N + 1 passes "
                        "(default 3e4, quick 5e3); above, one pass is timed and multiplied by N + 1")
    p.add_argument("--no-fd-extrapolation", action="store_true",
                   help="finite differences only where run in full (no per-pass estimate at larger N)")
    p.add_argument("--fd-batch", type=positive_int, default=None,
                   help="batch for finite differences (default: --batch)")
    p.add_argument("--fd-repeats", type=positive_int, default=None,
                   help="finite-difference runs per size (default 3, quick 1)")
    p.add_argument("--fd-time-limit", type=positive_float, default=30.0,
                   help="run the finite differences in full only where one run is predicted to take at most this "
                        "many seconds; also the time budget for repeating a run")
    p.add_argument("--fit-min-n", type=positive_float, default=None,
                   help="fit the exponents over N >= this (default: the GEMM-bound sizes, see --overhead-factor)")
    p.add_argument("--overhead-factor", type=positive_float, default=30.0,
                   help="a size is GEMM-bound when its forward time is at least this multiple of the fixed per-call "
                        "overhead (forward time of a width-1 net at batch 1)")
    p.add_argument("--peers", type=peer_list, default="",
                   help=f"other frameworks to time on the same nets: {', '.join(KNOWN_PEERS)}")
    p.add_argument("--threads", type=threads_int, default=None,
                   help="limit BLAS/OpenMP/Numba (and PyTorch) threads (default: the libraries' own choice)")
    p.add_argument("--lr", type=positive_float, default=1e-7,
                   help="SGD learning rate of the timed training steps (tiny: thousands of steps must not diverge)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the weights and the data")
    p.add_argument("--retries", type=non_negative_int, default=1,
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


def _start_peers(names: Iterable[str], threads: int | None) -> tuple[list[TorchPeer], dict[str, Any]]:
    """The peers of ``--peers`` and what each says about itself; one that cannot run here says why on stderr."""
    peers: list[TorchPeer] = []
    peer_info: dict[str, Any] = {}
    for name in names:
        peer = make_peer(name, threads)
        peer_info[name] = peer.info()
        if not peer.available:
            print(f"peer {name}: {peer.reason}", file=sys.stderr)
        peers.append(peer)
    return peers, peer_info


def _measure(backends: list[Backend], cfg: BenchConfig, peers: list[TorchPeer],
             no_progress: bool) -> tuple[list[dict[str, Any]], float]:
    """Every backend's sweep, with one progress bar over all their sizes; and the seconds it all took."""
    t0 = time.perf_counter()
    results = []
    with Progress(sum(len(cfg.sizes_for(b)) for b in backends), enabled=not no_progress) as progress:
        for backend in backends:
            results.append(run_backend(backend, cfg, progress, peers))
    return results, time.perf_counter() - t0


def _write_results(doc: dict[str, Any], out: Path, no_plot: bool) -> list[str]:
    """The plot (unless ``--no-plot``, or skipped with the reason), ``results.json`` and ``report.md`` in ``out``;
    returns the names written. Raises ``OSError`` where they cannot be written."""
    png: str | None = None
    if not no_plot:
        from .plot import plot_results

        why = plot_results(doc, out / PNG_NAME)
        if why:
            print(f"plot skipped: {why}", file=sys.stderr)
        else:
            png = PNG_NAME
    write_json(out / JSON_NAME, doc)
    (out / MD_NAME).write_text(markdown_report(doc, png))
    return [JSON_NAME, MD_NAME] + ([PNG_NAME] if png else [])


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Measure every backend of the checked options ``args`` and write the results; the exit status."""
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
    peers, peer_info = _start_peers(cfg.peers, args.threads)

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # out_problem looked before; the file system can still refuse (or change since)
        print(f"backprop-bench: error: argument --out: cannot create the directory {out}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    load_start, pressure_start = load_average(), cpu_pressure()
    busy = _busy(load_start, pressure_start)
    if busy:
        print(f"warning: {busy}: the timings will be noisy; rerun on a quiet machine for figures to quote",
              file=sys.stderr)
    machine = machine_info(backends)
    results, duration = _measure(backends, cfg, peers, args.no_progress)
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
    try:
        written = _write_results(doc, out, args.no_plot)
    except OSError as exc:  # e.g. the disk filled up during the run
        print(terminal_report(doc))
        print(f"backprop-bench: error: argument --out: cannot write the results to {out}: {exc}", file=sys.stderr)
        return 1
    print(terminal_report(doc))
    print(f"\nwrote {', '.join(str(out / n) for n in written)} ({duration:.0f} s)")
    return 1 if any(r["errors"] for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``backprop-bench``; returns the exit status (0 fine, 1 some size failed, 2 bad usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # every option's value is checked by its type ...
        check_args(parser, args)  # ... and what involves several options or the file system, here
    except SystemExit as exc:  # --help, or a usage error argparse has already reported
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        return run(args, argv)
    except KeyboardInterrupt:
        print("backprop-bench: interrupted", file=sys.stderr)
        return 130
    finally:
        restore_threads()
