"""Section 4, ``graph``: the training step recorded as a CUDA graph (``train_step(..., graph=True)``) against the
plain step."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ...optimizers import SGD
from ..sections import SkipSection
from . import cases
from .context import DTYPE, Context, fmt_ms, fmt_ratio, make_net, random_batch, timing_dict

__all__ = ["section_graph"]


def section_graph(ctx: Context) -> dict[str, Any]:
    """Plain ``train_step`` / ``train_step(..., graph=True)`` (target ``>= GRAPH_TARGET``); skipped where the
    backend cannot record a step or the recording falls back to plain steps."""
    b = ctx.require_device()
    k = b.kernels
    sizes, batch = cases.GRAPH_CASE.at(ctx.quick)
    net = make_net(sizes, cases.GRAPH_CASE.activation, cases.GRAPH_CASE.head, b)
    x_h, t_h = random_batch(sizes, batch, cases.GRAPH_CASE.head, np.random.default_rng(4))
    x, t = k.to_device(x_h, DTYPE), k.to_device(t_h, DTYPE)
    opt = SGD(lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # the first call runs a plain step and records the graph
            net.train_step(x, t, opt, graph=True)
        except (ValueError, NotImplementedError) as exc:  # the backend cannot record a step: says why
            raise SkipSection(str(exc)) from None
    fallback = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if fallback:
        raise SkipSection(f"the recording fell back to plain steps on backend {b.name!r}: {fallback[0]}")
    ops = {"plain": lambda: net.train_step(x, t, opt), "graph": lambda: net.train_step(x, t, opt, graph=True),
           "plain_device": lambda: net.train_step_device(x, t, opt)}
    tm = ctx.time(ops, b.synchronize)
    ratio = tm["plain"].median / tm["graph"].median
    return {
        "description": (f"`net.train_step(x, t, opt)` against `net.train_step(x, t, opt, graph=True)` on {sizes} "
                        f"@ {batch} ({cases.GRAPH_CASE.activation}, softmax + cross-entropy, SGD), device arrays; "
                        f"`train_step_device` for reference; median of {ctx.repeats} interleaved samples."),
        "tables": [{"header": ["sizes", "batch", "plain ms", "graph ms", "plain / graph", "train_step_device ms"],
                    "rows": [[str(sizes), str(batch), fmt_ms(tm["plain"].median), fmt_ms(tm["graph"].median),
                              fmt_ratio(ratio), fmt_ms(tm["plain_device"].median)]]}],
        "targets": [{"what": "plain step / graph step", "target": f">= {cases.GRAPH_TARGET}", "measured": ratio,
                     "met": bool(ratio >= cases.GRAPH_TARGET)}],
        "timings": {op: timing_dict(v) for op, v in tm.items()},
        "settings": {"backend": b.name, "sizes": sizes, "batch": batch},
    }



