"""The sweep: for one backend, time forward, gradient and training step over a range of net sizes,
the finite-difference gradient at the small ones, and fit the cost exponents.

Everything is returned as plain JSON-ready dicts (see :mod:`backprop.bench.report` for the layout).
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..backend import Backend
from ..network import MLP
from ..optimizers import SGD
from .fd import FDTimeout, fd_gradient, fd_pass_op, relative_error
from .powerlaw import fit_power_law, local_slopes
from .nets import (
    DEFAULT_DEPTH,
    available_bytes,
    estimate_bytes,
    flop_counts,
    flop_ratio,
    is_out_of_memory,
    n_params,
    parse_sizes,
    step_flop_ratio,
)
from .torch_peer import TorchPeer
from .progress import Progress
from .timing import Timing, time_ops, time_repeated

__all__ = ["BATCH_RULE", "DEFAULT_BATCH_CPU", "DEFAULT_BATCH_GPU", "DEFAULT_SIZES_CPU", "DEFAULT_SIZES_GPU", "QUICK_SIZES",
           "BenchConfig", "run_backend"]

#: Default sweeps (parameter counts, 4 a decade on a CPU): about 1e3 to 1e7 on a CPU, to 1e9 on a GPU.
DEFAULT_SIZES_CPU = "1e3:1e7:17"
DEFAULT_SIZES_GPU = "1e3:1e9:19"
QUICK_SIZES = "1e3:1e6:7"
#: Default batches: on a GPU a batch of 256 leaves even the largest nets of the sweep bound by the fixed
#: cost of the calls (no size was GEMM-bound on an H200 at 256; at 4096 the large ones were), so a GPU
#: backend gets 4096 unless ``batch`` is given.
DEFAULT_BATCH_CPU = 256
DEFAULT_BATCH_GPU = 4096
BATCH_RULE = (f"batch {DEFAULT_BATCH_GPU} on a GPU backend, {DEFAULT_BATCH_CPU} on a CPU backend "
              "(the default; --batch sets one for all)")
OPS = ("forward", "gradient", "step")


@dataclass
class BenchConfig:
    """What to measure and how; ``sizes=None`` picks the default sweep for each backend's device."""

    sizes: str | None = None
    depth: int = DEFAULT_DEPTH
    batch: int | None = None  #: ``None``: :data:`DEFAULT_BATCH_GPU` on a GPU backend, :data:`DEFAULT_BATCH_CPU` on a CPU
    dtype: str = "float32"
    repeats: int = 7
    warmup: int = 2
    min_sample_time: float = 0.01
    lr: float = 1e-7
    seed: int = 0
    fd: bool = True
    fd_max_n: float = 3e4
    fd_extrapolate: bool = True
    fd_batch: int | None = None
    fd_repeats: int = 3
    fd_time_limit: float = 30.0
    fit_min_n: float | None = None
    overhead_factor: float = 30.0
    mem_fraction: float = 0.8
    retries: int = 1
    unstable_spread: float = 0.1
    quick: bool = False
    peers: list[str] = field(default_factory=list)

    def sizes_for(self, backend: Backend) -> list[list[int]]:
        spec = self.sizes or (QUICK_SIZES if self.quick else DEFAULT_SIZES_GPU if backend.is_gpu else DEFAULT_SIZES_CPU)
        return parse_sizes(spec, self.depth)

    def batch_for(self, backend: Backend) -> int:
        """The batch of the timed passes on ``backend``: ``batch`` when given, else by the device (see
        :data:`BATCH_RULE`)."""
        if self.batch is not None:
            return self.batch
        return DEFAULT_BATCH_GPU if backend.is_gpu else DEFAULT_BATCH_CPU

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _release(backend: Backend) -> None:
    """Free what the last size left behind, on the host and in the backend's memory pool (if it keeps one)."""
    gc.collect()
    if backend.capabilities.memory_pool:
        backend.kernels.release_memory()


def _data(backend: Backend, sizes: list[int], batch: int, dtype: str, seed: int) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    x_host = rng.standard_normal((batch, sizes[0])).astype(dtype)
    t_host = rng.standard_normal((batch, sizes[-1])).astype(dtype)
    k = backend.kernels
    return x_host, t_host, k.to_device(x_host, dtype), k.to_device(t_host, dtype)


