"""Section 3, ``step``: the device-level training step against PyTorch eager and ``torch.compile``, and the
share of the measured GEMM rate the GEMM-bound net reaches."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ...backend import Backend
from ...network import MLP
from ...optimizers import SGD
from ..timing import Timing
from . import cases
from .cases import Case
from .context import (
    DTYPE,
    Context,
    fmt_ms,
    fmt_ratio,
    gemm_rate,
    make_net,
    random_batch,
    release_device_memory,
    step_flops,
    timing_dict,
)

__all__ = ["section_step"]


def _compiled_step(ctx: Context, net: MLP, x_h: np.ndarray, t_h: np.ndarray, device: str,
                   lr: float) -> tuple[Callable[[], Any] | None, str, float]:
    """A warmed-up ``torch.compile`` step, or ``None`` and why; and the seconds the first call took."""
    assert ctx.peer is not None
    if ctx.args.no_compile:
        return None, "--no-compile", 0.0
    reason = ctx.peer.compile_reason()
    if reason:
        return None, reason, 0.0
    if ctx.compile_spent > ctx.compile_budget:
        return None, (f"compiling the earlier nets took {ctx.compile_spent:.0f} s, over --compile-budget "
                      f"{ctx.compile_budget:g} s"), 0.0
    t0 = time.perf_counter()
    try:
        fn = ctx.peer.step_fn(net, x_h, t_h, device, lr=lr, compiled=True)
        fn()
        ctx.peer.synchronizer(device)()
    except Exception as exc:  # noqa: BLE001 - no compiler here, or a compiler error: skip the column
        return None, ctx.peer.compile_failed(exc), time.perf_counter() - t0
    finally:
        ctx.compile_spent += time.perf_counter() - t0
    return fn, "", time.perf_counter() - t0



def _step_case(ctx: Context, b: Backend, case: Case, sizes: list[int], batch: int, rng: np.random.Generator,
               device: str | None, notes: list[str]) -> tuple[dict[str, Timing], float | None]:
    """Time backprop's step, PyTorch eager and compiled (where they run) on one net; notes why not."""
    k = b.kernels
    lr = 1e-3
    net = make_net(sizes, case.activation, case.head, b)
    x_h, t_h = random_batch(sizes, batch, case.head, rng)
    x, t = k.to_device(x_h, DTYPE), k.to_device(t_h, DTYPE)
    opt = SGD(lr=lr)
    ops: dict[str, Callable[[], Any]] = {"backprop": lambda: net.train_step_device(x, t, opt)}
    compile_s = None
    if device is not None:
        assert ctx.peer is not None
        ops["torch"] = ctx.peer.step_fn(net, x_h, t_h, device, lr=lr)
        fn, reason, compile_s = _compiled_step(ctx, net, x_h, t_h, device, lr)
        if fn is not None:
            ops["torch_compile"] = fn
        elif f"torch.compile not measured: {reason}" not in notes:
            notes.append(f"torch.compile not measured: {reason}")
    return ctx.time(ops, ctx.sync(b, device)), compile_s



def section_step(ctx: Context) -> dict[str, Any]:
    """``train_step_device`` against PyTorch eager and compiled on :data:`~.cases.STEP_CASES` (ratio =
    other / backprop), each net's TFLOP/s ``= step_flops / t``, and for the GEMM-bound net the fraction of the
    measured GEMM rate."""
    b = ctx.require_device()
    rng = np.random.default_rng(3)
    device, why = ctx.torch_device(b)
    notes = [why] if why else []
    gemm_n = ctx.args.gemm_size if ctx.args.gemm_size is not None else (64 if ctx.quick else 4096)
    gemm = gemm_rate(b, gemm_n, ctx)
    notes.append(f"float32 GEMM {gemm_n}^3 through the backend's layer call: {gemm / 1e12:.3g} TFLOP/s")
    rows, raw = [], {}
    for case in cases.STEP_CASES:
        sizes, batch = case.at(ctx.quick)
        tm, compile_s = _step_case(ctx, b, case, sizes, batch, rng, device, notes)
        if device is not None and ctx.peer is not None:
            ctx.peer.release(device)
        release_device_memory(b)
        flops = step_flops(sizes, batch)
        bp = tm["backprop"].median
        tt, tc = tm.get("torch"), tm.get("torch_compile")
        rows.append([case.name, str(sizes), str(batch), f"{flops / 1e9:.3g}", fmt_ms(bp),
                     fmt_ms(tt.median if tt else None), fmt_ratio(tt.median / bp if tt else None),
                     fmt_ms(tc.median if tc else None), fmt_ratio(tc.median / bp if tc else None),
                     f"{flops / bp / 1e12:.3g}"])
        raw[case.name] = {"sizes": sizes, "batch": batch, "flops": flops, "compile_first_call_s": compile_s,
                          "timings": {op: timing_dict(v) for op, v in tm.items()}}
        if case.gemm_bound:
            frac = flops / bp / gemm
            raw[case.name]["fraction_of_gemm"] = frac
            line = f"{case.name}: backprop reaches {flops / bp / 1e12:.3g} TFLOP/s, {100 * frac:.0f}% of that GEMM rate"
            if tt:
                line += f"; torch eager {flops / tt.median / 1e12:.3g} TFLOP/s, {100 * flops / tt.median / gemm:.0f}%"
            notes.append(line)
    return {
        "description": ("One training step on a fixed batch, the loss read back every step on both sides: backprop "
                        "`net.train_step_device(x, t, SGD(lr=1e-3))`; PyTorch `zero_grad`, forward, loss, `backward`, "
                        "`SGD.step`, `loss.item()`, eager and with the model under `torch.compile` (first call, the "
                        "compilation, excluded). TF32 as each library defaults on the backend (off in backprop). "
                        f"Median of {ctx.repeats} interleaved samples; ratio = other / backprop (above 1: backprop "
                        "faster)."),
        "tables": [{"header": ["net", "sizes", "batch", "GFLOP/step", "backprop ms", "torch eager ms",
                               "eager / backprop", "torch.compile ms", "compile / backprop", "backprop TFLOP/s"],
                    "rows": rows}],
        "notes": notes, "gemm": {"n": gemm_n, "flops_per_s": gemm}, "cases": raw,
        "settings": {"backend": b.name, "torch_device": device, "repeats": ctx.repeats},
    }



