"""The nets, batches and targets of every section, each with the small stand-in of ``--quick``.

The sections read these tables when they run (``cases.FIT``, ``cases.STEP_CASES``, ...): replacing one here
(``monkeypatch.setattr(cases, "FIT", ...)``) changes what the next run measures.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["API_CASES", "API_TARGET", "CPU_CASES", "CPU_TARGET", "EPILOGUE_CASES", "EPILOGUE_GEMM_SHARE", "FIT",
           "FUSED_CASE", "FUSED_TARGET", "GRAPH_CASE", "GRAPH_TARGET", "STEP_CASES", "TF32_CASE", "Case", "FitCase"]


@dataclass(frozen=True)
class Case:
    """A net and batch of a section, with the small stand-ins of ``--quick``."""

    name: str
    sizes: tuple[int, ...]
    batch: int
    activation: str
    head: str  # "multiclass" (softmax + cross-entropy) or "regression" (identity + MSE)
    quick_sizes: tuple[int, ...]
    quick_batch: int
    gemm_bound: bool = False

    def at(self, quick: bool) -> tuple[list[int], int]:
        """The layer widths and the batch of a full run, or of ``--quick``."""
        return (list(self.quick_sizes), self.quick_batch) if quick else (list(self.sizes), self.batch)


@dataclass(frozen=True)
class FitCase:
    """The ``fit`` section's net, data and training settings, with the small stand-ins of ``--quick``."""

    sizes: tuple[int, ...]
    rows: int
    batch: int
    quick_sizes: tuple[int, ...]
    quick_rows: int
    quick_batch: int
    lr: float = 0.01
    momentum: float = 0.9
    target: float = 1.3

    def at(self, quick: bool) -> tuple[list[int], int, int]:
        """The layer widths, the rows of data and the minibatch of a full run, or of ``--quick``."""
        if quick:
            return list(self.quick_sizes), self.quick_rows, self.quick_batch
        return list(self.sizes), self.rows, self.batch


#: 1. ``fit``: one epoch, 60000 x 784, 10 classes; target: PyTorch epoch / backprop epoch >= 1.3
FIT = FitCase((784, 1024, 1024, 10), 60000, 256, (32, 64, 64, 4), 1024, 64)
#: 2. ``api``: public call / device-level call <= API_TARGET
API_CASES = [
    Case("narrow_deep", (64,) * 6 + (1,), 262144, "relu", "regression", (16,) * 4 + (1,), 256),
    Case("mnist_like", (784, 1024, 1024, 10), 4096, "relu", "multiclass", (32, 64, 64, 4), 64),
]
#: 3. ``step``: the nets of the H200 findings; the ``gemm_bound`` one is compared with the GEMM rate
STEP_CASES = [
    Case("mnist_like", (784, 1024, 1024, 10), 4096, "relu", "multiclass", (32, 64, 64, 4), 64),
    Case("narrow_deep", (64,) * 6, 262144, "relu", "regression", (16,) * 4, 256),
    Case("gemm_bound", (4096,) * 4, 4096, "relu", "regression", (64,) * 4, 64, gemm_bound=True),
    Case("tiny", (64, 64, 10), 256, "tanh", "multiclass", (8, 8, 4), 16),
]
#: 4. ``graph``: plain step / graph step >= GRAPH_TARGET
GRAPH_CASE = Case("tiny", (64, 64, 10), 256, "tanh", "multiclass", (8, 8, 4), 16)
#: 5. ``tf32``: the GEMM-bound net
TF32_CASE = STEP_CASES[2]
#: 6. ``fused``: torch eager / fused >= FUSED_TARGET
FUSED_CASE = Case("narrow_deep", (64,) * 6, 262144, "relu", "regression", (16,) * 4, 256)
#: 7. ``epilogues``: (net, target of torch eager / epilogues on, or ``None``)
EPILOGUE_CASES = [
    (Case("narrow_deep", (64,) * 6, 262144, "relu", "regression", (16,) * 4, 256), 1.5),
    (Case("mnist_like", (784, 1024, 1024, 10), 4096, "relu", "multiclass", (32, 64, 64, 4), 64), 1.25),
    (Case("gemm_bound", (4096,) * 4, 4096, "relu", "regression", (64,) * 4, 64, gemm_bound=True), None),
]
#: 8. ``cpu``: PyTorch step on the CPU / backprop ``train_step`` >= CPU_TARGET
CPU_CASES = [
    Case("mnist_like", (784, 256, 256, 10), 256, "relu", "multiclass", (32, 64, 64, 4), 32),
    Case("narrow_deep", (64,) * 6 + (1,), 8192, "relu", "regression", (16,) * 4 + (1,), 128),
]
API_TARGET, GRAPH_TARGET, CPU_TARGET = 1.10, 1.5, 1.2
FUSED_TARGET = 3.0
#: The GEMM-bound net with epilogues keeps at least this share of the measured cuBLAS rate.
EPILOGUE_GEMM_SHARE = 0.95
