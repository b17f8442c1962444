"""The fused narrow-network kernels (``backprop.kernels.fused_mlp_sources``), checked without a GPU.

1. ``nvcc`` compiles them for float and double, and the float module with its tensor-core (TF32) twins; the
   float PTX computes nothing in double (their registers, spills and shared memory: test_cuda_resources).
2. The host emulator of test_cupy_sources runs them against the NumPy reference on fresh random inputs:
   every activation, widths 16 to 128, batches that are not a multiple of the tile, several blocks
   walking the tiles, and whole SGD and Adam steps (the backend's update kernels, emulated too). Every check
   runs in float, in double, and in float on the tensor cores (``tf32``: the emulator's ``mma`` follows the
   PTX ISA's fragment layout and rounds the inputs as ``cvt.rna.tf32.f32`` does), the last to TF32's error. The
   forward checks run the tiled CUDA-core forward too (``float-tiled``, ``double-tiled``), which also gives the
   column kernel's ``y``, ``u`` and ``delta`` bit for bit; ptxas reports its resources (``exhaustive``).
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from backprop.kernels import fused_forward_tiled as tiled
from backprop.kernels import fused_mlp_sources as F
from backprop.kernels import numpy_ref as ref
from backprop.kernels.registry import ACTIVATIONS

from .reference_net import Net as ReferenceNet
from .test_cupy_sources import NVCC, Emu, _f64_instructions, _nvcc_ptx, _tol, build_emulator, signatures

CTYPES = ["float", "double"]
#: The emulated variants: each C type on the CUDA cores, and float on the tensor cores.
VARIANTS = [*CTYPES, "tf32"]
#: The tiled CUDA-core forward kernel of each C type (its backward pass is the column kernels').
TILED = [f"{c}-tiled" for c in CTYPES]
#: Error of the TF32 kernels against the float64 reference, relative to the values' scale: inputs of every layer's
#: GEMMs rounded to a 10-bit mantissa (relative 2^-11 each), through up to four layers.
TF32_TOL = {"rtol": 1e-2, "atol": 1e-2}
HIDDEN = [n for n in F.ACT_CODES if n != F.SOFTMAX and ACTIVATIONS[n].hidden]
# --------------------------------------------------------------------------- selection and layout
def test_unserved_reasons():
    assert F.unserved_reason([64] * 7, ["relu"] * 5 + ["identity"], np.float32) == ""
    assert F.unserved_reason([32, 128, 128, 128, 1], ["tanh"] * 3 + ["sigmoid"], np.float64) == ""
    assert F.unserved_reason([4, 16, 3], ["gelu", "softmax"], np.float32) == ""
    assert "width 129" in F.unserved_reason([4, 129, 3], ["relu", "identity"], np.float32)
    assert "width 256" in F.unserved_reason([256, 16, 3], ["relu", "identity"], np.float32)
    assert "float16" in F.unserved_reason([4, 16, 3], ["relu", "identity"], np.float16)
    assert "'softmax' in layer 1" in F.unserved_reason([4, 16, 3], ["softmax", "identity"], np.float32)


def test_kernel_width_and_tiles():
    assert [F.kernel_width(s) for s in ([3, 16, 2], [33, 8], [64] * 7, [32, 128, 1])] == [32, 64, 64, 128]
    assert [F.tile_rows(w, "float") for w in F.WIDTHS] == [128, 64, 32]
    assert [F.tile_rows(w, "double") for w in F.WIDTHS] == [64, 32, 16]
    with pytest.raises(ValueError, match="wider than 128"):
        F.kernel_width([4, 200, 3])


def test_plan_offsets():
    layout, y_off, u_off, ny, nu = F.plan([3, 5, 2], ["tanh", "softmax"], 7, [False, True])
    rows = layout.reshape(2, F.LAYOUT_FIELDS)
    assert rows[0].tolist() == [3, 5, 0, 25, F.ACT_CODES["tanh"], 0, -1]
    assert rows[1].tolist() == [5, 2, 15, 30, F.ACT_CODES["softmax"], 35, 0]
    assert (y_off, u_off, ny, nu) == ([0, 35], [-1, 0], 49, 14)


def test_every_pointer_of_the_fused_kernels_is_restrict():
    """No two arrays of a fused launch overlap (the fake CuPy checks every launch), so every pointer parameter,
    of the entry points and of the passes they call, is ``__restrict__``."""
    for source in (F.module_source("double"), F.module_source("float", tensor_cores=True)):
        params = [p for ps in signatures(source).values() for p in ps]
        params += [" ".join(p.split()) for ps in re.findall(r"void bp_mlp_\w+_at\(([^)]*)\)", source)
                   for p in ps.split(",")]
        pointers = [p for p in params if "*" in p]
        assert len(pointers) > 6 * len(F.KERNEL_NAMES)
        assert [p for p in pointers if "__restrict__" not in p] == []


# --------------------------------------------------------------------------- 1. nvcc and ptxas
@pytest.mark.exhaustive
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiles_for_float_and_double_and_tf32(variant, tmp_path):
    tensor_cores = variant == "tf32"
    ctype = "float" if tensor_cores else variant
    ptx = _nvcc_ptx(F.module_source(ctype, tensor_cores), tmp_path, f"fused_{variant}")
    for name in F.KERNEL_NAMES + (F.TF32_KERNEL_NAMES if tensor_cores else ()):
        assert f".entry {name}(" in ptx
    assert ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" in ptx) == tensor_cores
    if ctype == "float":
        assert not _f64_instructions(ptx, frozenset()), _f64_instructions(ptx, frozenset())[:5]


def _ptxas_resources(log: str) -> dict[str, dict[str, int]]:
    """Each entry point's registers, spill stores and loads, and static shared memory from ``ptxas -v``."""
    out = {}
    for name, body in re.findall(r"Compiling entry function '(\w+)'(.*?)(?=Compiling entry function|\Z)", log, re.S):
        out[name] = {"registers": int(re.search(r"Used (\d+) registers", body).group(1)),
                     "spills": sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", body)),
                     "smem": int(m.group(1)) if (m := re.search(r"(\d+) bytes smem", body)) else 0}
    return out


