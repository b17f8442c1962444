"""The figure: time per call against N on log-log axes with the fitted slopes, and the ratios against N.

Colour says which backend (a fixed colour per backend, the same in both panels), line style and marker say
what was timed; one legend to the right of both panels explains both. A noisy run (see
:func:`~backprop.bench.report.noise_verdict`) gets a red banner above the panels.

matplotlib is optional (``pip install backprop-kernels[bench]``); without it the plot is skipped with a message.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .report import CHEAP_GRADIENT_BOUND, fmt_n, noise_banner, noise_verdict

__all__ = ["backend_color", "build_figure", "plot_results"]

#: A fixed colour per backend (matplotlib's qualitative tab10 palette), so that a backend looks the same in every
#: plot; red is left out: it is the colour of the noise warning.
BACKEND_COLORS = {"numpy": "#1f77b4", "numba": "#ff7f0e", "cupy": "#2ca02c", "numba-cuda": "#9467bd"}
_SPARE_COLORS = ["#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
PEER_COLORS = {"torch": "#8c564b"}
#: what was timed -> (line style, marker); the ratio panel uses the style of the numerator
_STYLE = {"forward": ("-", "o"), "gradient": ("--", "^"), "step": (":", "s"), "finite_differences": ("-.", "D")}
_LABELS = {"forward": "forward pass T_fwd", "gradient": "gradient T_grad (forward + backward)",
           "step": "training step T_step (gradient + SGD update)"}
_SHORT = {"forward": "fwd", "gradient": "grad", "step": "step", "finite_differences": "FD"}
_BANNER_RED = "#b00000"


def backend_color(name: str) -> str:
    """The colour of backend ``name`` in the plot (a spare colour, by a stable hash, for an unknown name)."""
    if name in BACKEND_COLORS:
        return BACKEND_COLORS[name]
    return _SPARE_COLORS[sum(map(ord, name)) % len(_SPARE_COLORS)]


def _errorbar(ax: Any, n: list[float], timings: list[dict[str, Any]], **kw: Any) -> None:
    med = np.array([t["median"] for t in timings])
    lo = med - np.array([t["q1"] for t in timings])
    hi = np.array([t["q3"] for t in timings]) - med
    ax.errorbar(n, med, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=2, markersize=5, linewidth=1.3, **kw)


def _fit_line(ax: Any, fit: dict[str, Any] | None, color: str) -> None:
    if not fit:
        return
    n = np.geomspace(fit["n_min"], fit["n_max"], 20)
    ax.plot(n, fit["coef"] * n ** fit["slope"], color=color, linestyle="-", linewidth=6, alpha=0.22,
            solid_capstyle="butt")


def _backend_label(res: dict[str, Any]) -> str:
    """``numpy (CPU)`` and the fitted slopes, for the colour key."""
    fits = res["fits"]
    slopes = ", ".join(f"{_SHORT[op]} {fits[op]['slope']:.2f}" for op in ("forward", "gradient", "step",
                                                                           "finite_differences") if fits.get(op))
    return f"{res['backend']} ({'GPU' if res['is_gpu'] else 'CPU'})" + (f": {slopes}" if slopes else "")


def _fit_starts(ax: Any, backends: list[dict[str, Any]], text: bool) -> None:
    """A dotted vertical line where each backend's fit of the timings starts, labelled ``fit from N = ...``
    (one grey line for the backends that start at the same N)."""
    starts: dict[float, list[dict[str, Any]]] = {}
    for res in backends:
        fit = res["fits"].get("gradient")
        if fit and fit.get("n_used"):
            starts.setdefault(min(fit["n_used"]), []).append(res)
    for n0, group in starts.items():
        color = backend_color(group[0]["backend"]) if len(group) == 1 else "0.35"
        ax.axvline(n0, color=color, linewidth=1.2, linestyle=(0, (1, 2)))
        if text:
            fallback = any(str(r["fits"]["gradient"].get("rule", "")).startswith("fallback") for r in group)
            who = ", ".join(r["backend"] for r in group) if len(backends) > 1 else ""
            note = "; ".join(x for x in (who, "fallback: largest sizes" if fallback else "") if x)
            ax.text(n0, 0.985, f" fit from N = {fmt_n(n0)}" + (f" ({note})" if note else "") + " →",
                    transform=ax.get_xaxis_transform(), rotation=90, ha="right", va="top", fontsize=8.5,
                    color=color, bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})


@dataclass
class _Drawn:
    """What the panels show, for the legend and the ratio panel's range: which kinds of lines were drawn, and
    every ratio point (N, ratio, colour)."""

    any_fit: bool = False
    any_fd_full: bool = False
    any_fd_est: bool = False
    peers: set[str] = field(default_factory=set)
    ratio_points: list[tuple[float, float, str]] = field(default_factory=list)
    ratio_max: float = 5.6

    @property
    def any_fd(self) -> bool:
        return self.any_fd_full or self.any_fd_est


def _panels(fig: Any, banner: str) -> tuple[Any, Any, Any]:
    """The (sub)figure holding the panels (below a red banner when ``banner`` is not empty), the time panel and
    the ratio panel."""
    body = fig
    if banner:
        top, body = fig.subfigures(2, 1, height_ratios=[0.8, 8.4])
        top.set_facecolor("#fde3e1")
        top.text(0.5, 0.5, textwrap.fill(banner, 160), ha="center", va="center", fontsize=11, fontweight="bold",
                 color=_BANNER_RED, wrap=False)
        top.patch.set_edgecolor(_BANNER_RED)
        top.patch.set_linewidth(3)
    ax_t, ax_r = body.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    return body, ax_t, ax_r


def _draw_times(ax_t: Any, res: dict[str, Any], ok: list[dict[str, Any]], color: str, drawn: _Drawn) -> None:
    """A backend's forward, gradient and step times against N, each with its fitted band."""
    n = [r["n_params"] for r in ok]
    for op in ("forward", "gradient", "step"):
        ls, mk = _STYLE[op]
        _errorbar(ax_t, n, [r["timings"][op] for r in ok], color=color, linestyle=ls, marker=mk)
        _fit_line(ax_t, res["fits"].get(op), color)
        drawn.any_fit = drawn.any_fit or bool(res["fits"].get(op))