def _net(backend: Backend, sizes: list[int], cfg: BenchConfig) -> MLP:
    return MLP(sizes, activation="relu", output="identity", loss="mse", dtype=cfg.dtype, seed=cfg.seed,
               backend=backend.name)


def _fmt_n(n: float) -> str:
    return f"{n:.3g}" if n < 1e4 else f"{n:.2e}".replace("e+0", "e").replace("e+", "e")


class _Runner:
    def __init__(self, backend: Backend, cfg: BenchConfig, progress: Progress, peers: list[TorchPeer]) -> None:
        self.backend = backend
        self.cfg = cfg
        self.batch = cfg.batch_for(backend)
        self.progress = progress
        self.peers = peers
        self.messages: list[str] = []
        self.errors = 0
        self._floor: dict[int, Timing] = {}
        self.fd_records: list[dict[str, Any]] = []

    def say(self, msg: str) -> None:
        self.messages.append(msg)
        self.progress.write(f"[{self.backend.name}] {msg}")

    def timing_kwargs(self) -> dict[str, Any]:
        c = self.cfg
        return {"repeats": c.repeats, "warmup": c.warmup, "min_sample_time": c.min_sample_time,
                "sync": self.backend.synchronize}

    # ---------------------------------------------------------------- overhead floor
    def floor(self, depth: int) -> Timing:
        """Forward time of a net of ``depth`` layers of width 1 at batch 1: the fixed cost of the calls."""
        if depth not in self._floor:
            sizes = [1] * (depth + 1)
            net = _net(self.backend, sizes, self.cfg)
            _, _, x, _ = _data(self.backend, sizes, 1, self.cfg.dtype, self.cfg.seed)
            self._floor[depth] = time_ops({"forward": lambda: net.forward_device(x)}, **self.timing_kwargs())["forward"]
        return self._floor[depth]

    def memory_check(self, sizes: list[int], batch: int) -> str | None:
        itemsize = np.dtype(self.cfg.dtype).itemsize
        need = estimate_bytes(sizes, batch, itemsize, peers=len(self.peers))
        have = available_bytes(self.backend)
        if have is not None and need > self.cfg.mem_fraction * have:
            return (f"N={_fmt_n(n_params(sizes))} {sizes} skipped: needs about {need / 2**30:.2f} GiB, "
                    f"{have / 2**30:.2f} GiB free")
        return None

    # ---------------------------------------------------------------- one size
    def measure(self, sizes: list[int]) -> dict[str, Any]:
        cfg, backend = self.cfg, self.backend
        n = n_params(sizes)
        rec: dict[str, Any] = {
            "sizes": sizes, "n_params": n, "batch": self.batch, "status": "ok", "message": "",
            "flops": flop_counts(sizes, self.batch), "flop_ratio": flop_ratio(sizes),
            "step_flop_ratio": step_flop_ratio(sizes, self.batch),
            "est_bytes": estimate_bytes(sizes, self.batch, np.dtype(cfg.dtype).itemsize, peers=len(self.peers)),
        }
        skip = self.memory_check(sizes, self.batch)
        if skip:
            rec.update(status="skipped", message=skip)
            self.say(skip)
            return rec
        net = x = t = None
        start = time.perf_counter()
        try:
            net = _net(backend, sizes, cfg)
            x_host, t_host, x, t = _data(backend, sizes, self.batch, cfg.dtype, cfg.seed + 1)
            opt = SGD(lr=cfg.lr)
            params = net.get_params() if self.peers else None
            ops = {
                "forward": lambda: net.forward_device(x),
                "gradient": lambda: net.loss_and_grads_device(x, t),
                "step": lambda: net.train_step_device(x, t, opt),
            }
            timings, spread, cold, attempts = {}, float("inf"), {}, 0
            while attempts <= max(0, cfg.retries):
                attempts += 1
                again = time_ops(ops, **self.timing_kwargs())
                cold = cold or {op: tm.first_call for op, tm in again.items()}
                sp = max((tm.q3 - tm.q1) / tm.median for tm in again.values())
                if sp < spread:
                    timings, spread = again, sp
                if spread <= cfg.unstable_spread:
                    break
            for op, tm in timings.items():
                tm.first_call = cold[op]  # the cold call is the first attempt's
            rec["attempts"] = attempts
            rec["spread"] = spread
            rec["unstable"] = bool(spread > cfg.unstable_spread)
            rec["timings"] = {op: timings[op].to_dict() for op in OPS}
            rec["ratio_grad"] = timings["gradient"].median / timings["forward"].median
            rec["ratio_step"] = timings["step"].median / timings["forward"].median
            rec["ratio_grad_min"] = timings["gradient"].min / timings["forward"].min
            rec["ratio_step_min"] = timings["step"].min / timings["forward"].min
            floor = self.floor(len(sizes) - 1)
            rec["overhead_floor"] = floor.median
            rec["gemm_bound"] = bool(timings["forward"].median >= cfg.overhead_factor * floor.median)
            rec["gflops_forward"] = rec["flops"]["forward"] / timings["forward"].median / 1e9
            if self.peers:
                net.set_params(params)
                rec["peers"] = {p.name: self.measure_peer(p, net, x_host, t_host, timings) for p in self.peers}
            if cfg.fd and (cfg.fd_extrapolate or n <= cfg.fd_max_n):
                self.measure_fd(rec, net, x, t)
        except Exception as exc:  # noqa: BLE001 - one size failing must not lose the rest of the sweep
            if is_out_of_memory(exc):
                rec.update(status="skipped", message=f"N={_fmt_n(n)} {sizes} skipped: out of memory ({exc})")
            else:
                self.errors += 1
                rec.update(status="error", message=f"N={_fmt_n(n)} {sizes} failed: {type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc())
            self.say(rec["message"])
        finally:
            net = x = t = None  # the arrays go before the next size is built
            _release(backend)
            rec["wall_s"] = time.perf_counter() - start
        return rec

    def measure_peer(self, peer: TorchPeer, net: MLP, x_host: np.ndarray, t_host: np.ndarray,
                     ours: dict[str, Timing]) -> dict[str, Any]:
        device, why = peer.device_for(self.backend)
        if device is None:
            return {"status": "unavailable", "message": why}
        try:
            theirs = peer.time_net(net, x_host, t_host, device, lr=self.cfg.lr, repeats=self.cfg.repeats,
                                   warmup=self.cfg.warmup, min_sample_time=self.cfg.min_sample_time)
        except Exception as exc:  # noqa: BLE001
            kind = "skipped" if is_out_of_memory(exc) else "error"
            msg = f"{peer.name} on N={_fmt_n(net.n_params)}: {type(exc).__name__}: {exc}"
            self.say(msg)
            return {"status": kind, "message": msg}
        out: dict[str, Any] = {"status": "ok", "device": device,
                               "timings": {op: theirs[op].to_dict() for op in OPS}}
        out["ratio_grad"] = theirs["gradient"].median / theirs["forward"].median
        out["ratio_step"] = theirs["step"].median / theirs["forward"].median
        # backprop time / peer time: below 1 means backprop is faster
        out["vs"] = {op: ours[op].median / theirs[op].median for op in OPS}
        return out

    # ---------------------------------------------------------------- finite differences
    def measure_fd(self, rec: dict[str, Any], net: MLP | None = None, x: Any = None, t: Any = None) -> dict[str, Any]:
        """Time one finite-difference pass (calibrated like the other timings); then, at small N, all
        ``N + 1`` of them, the full naive gradient, checked against backpropagation. Uses ``net`` and its
        batch ``(x, t)`` when given and the FD batch is the main one; builds its own otherwise."""
        cfg, backend = self.cfg, self.backend
        sizes, n = rec["sizes"], rec["n_params"]
        batch = cfg.fd_batch or self.batch
        out: dict[str, Any] = {"sizes": sizes, "n_params": n, "batch": batch, "evaluations": n + 1,
                               "status": "ok", "message": "", "measured": False}
        own = net is None or batch != self.batch
        try:
            if own:
                net = _net(backend, sizes, cfg)
                _, _, x, t = _data(backend, sizes, batch, cfg.dtype, cfg.seed + 1)
            assert net is not None
            if batch == self.batch:
                fwd, grad = rec["timings"]["forward"], rec["timings"]["gradient"]
            else:
                same = time_ops({"forward": lambda: net.forward_device(x),
                                 "gradient": lambda: net.loss_and_grads_device(x, t)}, **self.timing_kwargs())
                fwd, grad = same["forward"].to_dict(), same["gradient"].to_dict()
            floor = self.floor(len(sizes) - 1)
            op, restore = fd_pass_op(net, x, t, seed=cfg.seed)
            try:
                one = time_ops({"pass": op}, **self.timing_kwargs())["pass"]
            finally:
                restore()
            estimate = (n + 1) * one.median
            out.update(forward=fwd, gradient=grad, one_pass=one.to_dict(), estimate=estimate, time=estimate,
                       gemm_bound=bool(fwd["median"] >= cfg.overhead_factor * floor.median))
            if n <= cfg.fd_max_n:
                if estimate > cfg.fd_time_limit:
                    self.say(f"finite differences in full at N={_fmt_n(n)} skipped: about {estimate:.0f} s a run, "
                             f"over --fd-time-limit {cfg.fd_time_limit:g} s (estimated from one pass)")
                else:
                    limit = max(3 * cfg.fd_time_limit, 3 * estimate)
                    timing, grads = time_repeated(
                        lambda: fd_gradient(net, x, t, deadline=time.perf_counter() + limit),
                        repeats=cfg.fd_repeats, budget=cfg.fd_time_limit, sync=backend.synchronize)
                    _, bp_grads = net.loss_and_grads_device(x, t)
                    out.update(measured=True, full=timing.to_dict(), time=timing.median,
                               estimate_error=estimate / timing.median - 1,
                               rel_error=relative_error(grads, bp_grads, backend.kernels.to_host))
            out["per_pass"] = out["time"] / (n + 1)
            out["speedup"] = out["time"] / grad["median"]
        except FDTimeout:
            out.update(status="aborted", message=f"finite differences at N={_fmt_n(n)} aborted: far slower than "
                                                 "predicted from one pass (is the machine busy?)")
            self.say(out["message"])
        except Exception as exc:  # noqa: BLE001
            if is_out_of_memory(exc):
                out.update(status="skipped", message=f"finite differences at N={_fmt_n(n)}: out of memory")
            else:
                self.errors += 1
                out.update(status="error", message=f"finite differences at N={_fmt_n(n)} failed: "
                                                   f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            self.say(out["message"])
        finally:
            if own:
                net = x = t = None
                _release(backend)
        self.fd_records.append(out)
        return out


def _fit_block(points: list[tuple[float, float, bool]], min_n: float | None, what: str,
               factor: float) -> dict[str, Any] | None:
    """Fit over the GEMM-bound points (or ``N >= min_n``); fall back to the 3 largest if fewer than 3."""
    if len({p[0] for p in points}) < 2:
        return None
    if min_n is not None:
        chosen = [p for p in points if p[0] >= min_n]
        rule = f"N >= {min_n:g} (--fit-min-n)"
    else:
        chosen = [p for p in points if p[2]]
        rule = (f"GEMM-bound sizes: forward time at least {factor:g}x the fixed per-call overhead "
                "(and every larger size too)")
    if len(chosen) < 3:
        chosen = points[-3:]
        rule = f"fallback: the {len(chosen)} largest sizes ({what}: fewer than 3 sizes met the rule '{rule}')"
    fit = fit_power_law([p[0] for p in chosen], [p[1] for p in chosen])
    out = fit.to_dict()
    out["rule"] = rule
    out["n_used"] = [p[0] for p in chosen]
    return out


def _contiguous_from_top(records: list[dict[str, Any]]) -> None:
    """A size counts as GEMM-bound only if every larger one does too (noise cannot add a stray small one)."""
    failed = False
    for r in reversed(records):
        r["gemm_bound_raw"] = r["gemm_bound"]
        failed = failed or not r["gemm_bound"]
        r["gemm_bound"] = not failed


def _plain_fit(points: list[tuple[float, float]], rule: str) -> dict[str, Any] | None:
    if len({p[0] for p in points}) < 2:
        return None
    return {**fit_power_law([p[0] for p in points], [p[1] for p in points]).to_dict(), "rule": rule,
            "n_used": [p[0] for p in points]}


def run_backend(backend: Backend, cfg: BenchConfig, progress: Progress | None = None,
                peers: list[TorchPeer] | None = None) -> dict[str, Any]:
    """Run the whole sweep on ``backend``; returns its JSON-ready result."""
    progress = progress or Progress(0, enabled=False)
    runner = _Runner(backend, cfg, progress, [p for p in (peers or []) if p.available])
    all_sizes = cfg.sizes_for(backend)
    records = []
    for sizes in all_sizes:
        progress.set_description(f"{backend.name} N={_fmt_n(n_params(sizes))}")
        records.append(runner.measure(sizes))
        progress.update()
    ok = [r for r in records if r["status"] == "ok"]
    _contiguous_from_top(ok)

    fd_records = runner.fd_records

    fits: dict[str, Any] = {}
    for op in OPS:
        pts = [(r["n_params"], r["timings"][op]["median"], r["gemm_bound"]) for r in ok]
        fits[op] = _fit_block(pts, cfg.fit_min_n, op, cfg.overhead_factor)
    fd_ok = [f for f in fd_records if f["status"] == "ok"]
    _contiguous_from_top(fd_ok)
    fits["finite_differences"] = _fit_block([(f["n_params"], f["time"], f["gemm_bound"]) for f in fd_ok],
                                            cfg.fit_min_n, "finite differences", cfg.overhead_factor)
    measured = [f for f in fd_ok if f["measured"]]
    fits["finite_differences_measured"] = _plain_fit([(f["n_params"], f["time"]) for f in measured],
                                                     "finite differences measured in full (all N + 1 passes)")
    fits["finite_differences_pass"] = _plain_fit([(f["n_params"], f["per_pass"]) for f in measured],
                                                 "one finite-difference pass, at the sizes measured in full")

    bound = [r for r in ok if r["gemm_bound"]] if cfg.fit_min_n is None else \
        [r for r in ok if r["n_params"] >= cfg.fit_min_n]
    checks: dict[str, Any] = {"gemm_bound_sizes": [r["n_params"] for r in bound],
                              "unstable_sizes": [r["n_params"] for r in ok if r.get("unstable")]}
    if bound:
        checks.update(
            max_ratio_grad=max(r["ratio_grad"] for r in bound),
            max_ratio_step=max(r["ratio_step"] for r in bound),
            max_ratio_grad_best=max(r["ratio_grad_min"] for r in bound),
            max_ratio_step_best=max(r["ratio_step_min"] for r in bound),
            max_flop_ratio=max(r["flop_ratio"] for r in bound),
            ratio_grad_at_most_3=all(r["ratio_grad"] <= 3 for r in bound),
            ratio_step_at_most_3=all(r["ratio_step"] <= 3 for r in bound),
            ratio_grad_at_most_5=all(r["ratio_grad"] <= 5 for r in bound),
            ratio_step_at_most_5=all(r["ratio_step"] <= 5 for r in bound),
        )
    first = ok[0]["timings"] if ok else {}
    result = {
        "backend": backend.name,
        "is_gpu": backend.is_gpu,
        "batch": runner.batch,
        "batch_default": cfg.batch is None,
        "sizes": records,
        "finite_differences": fd_records,
        "fits": fits,
        "local_slopes": {op: local_slopes([r["n_params"] for r in ok], [r["timings"][op]["median"] for r in ok])
                         for op in OPS} if len(ok) >= 2 else {},
        "overhead_floor": {str(d): t.to_dict() for d, t in runner._floor.items()},
        "first_call_excess": {op: first[op]["first_call_excess"] for op in first},
        "checks": checks,
        "messages": runner.messages,
        "errors": runner.errors,
    }
    return result
