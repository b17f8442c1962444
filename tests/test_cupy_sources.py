"""The CUDA sources of the CuPy backend, checked without a GPU.

1. ``nvcc`` compiles every kernel, wrapped as CuPy wraps it, for float and double; the float
   PTX holds no double-precision instruction (no literal promoted to double).
2. Where CuPy and NVRTC import (no GPU needed), CuPy's own code generator wraps each
   ElementwiseKernel and NVRTC compiles it with CuPy's headers and options, as at run time.
3. A small host emulator (cooperative fibers on one OS thread standing in for the CUDA threads of
   a block, barriers for warps and ``__syncthreads``) runs every kernel on the CPU against the NumPy
   reference, so that the formulas, the indexing, the warp and block reductions and the grid-stride
   loops are checked.

Each part skips cleanly when its compiler is missing.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from backprop.kernels import cupy_sources as S
from backprop.kernels import numpy_ref as ref
from backprop.kernels.registry import ACTIVATIONS, LOSSES

from .cuda_build import NVCC, locked_build_dir
from .cuda_build import nvcc_ptx as _nvcc_ptx

CXX = shutil.which("g++") or shutil.which("clang++")
CTYPES = ["float", "double"]
_F64 = re.compile(r"\.f64|%fd")


_ENTRY = re.compile(r"^(?:\.(?:visible|weak|extern)\s+)?\.(entry|func)\s+(?:\([^)]*\)\s*)?(\w+)\s*\(", re.M)


def _f64_instructions(ptx: str, allowed: frozenset[str] = S.F64_KERNELS) -> list[str]:
    """Lines of ``ptx`` that compute in double precision (declarations of module constants, such
    as DBL_MAX from CuPy's headers, do not count), outside the kernels ``allowed`` to (the guard's
    float64 bookkeeping) and the device functions only they call (``pow`` of Adam's corrections)."""
    starts = [(m.start(), m.group(1), m.group(2)) for m in _ENTRY.finditer(ptx)]
    sections = [(name, kind, ptx[start:nxt[0]])
                for (start, kind, name), nxt in zip(starts, starts[1:] + [(len(ptx), "", "")])]
    callers: dict[str, set[str]] = {}
    for name, kind, text in sections:
        for callee in re.findall(r"\bcall(?:\.uni)?\s+(?:\([^)]*\),\s*)?(\w+)", text):
            callers.setdefault(callee, set()).add(name)
    ok = set(allowed) | {name for name, kind, _ in sections
                         if kind == "func" and callers.get(name) and callers[name] <= set(allowed)}
    keep = [ptx[:starts[0][0]] if starts else ptx] + [text for name, _, text in sections if name not in ok]
    return [line.strip() for line in "".join(keep).splitlines()
            if _F64.search(line) and not line.lstrip().startswith((".global", ".const", ".extern", "//"))]


_C_OF = {"T": "T", "int32": "int", "int64": "long long", "float32": "float", "float64": "double"}
#: NumPy dtype of each C element type of a kernel pointer (``T`` is the emulated type).
_NP_OF = {"double": np.float64, "float": np.float32, "long long": np.int64, "int": np.int32}


# --------------------------------------------------------------------------- wrappers
def _split(params: str) -> list[tuple[str, str]]:
    """``(type, name)`` of each parameter; a raw array's type keeps its marker: ``"raw int64"``."""
    return [(" ".join(p.split()[:-1]), p.split()[-1]) for p in params.split(",") if p.strip()]


def elementwise_wrapper(name: str, spec: S.ElementwiseSpec) -> str:
    """A ``__global__`` function running ``spec``'s operation the way CuPy's ElementwiseKernel does:
    each array parameter bound by reference to its element (``b``, the bias, broadcast along rows),
    raw arrays passed whole, scalars passed by value, a grid-stride loop over ``_n`` elements whose
    index is ``i`` (as in CuPy)."""
    in_params, out_params, operation = spec
    args, binds = [], []
    for typ, pname in _split(in_params):
        if typ.startswith("raw "):  # the whole array, indexed by the operation (``guard[0]``)
            ctype = _C_OF[typ.split()[1]]
            args.append(f"const {ctype}* _raw_{pname}")
            binds.append(f"const {ctype}* {pname} = _raw_{pname};")
            continue
        ctype = _C_OF[typ]
        if pname in S.SCALAR_PARAMS:
            args.append(f"const {ctype} {pname}")
        else:
            args.append(f"const {ctype}* _raw_{pname}")
            idx = "i % _ncols" if pname == "b" else "i"
            binds.append(f"const {ctype} &{pname} = _raw_{pname}[{idx}];")
    for typ, pname in _split(out_params):
        ctype = _C_OF[typ]
        args.append(f"{ctype}* _raw_{pname}")
        binds.append(f"{ctype} &{pname} = _raw_{pname}[i];")
    args += ["long long _n", "long long _ncols"]
    body = "\n        ".join(binds + [operation])
    return (f'extern "C" __global__ void ew_{name}({", ".join(args)}) {{\n'
            f"    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < _n;\n"
            f"         i += (long long)gridDim.x * blockDim.x) {{\n        {body}\n    }}\n}}\n")


def elementwise_source(ctype: str) -> str:
    wrappers = "\n".join(elementwise_wrapper(n, s) for n, s in S.elementwise_kernels().items())
    return f"typedef {ctype} T;\n{S.MATH_PREAMBLE}\n{wrappers}"


# --------------------------------------------------------------------------- 1. nvcc
def test_every_activation_and_loss_has_a_kernel():
    hidden = {n for n, s in ACTIVATIONS.items() if s.hidden}
    assert hidden <= set(S.ACT_FORWARD) and hidden <= set(S.ACT_SLOPE)
    pairs = {(o, loss) for loss, s in LOSSES.items() for o in s.outputs}
    assert pairs == set(S.loss_pairs()) | {("softmax", "cross_entropy")}
    names = S.elementwise_kernels()
    for act in hidden:
        assert {f"bp_fwd_keep_{act}", f"bp_fwd_{act}", f"bp_slope_{act}"} <= set(names)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("ctype", CTYPES)
def test_sources_compile_with_nvcc(ctype, tmp_path):
    ew = _nvcc_ptx(elementwise_source(ctype), tmp_path, f"ew_{ctype}")
    raw = _nvcc_ptx(S.raw_module_source(ctype), tmp_path, f"raw_{ctype}")
    for name in S.elementwise_kernels():
        assert f".entry ew_{name}(" in ew
    for name in S.raw_kernel_names():
        assert f".entry {name}(" in raw, f"{name} missing from the raw module"
    if ctype == "float":
        assert not _f64_instructions(ew), f"float32 elementwise kernels compute in double: {_f64_instructions(ew)[:5]}"
        assert not _f64_instructions(raw), f"float32 raw kernels compute in double: {_f64_instructions(raw)[:5]}"


# --------------------------------------------------------------------------- 2. CuPy + NVRTC
def _cupy_nvrtc():
    try:
        import cupy
        from cupy._core import _carray, _kernel, _scalar
        from cupy._core import core
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # not installed, or NVRTC not loadable
        pytest.skip(f"CuPy with NVRTC not importable here: {exc}")
    return cupy, _carray, _kernel, _scalar, core, nvrtc


def test_cupy_generated_code_compiles_with_nvrtc():
    """CuPy's own ElementwiseKernel code generator and CuPy's compiler options, through NVRTC."""
    cupy, _carray, K, _scalar, core, nvrtc = _cupy_nvrtc()
    try:
        opts = tuple(core.assemble_cupy_compiler_options(()))
        header = "".join(f"#include <{h}>\n" for h in core._cupy_header_list)
        ndarray_kind, indexer_kind, scalar_kind = 1, 2, 3  # CuPy's _ArgKind enumeration
        K._ArgInfo(ndarray_kind, cupy.ndarray, np.dtype("float32"), 2, True, True)
    except Exception as exc:
        pytest.skip(f"this CuPy's internals differ ({exc})")
    major, minor = nvrtc.getVersion()
    arch = "90" if (major, minor) >= (11, 8) else "80"
    opts += (f"-arch=compute_{arch}", "--device-as-default-execution-space", "-ftz=true")

    def compile_(source: str, name: str) -> str:
        prog = nvrtc.createProgram(source, name + ".cu", (), ())
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError:
            pytest.fail(f"NVRTC failed on {name}:\n{nvrtc.getProgramLog(prog)}")
        ptx = nvrtc.getPTX(prog)
        return ptx.decode() if isinstance(ptx, bytes) else ptx

    probe = nvrtc.createProgram(header + 'extern "C" __global__ void bp_probe() {}\n', "probe.cu", (), ())
    try:
        nvrtc.compileProgram(probe, opts)
    except nvrtc.NVRTCError:  # CuPy's own kernels would not compile here either (CUDA headers not found)
        pytest.skip(f"CuPy's headers do not compile here: {nvrtc.getProgramLog(probe)[-300:]}")

    def generated(d: np.dtype) -> dict[str, str]:
        """CuPy's own source for each ElementwiseKernel (2-D arrays, the bias broadcast)."""
        codes = {}
        for name, (inp, outp, op) in S.elementwise_kernels().items():
            ins, outs = K._get_param_info(inp, True), K._get_param_info(outp, False)
            params = ins + outs + K._get_param_info("CIndexer _ind", False)
            infos = []
            for p in ins:
                if p.raw:  # the whole (1-D) array, of the parameter's own dtype
                    infos.append(K._ArgInfo(ndarray_kind, cupy.ndarray, p.dtype, 1, True, True))
                elif p.name in S.SCALAR_PARAMS:
                    infos.append(K._ArgInfo(scalar_kind, _scalar.CScalar, p.dtype if p.dtype is not None else d,
                                            0, True, True))
                else:
                    infos.append(K._ArgInfo(ndarray_kind, cupy.ndarray, d, 2, p.name != "b", True))
            infos += [K._ArgInfo(ndarray_kind, cupy.ndarray, d, 2, True, True) for _ in outs]
            infos.append(K._ArgInfo(indexer_kind, _carray.Indexer, None, 2, True, True))
            codes[name] = K._get_elementwise_kernel_code(tuple(infos), K._TypeMap((("T", d),)), params, op, name,
                                                         S.MATH_PREAMBLE)
        return codes

    for dt in ("float32", "float64"):
        try:
            codes = generated(np.dtype(dt))
        except (TypeError, AttributeError, ValueError) as exc:
            pytest.skip(f"this CuPy's code generator differs ({exc})")
        for name, code in codes.items():
            ptx = compile_(header + code, f"{name}_{dt}")
            if dt == "float32":
                assert not _f64_instructions(ptx), f"{name} computes in double for float32: {_f64_instructions(ptx)[:5]}"
        ptx = compile_(S.raw_module_source(S.CTYPES[dt]), f"raw_{dt}")  # RawModule: no headers prepended
        for name in S.raw_kernel_names():
            assert f".entry {name}(" in ptx
        if dt == "float32":
            assert not _f64_instructions(ptx), _f64_instructions(ptx)[:5]


# --------------------------------------------------------------------------- 3. host emulator
EMULATOR = r"""
#undef _FORTIFY_SOURCE  /* its longjmp check refuses a jump to another fiber's stack */
#if defined(__APPLE__)  /* its <ucontext.h> wants these */
#define _XOPEN_SOURCE 700
#define _DARWIN_C_SOURCE
#endif
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <setjmp.h>
#include <sstream>
#include <string>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <vector>
using std::erf; using std::exp; using std::expm1; using std::fabs; using std::log; using std::log1p;
using std::sqrt; using std::tanh;

#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct bp_dim3 { unsigned x = 0, y = 0, z = 0; };
static bp_dim3 blockIdx, blockDim, gridDim;
bp_dim3 threadIdx;  /* set by the scheduler on each switch (external linkage: no copy kept across a switch) */
static unsigned long long bp_slots[1024];

/* The CUDA threads of a block are fibers on one OS thread, switched cooperatively: a thread runs until it
   waits at a barrier or finishes, then the next runnable thread (round robin) runs. A fiber starts on its own
   stack through ucontext; switches use _setjmp/_longjmp, which leave the signal mask alone (swapcontext
   would make a system call for it on every switch). */
struct bp_fiber {
    jmp_buf jb;
    const unsigned long long* gen = nullptr;  /* waiting until *gen != seen (a barrier's generation) */
    unsigned long long seen = 0;
    bool done = false;
};
static std::vector<bp_fiber> bp_fibers;
static unsigned bp_current = 0, bp_live = 0;
static jmp_buf bp_main_jb;

static bool bp_runnable(const bp_fiber& f) { return !f.done && (!f.gen || *f.gen != f.seen); }

static void bp_deadlock() {
    unsigned finished = 0, waiting = 0;
    for (const bp_fiber& f : bp_fibers) (f.done ? finished : waiting) += 1;
    std::fprintf(stderr, "deadlock in block %u: %u of its threads wait at barriers that cannot complete, "
                 "%u have finished\n", blockIdx.x, waiting, finished);
    std::fflush(stderr);
    std::_Exit(6);
}

/* Leaves the current fiber (waiting or finished) for the next runnable one; to main once all finished. */
static void bp_yield() {
    const unsigned n = (unsigned)bp_fibers.size(), from = bp_current;
    for (unsigned k = 1; k <= n; ++k) {
        const unsigned i = (from + k) % n;
        if (!bp_runnable(bp_fibers[i])) continue;
        bp_fibers[i].gen = nullptr;
        if (i == from) return;
        bp_current = i;
        threadIdx.x = i;
        if (_setjmp(bp_fibers[from].jb) == 0) _longjmp(bp_fibers[i].jb, 1);
        return;
    }
    if (bp_live > 0) bp_deadlock();
    if (_setjmp(bp_fibers[from].jb) == 0) _longjmp(bp_main_jb, 1);
}

/* Every participant arrives before any passes: the last to arrive opens the next generation. */
struct bp_barrier {
    unsigned expected = 0, arrived = 0;
    unsigned long long generation = 0;
    void arrive_and_wait() {
        if (++arrived == expected) { arrived = 0; ++generation; return; }
        bp_fiber& self = bp_fibers[bp_current];
        self.gen = &generation;
        self.seen = generation;
        bp_yield();
    }
};
static bp_barrier bp_block_barrier;
static bp_barrier bp_warp_barriers[32];  /* one per warp of the block: waits only for the warp's 32 threads */

inline void __syncthreads() { bp_block_barrier.arrive_and_wait(); }

template <class V> V __shfl_xor_sync(unsigned, V v, int o) {
    const unsigned t = threadIdx.x, w = t / 32, lane = t % 32;
    std::memcpy(&bp_slots[t], &v, sizeof(V));
    bp_warp_barriers[w].arrive_and_wait();
    V r;
    std::memcpy(&r, &bp_slots[w * 32 + (lane ^ (unsigned)o)], sizeof(V));
    bp_warp_barriers[w].arrive_and_wait();
    return r;
}

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

static void (*bp_body)(void*) = nullptr;
static void* bp_body_arg = nullptr;
static ucontext_t bp_boot_ctx;

/* A fiber's first context: saves where it is and returns to bp_launch; once resumed, runs its thread's body
   once per block, then waits for the next block. */
static void bp_fiber_main() {
    if (_setjmp(bp_fibers[bp_current].jb) == 0) setcontext(&bp_boot_ctx);
    for (;;) {
        bp_body(bp_body_arg);
        bp_fibers[bp_current].done = true;
        --bp_live;
        bp_yield();
    }
}

/* Runs body() once per CUDA thread: blocks one after another, the threads of a block as fibers. */
template <class F> void bp_launch(unsigned grid, unsigned block, F body) {
    if (block == 0 || block % 32 || block > 1024) { std::fprintf(stderr, "bad block size\n"); std::exit(2); }
    gridDim.x = grid; blockDim.x = block;
    bp_body = [](void* p) { (*static_cast<F*>(p))(); };
    bp_body_arg = &body;
    /* the fibers' stacks side by side (no guard pages: an mprotect each would cost more than the kernel), each
       with a canary just below it, at the top of its neighbour's (so in a page touched anyway), checked after
       each block: an overflow fails loudly */
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), span = 256 * 1024, canary = 64;
    char* mem = static_cast<char*>(mmap(nullptr, page + span * block, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (mem == MAP_FAILED) { std::perror("mmap"); std::exit(2); }
    char* const stacks = mem + page;
    bp_fibers.assign(block, bp_fiber());
    for (unsigned ti = 0; ti < block; ++ti) {
        std::memset(stacks + ti * span - canary, 0xa5, canary);
        ucontext_t c;
        getcontext(&c);
        c.uc_stack.ss_sp = stacks + ti * span;
        c.uc_stack.ss_size = span - canary;
        c.uc_link = nullptr;
        makecontext(&c, bp_fiber_main, 0);
        bp_current = ti;
        swapcontext(&bp_boot_ctx, &c);
    }
    bp_block_barrier = bp_barrier();
    bp_block_barrier.expected = block;
    for (unsigned w = 0; w < 32; ++w) { bp_warp_barriers[w] = bp_barrier(); bp_warp_barriers[w].expected = 32; }
    for (unsigned bi = 0; bi < grid; ++bi) {
        blockIdx.x = bi;
        for (bp_fiber& f : bp_fibers) { f.done = false; f.gen = nullptr; }
        bp_live = block;
        bp_current = 0;
        threadIdx.x = 0;
        if (_setjmp(bp_main_jb) == 0) _longjmp(bp_fibers[0].jb, 1);
        for (unsigned ti = 0; ti < block; ++ti)
            for (size_t j = 0; j < canary; ++j)
                if ((unsigned char)stacks[ti * span - canary + j] != 0xa5) {
                    std::fprintf(stderr, "thread %u overflowed its %zu-byte stack\n", ti, span - canary);
                    std::exit(7);
                }
    }
    munmap(mem, page + span * block);
}

inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }

static std::string bp_dir;
static std::map<std::string, std::vector<unsigned char>> bp_buffers;  /* the bytes of each array */
static std::map<std::string, double> bp_scalars;

/* Array ``name`` from the directory, as elements of type E (the kernel parameter's type). */
template <class E> E* bp_array(const std::string& name) {
    std::ifstream alias(bp_dir + "/" + name + ".alias");
    if (alias) { std::string target; alias >> target; return bp_array<E>(target); }
    auto it = bp_buffers.find(name);
    if (it != bp_buffers.end()) return reinterpret_cast<E*>(it->second.data());
    std::ifstream f(bp_dir + "/" + name + ".bin", std::ios::binary | std::ios::ate);
    if (!f) { std::fprintf(stderr, "missing array %s\n", name.c_str()); std::exit(3); }
    std::vector<unsigned char> v((size_t)f.tellg() + sizeof(double));  /* room, and aligned storage */
    v.resize((size_t)f.tellg());
    f.seekg(0);
    f.read(reinterpret_cast<char*>(v.data()), (std::streamsize)v.size());
    return reinterpret_cast<E*>((bp_buffers[name] = std::move(v)).data());
}

static double bp_scalar(const std::string& name) {
    if (!bp_scalars.count(name)) { std::fprintf(stderr, "missing scalar %s\n", name.c_str()); std::exit(4); }
    return bp_scalars[name];
}

static void bp_save(const std::string& name) {
    std::ifstream alias(bp_dir + "/" + name + ".alias");
    if (alias) return;
    auto& v = bp_buffers.at(name);
    std::ofstream f(bp_dir + "/" + name + ".out", std::ios::binary);
    f.write(reinterpret_cast<const char*>(v.data()), (std::streamsize)v.size());
}
"""

_SIG = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(([^)]*)\)')


