"""The command line of ``python benchmarks/gpu_vs_torch.py``: the options, their checks, and :func:`main`, which
runs the chosen sections and writes each one's files as soon as it ends.

Every option is checked before any work starts and before anything is written: a bad value is reported as
``<prog>: error: argument --name: ...`` and :func:`main` returns 2. The numeric checkers are those of
backprop-bench (:mod:`backprop.bench.cli`); the lists of names and the output folder are checked here.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from ...kernels import BACKEND_MODULES
from ..cli import (
    doc_parser,
    non_negative_float,
    out_dir,
    positive_float,
    positive_int,
    sample_time_float,
    threads_int,
)
from ..cli import out_problem as _out_problem
from ..machine import machine_info, restore_threads, set_threads
from ..sections import SectionWriter
from .catalog import SECTIONS, SUMMARY
from .context import Context
from .cpu import cpu_backends

__all__ = ["build_parser", "check_args", "cpu_backend_list", "device_backend", "main", "out_names", "out_problem",
           "section_list"]


def _names(text: str, known: Iterable[str], what: str, *, also: str = "") -> list[str]:
    """The comma-separated names of ``text``, stripped, lower-cased, each once (first place kept); an
    ``ArgumentTypeError`` listing the known ones for an unknown name or none at all."""
    known = list(known)
    listed = f"known: {', '.join(known)}{also}"
    names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"no {what} in {text!r}; {listed}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown))}; {listed}")
    return names


def section_list(text: str) -> str:
    """``--sections``: comma-separated keys of :data:`SECTIONS`, run in the order given (a repeated one once)."""
    return ",".join(_names(text, SECTIONS, "section(s)"))


def device_backend(text: str) -> str:
    """``--backend``: ``auto`` or one known backend name (whether it works here is found out when the run
    starts; sections 1-7 are then skipped with the reason)."""
    key = text.strip().lower()
    if key == "auto":
        return key
    if key not in BACKEND_MODULES:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; known: {', '.join(BACKEND_MODULES)} or 'auto'")
    return key


def cpu_backend_list(text: str) -> str:
    """``--cpu-backends``: comma-separated known backend names (a GPU one, or one that does not work here, is
    skipped by section 8 (cpu) with the reason)."""
    return ",".join(_names(text, BACKEND_MODULES, "backend(s)"))


def out_names(sections: str) -> list[str]:
    """The files a run of ``sections`` (as :func:`section_list` returns them) writes in ``--out``."""
    stems = [SECTIONS[key][0] for key in sections.split(",") if key in SECTIONS] + [SUMMARY]
    return [f"{stem}{ext}" for stem in stems for ext in (".json", ".md")]


def out_problem(out: str, names: Iterable[str]) -> str | None:
    """Why ``out`` cannot be the output folder of files ``names`` (backprop-bench's check, see
    :func:`backprop.bench.cli.out_problem`), or ``None``. Creates nothing."""
    return _out_problem(out, names, f"the section files and {SUMMARY}.json/.md")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the option types cannot check alone (the output folder, against the files the chosen sections
    write): ``parser.error`` naming the option (exit status 2), before any work starts."""
    why = out_problem(args.out, out_names(args.sections))
    if why:
        parser.error(f"argument --out: {why}")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of every option, each value checked by its type; ``--help`` shows the package's overview of
    the sections."""
    p = doc_parser(prog, sys.modules[__package__].__doc__)
    p.add_argument("--out", type=out_dir, default=os.environ.get("OUT") or "bench-out",
                   help="folder of the results: one .json and .md per section and gpu_vs_torch.json/.md, the "
                        "summary (default: $OUT, else bench-out)")
    p.add_argument("--sections", type=section_list, default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, in this order: {','.join(SECTIONS)} (default: all)")
    p.add_argument("--backend", type=device_backend, default="auto",
                   help="backend of sections 1-7 (default auto: the first GPU backend that works here; a CPU backend "
                        f"may be named to try those sections on the CPU); known: {', '.join(BACKEND_MODULES)}")
    p.add_argument("--cpu-backends", type=cpu_backend_list, default="numpy,numba",
                   help=f"backends of section 8, cpu (default numpy,numba); known: {', '.join(BACKEND_MODULES)}")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="interleaved samples per measurement (default 7, quick 2)")
    p.add_argument("--fit-repeats", type=positive_int, default=None,
                   help="timed epochs after the warm-up (default 3, quick 1)")
    p.add_argument("--cpu-repeats", type=positive_int, default=None,
                   help="interleaved rounds of section 8, cpu (default 21, quick 2)")
    p.add_argument("--min-sample-time", type=sample_time_float, default=None,
                   help="seconds a sample lasts at least, looping short calls (default 0.05, quick 0.002)")
    p.add_argument("--quick", action="store_true", help="tiny nets and data: a smoke test of a few seconds")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile in section 3")
    p.add_argument("--compile-budget", type=non_negative_float, default=120.0,
                   help="seconds of torch.compile compilation after which later nets skip it (default 120)")
    p.add_argument("--no-tf32", action="store_true", help="skip section 5 (TF32)")
    p.add_argument("--gemm-size", type=positive_int, default=None,
                   help="n of the n^3 reference GEMM (default 4096, quick 64)")
    p.add_argument("--threads", type=threads_int, default=None,
                   help="limit BLAS/OpenMP/Numba and PyTorch threads (default: the libraries' own choice)")
    p.add_argument("--time-limit", type=positive_float, default=None,
                   help="seconds after which no further section starts (those left are recorded as skipped)")
    return p


def _bound(fn: Callable[[Context], dict[str, Any]], ctx: Context) -> Callable[[], dict[str, Any]]:
    """Section ``fn`` bound to the run's context, as :class:`~backprop.bench.sections.SectionWriter` calls it."""
    return lambda: fn(ctx)


