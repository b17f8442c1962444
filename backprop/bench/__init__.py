"""Benchmark suite: the measured cost of the gradient against the cost of the forward pass.

Run ``backprop-bench`` (or ``python -m backprop.bench``); ``backprop-bench --help`` lists the options.
For each backend it times, over nets whose parameter count ``N`` spans several decades,

* ``T_fwd``, the inference pass; ``T_grad``, forward + backward producing every gradient; ``T_step``, a
  fused training step with the SGD update;
* the ratios ``T_grad / T_fwd`` and ``T_step / T_fwd`` next to the operation-count ratio (about 3) and
  the bound of the cheap gradient principle (5: reverse-mode differentiation costs at most a small constant
  times the function evaluation, Baur and Strassen);
* the exponents ``k`` of ``T ~ N^k`` fitted where the GEMMs dominate (about 1), and the naive
  finite-difference gradient at small ``N`` (about ``N^2``) with the speedup of backpropagation over it;

and writes ``results.json`` (every raw timing, the machine and versions), ``report.md`` and
``scaling.png``. Modules: :mod:`.timing` (the timer), :mod:`.nets` (sizes, operation counts, memory),
:mod:`.fd` (finite differences), :mod:`.sweep` (the measurements), :mod:`.powerlaw` (power-law fits),
:mod:`.torch_peer` (PyTorch on the same nets: eager, ``torch.compile``, a whole epoch), :mod:`.report`,
:mod:`.plot`, :mod:`.machine`, :mod:`.cli`.

The benchmarks on the user's paths (``fit``, the public API on device arrays, the step against PyTorch
eager and compiled, CUDA graphs, TF32, fused kernels for narrow nets, cuBLASLt epilogues, the CPU step against
PyTorch; ``benchmarks/gpu_vs_torch.py``) are the package :mod:`.user_paths` (a module per group of sections),
built on the same timer, machine description and peers, with :mod:`.sections` writing each section's JSON and
Markdown as soon as it ends.
"""

from __future__ import annotations

from .cli import main
from .powerlaw import PowerFit, fit_power_law
from .nets import flop_counts, flop_ratio, parse_sizes, sizes_for_params
from .sweep import BenchConfig, run_backend
from .timing import Timing, time_ops

__all__ = [
    "BenchConfig",
    "PowerFit",
    "Timing",
    "fit_power_law",
    "flop_counts",
    "flop_ratio",
    "main",
    "parse_sizes",
    "run_backend",
    "sizes_for_params",
    "time_ops",
]