def _pointee(decl: str) -> str:
    """The element type of a pointer parameter: ``const long long* __restrict__ g`` -> ``long long``."""
    return " ".join(decl.replace("__restrict__", " ").replace("const", " ").replace("*", " ").split()[:-1])


def signatures(source: str) -> dict[str, list[str]]:
    """Each kernel's parameter declarations, whitespace normalized."""
    return {n: [" ".join(p.split()) for p in ps.split(",")] for n, ps in _SIG.findall(source)}


def _dispatch(source: str) -> str:
    """``main``: run the kernel named on the command line with arrays and scalars from a directory."""
    cases = []
    for name, params in _SIG.findall(source):
        decls = [" ".join(p.split()) for p in params.split(",")]
        lets, args, saves = [], [], []
        for i, decl in enumerate(decls):
            pname = decl.replace("*", " ").split()[-1]
            if "*" in decl:  # arrays are read before the threads start (bp_array is not thread-safe)
                ctype = _pointee(decl)
                assert ctype == "T" or ctype in _NP_OF, decl
                lets.append(f'{ctype}* a{i} = bp_array<{ctype}>("{pname}");')
                if not decl.startswith("const"):
                    saves.append(f'bp_save("{pname}");')
            else:
                ctype = decl.rsplit(" ", 1)[0].replace("const ", "")
                lets.append(f'{ctype} a{i} = ({ctype})bp_scalar("{pname}");')
            args.append(f"a{i}")
        call = f"{name}({', '.join(args)})"
        cases.append(
            f'    if (k == "{name}") {{\n'
            f"        {' '.join(lets)}\n"
            f"        auto run = [&] {{ {call}; }};\n"
            f"        bp_launch(grid, block, run);\n"
            f"        {' '.join(saves)}\n        return 0;\n    }}")
    return ("int main(int argc, char** argv) {\n"
            "    if (argc < 5) return 1;\n"
            "    std::string k = argv[1]; bp_dir = argv[2];\n"
            "    unsigned grid = (unsigned)std::atoi(argv[3]), block = (unsigned)std::atoi(argv[4]);\n"
            "    std::ifstream sf(bp_dir + \"/scalars.txt\"); std::string sn; double sv;\n"
            "    while (sf >> sn >> sv) bp_scalars[sn] = sv;\n"
            + "\n".join(cases) + "\n    std::fprintf(stderr, \"unknown kernel\\n\");\n    return 1;\n}\n")


