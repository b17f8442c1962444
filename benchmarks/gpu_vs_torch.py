#!/usr/bin/env python
"""Benchmarks on the user's paths, against PyTorch (the GPU sections, and one for the CPU).

    python benchmarks/gpu_vs_torch.py [--out DIR] [--quick] [--sections fit,api,step,graph,tf32,fused,epilogues,cpu]
                                      [--no-torch] [--no-compile] [--no-tf32] [--time-limit S]

The sections, their targets and their options are those of :mod:`backprop.bench.user_paths` (``--help``; its
nets, batches and targets in ``user_paths.cases``); the timing, the machine description, the PyTorch twin and
the report writer are those of :mod:`backprop.bench` (``timing``, ``machine``, ``torch_peer``, ``sections``).
Each section writes ``DIR/<section>.json`` and ``.md`` the moment it ends, and ``DIR/gpu_vs_torch.json`` /
``.md`` sums up every section so far; a section that fails records its error and the next one runs. On a
machine without a GPU the GPU sections are recorded as skipped, with the reason. Needs no network.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from backprop.bench.user_paths import main
except ImportError:  # run from a checkout that is not installed: the package maps backprop.kernels to ./kernels
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from backprop.bench.user_paths import main

if __name__ == "__main__":
    sys.exit(main())
