"""The figure: time against N on log-log axes with the fitted slopes, and the ratios against N.

matplotlib is optional (``pip install backprop-kernels[bench]``); without it the plot is skipped with a message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_results"]

_COLORS = {"forward": "C0", "gradient": "C1", "step": "C2", "finite_differences": "C3"}
_LABELS = {"forward": "forward", "gradient": "gradient (fwd+bwd)", "step": "training step",
           "finite_differences": "finite differences"}
_STYLES = ["-", "--", ":", "-."]


def _errorbar(ax: Any, n: list[float], timings: list[dict[str, Any]], **kw: Any) -> None:
    med = np.array([t["median"] for t in timings])
    lo = med - np.array([t["q1"] for t in timings])
    hi = np.array([t["q3"] for t in timings]) - med
    ax.errorbar(n, med, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=2, markersize=4, **kw)


def _fit_line(ax: Any, fit: dict[str, Any] | None, color: str, style: str) -> None:
    if not fit:
        return
    n = np.geomspace(fit["n_min"], fit["n_max"], 20)
    ax.plot(n, fit["coef"] * n ** fit["slope"], color=color, linestyle=style, linewidth=3, alpha=0.35)


def plot_results(doc: dict[str, Any], path: Path) -> str | None:
    """Write the figure to ``path``; returns ``None``, or why no figure was written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib, or backprop-kernels[bench])"
    cfg = doc["config"]
    backends = [b for b in doc["backends"] if any(r["status"] == "ok" for r in b["sizes"])]
    if not backends:
        return "nothing was measured: no plot"
    fig = Figure(figsize=(14, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_r = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    peer_names = [p for p, info in doc.get("peers", {}).items() if info.get("status") == "ok"]
    ratio_max = 5.5
    for bi, res in enumerate(backends):
        style = _STYLES[bi % len(_STYLES)]
        tag = f" [{res['backend']}]" if len(backends) > 1 else ""
        ok = [r for r in res["sizes"] if r["status"] == "ok"]
        n = [r["n_params"] for r in ok]
        for op in ("forward", "gradient", "step"):
            fit = res["fits"].get(op)
            slope = f", slope {fit['slope']:.2f}" if fit else ""
            _errorbar(ax_t, n, [r["timings"][op] for r in ok], color=_COLORS[op], linestyle=style, marker="o",
                      label=f"{_LABELS[op]}{tag}{slope}")
            _fit_line(ax_t, fit, _COLORS[op], style)
        fd = [f for f in res["finite_differences"] if f["status"] == "ok"]
        if fd:
            fit = res["fits"].get("finite_differences")
            bt = f", batch {fd[0]['batch']}" if fd[0]["batch"] != res.get("batch", cfg["batch"]) else ""
            color = _COLORS["finite_differences"]
            full = [f for f in fd if f["measured"]]
            if full:
                _errorbar(ax_t, [f["n_params"] for f in full], [f["full"] for f in full], color=color,
                          linestyle=style, marker="s", label=f"finite differences, run in full{bt}{tag}")
            est = [f for f in fd if not f["measured"]]
            if est:
                ax_t.plot([f["n_params"] for f in est], [f["time"] for f in est], color=color, linestyle=style,
                          marker="s", markerfacecolor="none", markersize=4,
                          label=f"finite differences, (N+1) x timed pass{bt}{tag}")
            if fit:
                n_fit = np.geomspace(fit["n_min"], fit["n_max"], 20)
                ax_t.plot(n_fit, fit["coef"] * n_fit ** fit["slope"], color=color, linestyle=style, linewidth=3,
                          alpha=0.35, label=f"finite differences fit{tag}, slope {fit['slope']:.2f}")
        for p in peer_names:
            pts = [(r["n_params"], r["peers"][p]) for r in ok if r.get("peers", {}).get(p, {}).get("status") == "ok"]
            if pts:
                ax_t.plot([q[0] for q in pts], [q[1]["timings"]["gradient"]["median"] for q in pts], color="C4",
                          linestyle=style, marker="x", label=f"{p} gradient{tag}")
                ax_r.plot([q[0] for q in pts], [q[1]["ratio_grad"] for q in pts], color="C4", linestyle=style,
                          marker="x", label=f"{p} T_grad/T_fwd{tag}")
        used = (res["fits"].get("gradient") or {}).get("n_used") or []
        if used:
            ax_t.axvline(min(used), color="0.6", linewidth=0.8, linestyle=style)
            ax_r.axvline(min(used), color="0.6", linewidth=0.8, linestyle=style)
        rg = [r["ratio_grad"] for r in ok]
        rs = [r["ratio_step"] for r in ok]
        ax_r.plot(n, rg, color=_COLORS["gradient"], linestyle=style, marker="o", label=f"T_grad / T_fwd{tag}")
        ax_r.plot(n, rs, color=_COLORS["step"], linestyle=style, marker="s", label=f"T_step / T_fwd{tag}")
        if bi == 0:
            ax_r.plot(n, [r["flop_ratio"] for r in ok], color="k", linestyle="--", linewidth=1,
                      label="flop ratio (fwd + bwd) / fwd")
        ratio_max = max(ratio_max, *rg, *rs)
    ax_r.axhline(3, color="0.4", linewidth=1, linestyle=":", label="3: GEMM operation count")
    ax_r.axhline(5, color="C3", linewidth=1, linestyle=":", label="5: Kakade's bound")
    ax_t.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="seconds per call",
             title="time against N (shaded lines: fits; grey line: start of the fit range)")
    ax_t.grid(True, which="both", alpha=0.25)
    handles, labels = ax_t.get_legend_handles_labels()
    rank = ("forward", "gradient", "training step", "finite differences")

    def key(i: int) -> tuple[int, int]:
        r = next((r for r, word in enumerate(rank) if labels[i].startswith(word)), len(rank) + 2)
        return r + ("(N+1)" in labels[i]) + 2 * ("fit" in labels[i]), i

    order = sorted(range(len(labels)), key=key)
    ax_t.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="upper left")
    ax_r.set(xscale="log", xlabel="parameters N", ylabel="time ratio", ylim=(0, min(ratio_max * 1.08, 12)),
             title="cost of the gradient in forward passes")
    ax_r.grid(True, which="both", alpha=0.25)
    ax_r.legend(fontsize=8, loc="upper right")
    m = doc["machine"]
    where = ", ".join(g.get("name", g["backend"]) for g in m.get("gpus", [])) or m["cpu"]
    batch = "/".join(sorted({str(r.get("batch", cfg["batch"])) for r in backends}))
    fig.suptitle(f"backprop {m['backprop']} · {where} · {cfg['dtype']}, batch {batch} · {m['date'][:10]}",
                 fontsize=11)
    fig.savefig(path, dpi=110)
    return None
