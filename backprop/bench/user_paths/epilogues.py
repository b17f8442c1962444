"""Section 7, ``epilogues``: the training step with cuBLASLt epilogues off and on against PyTorch, and the
GEMM-bound net's rate against the measured cuBLAS rate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ...optimizers import SGD
from . import cases
from .context import (
    DTYPE,
    Context,
    fmt_ms,
    fmt_ratio,
    gemm_rate,
    make_net,
    random_batch,
    step_flops,
    switch_of,
    switched,
    timing_dict,
)

__all__ = ["section_epilogues"]


def section_epilogues(ctx: Context) -> dict[str, Any]:
    """The SGD training step with cuBLASLt epilogues off and on (``set_epilogues``) against the PyTorch eager
    step, on the nets of the targets; the GEMM-bound net's rate against the measured cuBLAS rate."""
    b = ctx.require_device()
    k = b.kernels
    switch = switch_of(b, "epilogues", "cuBLASLt epilogues")
    before = bool(k.epilogues_enabled())
    rows, targets, raw, notes = [], [], [], []
    try:
        for case, target in cases.EPILOGUE_CASES:
            sizes, batch = case.at(ctx.quick)
            device, why = ctx.torch_device(b)
            if why and why not in notes:
                notes.append(why)
            net = make_net(sizes, case.activation, case.head, b)
            x_h, t_h = random_batch(sizes, batch, case.head, np.random.default_rng(7))
            x, t = k.to_device(x_h, DTYPE), k.to_device(t_h, DTYPE)
            sgd = SGD(lr=1e-3)
            ops: dict[str, Callable[[], Any]] = {
                tag: switched(switch, on, lambda: net.train_step_device(x, t, sgd))
                for tag, on in (("off", False), ("on", True))}
            if device is not None and ctx.peer is not None:
                ops["torch"] = ctx.peer.step_fn(net, x_h, t_h, device, lr=1e-3)
            tm = ctx.time(ops, ctx.sync(b, device))
            switch(True)
            paths = sorted({p for key, p in k.epilogue_paths().items() if key[-1] == "f"})
            switch(False)
            flops = step_flops(sizes, batch)
            off, on = tm["off"].median, tm["on"].median
            peer = tm.get("torch")
            share = None
            if case.gemm_bound:
                rate = gemm_rate(b, sizes[1], ctx)  # epilogues off: cuBLAS's own GEMM
                share = flops / on / rate
                targets.append({"what": f"{case.name}: rate with epilogues / measured cuBLAS rate",
                                "target": f">= {cases.EPILOGUE_GEMM_SHARE}", "measured": share,
                                "met": bool(share >= cases.EPILOGUE_GEMM_SHARE)})
            if peer is not None and target is not None:
                ratio = peer.median / on
                targets.append({"what": f"{case.name}: torch eager / epilogues", "target": f">= {target}",
                                "measured": ratio, "met": bool(ratio >= target)})
            rows.append([case.name, str(list(sizes)), str(batch), fmt_ms(off), fmt_ms(on), fmt_ratio(off / on),
                         fmt_ms(peer.median if peer else None), fmt_ratio(peer.median / on if peer else None),
                         f"{flops / on / 1e12:.1f}", "" if share is None else f"{share:.2f}"])
            raw.append({"name": case.name, "sizes": list(sizes), "batch": batch, "paths": paths,
                        "timings": {op: timing_dict(v) for op, v in tm.items()}})
    finally:
        switch(before)
    return {
        "description": ("`train_step_device` with SGD (lr 1e-3) in float32, cuBLASLt epilogues off (a GEMM and an "
                        "elementwise kernel per step of each layer, a GEMV for db) and on (`set_epilogues`: bias and "
                        "activation in the forward GEMM, the ReLU slope in the backward GEMM, db in the gradient "
                        f"GEMM), against the PyTorch eager step; median of {ctx.repeats} interleaved samples."),
        "tables": [{"header": ["net", "sizes", "batch", "off ms", "on ms", "off / on", "torch eager ms",
                               "torch / on", "TFLOP/s on", "share of cuBLAS rate"], "rows": rows}],
        "targets": targets, "notes": notes, "cases": raw,
        "settings": {"backend": b.name, "epilogues_before": before},
    }



