"""Benchmarks on the user's paths, against PyTorch: ``python benchmarks/gpu_vs_torch.py``.

Eight sections (:data:`SECTIONS`, run in the order ``--sections`` gives), each written out (JSON + Markdown,
with the machine, the command and the date) as soon as it ends, by
:class:`~backprop.bench.sections.SectionWriter`; a section that fails records its error and the next one runs.
Sections 1 to 7 run on the device backend (``--backend``, default: the first GPU backend that works here) and
are skipped, with the reason, where there is none; section 8 runs on the CPU backends. Every time comes from
:func:`~backprop.bench.timing.time_ops` (interleaved samples, each bracketed by the device's synchronisation,
median of the repeats) or, for whole epochs, one epoch a sample after a warm-up epoch. Float32 throughout.
1. ``fit`` (``fit_vs_torch``): one epoch of ``net.fit(X, y, epochs=1, batch_size=256,
   optimizer=SGD(0.01, momentum=0.9))`` on 60000 x 784 random data, 10 classes, ``[784, 1024, 1024, 10]``,
   from host arrays (NumPy ``X``, integer labels ``y``) and from device arrays, against a PyTorch eager loop
   with the data on the GPU (``torch.randperm`` there, the loss summed there and read once per epoch).
   Target: backprop at least 1.3x faster.
2. ``api`` (``api_overhead``): the public methods on device arrays against the device-level ones:
   ``train_step`` vs ``train_step_device``, ``forward`` vs ``forward_device``, on ``[64]*6+[1]`` @ 262144
   and ``[784, 1024, 1024, 10]`` @ 4096. Target: within 10%.
3. ``step`` (``step_vs_torch``): ``train_step_device`` (plain SGD, loss read every step) against PyTorch
   eager and the same model under ``torch.compile`` (skipped, with the reason, where compiling fails), on
   the nets of the H200 findings; the rate of one large GEMM through the backend's own layer call, and the
   fraction of it the GEMM-bound net reaches.
4. ``graph`` (``graph_step``): ``train_step(..., graph=True)`` against the plain step on ``[64, 64, 10]``
   @ 256 (tanh, softmax). Target: 1.5x. Skipped, with the reason, where the backend cannot record a step
   (``graph=True`` raises ``ValueError``) or the recording falls back to plain steps (``RuntimeWarning``).
5. ``tf32`` (``tf32``): the GEMM-bound net and the GEMM with TF32 off and on (both frameworks), where the
   backend has ``set_tf32``.
6. ``fused`` (``fused_narrow``): a narrow net's step and inference with the cupy backend's fused kernels off
   and on (CUDA cores, and TF32 tensor cores with TF32 on in both frameworks), against PyTorch, with each fused
   pass's TFLOP/s and GB/s against the SGEMM rate and the copy bandwidth measured in the same run.
7. ``epilogues`` (``epilogues``): the step with cuBLASLt epilogues off and on, against PyTorch.
8. ``cpu`` (``cpu_step_vs_torch``): the training step of the CPU backends (numpy, numba) against PyTorch
   on the CPU, ``[784, 256, 256, 10]`` @ 256 and ``[64]*6+[1]`` @ 8192, interleaved rounds, median; the
   public ``train_step`` (what a user calls) and ``train_step_device``. Target: at least 1.2x faster.

``--quick`` shrinks every net, batch and data set to a smoke test of a few seconds.
"""

from __future__ import annotations

# This docstring is the --help text of the script. The modules: cases (every section's nets, batches and
# targets: the sections read them from there when they run), context (the run's Context and shared helpers),
# api (1-2), step_vs_torch (3), graph (4), tf32 (5), fused (6), epilogues (7), cpu (8), catalog (SECTIONS)
# and cli (the options and main).

from . import cases
from .cases import (
    API_CASES,
    CPU_CASES,
    EPILOGUE_CASES,
    FIT,
    FUSED_CASE,
    GRAPH_CASE,
    STEP_CASES,
    TF32_CASE,
    Case,
    FitCase,
)
from .catalog import SECTIONS, SUMMARY
from .cli import build_parser, check_args, main, out_problem
from .context import Context

__all__ = ["API_CASES", "CPU_CASES", "EPILOGUE_CASES", "FIT", "FUSED_CASE", "GRAPH_CASE", "SECTIONS", "STEP_CASES",
           "SUMMARY", "TF32_CASE", "Case", "Context", "FitCase", "build_parser", "cases", "check_args", "main",
           "out_problem"]
