"""Section 8, ``cpu``: the training step of the CPU backends (public ``train_step`` and ``train_step_device``)
against PyTorch on the CPU."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ...backend import Backend, resolve_backend
from ...network import MLP
from ...optimizers import SGD
from ..sections import SkipSection
from ..timing import paired_ratio
from . import cases
from .context import DTYPE, Context, fmt_ms, fmt_ratio, make_net, random_batch, timing_dict

__all__ = ["cpu_backends", "section_cpu"]


def cpu_backends(spec: str) -> tuple[list[Backend], list[str]]:
    """The CPU backends of ``--cpu-backends`` that work here, and a note for each one skipped."""
    chosen, notes = [], []
    for name in [n.strip() for n in spec.split(",") if n.strip()]:
        try:
            backend = resolve_backend(name)
        except ValueError as exc:
            notes.append(f"backend {name} skipped: {exc}")
            continue
        if backend.is_gpu:
            notes.append(f"backend {name} skipped: a GPU backend")
            continue
        chosen.append(backend)
    return chosen, notes



def _public_and_device(net: MLP, x: Any, t: Any, opt: SGD) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The public step and the device-level step of ``net`` on ``x, t``, as calls without arguments."""
    return (lambda: net.train_step(x, t, opt)), (lambda: net.train_step_device(x, t, opt))



def section_cpu(ctx: Context) -> dict[str, Any]:
    """Each CPU backend's ``train_step`` and ``train_step_device`` against PyTorch's step on the CPU,
    interleaved rounds; target: ``t_torch / t_train_step >= CPU_TARGET`` (medians)."""
    backends, notes = cpu_backends(ctx.args.cpu_backends)
    if not backends:
        raise SkipSection("no CPU backend to measure (" + "; ".join(notes) + ")")
    peer = ctx.peer
    if peer is None:
        notes.append(f"PyTorch not measured: {ctx.peer_reason}")
    repeats = ctx.args.cpu_repeats if ctx.args.cpu_repeats is not None else (2 if ctx.quick else 21)
    rng = np.random.default_rng(6)
    rows, targets, raw = [], [], {}
    lr = 0.01
    for case in cases.CPU_CASES:
        sizes, batch = case.at(ctx.quick)
        x_h, t_h = random_batch(sizes, batch, case.head, rng)
        ops: dict[str, Callable[[], Any]] = {}
        if peer is not None:
            twin = make_net(sizes, case.activation, case.head, backends[0])
            ops["torch"] = peer.step_fn(twin, x_h, t_h, "cpu", lr=lr)
        for be in backends:
            net = make_net(sizes, case.activation, case.head, be)
            x, t = be.kernels.to_device(x_h, DTYPE), be.kernels.to_device(t_h, DTYPE)
            opt = SGD(lr=lr)
            ops[f"{be.name}/train_step"], ops[f"{be.name}/train_step_device"] = _public_and_device(net, x, t, opt)
        tm = ctx.time(ops, lambda: None, repeats=repeats, warmup=3)
        tt = tm.get("torch")
        for be in backends:
            pub, dev = tm[f"{be.name}/train_step"], tm[f"{be.name}/train_step_device"]
            ratio = tt.median / pub.median if tt else None
            paired = paired_ratio(tt, pub) if tt else None
            rows.append([case.name, str(sizes), str(batch), be.name, fmt_ms(pub.median), fmt_ms(dev.median),
                         fmt_ms(tt.median if tt else None), fmt_ratio(ratio), fmt_ratio(paired),
                         fmt_ratio(tt.median / dev.median if tt else None), f"{pub.first_call * 1e3:.4g}"])
            targets.append({"what": f"{case.name}, {be.name}: PyTorch step / backprop train_step (median)",
                            "target": f">= {cases.CPU_TARGET}", "measured": ratio,
                            "met": None if ratio is None else bool(ratio >= cases.CPU_TARGET)})
        raw[case.name] = {"sizes": sizes, "batch": batch, "timings": {op: timing_dict(v) for op, v in tm.items()}}
    threads: dict[str, Any] = {}
    if peer is not None:
        threads["torch"] = peer.torch.get_num_threads()
    if "numba" in sys.modules:
        import numba

        threads["numba"] = numba.get_num_threads()
    notes.append("threads: " + ", ".join(f"{k} {v}" for k, v in threads.items())
                 + (f" (--threads {ctx.args.threads})" if ctx.args.threads else " (the libraries' defaults)")
                 + "; on a machine with other work running, libraries whose threads wait for each other at every "
                   "parallel region (OpenMP) lose most: compare the paired column, and a run with --threads 1")
    return {
        "description": ("One training step on a fixed batch (float32, SGD lr 0.01, the loss read every step), "
                        "PyTorch on the CPU (`zero_grad`, forward, loss, `backward`, `SGD.step`, `loss.item()`) "
                        "against each CPU backend's public `net.train_step(x, t, opt)` (what a user calls: the "
                        "arrays are checked) and `net.train_step_device`; every step of every side timed in "
                        f"{repeats} interleaved rounds (each sample at least {ctx.min_sample_time * 1e3:g} ms), "
                        "median. Ratio = torch / backprop (above 1: backprop faster); paired = the median over "
                        "rounds of that ratio within a round."),
        "tables": [{"header": ["net", "sizes", "batch", "backend", "train_step ms", "train_step_device ms",
                               "torch ms", "torch / train_step", "paired", "torch / train_step_device",
                               "first call ms"], "rows": rows}],
        "targets": targets, "notes": notes, "threads": threads, "cases": raw,
        "settings": {"backends": [be.name for be in backends], "repeats": repeats, "lr": lr},
    }



