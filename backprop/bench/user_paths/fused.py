"""Section 6, ``fused``: a narrow net's step and inference with the fused kernels off and on (CUDA cores, and
TF32 tensor cores where they take them) against PyTorch, with each fused pass's TFLOP/s and GB/s against the
SGEMM rate and the copy bandwidth measured in the same run. Where the backend has a private choice of CUDA-core
forward kernel (the cupy backend's ``fused_mlp._forward_variant``), each other kernel is timed too, in the same
run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ... import step
from ...backend import Backend
from ...kernels import fused_mlp_sources as fused_sources
from ...network import MLP
from ...optimizers import SGD, Adam
from ..nets import flop_counts
from ..sections import SkipSection
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
    timing_dict,
)

__all__ = ["section_fused"]


def _tf32_variant(b: Backend, peer: Any) -> tuple[Callable[[bool], None] | None, Callable[[bool], None], str]:
    """The switches of the fused section's TF32 rows: the backend's ``set_tf32`` (``None``, with the reason,
    where the fused kernels would not take the tensor cores) and the peer's (a no-op without one)."""
    k = b.kernels
    if not (b.capabilities.tf32 and b.capabilities.fused_mlp):
        return None, lambda on: None, f"backend {b.name!r} has no TF32 fused kernels"
    set_tf32 = k.set_tf32
    before = bool(k.tf32_enabled())
    set_tf32(True)
    try:
        path = k.fused_mlp_path(DTYPE)
    finally:
        set_tf32(before)
    if path != "TF32 tensor cores":
        return None, lambda on: None, f"no TF32 rows: the fused kernels would run on the {path}"
    return set_tf32, (peer.set_tf32 if peer is not None else (lambda on: None)), ""



def _forward_variants(b: Backend) -> tuple[Any, list[str]]:
    """Where ``b``'s fused passes are the cupy backend's: the module holding its private choice of CUDA-core forward
    kernel (``cupy_gpu.fused_mlp._forward_variant``) and the kernels other than its current one
    (``fused_mlp_sources.FORWARD_VARIANTS``); else ``(None, [])``."""
    from ...kernels.cupy_gpu import fused_mlp as cupy_fused  # imports without CuPy

    if b.kernels.mlp_forward is not cupy_fused.mlp_forward:
        return None, []
    return cupy_fused, [v for v in fused_sources.FORWARD_VARIANTS if v != cupy_fused._forward_variant]


def _label(what: str, suffix: str) -> str:
    """The row of pass ``what`` (``sgd``, ``adam``, ``infer``) whose fused ops end in ``suffix``: ``""``, ``"_tf32"``
    or ``"_<forward kernel>"``."""
    if suffix == "_tf32":
        return f"{what} TF32"
    return f"{what} ({suffix[1:]} forward)" if suffix else what