def _draw_finite_differences(ax_t: Any, res: dict[str, Any], color: str, drawn: _Drawn) -> None:
    """A backend's finite-difference gradient times: measured (filled markers, bars) and estimated from one
    timed pass (open markers), with the fitted band."""
    fd = [f for f in res["finite_differences"] if f["status"] == "ok"]
    if not fd:
        return
    ls, mk = _STYLE["finite_differences"]
    full = [f for f in fd if f["measured"]]
    if full:
        drawn.any_fd_full = True
        _errorbar(ax_t, [f["n_params"] for f in full], [f["full"] for f in full], color=color, linestyle=ls,
                  marker=mk)
    est = [f for f in fd if not f["measured"]]
    if est:
        drawn.any_fd_est = True
        ax_t.plot([f["n_params"] for f in est], [f["time"] for f in est], color=color, linestyle=ls, marker=mk,
                  markerfacecolor="white", markersize=5, linewidth=1.3)
    _fit_line(ax_t, res["fits"].get("finite_differences"), color)


def _draw_peers(ax_t: Any, ax_r: Any, ok: list[dict[str, Any]], peer_names: list[str], drawn: _Drawn) -> None:
    """Each peer's gradient time (left) and its ``T_grad / T_fwd`` (right) on the nets of one backend."""
    for p in peer_names:
        pts = [(r["n_params"], r["peers"][p]) for r in ok if r.get("peers", {}).get(p, {}).get("status") == "ok"]
        if pts:
            pc = PEER_COLORS.get(p, "0.3")
            ax_t.plot([q[0] for q in pts], [q[1]["timings"]["gradient"]["median"] for q in pts], color=pc,
                      linestyle="--", marker="x")
            ax_r.plot([q[0] for q in pts], [q[1]["ratio_grad"] for q in pts], color=pc, linestyle="--", marker="x")
            drawn.peers.add(p)


def _draw_ratios(ax_r: Any, ok: list[dict[str, Any]], color: str, first: bool, drawn: _Drawn) -> None:
    """A backend's ``T_grad / T_fwd`` and ``T_step / T_fwd`` against N; for the first backend, the operation
    count ratio ``(fwd + bwd) / fwd`` too."""
    n = [r["n_params"] for r in ok]
    for key, op in (("ratio_grad", "gradient"), ("ratio_step", "step")):
        ls, mk = _STYLE[op]
        vals = [r[key] for r in ok]
        ax_r.plot(n, vals, color=color, linestyle=ls, marker=mk, markersize=5, linewidth=1.3)
        drawn.ratio_points += [(x, v, color) for x, v in zip(n, vals)]
        drawn.ratio_max = max(drawn.ratio_max, *vals)
    if first:
        ax_r.plot(n, [r["flop_ratio"] for r in ok], color="black", linestyle="-", linewidth=1.0)