def _emulated_kernels() -> str:
    """Every kernel the emulator runs: the elementwise wrappers (``ew_<name>``) and the raw module."""
    return "\n".join(elementwise_wrapper(n, s) for n, s in S.elementwise_kernels().items()) + S.raw_module_body()


@functools.lru_cache(maxsize=None)
def _emulator(ctype: str) -> str:
    """Build the emulator binary of the backend's kernels for ``ctype`` once per session; returns its path."""
    return build_emulator(ctype, f"{S.MATH_PREAMBLE}\n{S.REDUCE_PREAMBLE}", _emulated_kernels(), "bp_emu")


def build_emulator(ctype: str, preamble: str, kernels: str, stem: str) -> str:
    """Compile ``kernels`` (after ``preamble``) for element type ``ctype`` into an emulator binary whose
    ``main`` runs any of them by name (:class:`Emu`); returns its path."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    source = f"typedef {ctype} T;\n{EMULATOR}\n{preamble}\n{kernels}\n" + _dispatch(kernels)
    command = [CXX, "-std=c++20", "-O1"]
    # one build per source, shared by the test processes of a run (pytest-xdist workers)
    with locked_build_dir(f"{stem}_{ctype}", command + [source]) as out:
        exe = out / "emu"
        if not exe.exists():
            (out / "emu.cpp").write_text(source)
            proc = subprocess.run(command + ["-c", "-o", str(out / "emu.o"), str(out / "emu.cpp")],
                                  capture_output=True, text=True)
            if proc.returncode != 0 and ("ucontext" in proc.stderr or "c++20" in proc.stderr):
                pytest.skip(f"{CXX} lacks C++20 or POSIX <ucontext.h>: {proc.stderr[-300:]}")
            assert proc.returncode == 0, proc.stderr[-4000:]
            # linked statically where the static libraries are installed: a launch then starts in about half
            # the time (no shared C++ library to load), and a test run launches thousands
            for link in (["-static"], []):
                proc = subprocess.run([CXX, *link, "-o", str(out / "emu.tmp"), str(out / "emu.o")],
                                      capture_output=True, text=True)
                if proc.returncode == 0:
                    break
            assert proc.returncode == 0, proc.stderr[-4000:]
            os.replace(out / "emu.tmp", exe)
    return str(exe)


class Emu:
    """Runs one kernel in the emulator: arrays in, the written arrays out. By default the backend's kernels;
    ``exe`` and ``sigs`` (:func:`build_emulator`, :func:`signatures`) name another module's."""

    def __init__(self, ctype: str, exe: str | None = None, sigs: dict[str, list[str]] | None = None):
        self.exe = _emulator(ctype) if exe is None else exe
        self.sigs = sigs
        self.dtype = np.float32 if ctype == "float" else np.float64

    def dtypes(self, kernel: str) -> dict:
        """The NumPy dtype of each array parameter of ``kernel``: ``T`` is the emulated type."""
        out = {}
        for decl in (_kernel_signatures() if self.sigs is None else self.sigs)[kernel]:
            if "*" in decl:
                ctype = _pointee(decl)
                out[decl.replace("*", " ").split()[-1]] = self.dtype if ctype == "T" else _NP_OF[ctype]
        return out

    def __call__(self, kernel: str, grid: int, block: int, arrays: dict, scalars: dict,
                 aliases: dict | None = None, outputs: tuple[str, ...] = ()) -> dict:
        dtypes = self.dtypes(kernel)
        with tempfile.TemporaryDirectory() as d:
            for name, a in arrays.items():
                np.ascontiguousarray(a, dtype=dtypes[name]).tofile(os.path.join(d, name + ".bin"))
            for name, target in (aliases or {}).items():
                Path(d, name + ".alias").write_text(target)
            Path(d, "scalars.txt").write_text("".join(f"{k} {float(v)!r}\n" for k, v in scalars.items()))
            proc = subprocess.run([self.exe, kernel, d, str(grid), str(block)], capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 0, f"{kernel}: {proc.stderr}"
            return {name: np.fromfile(os.path.join(d, name + ".out"), dtype=dtypes[name]) for name in outputs}


@functools.lru_cache(maxsize=None)
def _kernel_signatures() -> dict[str, list[str]]:
    return signatures(_emulated_kernels())


def _tol(ctype: str) -> dict:
    return {"rtol": 2e-4, "atol": 2e-5} if ctype == "float" else {"rtol": 1e-10, "atol": 1e-12}


HIDDEN = [n for n, s in ACTIVATIONS.items() if s.hidden]
ALPHA = {"leaky_relu": 0.05, "elu": 0.7}


def _alpha(act: str) -> float:
    return ALPHA.get(act, ACTIVATIONS[act].default_alpha)


@pytest.fixture(params=CTYPES)
def emu(request) -> Emu:
    return Emu(request.param)


@pytest.fixture
def rng(request) -> np.random.Generator:
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.mark.parametrize("act", HIDDEN)
def test_emulated_forward(emu, rng, act):
    ct = "float" if emu.dtype == np.float32 else "double"
    rows, cols = 7, 13
    u0, b = rng.normal(size=(rows, cols)) * 2, rng.normal(size=cols)
    a = _alpha(act)
    u0 = u0.astype(emu.dtype).astype(np.float64)
    b = b.astype(emu.dtype).astype(np.float64)
    y_ref = ref.activate(u0 + b, act, a)
    n = rows * cols
    got = emu(f"ew_bp_fwd_keep_{act}", 2, 32, {"_raw_b": b, "_raw_u": u0, "_raw_y": np.full(n, np.nan)},
              {"alpha": a, "_n": n, "_ncols": cols}, outputs=("_raw_u", "_raw_y"))
    np.testing.assert_allclose(got["_raw_u"], (u0 + b).ravel(), **_tol(ct))
    np.testing.assert_allclose(got["_raw_y"], y_ref.ravel(), **_tol(ct))
    got = emu(f"ew_bp_fwd_{act}", 1, 64, {"_raw_b": b, "_raw_u": u0}, {"alpha": a, "_n": n, "_ncols": cols},
              outputs=("_raw_u",))
    np.testing.assert_allclose(got["_raw_u"], y_ref.ravel(), **_tol(ct))


@pytest.mark.parametrize("act", HIDDEN)
def test_emulated_slope(emu, rng, act):
    ct = "float" if emu.dtype == np.float32 else "double"
    rows, cols = 5, 11
    a = _alpha(act)
    u = (rng.normal(size=(rows, cols)) * 2).astype(emu.dtype).astype(np.float64)
    y = ref.activate(u, act, a).astype(emu.dtype).astype(np.float64)
    g = rng.normal(size=(rows, cols)).astype(emu.dtype).astype(np.float64)
    var = S.ACT_SLOPE[act][0]
    got = emu(f"ew_bp_slope_{act}", 1, 32, {f"_raw_{var}": u if var == "u" else y, "_raw_g": g},
              {"alpha": a, "_n": rows * cols, "_ncols": cols}, outputs=("_raw_g",))
    want = g * ref.activation_slope(y, u, act, a)
    np.testing.assert_allclose(got["_raw_g"], want.ravel(), **_tol(ct))


@pytest.mark.parametrize("nesterov", [0, 1])
def test_emulated_momentum(emu, rng, nesterov):
    ct = "float" if emu.dtype == np.float32 else "double"
    p, g, v = (rng.normal(size=40).astype(emu.dtype).astype(np.float64) for _ in range(3))
    got = emu("ew_bp_momentum", 1, 32, {"_raw_g": g, "_raw_p": p, "_raw_v": v},
              {"lr": 0.1, "mu": 0.9, "wd": 0.01, "nesterov": nesterov, "_n": 40, "_ncols": 40},
              outputs=("_raw_p", "_raw_v"))
    ref.momentum_update(p, g, v, 0.1, 0.9, bool(nesterov), 0.01)
    np.testing.assert_allclose(got["_raw_p"], p, **_tol(ct))
    np.testing.assert_allclose(got["_raw_v"], v, **_tol(ct))


@pytest.mark.parametrize("step", [1, 7])
def test_emulated_adam(emu, rng, step):
    ct = "float" if emu.dtype == np.float32 else "double"
    p, g, m = (rng.normal(size=40).astype(emu.dtype).astype(np.float64) for _ in range(3))
    v = rng.uniform(size=40).astype(emu.dtype).astype(np.float64)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.01
    c1, c2 = 1 - b1**step, 1 - b2**step
    got = emu("ew_bp_adam", 1, 32, {"_raw_g": g, "_raw_p": p, "_raw_m": m, "_raw_v": v},
              {"lr_c1": lr / c1, "beta1": b1, "beta2": b2, "one_m_beta1": 1 - b1, "one_m_beta2": 1 - b2, "c2": c2,
               "eps": eps, "wd": wd, "_n": 40, "_ncols": 40}, outputs=("_raw_p", "_raw_m", "_raw_v"))
    ref.adam_update(p, g, m, v, lr, b1, b2, eps, step, wd)
    for name, want in (("_raw_p", p), ("_raw_m", m), ("_raw_v", v)):
        np.testing.assert_allclose(got[name], want, **_tol(ct))


@pytest.mark.parametrize("step", [1, 7])
def test_emulated_adam_device_equals_adam(emu, rng, step):
    """bp_adam_device reading (lr / c1, c2) from its corrections array gives the bits of bp_adam given them
    as scalars (guarded and not)."""
    p, g, m = (rng.normal(size=40).astype(emu.dtype) for _ in range(3))
    v = rng.uniform(size=40).astype(emu.dtype)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.01
    corr = np.array([lr / (1 - b1**step), 1 - b2**step]).astype(emu.dtype)
    common = {"beta1": b1, "beta2": b2, "one_m_beta1": 1 - b1, "one_m_beta2": 1 - b2, "eps": eps, "wd": wd,
              "_n": 40, "_ncols": 40}
    arrays = {"_raw_g": g, "_raw_p": p, "_raw_m": m, "_raw_v": v}
    outs = ("_raw_p", "_raw_m", "_raw_v")
    want = emu("ew_bp_adam", 1, 32, arrays, {**common, "lr_c1": float(corr[0]), "c2": float(corr[1])}, outputs=outs)
    got = emu("ew_bp_adam_device", 1, 32, {**arrays, "_raw_corr": corr}, common, outputs=outs)
    guarded = emu("ew_bp_adam_device_guarded", 1, 32, {**arrays, "_raw_corr": corr, "_raw_guard": _guard_bits(1.0)},
                  common, outputs=outs)
    for name in outs:
        np.testing.assert_array_equal(got[name].view(np.uint8), want[name].view(np.uint8), err_msg=name)
        np.testing.assert_array_equal(guarded[name].view(np.uint8), want[name].view(np.uint8), err_msg=name)


def test_emulated_adam_corrections(emu):
    """One thread writes (lr / (1 - b1^t), 1 - b2^t) for t = count + 1, rounded to T, as the host does, and
    leaves count as it was; other threads write nothing."""
    lr, b1, b2 = 3e-3, 0.9, 0.999
    count, out = np.array([4.0]), np.full(2, np.nan)
    got = emu("bp_adam_corrections", 2, 64, {"count": count, "out": out}, {"lr": lr, "beta1": b1, "beta2": b2},
              outputs=("out",))
    want = np.array([lr / (1 - b1**5.0), 1 - b2**5.0]).astype(emu.dtype)
    np.testing.assert_array_equal(got["out"], want)


def test_emulated_count_step(emu):
    """count + 1 unguarded or under a guard whose first entry is 1.0; anything else leaves it."""
    for guarded, ok, want in ((0, 0.0, 5.0), (1, 1.0, 5.0), (1, 0.0, 4.0), (1, np.nan, 4.0), (1, 2.0, 4.0)):
        got = emu("bp_count_step", 2, 32, {"count": np.array([4.0]), "guard": np.array([ok, 1.0, 0.0, 0.0])},
                  {"guarded": guarded}, outputs=("count",))
        assert got["count"].tolist() == [want], (guarded, ok)


def test_emulated_sgd(emu, rng):
    ct = "float" if emu.dtype == np.float32 else "double"
    p, g = (rng.normal(size=40).astype(emu.dtype).astype(np.float64) for _ in range(2))
    for wd in (0.0, 0.01):
        got = emu("ew_bp_sgd", 1, 32, {"_raw_g": g, "_raw_p": p}, {"lr": 0.1, "wd": wd, "_n": 40, "_ncols": 40},
                  outputs=("_raw_p",))
        want = p.copy()
        ref.sgd_update(want, g, 0.1, wd)
        np.testing.assert_allclose(got["_raw_p"], want, **_tol(ct))


def _guard_bits(ok: float) -> np.ndarray:
    """The int64 view of a guard whose guard[0] is ``ok``, as the backend passes it to the updates."""
    return np.array([ok, 1.0, 0.0, 0.0]).view(np.int64)


#: Each update kernel: its scalars and the arrays it updates in place.
_UPDATES = {
    "bp_sgd": ({"lr": 0.1, "wd": 0.01}, ("p",)),
    "bp_momentum": ({"lr": 0.1, "mu": 0.9, "wd": 0.01, "nesterov": 1}, ("p", "v")),
    "bp_adam": ({"lr_c1": 0.05, "beta1": 0.9, "beta2": 0.999, "one_m_beta1": 0.1, "one_m_beta2": 1e-3, "c2": 0.003,
                 "eps": 1e-8, "wd": 0.01}, ("p", "m", "v")),
}


@pytest.mark.parametrize("kernel", sorted(_UPDATES))
def test_emulated_guarded_updates(emu, rng, kernel):
    """guard[0] == 1.0: exactly the unguarded update. Anything else (0, NaN, 2, -1, -0): every array
    left bit for bit as it was."""
    scalars, outs = _UPDATES[kernel]
    n = 70  # more elements than threads: the grid-stride loop
    arrays = {"_raw_g": rng.normal(size=n)}
    for name in outs:
        arrays[f"_raw_{name}"] = rng.uniform(size=n) if name == "v" else rng.normal(size=n)
    scalars = {**scalars, "_n": n, "_ncols": n}
    names = tuple(f"_raw_{o}" for o in outs)
    plain = emu(f"ew_{kernel}", 1, 32, arrays, scalars, outputs=names)
    for ok in (1.0, 0.0, np.nan, 2.0, -1.0, -0.0):
        got = emu(f"ew_{kernel}_guarded", 1, 32, {**arrays, "_raw_guard": _guard_bits(ok)}, scalars, outputs=names)
        for name in names:
            before = arrays[name].astype(emu.dtype)
            want = plain[name] if ok == 1.0 else before
            np.testing.assert_array_equal(got[name].view(np.uint8), want.view(np.uint8), err_msg=f"{name}, ok={ok}")
        if ok == 1.0:
            assert not np.array_equal(got["_raw_p"], arrays["_raw_p"].astype(emu.dtype))


def _probe_args(kernel: str, arrays: dict) -> dict:
    """The emulator's arrays of ``<kernel>_probe`` (``g_in``, ``p_in``, ... for ``_raw_g``, ``_raw_p``)."""
    return {name.replace("_raw_", "") + "_in": a for name, a in arrays.items()}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("kernel", sorted(_UPDATES))
def test_emulated_probes(emu, rng, kernel):
    """Each probe computes its update's results (from the same operation) and writes nothing but the
    guard: a finite update leaves the guard as it was; one element whose update overflows, anywhere in
    the grid-stride loop, fails the step (guard[0] = 0, guard[2] = guard[1]) unless a step failed
    before (guard[2] kept); a guard that says no is not looked at. The reference agrees on each verdict."""
    scalars, outs = _UPDATES[kernel]
    n = 70
    big = float(np.finfo(emu.dtype).max)
    arrays = {"_raw_g": rng.normal(size=n)}
    for name in outs:
        arrays[f"_raw_{name}"] = rng.uniform(size=n) if name == "v" else rng.normal(size=n)
    scalars = {**scalars, "n": n}
    bad = {**arrays, "_raw_g": arrays["_raw_g"].copy()}
    bad["_raw_g"][n - 3] = big  # g^2 overflows, or p - lr g with p near -big
    bad["_raw_p"] = arrays["_raw_p"].copy()
    bad["_raw_p"][n - 3] = -0.95 * big
    for arrs, guard, want in ((arrays, [1.0, 3.0, 0.0, 0.5], [1.0, 3.0, 0.0, 0.5]),
                              (bad, [1.0, 3.0, 0.0, 0.5], [0.0, 3.0, 3.0, 0.5]),
                              (bad, [1.0, 3.0, 2.0, 0.5], [0.0, 3.0, 2.0, 0.5]),
                              (bad, [0.0, 3.0, 2.0, 0.5], [0.0, 3.0, 2.0, 0.5])):
        got = emu(f"{kernel}_probe", 2, 32, {**_probe_args(kernel, arrs), "guard": np.array(guard).view(np.int64)},
                  scalars, outputs=("guard",))
        assert got["guard"].view(np.float64).tolist() == want, (guard, want)
    # the update itself, on the bad element, is indeed not finite (the reference's verdict too)
    ref_guard = np.array([1.0, 3.0, 0.0, 0.5])
    s = {name: bad[f"_raw_{name}"].astype(emu.dtype) for name in ("g", *outs)}
    if kernel == "bp_sgd":
        ref.sgd_update(s["p"], s["g"], scalars["lr"], scalars["wd"], guard=ref_guard, probe=True)
    elif kernel == "bp_momentum":
        ref.momentum_update(s["p"], s["g"], s["v"], scalars["lr"], scalars["mu"], True, scalars["wd"],
                            guard=ref_guard, probe=True)
    else:
        corr = np.array([scalars["lr_c1"], scalars["c2"]], dtype=emu.dtype)
        ref.adam_update(s["p"], s["g"], s["m"], s["v"], 0.0, scalars["beta1"], scalars["beta2"], scalars["eps"], corr,
                        scalars["wd"], guard=ref_guard, probe=True)
    assert ref_guard.tolist() == [0.0, 3.0, 3.0, 0.5]


def test_emulated_adam_device_probe_reads_its_corrections(emu, rng):
    """bp_adam_device_probe takes (lr / c1, c2) from its corrections array: a huge lr / c1 there fails the
    step, a small one does not."""
    n = 40
    arrays = {"g_in": rng.normal(size=n), "p_in": rng.normal(size=n), "m_in": rng.normal(size=n),
              "v_in": rng.uniform(size=n)}
    common = {"beta1": 0.9, "beta2": 0.999, "one_m_beta1": 0.1, "one_m_beta2": 1e-3, "eps": 1e-8, "wd": 0.0, "n": n}
    big = float(np.finfo(emu.dtype).max)
    for lr_c1, want in ((0.01, [1.0, 1.0, 0.0, 0.0]), (big, [0.0, 1.0, 1.0, 0.0])):
        got = emu("bp_adam_device_probe", 1, 32,
                  {**arrays, "corr": np.array([lr_c1, 0.5]), "guard": np.array([1.0, 1.0, 0.0, 0.0]).view(np.int64)},
                  common, outputs=("guard",))
        assert got["guard"].view(np.float64).tolist() == want


def test_emulated_one_hot(emu, rng):
    labels = rng.integers(0, 6, size=23)
    got = emu("ew_bp_one_hot", 2, 32, {"_raw_labels": labels, "_raw_out": np.full(23 * 6, np.nan)},
              {"n_classes": 6, "_n": 23 * 6, "_ncols": 23 * 6}, outputs=("_raw_out",))
    np.testing.assert_array_equal(got["_raw_out"].reshape(23, 6), ref.one_hot(labels, 6, emu.dtype))


def _emulated_guard_step(emu: Emu, guard: np.ndarray, loss: float, grads: np.ndarray, weight: float,
                         grid: int, block: int) -> np.ndarray:
    """bp_guard_scan on ``grid`` blocks, then bp_guard_finish, as guard_step launches them."""
    part = emu("bp_guard_scan", grid, block, {"g": grads, "partial": np.full(grid, np.nan)}, {"n": grads.size},
               outputs=("partial",))["partial"]
    assert set(np.unique(part)) <= set(range(grads.size + 1))  # whole counts
    return emu("bp_guard_finish", 1, S.BLOCK,
               {"guard": guard, "loss": np.array([loss]), "partial": part},
               {"blocks": grid, "weight": weight}, outputs=("guard",))["guard"]


def test_emulated_guard_step(emu, rng):
    """Several blocks of the scan, more elements than threads; the sequences of the contract: ok steps
    add weight * loss, the first failing step is kept and stays (sticky), and a non-finite loss fails."""
    n = 3 * 64 * 3 + 11
    g = rng.normal(size=n)
    bad = g.copy()
    bad[n - 1] = np.nan
    inf = g.copy()
    inf[64] = np.inf
    sequences = [
        [(1.5, g), (2.0, bad), (0.25, g)],
        [(1.0, inf), (1.0, g)],
        [(1.0, g), (np.nan, g), (1.0, g)],
        [(-np.inf, g)],
        [(1.0, g), (3.0, g)],
    ]
    for seq in sequences:
        guard, want = np.zeros(4), np.zeros(4)
        for loss, grads in seq:
            guard = _emulated_guard_step(emu, guard, loss, grads, 0.5, 3, 64)
            ref.guard_step(want, np.asarray(loss, dtype=emu.dtype), grads.astype(emu.dtype), 0.5)
            np.testing.assert_array_equal(guard, want)
    empty = _emulated_guard_step(emu, np.zeros(4), 2.0, np.zeros(0), 1.0, 1, 32)
    np.testing.assert_array_equal(empty, [1, 1, 0, 2])


def test_emulated_sum_of_squares(emu, rng):
    a = rng.normal(size=1000)
    part = emu("bp_sum_squares", 3, 64, {"a": a, "partial": np.full(3, np.nan)}, {"n": a.size},
               outputs=("partial",))["partial"]
    total = emu("bp_add_to_total", 1, S.BLOCK, {"partial": part, "total": np.array([1.25])}, {"blocks": 3},
                outputs=("total",))["total"]
    want = np.array([1.25])
    ref.add_sum_of_squares(want, a.astype(emu.dtype).astype(np.float64))
    np.testing.assert_allclose(total, want, rtol=1e-6 if emu.dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("cols", [3, 45, 70])
@pytest.mark.parametrize("in_place", [False, True])
def test_emulated_softmax_forward(emu, rng, cols, in_place):
    ct = "float" if emu.dtype == np.float32 else "double"
    rows = 11  # two blocks of 8 warps, the second partly idle
    u0 = (rng.normal(size=(rows, cols)) * 3).astype(emu.dtype).astype(np.float64)
    b = rng.normal(size=cols).astype(emu.dtype).astype(np.float64)
    arrays = {"u": u0, "b": b}
    aliases = {"y": "u"} if in_place else None
    if not in_place:
        arrays["y"] = np.full(rows * cols, np.nan)
    grid = (rows + S.ROWS_PER_BLOCK - 1) // S.ROWS_PER_BLOCK
    got = emu("bp_softmax_forward", grid, S.BLOCK, arrays, {"rows": rows, "cols": cols}, aliases,
              outputs=("u",) if in_place else ("u", "y"))
    y_ref = ref.activate(u0 + b, "softmax")
    if in_place:
        np.testing.assert_allclose(got["u"], y_ref.ravel(), **_tol(ct))
    else:
        np.testing.assert_allclose(got["u"], (u0 + b).ravel(), **_tol(ct))
        np.testing.assert_allclose(got["y"], y_ref.ravel(), **_tol(ct))


def _sum_scale(emu: Emu, x: np.ndarray, batch: int) -> float:
    got = emu("bp_sum_scale", 1, S.BLOCK, {"x": x, "out": np.full(1, np.nan)}, {"n": x.size, "batch": batch},
              outputs=("out",))
    return float(got["out"][0])


def _weights(rng, rows: int, weighted: bool, dtype) -> tuple[np.ndarray | None, np.ndarray]:
    """Row weights for the reference (``None`` unweighted) and the kernels' ``w``: NaN when unweighted, where
    the kernels must not read it."""
    if not weighted:
        return None, np.full(1, np.nan)
    w = rng.uniform(0.2, 3.0, size=rows).astype(dtype).astype(np.float64)
    return w, w


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("cols", [2, 40])
def test_emulated_softmax_cross_entropy(emu, rng, cols, weighted):
    ct = "float" if emu.dtype == np.float32 else "double"
    rows = 13
    u = (rng.normal(size=(rows, cols)) * 2).astype(emu.dtype).astype(np.float64)
    y = ref.activate(u, "softmax").astype(emu.dtype).astype(np.float64)
    t = np.eye(cols)[rng.integers(0, cols, rows)]
    weights, w = _weights(rng, rows, weighted, emu.dtype)
    grid = (rows + S.ROWS_PER_BLOCK - 1) // S.ROWS_PER_BLOCK
    got = emu("bp_softmax_xent", grid, S.BLOCK,
              {"py": y, "pu": u, "pt": t, "w": w, "delta": np.full(rows * cols, np.nan),
               "rowloss": np.full(rows, np.nan)},
              {"weighted": int(weighted), "rows": rows, "cols": cols, "batch": rows}, outputs=("delta", "rowloss"))
    value, delta = ref.output_error(y, u, t, "softmax", "cross_entropy", weights=weights)
    np.testing.assert_allclose(got["delta"], delta.ravel(), **_tol(ct))
    np.testing.assert_allclose(_sum_scale(emu, got["rowloss"], rows), float(value), **_tol(ct))


def test_emulated_softmax_cross_entropy_huge_logits(emu):
    u = np.array([[1e4, -1e4], [-1e4, 1e4], [0.0, 1e4]])
    y = ref.activate(u, "softmax")
    t = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    got = emu("bp_softmax_xent", 1, S.BLOCK,
              {"py": y, "pu": u, "pt": t, "w": np.full(1, np.nan), "delta": np.full(6, np.nan),
               "rowloss": np.full(3, np.nan)},
              {"weighted": 0, "rows": 3, "cols": 2, "batch": 3}, outputs=("delta", "rowloss"))
    value, _ = ref.output_error(y, u, t, "softmax", "cross_entropy")
    assert np.isfinite(got["delta"]).all() and np.isfinite(got["rowloss"]).all()
    np.testing.assert_allclose(_sum_scale(emu, got["rowloss"], 3), float(value), rtol=1e-5)


PAIRS = S.loss_pairs()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("output,loss", PAIRS)
def test_emulated_elementwise_loss(emu, rng, output, loss, weighted):
    ct = "float" if emu.dtype == np.float32 else "double"
    rows, cols = 13, 11  # 143 elements over 64 threads: up to three per thread
    a = _alpha(output)
    u = (rng.normal(size=(rows, cols)) * 2).astype(emu.dtype).astype(np.float64)
    y = ref.activate(u, output, a).astype(emu.dtype).astype(np.float64)
    t = rng.uniform(size=(rows, cols)) if loss == "bce" else rng.normal(size=(rows, cols))
    t = t.astype(emu.dtype).astype(np.float64)
    param = 0.5 if loss == "huber" else LOSSES[loss].default_param
    weights, w = _weights(rng, rows, weighted, emu.dtype)
    n = rows * cols
    # two blocks: each thread takes several elements (the grid-stride loop), block sums in two parts
    got = emu(S.loss_kernel_name(output, loss), 2, S.BLOCK // 8,
              {"py": y, "pu": u, "pt": t, "w": w, "delta": np.full(n, np.nan), "partial": np.full(2, np.nan)},
              {"weighted": int(weighted), "n": n, "cols": cols, "batch": rows, "k": param, "alpha": a},
              outputs=("delta", "partial"))
    value, delta = ref.output_error(y, u, t, output, loss, param, a, weights=weights)
    np.testing.assert_allclose(got["delta"], delta.ravel(), **_tol(ct))
    np.testing.assert_allclose(_sum_scale(emu, got["partial"], rows), float(value), **_tol(ct))


def test_emulated_bce_huge_logits(emu):
    u = np.array([[1e4, -1e4], [-1e4, 1e4], [0.0, 1e4]])
    y = ref.activate(u, "sigmoid")
    t = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    got = emu(S.loss_kernel_name("sigmoid", "bce"), 1, S.BLOCK,
              {"py": y, "pu": u, "pt": t, "w": np.full(1, np.nan), "delta": np.full(6, np.nan),
               "partial": np.full(1, np.nan)},
              {"weighted": 0, "n": 6, "cols": 2, "batch": 3, "k": 0.0, "alpha": 0.0}, outputs=("delta", "partial"))
    value, _ = ref.output_error(y, u, t, "sigmoid", "bce")
    assert np.isfinite(got["delta"]).all()
    np.testing.assert_allclose(_sum_scale(emu, got["partial"], 3), float(value), rtol=1e-5)


def test_emulated_sum_scale_many_values(emu):
    """More values than threads, in a fixed order: the loss reduction of a large batch."""
    x = np.arange(1000, dtype=np.float64) / 7
    np.testing.assert_allclose(_sum_scale(emu, x, 10), x.sum() / 10, rtol=1e-6)


def test_launch_configuration_constants():
    assert S.BLOCK % 32 == 0 and S.BLOCK <= 1024
    assert S.ROWS_PER_BLOCK * 32 == S.BLOCK
    assert 1 <= S.MAX_LOSS_BLOCKS and 1 <= S.MAX_GUARD_BLOCKS


def test_guarded_kernels_read_the_guard_bits():
    """Every update has a guarded twin that takes the int64 view of the guard and does nothing unless
    guard[0] has the bits of 1.0; only the float64 bookkeeping kernels may compute in double."""
    specs = S.elementwise_kernels()
    for name in ("bp_sgd", "bp_momentum", "bp_adam"):
        ins, outs, op = specs[f"{name}_guarded"]
        assert ins == specs[name][0] + ", raw int64 guard" and outs == specs[name][1]
        assert op.startswith("if (guard[0] == BP_GUARD_OK_BITS) {") and specs[name][2] in op
    assert int(np.array(1.0).view(np.int64)) == 0x3FF0000000000000
    assert "0x3FF0000000000000LL" in S.MATH_PREAMBLE
    assert S.F64_KERNELS <= set(S.raw_kernel_names())


def test_raw_pointers_are_restrict_but_where_they_may_alias():
    """Every pointer parameter of the raw module is ``__restrict__`` but those given one array in some launch
    and written: bp_softmax_forward's u and y (in place) and bp_count_step's count and guard (unguarded)."""
    plain = {(name, decl.replace("*", " ").split()[-1]) for name, decls in signatures(S.raw_module_body()).items()
             for decl in decls if "*" in decl and "__restrict__" not in decl}
    assert plain == {("bp_softmax_forward", "u"), ("bp_softmax_forward", "y"), ("bp_count_step", "count"),
                     ("bp_count_step", "guard")}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_float_ptx_check_sees_double(tmp_path):
    """The float32 PTX check works: it finds the double arithmetic of the allowed kernels when they are
    not allowed, and none elsewhere."""
    raw = _nvcc_ptx(S.raw_module_source("float"), tmp_path, "raw_float_f64")
    assert _f64_instructions(raw, allowed=frozenset()) and not _f64_instructions(raw)


#: Kernels that check the emulator itself: its barriers, its warps, and its loud failures.
_EMULATOR_PROBES = r"""
extern "C" __global__ void probe_neighbour(T* out, const int sync) {
    __shared__ T s[64];
    s[threadIdx.x] = (T)(threadIdx.x + 1);
    if (sync) __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}
extern "C" __global__ void probe_warps_apart(T* out) {
    T v = (T)threadIdx.x;
    if (threadIdx.x < 32) for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (threadIdx.x >= 32) for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}
extern "C" __global__ void probe_exit_before_sync(T* out, const int quitter) {
    if ((int)threadIdx.x == quitter) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
extern "C" __global__ void probe_exit_before_shuffle(T* out) {
    if (threadIdx.x == 40) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (T)threadIdx.x, 1);
}
"""


@functools.lru_cache(maxsize=None)
def _probe_emulator() -> Emu:
    return Emu("float", build_emulator("float", "", _EMULATOR_PROBES, "bp_probes"), signatures(_EMULATOR_PROBES))


def test_emulator_barriers():
    """All the threads of a block reach ``__syncthreads`` before any passes it; without it a thread reads
    shared memory its neighbour has not written yet (as on a GPU, where that is a race)."""
    emu = _probe_emulator()
    want = (np.arange(64) + 1) % 64 + 1
    got = emu("probe_neighbour", 1, 64, {"out": np.zeros(64)}, {"sync": 1}, outputs=("out",))["out"]
    np.testing.assert_array_equal(got, want)
    got = emu("probe_neighbour", 1, 64, {"out": np.zeros(64)}, {"sync": 0}, outputs=("out",))["out"]
    assert (got != want).any()


def test_emulator_warps_shuffle_on_their_own():
    """A warp's shuffles wait only for its own 32 threads: one warp shuffles before ``__syncthreads``,
    the other after it, in every block."""
    got = _probe_emulator()("probe_warps_apart", 3, 64, {"out": np.zeros(192)}, {}, outputs=("out",))["out"]
    want = np.tile(np.repeat([np.arange(32).sum(), np.arange(32, 64).sum()], 32), 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("quitter", [0, 63])
def test_emulator_deadlock_fails_loudly(quitter):
    """A thread that leaves before a barrier the others wait at (undefined in CUDA) stops the emulator with
    a message instead of hanging it."""
    emu = _probe_emulator()
    with pytest.raises(AssertionError, match="deadlock"):
        emu("probe_exit_before_sync", 1, 64, {"out": np.zeros(64)}, {"quitter": quitter})
    with pytest.raises(AssertionError, match="deadlock"):
        emu("probe_exit_before_shuffle", 1, 64, {"out": np.zeros(64)}, {})
