"""Sections 1 and 2, the public paths: ``fit`` (one epoch of ``net.fit`` against a PyTorch loop) and ``api``
(the public methods on device arrays against the device-level ones)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ...backend import Backend
from ...optimizers import SGD
from ..timing import Timing
from . import cases
from .cases import Case
from .context import DTYPE, Context, fmt_ms, fmt_ratio, make_net, random_batch, release_device_memory, timing_dict

__all__ = ["section_api", "section_fit"]


def section_fit(ctx: Context) -> dict[str, Any]:
    """One epoch of ``net.fit`` from host arrays and from device arrays against a PyTorch eager loop with the
    data on the device; target: ``t_torch / t_backprop >= FIT.target`` (medians)."""
    b = ctx.require_device()
    sizes, n, bs = cases.FIT.at(ctx.quick)
    lr, momentum = cases.FIT.lr, cases.FIT.momentum
    repeats = ctx.args.fit_repeats if ctx.args.fit_repeats is not None else (1 if ctx.quick else 3)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, sizes[0]), dtype=np.float32)
    y = rng.integers(0, sizes[-1], n)
    k = b.kernels
    notes: list[str] = []
    device, why = ctx.torch_device(b)
    ops: dict[str, Callable[[], Any]] = {}
    losses: dict[str, float] = {}
    if device is not None:
        assert ctx.peer is not None
        torch_epoch = ctx.peer.epoch_fn(make_net(sizes, "relu", "multiclass", b), X, y, device, batch_size=bs, lr=lr,
                                        momentum=momentum)
        ops["torch"] = lambda: losses.__setitem__("torch", torch_epoch())
    else:
        notes.append(why)
    nets = {"host": make_net(sizes, "relu", "multiclass", b), "device": make_net(sizes, "relu", "multiclass", b)}
    opts = {name: SGD(lr, momentum=momentum) for name in nets}
    Xd = k.to_device(X, DTYPE)
    Td = k.to_device(np.eye(sizes[-1], dtype=DTYPE)[y], DTYPE)
    args = {"host": (X, y), "device": (Xd, Td)}

    def fit_op(name: str) -> Callable[[], Any]:
        def run() -> None:
            h = nets[name].fit(*args[name], epochs=1, batch_size=bs, optimizer=opts[name], progress=False)
            losses[name] = h.loss[-1]
        return run

    ops = {"host": fit_op("host"), "device": fit_op("device"), **ops}
    tm = ctx.time(ops, ctx.sync(b, device), repeats=repeats, warmup=0, min_sample_time=0.0)
    labels = {"host": "backprop `net.fit(X, y)`, NumPy X and integer labels y",
              "device": "backprop `net.fit(X, T)`, X and one-hot T already on the device",
              "torch": "PyTorch eager loop, data on the device"}
    rows, targets = [], []
    t_torch = tm.get("torch")
    for name, t in tm.items():
        ratio = t_torch.median / t.median if t_torch is not None and name != "torch" else None
        best = t_torch.min / t.min if t_torch is not None and name != "torch" else None
        rows.append([labels[name], f"{t.first_call:.4g}", f"{t.min:.4g}", f"{t.median:.4g}", fmt_ratio(ratio),
                     fmt_ratio(best), f"{losses.get(name, float('nan')):.4g}"])
        if name != "torch":
            targets.append({"what": f"PyTorch epoch / backprop epoch, {name} arrays (median)",
                            "target": f">= {cases.FIT.target}", "measured": ratio,
                            "met": None if ratio is None else bool(ratio >= cases.FIT.target)})
    return {
        "description": (f"One epoch, {n} x {sizes[0]} random float32 data, {sizes[-1]} classes, {sizes}, ReLU, softmax "
                        f"+ cross-entropy, batch {bs}, SGD(lr={lr}, momentum={momentum}); the first epoch of each "
                        f"is the warm-up (its time in the first column), then {repeats} epoch(s) each, interleaved. "
                        "backprop reads its loss once per epoch; so does the PyTorch loop (`torch.randperm` on the "
                        "device, minibatches gathered there, the loss summed there)."),
        "tables": [{"header": ["variant", "warm-up epoch s", "best s", "median s", "torch / this (median)",
                               "torch / this (best)", "epoch loss"], "rows": rows}],
        "targets": targets, "notes": notes,
        "settings": {"sizes": sizes, "rows": n, "batch_size": bs, "lr": lr, "momentum": momentum,
                     "repeats": repeats, "backend": b.name, "torch_device": device},
        "timings": {name: timing_dict(t) for name, t in tm.items()}, "epoch_loss": losses,
    }



def _api_case(ctx: Context, b: Backend, case: Case, sizes: list[int], batch: int,
              rng: np.random.Generator) -> dict[str, Timing]:
    """The timings of the public and the device-level step and forward pass on one net."""
    k = b.kernels
    net = make_net(sizes, case.activation, case.head, b)
    x_h, t_h = random_batch(sizes, batch, case.head, rng)
    x, t = k.to_device(x_h, DTYPE), k.to_device(t_h, DTYPE)
    opt = SGD(lr=1e-3)
    ops = {"train_step": lambda: net.train_step(x, t, opt),
           "train_step_device": lambda: net.train_step_device(x, t, opt),
           "forward": lambda: net.forward(x),
           "forward_device": lambda: net.forward_device(x)}
    return ctx.time(ops, b.synchronize)



def section_api(ctx: Context) -> dict[str, Any]:
    """``train_step`` / ``train_step_device`` and ``forward`` / ``forward_device`` on the same device arrays;
    target: each ratio of medians ``<= API_TARGET``."""
    b = ctx.require_device()
    rng = np.random.default_rng(1)
    rows, targets, raw = [], [], {}
    for case in cases.API_CASES:
        sizes, batch = case.at(ctx.quick)
        tm = _api_case(ctx, b, case, sizes, batch, rng)
        release_device_memory(b)
        step_ratio = tm["train_step"].median / tm["train_step_device"].median
        fwd_ratio = tm["forward"].median / tm["forward_device"].median
        rows.append([case.name, str(sizes), str(batch), fmt_ms(tm["train_step"].median),
                     fmt_ms(tm["train_step_device"].median), fmt_ratio(step_ratio), fmt_ms(tm["forward"].median),
                     fmt_ms(tm["forward_device"].median), fmt_ratio(fwd_ratio)])
        for what, r in (("train_step / train_step_device", step_ratio), ("forward / forward_device", fwd_ratio)):
            targets.append({"what": f"{case.name}: {what}", "target": f"<= {cases.API_TARGET}", "measured": r,
                            "met": bool(r <= cases.API_TARGET)})
        raw[case.name] = {"sizes": sizes, "batch": batch, "timings": {op: timing_dict(v) for op, v in tm.items()}}
    return {
        "description": ("The public methods called with arrays of the backend (x, t made by `to_device`) against "
                        "the device-level methods on the same arrays: `net.train_step(x, t, opt)` vs "
                        "`net.train_step_device(x, t, opt)` (SGD, lr 1e-3) and `net.forward(x)` vs "
                        f"`net.forward_device(x)`; median of {ctx.repeats} interleaved samples, ms per call."),
        "tables": [{"header": ["net", "sizes", "batch", "train_step ms", "train_step_device ms", "ratio",
                               "forward ms", "forward_device ms", "ratio"], "rows": rows}],
        "targets": targets, "settings": {"backend": b.name, "repeats": ctx.repeats}, "cases": raw,
    }



