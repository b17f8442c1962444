"""Section 5, ``tf32``: the GEMM-bound net's step and one GEMM with TF32 off and on, in backprop and PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ...optimizers import SGD
from ..sections import SkipSection
from . import cases
from .context import (
    DTYPE, Context, fmt_ms, fmt_ratio, gemm_rate, make_net, random_batch, step_flops, switch_of, timing_dict,
)

__all__ = ["section_tf32"]


def section_tf32(ctx: Context) -> dict[str, Any]:
    """The GEMM-bound net's ``train_step_device`` and PyTorch's eager step with TF32 off and on, interleaved,
    and the backend's GEMM rate both ways; the backend's TF32 setting is put back after."""
    if ctx.args.no_tf32:
        raise SkipSection("--no-tf32")
    b = ctx.require_device()
    k = b.kernels
    set_tf32 = switch_of(b, "tf32", "TF32")
    before = bool(k.tf32_enabled())
    sizes, batch = cases.TF32_CASE.at(ctx.quick)
    device, why = ctx.torch_device(b)
    net = make_net(sizes, cases.TF32_CASE.activation, cases.TF32_CASE.head, b)
    x_h, t_h = random_batch(sizes, batch, cases.TF32_CASE.head, np.random.default_rng(5))
    x, t = k.to_device(x_h, DTYPE), k.to_device(t_h, DTYPE)
    opt = SGD(lr=1e-3)
    peer = ctx.peer if device is not None else None
    torch_step = peer.step_fn(net, x_h, t_h, device, lr=1e-3) if peer is not None and device else None

    def mode(on: bool, fn: Callable[[], Any], torch_side: bool = False) -> Callable[[], Any]:
        def run() -> Any:
            if torch_side:
                assert peer is not None
                peer.set_tf32(on)
            else:
                set_tf32(on)
            return fn()
        return run

    def backprop_step() -> Any:
        return net.train_step_device(x, t, opt)

    ops: dict[str, Callable[[], Any]] = {"backprop_off": mode(False, backprop_step),
                                         "backprop_on": mode(True, backprop_step)}
    if torch_step is not None:
        ops.update(torch_off=mode(False, torch_step, True), torch_on=mode(True, torch_step, True))
    try:
        tm = ctx.time(ops, ctx.sync(b, device))
        gemm_n = ctx.args.gemm_size if ctx.args.gemm_size is not None else (64 if ctx.quick else 4096)
        set_tf32(False)
        gemm_off = gemm_rate(b, gemm_n, ctx)
        set_tf32(True)
        gemm_on = gemm_rate(b, gemm_n, ctx)
    finally:
        set_tf32(before)
        if peer is not None:
            peer.set_tf32(False)
    flops = step_flops(sizes, batch)
    rows = []
    for side in ("backprop", "torch"):
        if f"{side}_off" not in tm:
            continue
        off, on = tm[f"{side}_off"].median, tm[f"{side}_on"].median
        rows.append([side, fmt_ms(off), fmt_ms(on), fmt_ratio(off / on), f"{flops / off / 1e12:.3g}",
                     f"{flops / on / 1e12:.3g}"])
    rows.append([f"GEMM {gemm_n}^3 (backend)", fmt_ms(2 * gemm_n**3 / gemm_off), fmt_ms(2 * gemm_n**3 / gemm_on),
                 fmt_ratio(gemm_on / gemm_off), f"{gemm_off / 1e12:.3g}", f"{gemm_on / 1e12:.3g}"])
    return {
        "description": (f"The GEMM-bound net {sizes} @ {batch} (ReLU, MSE, SGD), `train_step_device` and the PyTorch "
                        "eager step, with TF32 off and on (set before each call: `set_tf32` on the backend, "
                        "`allow_tf32` in PyTorch), interleaved; and one GEMM through the backend's layer call."),
        "tables": [{"header": ["", "TF32 off ms", "TF32 on ms", "off / on", "TFLOP/s off", "TFLOP/s on"],
                    "rows": rows}],
        "notes": [why] if why else [],
        "timings": {op: timing_dict(v) for op, v in tm.items()},
        "gemm": {"n": gemm_n, "off": gemm_off, "on": gemm_on},
        "settings": {"backend": b.name, "sizes": sizes, "batch": batch, "tf32_before": before},
    }