def _draw_backends(ax_t: Any, ax_r: Any, doc: dict[str, Any], backends: list[dict[str, Any]]) -> _Drawn:
    """Every backend's lines in both panels, in its colour, with the peers on the same nets."""
    peer_names = [p for p, info in doc.get("peers", {}).items() if info.get("status") == "ok"]
    drawn = _Drawn()
    for bi, res in enumerate(backends):
        color = backend_color(res["backend"])
        ok = [r for r in res["sizes"] if r["status"] == "ok"]
        _draw_times(ax_t, res, ok, color, drawn)
        _draw_finite_differences(ax_t, res, color, drawn)
        _draw_peers(ax_t, ax_r, ok, peer_names, drawn)
        _draw_ratios(ax_r, ok, color, bi == 0, drawn)
    return drawn


def _mark_ratio_panel(ax_r: Any, backends: list[dict[str, Any]], drawn: _Drawn) -> float:
    """The bound of the cheap gradient principle, the label of the operation count ratio and an arrow with the
    value for each ratio above the panel's top; returns that top, ``min(1.08 max ratio, 12)``."""
    ax_r.axhline(CHEAP_GRADIENT_BOUND, color="#555555", linewidth=2.2, linestyle=(0, (6, 2, 1, 2)))
    top_r = min(drawn.ratio_max * 1.08, 12.0)
    ax_r.text(0.01, CHEAP_GRADIENT_BOUND, f" bound {CHEAP_GRADIENT_BOUND:g}: cheap gradient principle",
              transform=ax_r.get_yaxis_transform(), ha="left", va="bottom", fontsize=8.5, color="#333333")
    flop_n = [r["flop_ratio"] for r in backends[0]["sizes"] if r["status"] == "ok"]
    ax_r.text(0.01, flop_n[0], " operation count ratio", transform=ax_r.get_yaxis_transform(), ha="left",
              va="top", fontsize=8.5, color="black")
    for x, v, c in drawn.ratio_points:  # ratios off the top of the panel: an arrow and the value at the edge
        if v > top_r:
            ax_r.annotate(f"{v:.1f}", xy=(x, top_r), xytext=(0, -14), textcoords="offset points", ha="center",
                          va="top", fontsize=8, color=c, arrowprops={"arrowstyle": "->", "color": c})
    return top_r


def _label_axes(ax_t: Any, ax_r: Any, top_r: float) -> None:
    """Log scales, axis labels, titles and grids of both panels."""
    ax_t.set(xscale="log", yscale="log", xlabel="parameters N (weights and biases of the net, log scale)",
             ylabel="time per call [s] (median; bars: interquartile range)",
             title="time per call against N (shaded bands: fits T ~ N^k)")
    ax_t.grid(True, which="both", alpha=0.25)
    ax_r.set(xscale="log", xlabel="parameters N (weights and biases of the net, log scale)",
             ylabel="time ratio T / T_fwd  [forward passes]", ylim=(0, top_r),
             title="cost of the gradient in forward passes: T_grad / T_fwd and T_step / T_fwd")
    ax_r.grid(True, which="both", alpha=0.25)


def _legend_head(text: str) -> tuple[Any, str]:
    """A legend row without a line: the bold heading of a column (or, empty, a filler)."""
    from matplotlib.lines import Line2D

    return Line2D([], [], linestyle="none"), text


def _colour_entries(backends: list[dict[str, Any]], drawn: _Drawn) -> list[tuple[Any, str]]:
    """The legend column of colours: one per backend (with its fitted slopes) and per peer drawn."""
    from matplotlib.lines import Line2D

    colours = [_legend_head("colour: backend (fitted slopes k of T ~ N^k)")]
    colours += [(Line2D([], [], color=backend_color(r["backend"]), linewidth=6), _backend_label(r)) for r in backends]
    colours += [(Line2D([], [], color=PEER_COLORS.get(p, "0.3"), linestyle="--", marker="x"),
                 f"{p} on the same nets: T_grad, T_grad / T_fwd") for p in sorted(drawn.peers)]
    return colours


def _style_entries(backends: list[dict[str, Any]], drawn: _Drawn) -> list[tuple[Any, str]]:
    """The legend column of line styles: what was timed, finite differences included where drawn."""
    from matplotlib.lines import Line2D

    styles = [_legend_head("line style: what was timed (left: time; right: ratio)")]
    for op in ("forward", "gradient", "step"):
        ls, mk = _STYLE[op]
        styles.append((Line2D([], [], color="0.25", linestyle=ls, marker=mk), _LABELS[op]))
    if drawn.any_fd:
        ls, mk = _STYLE["finite_differences"]
        fd_batch = {f["batch"] for r in backends for f in r["finite_differences"] if f["status"] == "ok"}
        bt = f", batch {'/'.join(map(str, sorted(fd_batch)))}"
        if drawn.any_fd_full:
            styles.append((Line2D([], [], color="0.25", linestyle=ls, marker=mk),
                           f"finite differences: all N + 1 passes run{bt}"))
        if drawn.any_fd_est:
            styles.append((Line2D([], [], color="0.25", linestyle=ls, marker=mk, markerfacecolor="white"),
                           f"finite differences: one pass timed, x (N + 1){bt}"))
    return styles


