"""Reports of a benchmark run: the terminal table, the JSON file and the Markdown report.

JSON layout (``schema: backprop-bench/1``): ``config``, ``machine`` (platform, CPU, load, versions,
BLAS, GPUs), ``peers``, ``backends`` (one entry per backend: ``sizes`` with the raw ``samples`` of every
timing, ``finite_differences``, ``fits``, ``checks``, ``messages``), ``skipped_backends``, ``duration_s``.
Times are seconds per call.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["CHEAP_GRADIENT_BOUND", "fmt_time", "machine_lines", "markdown_report", "noise_banner", "noise_paragraph",
           "noise_verdict", "summary_lines", "terminal_report", "write_json"]

#: The cheap gradient principle (Baur and Strassen, 1983; Griewank): reverse-mode differentiation, i.e.
#: backpropagation, computes the whole gradient for at most a small constant times the cost of evaluating the
#: function itself, whatever the number of parameters; 5 is the usual statement of that constant.
CHEAP_GRADIENT_BOUND = 5.0
CHEAP_GRADIENT_TEXT = (f"the cheap gradient principle (Baur and Strassen): reverse-mode differentiation, which is "
                       f"what backpropagation is, costs at most a small constant times the function evaluation, "
                       f"{CHEAP_GRADIENT_BOUND:g} in the usual statement")
#: CPU pressure (``some avg10``, %) above which other work competes for the CPUs (as ``backprop-bench`` warns)
BUSY_PRESSURE = 20.0
_LEGEND = ("fit: * = in the exponent fit (GEMM-bound), ! = unsteady (interquartile range over 10% of the median); "
           "T: median ± half the interquartile range")
GEMM_RATIO = 3.0


def fmt_time(s: float | None) -> str:
    """Seconds in the unit that reads best: ``12.3 us``, ``4.56 ms``, ``1.23 s``."""
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    if s < 600:
        return f"{s:.2f} s"
    if s < 3 * 3600:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def fmt_n(n: float) -> str:
    return f"{n:.2e}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _widths(sizes: list[int]) -> str:
    if len(set(sizes)) == 1:
        return f"{sizes[0]}x{len(sizes)}"
    return "-".join(map(str, sizes))


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return lines
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w[i]) for i, h in enumerate(header))]
    lines += ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    return lines


def _spread(t: dict[str, Any]) -> str:
    """Median with the interquartile range as +- half of it, in percent."""
    med = t["median"]
    if not med or not math.isfinite(med):
        return "-"
    iqr = (t["q3"] - t["q1"]) / med * 50
    return f"{fmt_time(med)} ±{iqr:.0f}%"


def _main_rows(res: dict[str, Any], peers: list[str], markdown: bool) -> tuple[list[str], list[list[str]]]:
    header = ["N", "layers", "T_fwd", "T_grad", "T_step", "grad/fwd", "step/fwd", "flop ratio", "fit"]
    for p in peers:
        header += [f"fwd vs {p}", f"grad vs {p}", f"step vs {p}"]
    rows = []
    for r in res["sizes"]:
        if r["status"] != "ok":
            rows.append([fmt_n(r["n_params"]), _widths(r["sizes"]), r["status"]] + [""] * (len(header) - 3))
            continue
        t = r["timings"]
        row = [fmt_n(r["n_params"]), _widths(r["sizes"]), _spread(t["forward"]), _spread(t["gradient"]),
               _spread(t["step"]), f"{r['ratio_grad']:.2f}", f"{r['ratio_step']:.2f}", f"{r['flop_ratio']:.2f}",
               ("*" if r.get("in_fit") else "") + ("!" if r.get("unstable") else "")]
        for p in peers:
            pr = r.get("peers", {}).get(p, {})
            if pr.get("status") == "ok":
                row += [f"{pr['vs'][op]:.2f}" for op in ("forward", "gradient", "step")]
            else:
                row += ["-", "-", "-"]
        rows.append(row)
    return header, rows


def _fd_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["N", "batch", "T_fd", "how", "T_grad", "speedup", "per pass", "rel. error", "fit"]
    rows = []
    for f in res["finite_differences"]:
        if f["status"] != "ok":
            rows.append([fmt_n(f["n_params"]), str(f["batch"]), f["status"]] + [""] * 6)
            continue
        measured = f["measured"]
        rows.append([fmt_n(f["n_params"]), str(f["batch"]),
                     _spread(f["full"]) if measured else fmt_time(f["time"]),
                     "run in full" if measured else "(N+1) x pass",
                     fmt_time(f["gradient"]["median"]), f"{f['speedup']:.3g}x", fmt_time(f["per_pass"]),
                     f"{f['rel_error']:.1e}" if measured else "", "*" if f.get("in_fit") else ""])
    return header, rows


def _fit_line(name: str, fit: dict[str, Any] | None) -> str:
    if not fit:
        return f"{name}: no fit (fewer than 2 sizes)"
    se = fit.get("stderr")
    err = f" ± {se:.2f}" if se is not None and math.isfinite(se) else ""
    return (f"{name}: exponent {fit['slope']:.2f}{err} (R² {fit['r2']:.3f}) over N = {fmt_n(fit['n_min'])} .. "
            f"{fmt_n(fit['n_max'])}, {fit['n_points']} sizes")


def mark_fit_points(res: dict[str, Any]) -> None:
    """Flag the sizes each fit used (``in_fit``), for the tables and the plot."""
    used = set((res["fits"].get("gradient") or {}).get("n_used", []))
    for r in res["sizes"]:
        r["in_fit"] = r["status"] == "ok" and r["n_params"] in used
    used = set((res["fits"].get("finite_differences") or {}).get("n_used", []))
    for f in res["finite_differences"]:
        f["in_fit"] = f["status"] == "ok" and f["n_params"] in used


def summary_lines(res: dict[str, Any]) -> list[str]:
    """The headline: exponents, ratio check, FD speedup."""
    fits, chk = res["fits"], res["checks"]
    lines = [_fit_line("forward      ", fits.get("forward")), _fit_line("gradient     ", fits.get("gradient")),
             _fit_line("training step", fits.get("step"))]
    if res["finite_differences"]:
        lines.append(_fit_line("finite diff. ", fits.get("finite_differences")))
    fda = fits.get("finite_differences_all")
    if fda and fits.get("finite_differences") and fda["n_points"] != fits["finite_differences"]["n_points"]:
        lines.append("  " + _fit_line("finite differences, all sizes", fda))
    if fits.get("forward"):
        lines.append(f"fit rule: {fits['forward']['rule']}")
    if "max_ratio_grad" in chk:
        ok3 = "yes" if chk["ratio_grad_at_most_3"] else "NO"
        ok5 = "yes" if chk["ratio_grad_at_most_5"] else "NO"
        lines.append(
            f"GEMM-bound sizes (N >= {fmt_n(min(chk['gemm_bound_sizes']))}): max T_grad/T_fwd = "
            f"{chk['max_ratio_grad']:.2f} (flop ratio {chk['max_flop_ratio']:.2f}; <= 3: {ok3}; <= 5: {ok5}), "
            f"max T_step/T_fwd = {chk['max_ratio_step']:.2f}; from the best of the repeats: "
            f"{chk['max_ratio_grad_best']:.2f} and {chk['max_ratio_step_best']:.2f}")
    else:
        lines.append("no GEMM-bound size in this sweep: the ratios are dominated by fixed per-call overhead")
    if chk.get("unstable_sizes"):
        lines.append("unsteady timings (interquartile range over 10% of the median, marked !) at N = "
                     + ", ".join(fmt_n(n) for n in chk["unstable_sizes"])
                     + ": other work competed for the machine; rerun on a quiet one")
    fdm = fits.get("finite_differences_measured")
    fdp = fits.get("finite_differences_pass")
    if fdm:
        lines.append(_fit_line("finite differences run in full", fdm))
    if fdp:
        lines.append(f"  one pass there: exponent {fdp['slope']:.2f}, so all N + 1 passes: "
                     f"about {1 + fdp['slope']:.2f}")
    fd = [f for f in res["finite_differences"] if f["status"] == "ok"]
    errs = [f["estimate_error"] for f in fd if f.get("measured") and f.get("estimate_error") is not None]
    if errs and any(not f["measured"] for f in fd):
        lines.append(f"finite differences above N = {fmt_n(max(f['n_params'] for f in fd if f['measured']))}: "
                     f"one timed pass x (N + 1); where run in full as well, that estimate was off by "
                     f"{min(errs) * 100:+.0f}% .. {max(errs) * 100:+.0f}%")
    for f in ([f for f in fd if f["measured"]][-1:] + [f for f in fd if not f["measured"]][-1:]):
        how = "" if f["measured"] else " (estimated)"
        lines.append(f"finite differences at N = {fmt_n(f['n_params'])}: {fmt_time(f['time'])}{how}, "
                     f"backpropagation {f['speedup']:.3g}x faster")
    exc = {op: v for op, v in res.get("first_call_excess", {}).items() if v and v > 1e-3}
    if exc:
        lines.append("first call (JIT compilation / lazy set-up, excluded from the timings): "
                     + ", ".join(f"{op} {fmt_time(v)}" for op, v in exc.items()))
    return lines


def terminal_report(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    peers = [p for p, info in doc.get("peers", {}).items() if info.get("status") == "ok"]
    out = []
    for res in doc["backends"]:
        out.append("")
        out.append(f"== backend {res['backend']} ({'GPU' if res['is_gpu'] else 'CPU'}), {cfg['dtype']}, "
                   f"batch {_batch(res, cfg)}, median of {cfg['repeats']} (± half the interquartile range) ==")
        out += _table(*_main_rows(res, peers, markdown=False), markdown=False)
        out.append(_LEGEND)
        if peers:
            out.append(f"'vs {peers[0]}' columns: backprop time / {peers[0]} time (below 1: backprop faster)")
        if res["finite_differences"]:
            out.append("")
            out.append("finite differences (one forward pass per parameter) against backpropagation at the same batch:")
            out += _table(*_fd_rows(res), markdown=False)
        out.append("")
        out += summary_lines(res)
        out += [f"note: {m}" for m in res["messages"]]
    for name, why in doc.get("skipped_backends", {}).items():
        out.append(f"backend {name} skipped: {why}")
    for name, info in doc.get("peers", {}).items():
        if info.get("status") != "ok":
            out.append(f"peer {name}: {info.get('message')}")
    la, ps = doc.get("load_average", {}), doc.get("cpu_pressure", {})
    out.append(f"load average at start {la.get('start')}, at end {la.get('end')}"
               + (f"; CPU pressure (some avg10/avg60 %) at start {_psi(ps.get('start'))}, at end {_psi(ps.get('end'))}"
                  if ps.get("start") else ""))
    verdict = noise_verdict(doc)
    if verdict["noisy"]:
        out.append("warning: " + noise_banner(verdict).replace("NOISY RUN", "noisy run", 1))
    return "\n".join(out)


def _batch(res: dict[str, Any], cfg: dict[str, Any]) -> str:
    """The batch a backend was timed at, and whether the device chose it."""
    batch = res.get("batch", cfg.get("batch"))
    if res.get("batch_default"):
        return f"{batch} (default on a {'GPU' if res['is_gpu'] else 'CPU'})"
    return str(batch)


def _psi(p: dict[str, float] | None) -> str:
    return f"{p.get('avg10')}/{p.get('avg60')}" if p else "-"


def _busy(load: list[float] | None, pressure: dict[str, float] | None, cpus: int | None) -> tuple[str, str]:
    """Why the machine looked busy (``backprop-bench``'s test at the start of a run): the measure and its
    value, or ``("", "")``."""
    if pressure and (pressure.get("avg10") or 0.0) > BUSY_PRESSURE:
        return "CPU pressure", f"{pressure['avg10']:.0f}%"
    if load and cpus and load[0] > cpus:
        return "load average", f"{load[0]:.1f}"
    return "", ""


def _busy_reasons(la: dict[str, Any], ps: dict[str, Any], cpus: int | None, said: str | None) -> list[str]:
    """``CPU pressure 85% at the start, 99% at the end (...)`` and the like; ``said``: the run's own verdict
    at the start, used where the figures are missing."""
    what = {"CPU pressure": " (tasks waiting for a CPU, over the last 10 s)", "load average": f" on {cpus} CPUs"}
    (k0, v0), (k1, v1) = _busy(la.get("start"), ps.get("start"), cpus), _busy(la.get("end"), ps.get("end"), cpus)
    if k0 and k0 == k1:
        return [f"{k0} {v0} at the start, {v1} at the end{',' if k0 == 'load average' else ''}{what[k0]}"]
    out = [f"{k} {v}{what[k]} at the {when}" for k, v, when in ((k0, v0, "start"), (k1, v1, "end")) if k]
    if not k0 and said:
        out.insert(0, f"at the start {said}")
    return out


def noise_verdict(doc: dict[str, Any]) -> dict[str, Any]:
    """Whether other work on the machine made the timings of a run noisy, from what ``doc`` recorded: the
    machine busy at the start or at the end (load average above the CPU count, or CPU pressure over
    :data:`BUSY_PRESSURE` %, as ``backprop-bench`` warns at the start), or unsteady timings (interquartile range
    over the sweep's ``unstable_spread`` of the median) at the sizes the ratios and fits rest on (the GEMM-bound
    ones; all sizes where none is). Returns ``noisy``, ``reasons`` (short phrases), ``max_ratio`` with
    ``max_ratio_what`` (``"T_grad/T_fwd"`` or ``"T_step/T_fwd"``), ``max_ratio_backend`` and ``max_ratio_n`` (the
    largest ratio at those sizes; ``None`` if nothing was measured), ``bound`` (:data:`CHEAP_GRADIENT_BOUND`)
    and ``spread``."""
    m = doc.get("machine") or {}
    cpus = m.get("cpu_count") or m.get("cpus_usable")
    la, ps = doc.get("load_average") or {}, doc.get("cpu_pressure") or {}
    spread = (doc.get("config") or {}).get("unstable_spread", 0.1)
    reasons = _busy_reasons(la, ps, cpus, doc.get("busy_at_start"))
    worst: tuple[float, str, str, float] | None = None
    unsteady, gemm = [], True
    for res in doc.get("backends", []):
        ok = [r for r in res.get("sizes", []) if r.get("status") == "ok"]
        bound = set((res.get("checks") or {}).get("gemm_bound_sizes") or [])
        pool = [r for r in ok if r["n_params"] in bound] or ok
        gemm = gemm and bool(bound)
        bad = sum(bool(r.get("unstable")) for r in pool)
        if bad:
            unsteady.append(f"{res.get('backend')} {bad} of {len(pool)}")
        for r in pool:
            for key, what in (("ratio_grad", "T_grad/T_fwd"), ("ratio_step", "T_step/T_fwd")):
                value = r.get(key)
                if value is not None and math.isfinite(value) and (worst is None or value > worst[0]):
                    worst = (value, what, str(res.get("backend")), r["n_params"])
    if unsteady:
        reasons.append(f"unsteady timings (interquartile range over {spread:.0%} of the median) at "
                       f"{'GEMM-bound ' if gemm else ''}sizes: {', '.join(unsteady)}")
    return {"noisy": bool(reasons), "reasons": reasons, "bound": CHEAP_GRADIENT_BOUND, "spread": spread,
            "max_ratio": worst[0] if worst else None, "max_ratio_what": worst[1] if worst else None,
            "max_ratio_backend": worst[2] if worst else None, "max_ratio_n": worst[3] if worst else None}


def _worst_ratio(v: dict[str, Any]) -> str:
    return (f"{v['max_ratio_what']} = {v['max_ratio']:.2f} ({v['max_ratio_backend']}, N = {fmt_n(v['max_ratio_n'])})"
            if v["max_ratio"] is not None else "")


def noise_paragraph(v: dict[str, Any]) -> str:
    """The report's verdict on noise (Markdown): why the run is noisy and what that means for its figures,
    or briefly that it is not."""
    bound = f"{v['bound']:g}"
    if not v["noisy"]:
        return (f"**Quiet run**: no sign of other work on the machine (load average within the CPU count and CPU "
                f"pressure under {BUSY_PRESSURE:g}% at the start and at the end, where the OS reports them), and "
                f"every size the ratios and fits rest on timed steadily (interquartile range within "
                f"{v['spread']:.0%} of the median).")
    worst = _worst_ratio(v)
    if v["max_ratio"] is not None and v["max_ratio"] > v["bound"]:
        figures = (f"the largest ratio here, {worst}, is above {bound}, the bound of the cheap gradient principle: "
                   f"ratios above {bound} most likely come from the machine, not from backpropagation, and the "
                   "others may be off too")
    else:
        figures = (f"the largest ratio here is {worst}; it may look plausible and still be off" if worst
                   else "nothing was measured")
    return (f"**Noisy run**: other work competed for the machine while it was measured: {'; '.join(v['reasons'])}. "
            f"The timings, ratios and exponents below are unreliable: {figures}. "
            "Rerun on an idle machine before quoting any figure.")


def noise_banner(v: dict[str, Any]) -> str:
    """The plot's one-paragraph warning of a noisy run (plain text; ``""`` for a quiet one)."""
    if not v["noisy"]:
        return ""
    worst = ""
    if v["max_ratio"] is not None:
        worst = (f" Ratios above {v['bound']:g} (here up to {v['max_ratio']:.1f}) are most likely noise."
                 if v["max_ratio"] > v["bound"] else f" (largest ratio here {v['max_ratio']:.1f})")
    return (f"NOISY RUN: other work competed for the machine: {'; '.join(v['reasons'])}. "
            f"Timings, ratios and slopes are unreliable.{worst} Rerun on an idle machine.")


def machine_lines(m: dict[str, Any], load: dict[str, Any] | None = None,
                  pressure: dict[str, Any] | None = None) -> list[str]:
    """Markdown bullets of what the figures were measured on (:func:`~backprop.bench.machine.machine_info`),
    with the load average and CPU pressure at start and end when given."""
    v = {k: val for k, val in m["versions"].items() if val}
    blas = ", ".join(f"{b.get('internal_api')} {b.get('version') or ''} ({b.get('num_threads', '?')} threads)".strip()
                     for b in m.get("blas", [])) or "unknown"
    la, ps = load or {}, pressure or {}
    lines = [
        f"- machine: {m['cpu']}, {m['cpu_count']} CPUs ({m['cpus_usable']} usable), "
        f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB; {m['platform']}; Python {m['python']}",
        f"- load average (1, 5, 15 min) at start {la.get('start', m.get('load_average'))}, at end {la.get('end')}"
        + (f"; CPU pressure (some avg10/avg60, %) at start {_psi(ps.get('start'))}, at end {_psi(ps.get('end'))}"
           if ps.get("start") else ""),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- BLAS: {blas}",
    ]
    for g in m.get("gpus", []):
        extra = ", ".join(f"{k} {val}" for k, val in g.items() if k not in ("backend", "name"))
        lines.append(f"- GPU ({g['backend']}): {g.get('name', '?')}" + (f" ({extra})" if extra else ""))
    for g in m.get("nvidia_smi", []):
        lines.append("- nvidia-smi: " + ", ".join(f"{k} {val}" for k, val in g.items()))
    return lines


def markdown_report(doc: dict[str, Any], plot_name: str | None) -> str:
    cfg, m = doc["config"], doc["machine"]
    peers = [p for p, info in doc.get("peers", {}).items() if info.get("status") == "ok"]
    batches = ", ".join(f"{r['backend']} {_batch(r, cfg)}" for r in doc["backends"]) or str(cfg.get("batch"))
    lines = [
        "# backprop benchmark: the cost of the gradient",
        "",
        f"{m['date']} · backprop {m['backprop']}" + (f" ({m['git_commit']})" if m.get("git_commit") else ""),
        "",
        noise_paragraph(noise_verdict(doc)),
        "",
        *machine_lines(m, doc.get("load_average"), doc.get("cpu_pressure")),
    ]
    lines += [
        f"- command: `{doc['command']}`",
        f"- batch: {batches}; {cfg.get('batch_rule') or ''}",
        f"- {cfg['dtype']}, nets of {cfg['depth']} square layers (ReLU, identity output, "
        f"MSE) unless listed otherwise; {cfg['repeats']} interleaved repeats after the first call and {cfg['warmup']} "
        "warm-up call(s), "
        f"each sample at least {cfg['min_sample_time'] * 1e3:g} ms; median ± half the interquartile range; "
        f"duration {doc['duration_s']:.0f} s",
        f"- memory allocator: {cfg.get('malloc') or 'as is'}" + (
            " (freed buffers stay in the process, so the temporaries of each pass do not page-fault in afresh; "
            "--no-malloc-tune measures without)" if cfg.get("malloc") else ""),
        "",
        "What is timed: `T_fwd` the inference pass `net.forward_device(x)` (nothing kept for backward); "
        "`T_grad` forward + output error + backward producing every gradient, "
        "`net.loss_and_grads_device(x, t)`; `T_step` the fused training step with the SGD update, "
        f"`net.train_step_device(x, t, SGD(lr={cfg['lr']:g}))`. The flop ratio is "
        "`(forward + weight gradients + input deltas) / forward` from the GEMM operation counts "
        "(3 for many GEMM-bound layers, 2 + 2/3 for three square layers: the first layer needs no input delta); "
        f"the bound of {CHEAP_GRADIENT_BOUND:g} on `T_grad/T_fwd` is {CHEAP_GRADIENT_TEXT} (here: forward pass "
        "plus loss). "
        "Exponents are least-squares slopes of log T against log N over the sizes marked `*` "
        "(where the GEMMs dominate: forward time at least "
        f"{cfg['overhead_factor']:g}x the fixed per-call overhead, measured as the forward time of a net of "
        "width 1 at batch 1); small nets are overhead-dominated and left out of the fit.",
        "",
    ]
    if plot_name:
        lines += [f"![time and ratio against N]({plot_name})", ""]
    for res in doc["backends"]:
        lines += [f"## Backend `{res['backend']}` ({'GPU' if res['is_gpu'] else 'CPU'})", ""]
        lines += ["```", *summary_lines(res), "```", ""]
        lines += _table(*_main_rows(res, peers, markdown=True), markdown=True)
        lines += ["", _LEGEND]
        if peers:
            lines += ["", f"`vs {peers[0]}`: backprop time / {peers[0]} time on the same net, data and timer "
                          "(below 1: backprop faster)."]
        if res["finite_differences"]:
            lines += ["", "### Finite differences", "",
                      "The naive gradient, one forward pass per parameter (each parameter nudged in place on the "
                      "backend array, forward pass and loss, restored): N + 1 passes of O(N) each. Up to "
                      f"N = {cfg['fd_max_n']:g} it is run in full and checked against backpropagation "
                      f"(`rel. error`, forward differences in {cfg['dtype']}); at every size one pass is also timed "
                      "like the other measurements, and above that N the cost is that pass times N + 1 "
                      "(every pass is the same forward pass of the same net). `speedup` = T_fd / T_grad on the "
                      "same net and batch.", ""]
            lines += _table(*_fd_rows(res), markdown=True)
        if res["messages"]:
            lines += ["", *[f"- {msg}" for msg in res["messages"]]]
        lines.append("")
    for name, why in doc.get("skipped_backends", {}).items():
        lines.append(f"- backend `{name}` skipped: {why}")
    for name, info in doc.get("peers", {}).items():
        if info.get("status") != "ok":
            lines.append(f"- peer `{name}`: {info.get('message')}")
        else:
            lines.append(f"- peer `{name}`: " + ", ".join(f"{k} {val}" for k, val in info.items() if k != "status"))
    lines.append("")
    return "\n".join(lines)


def _clean(o: Any) -> Any:
    """NaN and infinities to ``None`` (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "item") and callable(o.item):  # numpy scalars
        return _clean(o.item())
    return o


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")
