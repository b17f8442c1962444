"""The resources of every CUDA kernel the CuPy backend builds, from ``nvcc -cubin -Xptxas -v`` (no GPU needed).

For each kernel and architecture (sm_80, sm_90), against the block size the backend launches it with (read from
the launches in kernels/cupy_gpu/*.py):

* no spill stores or loads;
* its registers times the threads of a block within the 64K registers a block may hold (else every launch fails
  with "too many resources requested for launch");
* its static shared memory within the 48 KB a block gets without opting in;
* ``__launch_bounds__`` (at least the block size) on every kernel launched with more than 256 threads a block, so
  that ptxas keeps its registers within what such a block may hold.

The default run builds for sm_90 the raw modules (the one-launch step kernels among them) and the float fused
module with its TF32 twins; ``-m exhaustive`` builds every module for both architectures and checks the table of
docs/gpu.md, which ``python -m tests.test_cuda_resources --write`` regenerates (``--table`` prints it). Builds are
kept on disk (tests/cuda_build.py), so only the first run pays for them.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from backprop.kernels import cupy_sources as S
from backprop.kernels import fused_mlp_sources as F

from .cuda_build import NVCC, KernelResources, kernel_resources, launch_bounds, nvcc_version, ptxas_figures
from .test_cupy_sources import elementwise_source, signatures

ARCHS = ("sm_80", "sm_90")
#: Registers of an SM, and the most one block may hold (sm_80 and sm_90 alike).
REGISTERS_PER_SM = REGISTERS_PER_BLOCK = 65536
#: Registers are given to warps in units of 256, from the share of one of an SM's four sub-partitions.
REGISTER_UNIT = 256
SUB_PARTITIONS = 4
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
#: Shared memory of an SM at its largest carve-out; every block also takes 1 KB the system reserves.
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_UNIT = 128
#: Static shared memory a block gets without opting in.
STATIC_SMEM_LIMIT = 48 * 1024
#: Above this many threads a block, a kernel must carry ``__launch_bounds__``.
BOUNDS_ABOVE_THREADS = 256
#: Threads a block of CuPy's ElementwiseKernel, unless the call gives ``block_size``.
CUPY_ELEMENTWISE_BLOCK = 128
#: The backend's launches.
LAUNCH_SOURCES = Path(S.__file__).parent / "cupy_gpu"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "gpu.md"


# --------------------------------------------------------------------------- the modules
@dataclass(frozen=True)
class Module:
    """A CUDA module the CuPy backend builds."""

    ctype: str
    source: Callable[[], str]
    elementwise: bool = False  # CuPy's ElementwiseKernels, wrapped as test_cupy_sources wraps them: ``ew_<name>``


#: Every module, in the order of the table (the TF32 module repeats the float fused module's CUDA-core kernels).
MODULES = {
    "raw float": Module("float", lambda: S.raw_module_source("float")),
    "raw double": Module("double", lambda: S.raw_module_source("double")),
    "elementwise float": Module("float", lambda: elementwise_source("float"), elementwise=True),
    "elementwise double": Module("double", lambda: elementwise_source("double"), elementwise=True),
    "fused float": Module("float", lambda: F.module_source("float")),
    "fused double": Module("double", lambda: F.module_source("double")),
    "fused tf32": Module("float", lambda: F.module_source("float", tensor_cores=True)),
}
#: What the default run builds: the step kernels (raw modules) and the fused kernels, for sm_90.
FAST = (("sm_90", "raw float"), ("sm_90", "raw double"), ("sm_90", "fused tf32"))


def kernel_names(module: str) -> list[str]:
    """The kernels of ``module``, by the names its launches use (the elementwise wrappers' ``ew_`` dropped)."""
    names = list(signatures(MODULES[module].source()))
    return [n.removeprefix("ew_") for n in names] if MODULES[module].elementwise else names


# --------------------------------------------------------------------------- the launches
@dataclass(frozen=True)
class Launch:
    """A launch in the backend's source: the kernel names it may launch and its threads a block."""

    pattern: re.Pattern
    threads: int
    elementwise: bool
    where: str


class _Unknown:
    """A value the source does not fix (a variable): formats as :data:`_HOLE`, and is true or false as asked."""

    def __init__(self, truth: bool):
        self.truth = truth

    def __format__(self, spec: str) -> str:
        return _HOLE

    def __str__(self) -> str:
        return _HOLE

    def __bool__(self) -> bool:
        return self.truth


_HOLE = "\x00"


def _pattern_of(texts: list[str], escaped: bool = False) -> re.Pattern:
    """The kernel names ``texts`` stand for, each :data:`_HOLE` any identifier part (``escaped``: ``texts`` are
    patterns already)."""
    if escaped:
        return re.compile("|".join(dict.fromkeys(texts)))
    return re.compile("|".join(r"\w+".join(map(re.escape, t.split(_HOLE))) for t in dict.fromkeys(texts)))


def _name_pattern(expr: ast.expr, names: dict) -> re.Pattern:
    """The kernel names a launch's name expression may give: a string, an f-string, or a call of a naming function
    (``src.loss_kernel_name(output, loss)``), evaluated with every argument that is not a constant unknown."""
    if isinstance(expr, ast.Constant):
        return _pattern_of([expr.value])
    if isinstance(expr, ast.JoinedStr):
        return _pattern_of(["".join(v.value if isinstance(v, ast.Constant) else _HOLE for v in expr.values)])
    if isinstance(expr, ast.IfExp):  # either branch's names
        return _pattern_of([_name_pattern(expr.body, names).pattern, _name_pattern(expr.orelse, names).pattern],
                           escaped=True)
    if isinstance(expr, ast.Call) and not expr.keywords:
        func = eval(compile(ast.Expression(expr.func), "<launch>", "eval"), names)
        unknown = [i for i, a in enumerate(expr.args) if not isinstance(a, ast.Constant)]
        texts = []
        for truths in itertools.product((False, True), repeat=len(unknown)):
            args = [a.value if isinstance(a, ast.Constant) else None for a in expr.args]
            for i, truth in zip(unknown, truths):
                args[i] = _Unknown(truth)
            texts.append(func(*args))
        return _pattern_of(texts)
    return _pattern_of([_HOLE])


def _imported_names(tree: ast.Module) -> dict:
    """What a module of the backend imports from ``backprop.kernels`` (``src``, ``fused``, constants)."""
    names: dict = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 2:
            base = "backprop.kernels" + (f".{node.module}" if node.module else "")
            for alias in node.names:
                if node.module:
                    names[alias.asname or alias.name] = getattr(importlib.import_module(base), alias.name)
                else:
                    names[alias.asname or alias.name] = importlib.import_module(f"{base}.{alias.name}")
    return names


def launches() -> list[Launch]:
    """Every kernel launch in kernels/cupy_gpu/*.py: ``_raw(name, ...)(grid, (threads,), args)`` and
    ``_fused_kernel(name, ...)(grid, (threads,), args)``, the threads evaluated from the source, and
    ``_ew(name)(args)``, which CuPy launches in blocks of :data:`CUPY_ELEMENTWISE_BLOCK` unless given
    ``block_size``."""
    found = []
    for path in sorted(LAUNCH_SOURCES.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = _imported_names(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Call)
                    and isinstance(node.func.func, ast.Name) and node.func.func.id in ("_raw", "_fused_kernel", "_ew")):
                continue
            where = f"{path.name}:{node.lineno}"
            pattern = _name_pattern(node.func.args[0], names)
            if node.func.func.id == "_ew":
                size = next((k.value for k in node.keywords if k.arg == "block_size"), None)
                threads = CUPY_ELEMENTWISE_BLOCK if size is None else eval(
                    compile(ast.Expression(size), where, "eval"), names)
                found.append(Launch(pattern, threads, True, where))
                continue
            block = node.args[1] if len(node.args) > 1 else None
            assert isinstance(block, ast.Tuple) and len(block.elts) == 1, f"{where}: the block is not (threads,)"
            try:
                threads = eval(compile(ast.Expression(block.elts[0]), where, "eval"), names)
            except NameError as exc:
                raise AssertionError(f"{where}: the block size is not read from the source ({exc})") from None
            found.append(Launch(pattern, int(threads), False, where))
    return found


def launch_threads(module: str, kernel: str, found: list[Launch]) -> int | None:
    """The most threads a block of ``kernel`` (of ``module``) is launched with; ``None`` where no launch names it."""
    sizes = [la.threads for la in found
             if la.elementwise == MODULES[module].elementwise and la.pattern.fullmatch(kernel)]
    return max(sizes, default=None)


# --------------------------------------------------------------------------- occupancy
def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def registers_per_block(registers: int, threads: int) -> int:
    """Registers a block holds as a launch is checked: a warp's rounded up to :data:`REGISTER_UNIT`, the warps to a
    multiple of the SM's sub-partitions."""
    return _round_up(registers * 32, REGISTER_UNIT) * _round_up(-(-threads // 32), SUB_PARTITIONS)


def blocks_by_registers(registers: int, threads: int) -> int:
    """Blocks an SM holds by its registers (whole warps in each sub-partition's share); 0 where one block does not
    fit, and every launch fails."""
    if registers_per_block(registers, threads) > REGISTERS_PER_BLOCK:
        return 0
    per_warp = _round_up(registers * 32, REGISTER_UNIT)
    return (REGISTERS_PER_SM // SUB_PARTITIONS // per_warp) * SUB_PARTITIONS // -(-threads // 32)


def blocks_per_sm(r: KernelResources, threads: int, arch: str) -> int:
    """Blocks an SM holds at once: the least of what its registers, shared memory (largest carve-out), warps and
    block slots allow."""
    smem = _round_up(r.static_smem + SMEM_RESERVED_PER_BLOCK, SMEM_UNIT)
    warps = -(-threads // 32)
    return min(blocks_by_registers(r.registers, threads), SMEM_PER_SM[arch] // smem, MAX_WARPS_PER_SM // warps,
               MAX_BLOCKS_PER_SM)


def occupancy(r: KernelResources, threads: int, arch: str) -> float:
    """Resident warps over the SM's 64, estimated from the static resources (no dynamic shared memory is used)."""
    return blocks_per_sm(r, threads, arch) * -(-threads // 32) / MAX_WARPS_PER_SM


# --------------------------------------------------------------------------- the checks
def kernel_violations(r: KernelResources, threads: int) -> list[str]:
    """The rules of the module docstring that a kernel of resources ``r``, launched with ``threads`` a block,
    breaks."""
    bad = []
    if r.spill_stores or r.spill_loads:
        bad.append(f"{r.spill_stores} bytes of spill stores, {r.spill_loads} of spill loads")
    if blocks_by_registers(r.registers, threads) == 0:
        bad.append(f"{r.registers} registers x {threads} threads take {registers_per_block(r.registers, threads)} "
                   f"registers, more than a block's {REGISTERS_PER_BLOCK}")
    if r.static_smem > STATIC_SMEM_LIMIT:
        bad.append(f"{r.static_smem} bytes of static shared memory, more than {STATIC_SMEM_LIMIT}")
    if threads > BOUNDS_ABOVE_THREADS and (r.max_threads or 0) < threads:
        bad.append(f"launched with {threads} threads a block, __launch_bounds__ {r.max_threads or 'missing'}")
    return bad


def resource_violations(module: str, arch: str, found: list[Launch]) -> list[str]:
    """What breaks a rule of the module docstring, kernel by kernel, in ``module`` built for ``arch``."""
    res = kernel_resources(MODULES[module].source(), arch)
    if MODULES[module].elementwise:
        res = {name.removeprefix("ew_"): r for name, r in res.items()}
    bad = [f"{name}: not in ptxas's report" for name in kernel_names(module) if name not in res]
    for name, r in sorted(res.items()):
        threads = launch_threads(module, name, found)
        if threads is None:
            bad.append(f"{name}: no launch of it found in kernels/cupy_gpu")
        else:
            bad += [f"{name}: {v}" for v in kernel_violations(r, threads)]
    return bad


_SAMPLE_REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'bp_small' for 'sm_90'
ptxas info    : Function properties for bp_small
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers
ptxas info    : Compile time = 5.1 ms
ptxas info    : Compiling entry function 'bp_big' for 'sm_90'
ptxas info    : Function properties for bp_big
    8 bytes stack frame, 4 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size, 33152 bytes smem
ptxas info    : Function properties for _Z7bp_helperiRf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
"""

_SAMPLE_PTX = """\
.visible .entry bp_small(
\t.param .u64 bp_small_param_0
)
{
\tret;
}
.visible .entry bp_big(
\t.param .u64 bp_big_param_0
)
.maxntid 1024, 1, 1
{
\tret;
}
"""


def test_ptxas_report_and_launch_bounds_are_read_per_kernel():
    figures = ptxas_figures(_SAMPLE_REPORT)
    assert figures == {"bp_small": {"registers": 24, "spill_stores": 0, "spill_loads": 0, "static_smem": 0},
                       "bp_big": {"registers": 255, "spill_stores": 12, "spill_loads": 12, "static_smem": 33152}}
    assert launch_bounds(_SAMPLE_PTX) == {"bp_big": 1024}


def test_register_and_occupancy_rules():
    """A block of 1024 threads holds at most 64 registers a thread; the fused kernels' 128-thread blocks at 160 and
    224 registers leave 3 and 2 blocks on an SM; shared memory and warps bound the rest."""
    assert registers_per_block(64, 1024) == REGISTERS_PER_BLOCK and blocks_by_registers(64, 1024) == 1
    assert blocks_by_registers(65, 1024) == 0 and blocks_by_registers(56, 1024) == 1
    assert [blocks_by_registers(r, 128) for r in (160, 168, 169, 224, 255)] == [3, 3, 2, 2, 2]
    assert registers_per_block(255, 32) == 8192 * SUB_PARTITIONS  # a lone warp is checked as four
    fused = KernelResources(160, 0, 0, 33152, None)
    assert blocks_per_sm(fused, 128, "sm_90") == 3 and occupancy(fused, 128, "sm_90") == 12 / 64
    roomy = KernelResources(16, 0, 0, 40 * 1024, None)
    assert blocks_per_sm(roomy, 128, "sm_80") == 4 and blocks_per_sm(roomy, 128, "sm_90") == 5
    assert occupancy(KernelResources(16, 0, 0, 0, None), 256, "sm_90") == 1.0


def test_each_rule_flags_the_kernels_that_break_it():
    ok = KernelResources(registers=64, spill_stores=0, spill_loads=0, static_smem=48 * 1024, max_threads=1024)
    assert kernel_violations(ok, 1024) == [] and kernel_violations(replace(ok, max_threads=None), 256) == []
    broken = {"spill stores": replace(ok, spill_stores=4), "more than a block's": replace(ok, registers=65),
              "static shared memory": replace(ok, static_smem=48 * 1024 + 1),
              "__launch_bounds__ missing": replace(ok, max_threads=None),
              "__launch_bounds__ 512": replace(ok, max_threads=512)}
    for rule, r in broken.items():
        found = kernel_violations(r, 1024)
        assert len(found) == 1 and rule in found[0], (rule, found)


def test_launches_are_read_from_the_backend():
    """The block sizes the backend launches with, as the scan reads them: the one-launch step's, the fused passes',
    the raw kernels', CuPy's default for the elementwise kernels; every kernel of every module is launched, and
    every launch names a kernel."""
    found = launches()
    assert launch_threads("raw float", "bp_step_adam", found) == S.STEP_THREADS == 1024
    assert launch_threads("raw double", "bp_loss_sigmoid_bce", found) == S.BLOCK
    assert launch_threads("raw float", "bp_count_step", found) == 32
    assert launch_threads("fused tf32", "bp_mlp_backward_tf32_w64", found) == F.THREADS
    assert launch_threads("fused float", "bp_mlp_reduce", found) == S.BLOCK
    assert launch_threads("elementwise float", "bp_adam_device_guarded", found) == CUPY_ELEMENTWISE_BLOCK
    assert launch_threads("raw float", "bp_no_such_kernel", found) is None
    unlaunched = [(m, k) for m in MODULES for k in kernel_names(m) if launch_threads(m, k, found) is None]
    assert not unlaunched, unlaunched
    kernels = {(MODULES[m].elementwise, k) for m in MODULES for k in kernel_names(m)}
    stale = [la.where for la in found if not any(e == la.elementwise and la.pattern.fullmatch(k) for e, k in kernels)]
    assert not stale, f"launches of no kernel: {stale}"


def _cases():
    for arch in ARCHS:
        for module in MODULES:
            marks = [] if (arch, module) in FAST else [pytest.mark.exhaustive]
            yield pytest.param(arch, module, marks=marks, id=f"{arch}-{module.replace(' ', '-')}")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch,module", list(_cases()))
def test_kernels_within_resources(arch, module):
    bad = resource_violations(module, arch, launches())
    assert not bad, f"{module} for {arch}:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- the table of docs/gpu.md
#: Kernels shown as one row: one kernel per activation, loss pair or update.
_GROUPS = [(re.compile(p), label) for p, label in (
    (r"bp_loss_\w+", "bp_loss_<output>_<loss>"), (r"bp_fwd_keep_\w+", "bp_fwd_keep_<act>"),
    (r"bp_fwd_\w+", "bp_fwd_<act>"), (r"bp_slope_\w+", "bp_slope_<act>"), (r"bp_\w+_guarded", "bp_<update>_guarded"),
    (r"bp_\w+_probe", "bp_<update>_probe"))]
TABLE_BEGIN = "<!-- resources table: python -m tests.test_cuda_resources --write -->"
TABLE_END = "<!-- end of resources table -->"


def _group(kernel: str) -> str:
    return next((label for pattern, label in _GROUPS if pattern.fullmatch(kernel)), kernel)


def _per_arch(values: list) -> str:
    """One figure per architecture of :data:`ARCHS`, ``"a / b"``, or one where they agree."""
    return str(values[0]) if len(set(values)) == 1 else " / ".join(map(str, values))


def _largest(rs: list[KernelResources]) -> KernelResources:
    """The largest of each figure of a group's kernels."""
    return KernelResources(max(r.registers for r in rs), max(r.spill_stores for r in rs),
                           max(r.spill_loads for r in rs), max(r.static_smem for r in rs), None)


def resources_table() -> str:
    """The markdown table of every kernel (a row per group of :data:`_GROUPS`, at its largest figures) and type:
    threads a block at launch, registers, spills, static shared memory, blocks an SM holds by its registers (at
    most its block slots), estimated occupancy, each for sm_80 / sm_90."""
    found = launches()
    groups: dict[tuple[str, str], tuple[int, dict[str, list[KernelResources]]]] = {}
    seen = set()
    for module, spec in MODULES.items():
        built = {arch: kernel_resources(spec.source(), arch) for arch in ARCHS}
        for name in kernel_names(module):
            if (name, spec.ctype) in seen:  # the TF32 module's CUDA-core kernels: the float module's
                continue
            seen.add((name, spec.ctype))
            threads, by_arch = groups.setdefault((_group(name), spec.ctype),
                                                 (launch_threads(module, name, found), {a: [] for a in ARCHS}))
            for arch in ARCHS:
                by_arch[arch].append(built[arch]["ew_" + name if spec.elementwise else name])
    lines = [f"Built by nvcc {nvcc_version()}: `nvcc -cubin -arch=<arch> -Xptxas -v`; each figure for "
             f"{' / '.join(ARCHS)} where they differ. Occupancy: resident warps over the SM's 64, estimated from the "
             "registers and the static shared memory (at the largest carve-out).", "",
             "| kernel | T | threads/block | registers | spills (bytes) | static smem (bytes) | blocks/SM by registers "
             "| occupancy (est.) |", "|---|---|--:|--:|--:|--:|--:|--:|"]
    for (group, ctype), (threads, by_arch) in groups.items():
        worst = {arch: _largest(rs) for arch, rs in by_arch.items()}
        registers = [f"{min(r.registers for r in rs)}–{worst[a].registers}"
                     if min(r.registers for r in rs) < worst[a].registers else str(worst[a].registers)
                     for a, rs in by_arch.items()]
        cells = [f"`{group}`", ctype, str(threads), _per_arch(registers),
                 _per_arch([w.spill_stores + w.spill_loads for w in worst.values()]),
                 _per_arch([w.static_smem for w in worst.values()]),
                 _per_arch([min(blocks_by_registers(w.registers, threads), MAX_BLOCKS_PER_SM) for w in worst.values()]),
                 _per_arch([f"{occupancy(w, threads, a):.0%}" for a, w in worst.items()])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _table_span(text: str) -> slice:
    """Where the table is in docs/gpu.md: between the lines :data:`TABLE_BEGIN` and :data:`TABLE_END`."""
    return slice(text.index(TABLE_BEGIN) + len(TABLE_BEGIN) + 1, text.index(TABLE_END))


@pytest.mark.exhaustive
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_docs_table_is_current():
    text = DOCS.read_text()
    documented = text[_table_span(text)]
    if f"nvcc {nvcc_version()}:" not in documented:
        pytest.skip(f"docs/gpu.md's table was built by another nvcc than {nvcc_version()}")
    assert documented == resources_table(), "run python -m tests.test_cuda_resources --write"


def write_docs_table() -> None:
    """Replace the table of docs/gpu.md by :func:`resources_table`."""
    text = DOCS.read_text()
    span = _table_span(text)
    DOCS.write_text(text[:span.start] + resources_table() + text[span.stop:])


if __name__ == "__main__":
    if NVCC is None:
        sys.exit("nvcc not found")
    if sys.argv[1:] == ["--table"]:
        print(resources_table(), end="")
    elif sys.argv[1:] == ["--write"]:
        write_docs_table()
    else:
        sys.exit("usage: python -m tests.test_cuda_resources --table | --write")