def main(argv: list[str] | None = None, prog: str = "python benchmarks/gpu_vs_torch.py") -> int:
    """Run the sections; returns 0, 1 if a section failed, 2 on bad usage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)  # every option's value is checked by its type ...
        check_args(parser, args)  # ... and the output folder, against the files the sections write, here
    except SystemExit as exc:  # --help, or a usage error argparse has already reported
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    keys = args.sections.split(",")
    start = time.perf_counter()
    try:
        ctx = Context(args)
        cpu, _ = cpu_backends(args.cpu_backends) if "cpu" in keys else ([], [])
        if args.threads:
            # after the backends are loaded (Numba imported), so that Numba's pool is limited too; PyTorch's
            # own pool is set by TorchPeer. Numba's OpenMP layer and PyTorch may share one OpenMP runtime,
            # whose thread count the last parallel call of either sets: only an equal limit keeps both fixed.
            set_threads(args.threads)
        machine = machine_info(([ctx.device] if ctx.device else []) + cpu)
        device = ctx.device.name if ctx.device else "none: " + ctx.device_reason
        torch_info = (", ".join(f"{k} {v}" for k, v in ctx.peer.info().items() if k != "status") if ctx.peer
                      else f"not measured: {ctx.peer_reason}")
        try:
            writer = SectionWriter(args.out, title="backprop on the user's paths, against PyTorch",
                                   command=prog + "".join(" " + shlex.quote(a) for a in argv), machine=machine,
                                   summary=SUMMARY,
                                   deadline=None if args.time_limit is None else start + args.time_limit,
                                   preamble=[f"- device backend (sections 1-7): {device}", f"- PyTorch: {torch_info}",
                                             f"- quick: {ctx.quick}; repeats {ctx.repeats}"])
        except OSError as exc:  # out_problem looked before; the file system can still refuse (or change since)
            print(f"{parser.prog}: error: argument --out: cannot create the directory {args.out}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
        for key in keys:
            stem, title, fn = SECTIONS[key]
            writer.run(key, title, _bound(fn, ctx), stem=stem)
    finally:
        restore_threads()
    failed = writer.failed
    print(f"wrote {len(writer.sections)} section(s) and {SUMMARY}.json/.md to {writer.out} in "
          f"{time.perf_counter() - start:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