@pytest.mark.exhaustive
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("ctype", CTYPES)
def test_tiled_forward_resources(ctype, tmp_path):
    """The tiled forward alone (the other entry points left out), for sm_80 and sm_90: its PTX loads shared memory
    16 bytes at a time; ptxas reports no spills, the static shared memory of its layout (and bp_block_sum's 32
    values), and at most 128 registers, so that 4 blocks of 128 threads share a multiprocessor's 65536."""
    fields = F.format_fields()
    source = f"typedef {ctype} T;\n{F.PREAMBLE}\n" + F.KERNELS % {**fields, "entries": tiled.source(fields)}
    ptx = _nvcc_ptx(source, tmp_path, f"tiled_{ctype}")
    assert ("ld.shared.v4.f32" if ctype == "float" else "ld.shared.v2.f64") in ptx
    ptxas = str(Path(NVCC).with_name("ptxas"))
    itemsize = 4 if ctype == "float" else 8
    for arch in ("sm_80", "sm_90"):
        proc = subprocess.run([ptxas, f"-arch={arch}", "-v", "-o", str(tmp_path / f"{arch}.cubin"),
                               str(tmp_path / f"tiled_{ctype}.ptx")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = _ptxas_resources(proc.stderr)
        for w in F.WIDTHS:
            r = got[F.kernel_name("forward", w, variant="tiled")]
            want_smem = F.tiled_geometry(w, ctype)["smem_bytes"] + 32 * itemsize
            assert r["spills"] == 0 and r["smem"] == want_smem and r["registers"] <= 128, (arch, w, r)


# --------------------------------------------------------------------------- 2. the emulator
#: The tensor cores' primitives for the host emulator, as the PTX ISA defines them (see
#: ``fused_mlp_sources.MMA_PRIMITIVES``): each lane leaves its fragments in the warp's slots and, after a warp
#: barrier, computes its own four elements of ``D`` from everyone's (TF32 products are exact in float).
EMULATED_MMA = r"""
static unsigned bp_mma_slots[1024][6];
inline unsigned bp_to_tf32(float v) {  /* to nearest, ties away from zero; inf and NaN kept */
    unsigned u;
    std::memcpy(&u, &v, 4);
    return (u & 0x7f800000u) == 0x7f800000u ? u : (u + 0x1000u) & 0xffffe000u;
}
inline float bp_tf32_value(unsigned u) { u &= 0xffffe000u; float f; std::memcpy(&f, &u, 4); return f; }
inline void bp_mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    const unsigned t = threadIdx.x, w = t / 32, lane = t % 32, g = lane / 4, q = lane % 4;
    for (int i = 0; i < 4; ++i) bp_mma_slots[t][i] = a[i];
    bp_mma_slots[t][4] = b[0];
    bp_mma_slots[t][5] = b[1];
    bp_warp_barriers[w].arrive_and_wait();
    auto A = [&](unsigned m, unsigned k) {  /* a = (A[g][q], A[g+8][q], A[g][q+4], A[g+8][q+4]) */
        return bp_tf32_value(bp_mma_slots[w * 32 + (m % 8) * 4 + k % 4][(m / 8) + 2 * (k / 4)]); };
    auto B = [&](unsigned k, unsigned n) {  /* b = (B[q][g], B[q+4][g]) */
        return bp_tf32_value(bp_mma_slots[w * 32 + n * 4 + k % 4][4 + k / 4]); };
    for (unsigned i = 0; i < 4; ++i) {  /* d = (D[g][2q], D[g][2q+1], D[g+8][2q], D[g+8][2q+1]) */
        const unsigned m = g + 8 * (i / 2), n = 2 * q + i % 2;
        float s = d[i];
        for (unsigned k = 0; k < 8; ++k) s += A(m, k) * B(k, n);
        d[i] = s;
    }
    bp_warp_barriers[w].arrive_and_wait();
}
"""


@functools.lru_cache(maxsize=None)
def _exe(ctype: str) -> str:
    """The emulator of the fused module for ``ctype``; float's has the tensor-core (TF32) kernels too."""
    return build_emulator(ctype, F.PREAMBLE.replace(F.MMA_PRIMITIVES, EMULATED_MMA),
                          F.kernels_body(tensor_cores=ctype == "float"), "bp_fused")


@functools.lru_cache(maxsize=None)
def _sigs(ctype: str) -> dict:
    return signatures(F.kernels_body(tensor_cores=ctype == "float"))


def _variant(variant: str) -> Emu:
    """The emulated fused kernels of one of :data:`VARIANTS` or :data:`TILED`; ``emu.tensor_cores`` picks the TF32
    entry points, ``emu.forward_variant`` the CUDA-core forward kernel."""
    ctype = "float" if variant == "tf32" else variant.split("-")[0]
    e = Emu(ctype, _exe(ctype), _sigs(ctype))
    e.tensor_cores = variant == "tf32"
    e.forward_variant = "tiled" if variant in TILED else "column"
    return e


@pytest.fixture(params=VARIANTS)
def emu(request) -> Emu:
    return _variant(request.param)


def _ctype(emu: Emu) -> str:
    return "float" if emu.dtype == np.float32 else "double"


def _tol_of(emu: Emu) -> dict:
    return TF32_TOL if emu.tensor_cores else _tol(_ctype(emu))


class Net(ReferenceNet):
    """:class:`tests.reference_net.Net` with the GPU kernels' layout of its flat buffers."""

    def plan(self, rows):
        return F.plan(self.sizes, self.acts, rows, self.keep_u)


def _forward(emu, net, x, grid, error=None):
    """The fused forward pass; with ``error = (t, loss, param, weights)`` also the error at the output: returns
    each layer's ``y`` and ``u``, and then ``delta`` and the mean loss."""
    rows, n_out = x.shape[0], net.sizes[-1]
    layout, y_off, u_off, ny, nu = net.plan(rows)
    arrays = {"x": x, "p": net.params, "layout": layout, "alphas": net.alphas, "ys": np.full(ny, np.nan),
              "us": np.full(max(nu, 1), np.nan), "target": np.zeros(1), "w": np.zeros(1), "delta": np.zeros(1),
              "partial": np.zeros(1)}
    scalars = {"layers": len(net.acts), "rows": rows, "weighted": 0, "pair": F.NO_ERROR, "k": 0.0, "batch": rows}
    outputs = ("ys", "us")
    if error is not None:
        t, loss, param, weights = error
        arrays.update(target=t, delta=np.full(rows * n_out, np.nan), partial=np.full(grid, np.nan))
        scalars.update(pair=F.PAIR_CODES[(net.acts[-1], loss)], k=param)
        if weights is not None:
            arrays["w"], scalars["weighted"] = weights, 1
        outputs += ("delta", "partial")
    name = F.kernel_name("forward", F.kernel_width(net.sizes), emu.tensor_cores, emu.forward_variant)
    got = emu(name, grid, F.THREADS, arrays, scalars, outputs=outputs)
    ys = [got["ys"][o:o + rows * n].reshape(rows, n) for o, n in zip(y_off, net.sizes[1:])]
    us = [None if o < 0 else got["us"][o:o + rows * n].reshape(rows, n) for o, n in zip(u_off, net.sizes[1:])]
    if error is None:
        return ys, us
    # each block writes its tiles' loss sum into partial[block]: grid sums (the backend launches a block a tile)
    mean = emu("bp_mlp_mean", 1, 256, {"partial": got["partial"], "out": np.full(1, np.nan)},
               {"blocks": grid, "batch": rows}, outputs=("out",))["out"][0]
    return ys, us, got["delta"].reshape(rows, n_out), mean


def _backward(emu, net, x, ys, us, delta, grid):
    rows = x.shape[0]
    layout, y_off, u_off, ny, nu = net.plan(rows)
    yflat, uflat = np.zeros(ny), np.zeros(max(nu, 1))
    for o, y in zip(y_off, ys):
        yflat[o:o + y.size] = y.ravel()
    for o, u in zip(u_off, us):
        if o >= 0:
            uflat[o:o + u.size] = u.ravel()
    n = net.params.size
    width = F.kernel_width(net.sizes)
    slices = grid * (F.THREADS // width)
    part = emu(F.kernel_name("backward", width, emu.tensor_cores), grid, F.THREADS,
               {"x": x, "p": net.params, "layout": layout, "alphas": net.alphas, "ys": yflat, "us": uflat,
                "delta": delta, "partial": np.full(slices * n, np.nan)},
               {"layers": len(net.acts), "rows": rows, "n_params": n}, outputs=("partial",))["partial"]
    return emu("bp_mlp_reduce", 2, 64, {"partial": part, "grads": np.full(n, np.nan)},
               {"slices": slices, "n": n}, outputs=("grads",))["grads"]


def _data(rng, net, rows):
    return rng.normal(size=(rows, net.sizes[0])).astype(net.dtype).astype(np.float64)


def _check_forward(emu, rng, sizes, acts, rows=45, grid=2):
    net = Net(rng, sizes, acts, emu.dtype)
    x = _data(rng, net, rows)
    ys, us = _forward(emu, net, x, grid)
    want_y, want_u = net.forward(x)
    for i, (y, u, wy, wu) in enumerate(zip(ys, us, want_y, want_u)):
        np.testing.assert_allclose(y, wy, **_tol_of(emu), err_msg=f"y of layer {i + 1}")
        if net.keep_u[i]:
            np.testing.assert_allclose(u, wu, **_tol_of(emu), err_msg=f"u of layer {i + 1}")


def _check_backward(emu, rng, sizes, acts, rows=45, grid=3):
    net = Net(rng, sizes, acts, emu.dtype)
    x = _data(rng, net, rows)
    ys, us = net.forward(x)
    ys = [y.astype(emu.dtype).astype(np.float64) for y in ys]
    us = [u.astype(emu.dtype).astype(np.float64) for u in us]
    delta = rng.normal(size=(rows, sizes[-1])).astype(emu.dtype).astype(np.float64) / rows
    got = _backward(emu, net, x, ys, us, delta, grid)
    want = net.backward(x, ys, us, delta)
    scale = np.max(np.abs(want))
    tol = _tol_of(emu)
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale)


PASSES = {"forward": _check_forward, "backward": _check_backward}


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("act", HIDDEN)
def test_every_hidden_activation(emu, rng, act, pass_):
    PASSES[pass_](emu, rng, [5, 32, 24, 3], [act, act, "identity"])


@pytest.mark.parametrize("act", HIDDEN)
@pytest.mark.parametrize("emu", TILED, indirect=True)
def test_tiled_forward_every_hidden_activation(emu, rng, act):
    _check_forward(emu, rng, [5, 32, 24, 3], [act, act, "identity"])


@pytest.mark.parametrize("pass_,acts", [("forward", ["tanh", "relu", "sigmoid"]),
                                        ("backward", ["silu", "elu", "softmax"])])
@pytest.mark.parametrize("width", [16, 32, 64, 128])
def test_widths(emu, rng, width, pass_, acts):
    PASSES[pass_](emu, rng, [width, width, width, 4], acts, rows=37)


@pytest.mark.parametrize("width", [16, 32, 64, 128])
@pytest.mark.parametrize("emu", TILED, indirect=True)
def test_tiled_forward_widths(emu, rng, width):
    _check_forward(emu, rng, [width, width, width, 4], ["tanh", "relu", "sigmoid"], rows=37)


@pytest.mark.parametrize("output", ["identity", "sigmoid", "softmax", "tanh", "exp"])
@pytest.mark.parametrize("emu", VARIANTS + TILED, indirect=True)
def test_forward_outputs(emu, rng, output):
    _check_forward(emu, rng, [6, 16, 10], ["gelu", output], rows=21, grid=1)


#: Every pair without row weights, and one pair of each kind of loss body with them.
ERROR_CASES = [(o, loss, False) for o, loss in sorted(F.PAIR_CODES)] + [
    ("identity", "mse", True), ("tanh", "huber", True), ("sigmoid", "bce", True), ("softmax", "cross_entropy", True),
    ("exp", "poisson", True)]


@pytest.mark.parametrize("output,loss,weighted", ERROR_CASES)
@pytest.mark.parametrize("emu", VARIANTS + TILED, indirect=True)
def test_forward_with_the_error_at_the_output(emu, rng, output, loss, weighted):
    """Every (output, loss) pair, with and without row weights: ``delta^L`` and the mean loss of the reference's
    ``output_error`` on the reference's forward pass (several tiles, blocks taking more than one). On the tensor
    cores, on the kernel's own forward pass (checked by the other tests): TF32's error could flip the sign MAE's
    delta takes."""
    from .conftest import targets_for

    n_out = 1 if weighted and loss == "bce" else 4
    net = Net(rng, [5, 16, n_out], ["tanh", output], emu.dtype)
    rows = 150
    x = _data(rng, net, rows)
    t = targets_for(rng, loss, rows, n_out).astype(emu.dtype).astype(np.float64)
    weights = rng.uniform(0.2, 2.0, rows).astype(emu.dtype).astype(np.float64) if weighted else None
    param = 0.7 if loss == "huber" else 0.0
    got_ys, got_us, delta, mean = _forward(emu, net, x, 2, (t, loss, param, weights))
    ys, us = (got_ys, got_us) if emu.tensor_cores else net.forward(x)
    y_out, u_out = ys[-1].astype(np.float64), us[-1].astype(np.float64)
    want_mean, want_delta = ref.output_error(y_out, u_out, t, output, loss, param, net.alphas[-1], weights=weights)
    tol = _tol(_ctype(emu))
    np.testing.assert_allclose(delta, want_delta, rtol=tol["rtol"], atol=tol["atol"] / rows)
    np.testing.assert_allclose(mean, float(want_mean), **tol)


@pytest.mark.parametrize("width", [16, 64])
def test_several_tiles_per_block(emu, rng, width):
    """300 rows: several tiles (of 128 or 64 rows at kernel width 32, 64 or 32 at width 64), a block taking two
    of them and the last one short."""
    _check_forward(emu, rng, [width, width, 3], ["tanh", "softmax"], rows=300, grid=2)
    _check_backward(emu, rng, [width, width, 3], ["tanh", "softmax"], rows=300, grid=2)


def test_one_row_and_more_blocks_than_tiles(emu, rng):
    _check_forward(emu, rng, [3, 16, 2], ["relu", "identity"], rows=1, grid=3)
    _check_backward(emu, rng, [3, 16, 2], ["relu", "identity"], rows=1, grid=3)


#: Networks of the tiled forward's bit-for-bit check: (sizes, activations, rows, grid, (output, loss) or None,
#: weighted). Many tiles a block and a short last one, one row with more blocks than tiles, every kernel width, an
#: input narrower than a pack of 16 bytes, layers narrower than the width, softmax.
TILED_CASES = [([16, 64, 3], ["tanh", "softmax"], 300, 2, ("softmax", "cross_entropy"), True),
               ([3, 16, 2], ["relu", "identity"], 1, 3, ("identity", "mse"), False),
               ([7, 33, 17, 5], ["elu", "gelu", "sigmoid"], 150, 2, ("sigmoid", "bce"), True),
               ([128, 96, 128, 4], ["silu", "leaky_relu", "identity"], 70, 2, ("identity", "huber"), False),
               ([32, 32, 32], ["tanh", "exp"], 260, 1, None, False)]


@pytest.mark.parametrize("ctype", CTYPES)
@pytest.mark.parametrize("sizes,acts,rows,grid,pair,weighted", TILED_CASES)
def test_tiled_forward_is_the_column_forward_bit_for_bit(rng, ctype, sizes, acts, rows, grid, pair, weighted):
    """The tiled forward sums each output in the column kernel's order: the same ``y``, ``u`` and ``delta`` bits;
    the mean loss adds the same terms in another order (equal to rounding)."""
    from .conftest import targets_for

    column, tiled = _variant(ctype), _variant(f"{ctype}-tiled")
    net = Net(rng, sizes, acts, column.dtype)
    x = _data(rng, net, rows)
    error = None
    if pair is not None:
        t = targets_for(rng, pair[1], rows, sizes[-1]).astype(column.dtype).astype(np.float64)
        w = rng.uniform(0.2, 2.0, rows).astype(column.dtype).astype(np.float64) if weighted else None
        error = (t, pair[1], 0.7 if pair[1] == "huber" else 0.0, w)
    want, got = (_forward(e, net, x, grid, error) for e in (column, tiled))
    for i in range(len(acts)):
        assert np.array_equal(got[0][i], want[0][i]), f"y of layer {i + 1}"
        assert got[1][i] is None or np.array_equal(got[1][i], want[1][i]), f"u of layer {i + 1}"
    if error is not None:
        assert np.array_equal(got[2], want[2])
        np.testing.assert_allclose(got[3], want[3], rtol=_tol(ctype)["rtol"])


@pytest.mark.parametrize("pass_", PASSES)
def test_tensor_cores_compute_in_tf32(rng, pass_):
    """The TF32 kernels are not the float kernels under another name: on the same inputs they differ from them by
    TF32's rounding (about 2^-11 of the values' scale), far more than float's, and stay within TF32_TOL."""
    plain, tc = _variant("float"), _variant("tf32")
    net = Net(rng, [24, 64, 64, 8], ["tanh", "relu", "identity"], np.float32)
    x = _data(rng, net, 40)
    if pass_ == "forward":
        a, b = (_forward(e, net, x, 1)[0][-1] for e in (plain, tc))
    else:
        ys, us = net.forward(x)
        delta = rng.normal(size=(40, 8)) / 40
        a, b = (_backward(e, net, x, ys, us, delta, 1) for e in (plain, tc))
    scale = np.max(np.abs(a))
    assert 1e-5 * scale < np.max(np.abs(a - b)) < TF32_TOL["atol"] * scale


def test_gradients_do_not_depend_on_the_blocks_beyond_rounding(emu, rng):
    """Each grid gives the same gradients to rounding (each is a fixed order of the same sums), and a grid
    gives the same bits every time."""
    net = Net(rng, [8, 32, 32, 5], ["tanh", "relu", "identity"], emu.dtype)
    x = _data(rng, net, 70)
    ys, us = net.forward(x)
    delta = rng.normal(size=(70, 5)) / 70
    one, three, again = (_backward(emu, net, x, ys, us, delta, g) for g in (1, 3, 3))
    assert np.array_equal(three, again)
    np.testing.assert_allclose(one, three, **_tol_of(emu))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_whole_step(emu, rng, optimizer):
    """Forward, the output error (the reference's), backward and the reduction fused; then the backend's
    update kernel, emulated: the parameters of the reference's step."""
    from .test_cupy_sources import Emu as BackendEmu

    net = Net(rng, [6, 64, 64, 4], ["relu", "tanh", "softmax"], emu.dtype)
    rows = 50
    x = _data(rng, net, rows)
    t = np.eye(4)[rng.integers(0, 4, rows)]
    ys, us = _forward(emu, net, x, 2)
    _, delta = ref.output_error(ys[-1], us[-1], t, "softmax", "cross_entropy")
    grads = _backward(emu, net, x, ys, us, delta.astype(emu.dtype).astype(np.float64), 2)
    p = net.params
    want_ys, want_us = net.forward(x)
    _, want_delta = ref.output_error(want_ys[-1], want_us[-1], t, "softmax", "cross_entropy")
    want_g = net.backward(x, want_ys, want_us, want_delta)
    n = p.size
    updates = BackendEmu(_ctype(emu))
    if optimizer == "sgd":
        got = updates("ew_bp_sgd", 4, 256, {"_raw_g": grads, "_raw_p": p}, {"lr": 0.1, "wd": 0.0, "_n": n, "_ncols": n},
                      outputs=("_raw_p",))["_raw_p"]
        want = p.copy()
        ref.sgd_update(want, want_g, 0.1, 0.0)
    else:
        m, v = np.zeros(n), np.zeros(n)
        lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
        got = updates("ew_bp_adam", 4, 256, {"_raw_g": grads, "_raw_p": p, "_raw_m": m, "_raw_v": v},
                      {"lr_c1": lr / (1 - b1), "beta1": b1, "beta2": b2, "one_m_beta1": 1 - b1, "one_m_beta2": 1 - b2,
                       "c2": 1 - b2, "eps": eps, "wd": 0.0, "_n": n, "_ncols": n}, outputs=("_raw_p",))["_raw_p"]
        want = p.copy()
        ref.adam_update(want, want_g, m.copy(), v.copy(), lr, b1, b2, eps, 1, 0.0)
    tol = _tol_of(emu)
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=10 * tol["atol"])


def test_traffic_bytes_counts_the_activations():
    """[3, 4, 2] with u kept only at the output, 5 rows of float32: inference reads x and writes both layers' y and
    the output's u; training also reads t and writes delta; backward reads delta, x and the hidden y."""
    got = F.traffic_bytes([3, 4, 2], [False, True], 5, 4)
    assert got == {"inference": 5 * (3 + 4 + 2 + 2) * 4, "forward": 5 * (3 + 4 + 2 + 2 + 2 * 2) * 4,
                   "backward": 5 * (2 + 3 + 4) * 4}
    assert F.traffic_bytes([3, 4, 2], [True, True], 5, 8)["backward"] == 5 * (2 + 3 + 4 + 4) * 8  # a kept hidden u