def _reference_entries(backends: list[dict[str, Any]], drawn: _Drawn) -> list[tuple[Any, str]]:
    """The legend column of reference lines: fits, the start of the fit range, the operation count ratio and
    the bound of the cheap gradient principle."""
    from matplotlib.lines import Line2D

    lines = [_legend_head("reference lines")]
    if drawn.any_fit:
        lines.append((Line2D([], [], color="0.25", linewidth=6, alpha=0.3), "least-squares fit T ~ N^k over its range"))
    lines.append((Line2D([], [], color="0.35", linewidth=1.2, linestyle=(0, (1, 2))),
                  "start of the fit range (sizes where the GEMMs dominate)"))
    flop = [r["flop_ratio"] for r in backends[0]["sizes"] if r["status"] == "ok"]
    here = f"{min(flop):.2f}" if max(flop) - min(flop) < 0.005 else f"{min(flop):.2f} to {max(flop):.2f}"
    lines.append((Line2D([], [], color="black", linewidth=1.0),
                  f"operation count ratio (fwd + bwd) / fwd: about 3 ({here} for these nets)"))
    lines.append((Line2D([], [], color="#555555", linewidth=2.2, linestyle=(0, (6, 2, 1, 2))),
                  f"bound {CHEAP_GRADIENT_BOUND:g} (cheap gradient principle: gradient <= "
                  f"{CHEAP_GRADIENT_BOUND:g} x evaluation)"))
    return lines


def _legend(body: Any, backends: list[dict[str, Any]], drawn: _Drawn) -> None:
    """One legend for both panels, below them, a column per key (colour = backend, style = what was timed,
    reference lines), each headed in bold."""
    columns = [_colour_entries(backends, drawn), _style_entries(backends, drawn), _reference_entries(backends, drawn)]
    rows = max(map(len, columns))
    entries = [e for col in columns for e in col + [_legend_head("")] * (rows - len(col))]
    leg = body.legend([e[0] for e in entries], [e[1] for e in entries], loc="outside lower center",
                      ncols=len(columns), fontsize=9, handlelength=3.2, frameon=False, columnspacing=2.5)
    heads = [col[0][1] for col in columns]
    for text in leg.get_texts():
        if text.get_text() in heads:
            text.set_fontweight("bold")


def _title(body: Any, doc: dict[str, Any], backends: list[dict[str, Any]]) -> None:
    """The title: what is plotted, the version, where it ran (GPUs, else the CPU), dtype, batch, repeats, date."""
    m, cfg = doc["machine"], doc["config"]
    where = ", ".join(g.get("name", g["backend"]) for g in m.get("gpus", [])) or f"{m['cpu']}, {m['cpu_count']} CPUs"
    batch = "/".join(sorted({str(r.get("batch", cfg["batch"])) for r in backends}))
    body.suptitle("backprop benchmark: time of the forward pass, the gradient and a training step against the "
                  f"number of parameters N\nbackprop {m['backprop']} · {where} · {cfg['dtype']}, batch {batch}, "
                  f"ReLU MLPs · median of {cfg['repeats']} repeats · {m['date'][:10]}",
                  fontsize=11.5)


def build_figure(doc: dict[str, Any]) -> Any:
    """The figure of a run (a :class:`matplotlib.figure.Figure` on an Agg canvas), or ``None`` when nothing was
    measured. Raises ``ImportError`` without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    backends = [b for b in doc["backends"] if any(r["status"] == "ok" for r in b["sizes"])]
    if not backends:
        return None
    banner = noise_banner(noise_verdict(doc))
    fig = Figure(figsize=(16, 9.2 if banner else 8.4), layout="constrained")
    FigureCanvasAgg(fig)
    body, ax_t, ax_r = _panels(fig, banner)
    drawn = _draw_backends(ax_t, ax_r, doc, backends)
    _fit_starts(ax_t, backends, text=True)
    _fit_starts(ax_r, backends, text=False)
    top_r = _mark_ratio_panel(ax_r, backends, drawn)
    _label_axes(ax_t, ax_r, top_r)
    _legend(body, backends, drawn)
    _title(body, doc, backends)
    return fig


def plot_results(doc: dict[str, Any], path: Path) -> str | None:
    """Write the figure to ``path``; returns ``None``, or why no figure was written."""
    try:
        fig = build_figure(doc)
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib, or backprop-kernels[bench])"
    if fig is None:
        return "nothing was measured: no plot"
    fig.savefig(path, dpi=110)
    return None
