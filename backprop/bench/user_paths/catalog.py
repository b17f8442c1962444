"""The sections of the run, in their default order: key -> (file stem, title, the function that measures)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .api import section_api, section_fit
from .context import Context
from .cpu import section_cpu
from .epilogues import section_epilogues
from .fused import section_fused
from .graph import section_graph
from .step_vs_torch import section_step
from .tf32 import section_tf32

__all__ = ["SECTIONS", "SUMMARY"]

#: the stem of the summary files, ``gpu_vs_torch.json`` / ``.md``
SUMMARY = "gpu_vs_torch"

#: key -> (file stem, title, function); run in this order
SECTIONS: dict[str, tuple[str, str, Callable[[Context], dict[str, Any]]]] = {
    "fit": ("fit_vs_torch", "1. `fit`: one epoch against a PyTorch loop", section_fit),
    "api": ("api_overhead", "2. The public API on device arrays against the device-level calls", section_api),
    "step": ("step_vs_torch", "3. The device-level step against PyTorch eager and torch.compile", section_step),
    "graph": ("graph_step", "4. CUDA-graph step against the plain step", section_graph),
    "tf32": ("tf32", "5. TF32 off and on, the GEMM-bound net", section_tf32),
    "fused": ("fused_narrow", "6. Fused kernels for a narrow net, off and on, against PyTorch", section_fused),
    "epilogues": ("epilogues", "7. cuBLASLt epilogues, off and on, against PyTorch", section_epilogues),
    "cpu": ("cpu_step_vs_torch", "8. CPU: the training step against PyTorch on the CPU", section_cpu),
}