def section_fused(ctx: Context) -> dict[str, Any]:
    """The narrow net's training step (SGD, Adam) and inference, layer by layer and fused (one launch per pass,
    ``set_fused_mlp``), against PyTorch eager on the same device; in float32, then (where the fused kernels take the
    tensor cores) with TF32 on in both frameworks."""
    b = ctx.require_device()
    k = b.kernels
    set_fused = switch_of(b, "fused_mlp", "fused kernels")
    before = bool(k.fused_mlp_enabled())
    tf32_before = bool(k.tf32_enabled()) if b.capabilities.tf32 else False
    sizes, batch = cases.FUSED_CASE.at(ctx.quick)
    device, why = ctx.torch_device(b)
    net = make_net(sizes, cases.FUSED_CASE.activation, cases.FUSED_CASE.head, b)
    reason = k.fused_mlp_reason(net.sizes, [L.activation.name for L in net.layers], net.dtype)
    if reason:
        raise SkipSection(f"the fused kernels do not serve {sizes}: {reason}")
    x_h, t_h = random_batch(sizes, batch, cases.FUSED_CASE.head, np.random.default_rng(6))
    x, t = k.to_device(x_h, DTYPE), k.to_device(t_h, DTYPE)
    sgd, adam = SGD(lr=1e-3), Adam(1e-3)
    peer = ctx.peer if device is not None else None
    set_tf32, peer_tf32, tf32_why = _tf32_variant(b, peer)
    variants = {"": False} | ({"_tf32": True} if set_tf32 is not None else {})
    forward_module, other_forwards = _forward_variants(b)
    forward_before = forward_module._forward_variant if forward_module is not None else None
    # the fused sides: (variant, the CUDA-core forward kernel or None for the backend's current one)
    sides = [(v, None) for v in variants] + [(f"_{kernel}", kernel) for kernel in other_forwards]

    def mode(fused_on: bool, tf32: bool, fn: Callable[[], Any], forward: str | None = None) -> Callable[[], Any]:
        def run() -> Any:  # every side sets every switch: the sides are interleaved
            set_fused(fused_on)
            if set_tf32 is not None:
                set_tf32(tf32)
            peer_tf32(tf32)
            if forward_module is not None:
                forward_module._forward_variant = forward or forward_before
            return fn()
        return run

    ops: dict[str, Callable[[], Any]] = {}
    for v, tf32 in variants.items():
        for on, tag in ((False, "layers"), (True, "fused")):
            ops[f"sgd_{tag}{v}"] = mode(on, tf32, lambda: net.train_step_device(x, t, sgd))
            ops[f"adam_{tag}{v}"] = mode(on, tf32, lambda: net.train_step_device(x, t, adam))
            ops[f"infer_{tag}{v}"] = mode(on, tf32, lambda: net.forward_device(x))
        if peer is not None:
            ops[f"sgd_torch{v}"] = mode(False, tf32, peer.step_fn(net, x_h, t_h, device, lr=1e-3))
            ops[f"infer_torch{v}"] = mode(False, tf32, peer.forward_fn(net, x_h, device))
    for v, kernel in sides[len(variants):]:
        ops[f"sgd_fused{v}"] = mode(True, False, lambda: net.train_step_device(x, t, sgd), kernel)
        ops[f"adam_fused{v}"] = mode(True, False, lambda: net.train_step_device(x, t, adam), kernel)
        ops[f"infer_fused{v}"] = mode(True, False, lambda: net.forward_device(x), kernel)
    try:
        tm = ctx.time(ops, ctx.sync(b, device))
    finally:
        set_fused(before)
        if set_tf32 is not None:
            set_tf32(tf32_before)
        peer_tf32(False)
        if forward_module is not None:
            forward_module._forward_variant = forward_before
    flops = step_flops(sizes, batch)
    rates = _achieved(ctx, b, net, sizes, batch, {f"{w}_fused{v}": tm[f"{w}_fused{v}"].median
                                                  for v, _ in sides for w in ("sgd", "adam", "infer")}, set_tf32)
    rows, targets = [], []
    for v, kernel in sides:
        for what in ("sgd", "adam", "infer"):
            layers, fused_t = tm[f"{what}_layers{v if kernel is None else ''}"].median, tm[f"{what}_fused{v}"].median
            peer_t = tm.get(f"{what}_torch{v if kernel is None else ''}")
            label = _label(what, v)
            rows.append([label, fmt_ms(layers), fmt_ms(fused_t), fmt_ratio(layers / fused_t),
                         fmt_ms(peer_t.median if peer_t else None),
                         fmt_ratio(peer_t.median / fused_t if peer_t else None)])
            if peer_t is not None and kernel is None:
                ratio = peer_t.median / fused_t
                targets.append({"what": f"{label}: torch eager / fused", "target": f">= {cases.FUSED_TARGET}",
                                "measured": ratio, "met": bool(ratio >= cases.FUSED_TARGET)})
    forward_note = (" The rows '(<kernel> forward)' run the fused passes with that CUDA-core forward kernel instead "
                    f"of the backend's `{forward_before}` (its private switch `fused_mlp._forward_variant`)."
                    if other_forwards else "")
    return {
        "description": (f"The narrow net {sizes} @ {batch} ({cases.FUSED_CASE.activation}, MSE) in float32: "
                        "`train_step_device` with SGD and Adam, and `forward_device`, with the fused kernels off "
                        "(a GEMM and an elementwise kernel per layer) and on (one launch per pass), against the "
                        f"PyTorch eager step (SGD) and inference; median of {ctx.repeats} interleaved samples. "
                        "The TF32 rows set TF32 on in both frameworks (`set_tf32`, `allow_tf32`): the fused kernels "
                        f"then run on the tensor cores.{forward_note} Training step: {flops / 1e9:.3g} GFLOP."),
        "tables": [{"header": ["", "layers ms", "fused ms", "layers / fused", "torch eager ms", "torch / fused"],
                    "rows": rows}, rates["table"]],
        "targets": targets, "notes": ([why] if why else []) + ([tf32_why] if tf32_why else []) + [rates["note"]],
        "timings": {op: timing_dict(v) for op, v in tm.items()}, "achieved": rates["values"],
        "settings": {"backend": b.name, "sizes": sizes, "batch": batch, "fused_before": before,
                     "tf32_rows": set_tf32 is not None, "forward_kernel": forward_before,
                     "other_forward_kernels": other_forwards},
    }



def _achieved(ctx: Context, b: Backend, net: MLP, sizes: list[int], batch: int, seconds: dict[str, float],
              set_tf32: Callable[[bool], None] | None = None) -> dict[str, Any]:
    """The fused passes' achieved TFLOP/s and GB/s (activations' traffic, ``fused_mlp_sources.traffic_bytes``)
    against the measured SGEMM rate (the TF32 GEMM rate for ``*_tf32`` passes, measured with ``set_tf32``) and the
    device's copy bandwidth, all measured here."""
    k = b.kernels
    gemm_n = ctx.args.gemm_size if ctx.args.gemm_size is not None else (64 if ctx.quick else 4096)
    sgemm = gemm_rate(b, gemm_n, ctx)
    tf32_gemm = None
    if set_tf32 is not None:
        before = bool(k.tf32_enabled())
        set_tf32(True)
        try:
            tf32_gemm = gemm_rate(b, gemm_n, ctx)
        finally:
            set_tf32(before)
    n_copy = 2**16 if ctx.quick else 2**26  # 256 MB of float32 in full runs
    src, dst = k.zeros((n_copy,), DTYPE), k.zeros((n_copy,), DTYPE)
    copy_s = ctx.time({"copy": lambda: k.copy_into(dst, src)}, b.synchronize)["copy"].median
    copy_bw = 2 * n_copy * np.dtype(DTYPE).itemsize / copy_s  # read and write
    keep_u = step.workspace(net, batch).keep_u
    traffic = fused_sources.traffic_bytes(sizes, keep_u, batch, np.dtype(DTYPE).itemsize)
    fwd_flops = flop_counts(sizes, batch)["forward"]
    work = {"sgd": (step_flops(sizes, batch), traffic["forward"] + traffic["backward"]),
            "adam": (step_flops(sizes, batch), traffic["forward"] + traffic["backward"]),
            "infer": (fwd_flops, traffic["inference"])}
    rows, values = [], {}
    for op, secs in seconds.items():
        flop, nbytes = work[op.split("_")[0]]
        gemm = tf32_gemm if op.endswith("_tf32") and tf32_gemm else sgemm
        tflops, gbs = flop / secs / 1e12, nbytes / secs / 1e9
        values[op] = {"tflops": tflops, "gb_per_s": gbs, "of_sgemm": flop / secs / gemm,
                      "of_copy": nbytes / secs / copy_bw, "flop": flop, "bytes": nbytes}
        label = _label(*op.split("_fused"))
        rows.append([label, f"{tflops:.2f}", f"{values[op]['of_sgemm']:.2f}", f"{gbs:.0f}",
                     f"{values[op]['of_copy']:.2f}"])
    values["sgemm_tflops"], values["copy_gb_per_s"] = sgemm / 1e12, copy_bw / 1e9
    tf32_note = ""
    if tf32_gemm:
        values["tf32_gemm_tflops"] = tf32_gemm / 1e12
        tf32_note = f", the same GEMM in TF32 {tf32_gemm / 1e12:.2f} TFLOP/s (the TF32 rows' reference)"
    return {"table": {"header": ["fused", "TFLOP/s", "of SGEMM", "GB/s", "of copy bandwidth"], "rows": rows},
            "values": values,
            "note": (f"Measured here: SGEMM {sgemm / 1e12:.2f} TFLOP/s ({gemm_n}^3 through layer_forward){tf32_note}, "
                     f"device copy {copy_bw / 1e9:.0f} GB/s ({n_copy * 4 / 1e6:.0f} MB copied); GB/s counts the "
                     "activations the fused passes read and write (kernels.fused_mlp_sources.traffic_bytes).")}



