"""Bank conflicts of the fused kernels' shared-memory accesses, in a model of the banks (nothing here runs the
kernels): 32 banks of 4-byte words; a warp's access takes as many wavefronts as the most distinct words any one
bank holds among those its lanes touch (lanes reading the same word share it). An access is conflict-free when it
takes no more wavefronts than its distinct words need, ``ceil(words / 32)``. Each pattern below is the index
expression of the code it names (``kernels/fused_mlp_sources.py``, ``kernels/fused_forward_tiled.py``), at the
pitches those modules generate the source with.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import pytest

from backprop.kernels import fused_forward_tiled as tiled
from backprop.kernels import fused_mlp_sources as F

ITEMSIZE = {"float": 4, "double": 8}


def wavefronts(accesses: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """``(wavefronts, the fewest possible)`` of one warp's access, given each lane's ``(byte address, bytes)``."""
    banks: dict[int, set[int]] = defaultdict(set)
    for address, size in accesses:
        for word in range(address // 4, (address + size) // 4):
            banks[word % 32].add(word)
    words = sum(len(w) for w in banks.values())
    return max(len(w) for w in banks.values()), math.ceil(words / 32)


def ways(lane_elements: Callable[[int], Iterable[int]], itemsize: int = 4, elements: int = 1) -> float:
    """The conflict degree (wavefronts over the fewest possible: 1 when conflict-free) of a warp whose lane
    ``lane`` accesses ``elements`` consecutive elements of ``itemsize`` bytes at each index of
    ``lane_elements(lane)``."""
    got, best = wavefronts((i * itemsize, elements * itemsize) for lane in range(32) for i in lane_elements(lane))
    return got / best


# --------------------------------------------------------------------------- tensor cores (bp_tc_tiles)
def _gq(lane: int) -> tuple[int, int]:
    return lane // 4, lane % 4


def tc_rows(pitch: int) -> float:
    """A fragment read by rows: ``load_a(m0 + g, k0 + q)`` of ``BP_AT(buf, m, k)`` (the forward's ``W x``, the
    backward's ``W^T delta``): element ``(m0 + g) * pitch + k0 + q``; the worst of the four of a k-step."""
    return max(ways(lambda lane, dm=dm, dk=dk: [(16 + _gq(lane)[0] + dm) * pitch + 8 + _gq(lane)[1] + dk])
               for dm in (0, 8) for dk in (0, 4))


def tc_columns(pitch: int) -> float:
    """A fragment read by columns: the backward's ``dE/dW`` reads ``BP_AT(cur, r0 + k, m)`` (A) and
    ``BP_AT(cur ^ 1, r0 + k, n)`` (B), ``k = k0 + q``, ``m`` or ``n = .. + g``: element ``(k0 + q) * pitch + g``."""
    return max(ways(lambda lane, dk=dk, dm=dm: [(8 + _gq(lane)[1] + dk) * pitch + 16 + _gq(lane)[0] + dm])
               for dm in (0, 8) for dk in (0, 4))


def store_first(g: int, pitch: int) -> int:
    """The column (0 or 1 of its pair) lane ``g`` of a fragment of D stores first: ``bp_tc_tiles``' ``s``."""
    return (g >> (0 if pitch % 8 == 4 else 2)) & 1


#: ``s`` as bp_tc_tiles computes it, which :func:`store_first` models.
STORE_ORDER_SOURCE = "s = (g >> (PITCH % 8 == 4 ? 0 : 2)) & 1"


def tc_stores(pitch: int, first: Callable[[int, int], int] = store_first) -> float:
    """Stores of a fragment of D into ``BP_AT(buf, m, n)``: lane ``(g, q)`` stores ``(m0 + g, n + s)`` and then
    ``(m0 + g, n + 1 - s)``, ``n = nb * 8 + 2 q``; the worst of the two store instructions."""
    def lane_at(second: int) -> Callable[[int], list[int]]:
        def at(lane: int) -> list[int]:
            g, q = _gq(lane)
            s = first(g, pitch)
            return [(16 + g) * pitch + 8 + 2 * q + (1 - s if second else s)]
        return at
    return max(ways(lane_at(0)), ways(lane_at(1)))


def softmax_rows(pitch: int) -> float:
    """The softmax of the column and TF32 forwards: thread ``t`` reads ``BP_AT(nxt, t, j)``, element
    ``t * pitch + j``."""
    return ways(lambda lane: [lane * pitch + 3])


def tc_pitch(width: int, pass_: str) -> int:
    return width + F.TC_PAD[pass_]


def test_the_model_reproduces_the_conflicts_of_a_pitch_of_width_plus_8():
    """At ``width + 8`` with each lane storing its even column first (the layout before ``TC_PAD``): 2-way
    conflicts for A read by rows and for the stores of D, 8-way for the softmax, none for fragments read by
    columns."""
    for width in F.WIDTHS:
        pitch, even_first = width + 8, lambda g, p: 0
        assert (tc_rows(pitch), tc_stores(pitch, even_first), softmax_rows(pitch), tc_columns(pitch)) == (2, 2, 8, 1)


def test_bp_tc_tiles_stores_in_the_modelled_order():
    assert STORE_ORDER_SOURCE in F.kernels_body(tensor_cores=True)


@pytest.mark.parametrize("width", F.WIDTHS)
def test_tensor_core_fragments_are_conflict_free(width):
    """The forward pass reads A by rows (``W x``): conflict-free at its pitch; the backward reads its ``dE/dW``
    fragments by columns (A and B: three loads in four of the pass's) conflict-free at its own; the stores of D
    are conflict-free at both. What is left: the backward's ``W^T delta`` reads A by rows 2-way, and the TF32
    softmax (the output layer only) reads 4-way (8-way before)."""
    forward, backward = tc_pitch(width, "forward"), tc_pitch(width, "backward")
    assert tc_rows(forward) == 1 and tc_stores(forward) == 1
    assert tc_columns(backward) == 1 and tc_stores(backward) == 1
    assert tc_rows(backward) == 2 and softmax_rows(forward) == 4


# --------------------------------------------------------------------------- the tiled forward
def _warps(width: int) -> Iterable[list[tuple[int, int]]]:
    """The (row group, column group) of each lane of each warp of a block."""
    for warp in range(F.THREADS // 32):
        yield [tiled.thread_tile(warp * 32 + lane, width) for lane in range(32)]


def _tiled_ways(width: int, ctype: str, element: Callable[[int, int, int], int], packs: int) -> float:
    """The worst conflict degree over the warps of a 16-byte access, ``packs`` a thread, at
    ``element(rg, cg, h)``."""
    size = ITEMSIZE[ctype]
    g = F.tiled_geometry(width, ctype)
    return max(ways(lambda lane, w=w, h=h: [element(*w[lane], h)], size, g["vector"])
               for w in _warps(width) for h in range(packs))


@pytest.mark.parametrize("ctype", ["float", "double"])
@pytest.mark.parametrize("width", F.WIDTHS)
def test_tiled_forward_is_conflict_free(width, ctype):
    """Per k, its loads of ``x`` (pack ``h`` at ``xs[k * XP + r0 + h * VEC]``) and of ``W`` (at ``ws[kk * WP + cg *
    VEC + h * NC * VEC]``);
    its stores of a layer's output (``xs[col * XP + r0 + ...]``, ``col = cg + NC * j``); its softmax (``xs[j * XP +
    t]``): every one conflict-free."""
    g = F.tiled_geometry(width, ctype)
    xp, wp, rm, vec, nc = g["x_pitch"], g["w_pitch"], g["rows_per_thread"], g["vector"], g["column_groups"]
    k, j = 5, 2
    assert _tiled_ways(width, ctype, lambda rg, cg, h: k * xp + rg * rm + h * vec, rm // vec) == 1
    assert _tiled_ways(width, ctype, lambda rg, cg, h: k * wp + cg * vec + h * nc * vec, tiled.COLUMNS // vec) == 1
    assert _tiled_ways(width, ctype, lambda rg, cg, h: (cg + nc * j) * xp + rg * rm + h * vec, rm // vec) == 1
    assert ways(lambda lane: [j * xp + lane], ITEMSIZE[ctype]) == 1


def test_tiled_layout_spreads_a_warp_over_4_row_groups_and_8_column_groups():
    for width in F.WIDTHS:
        for warp in _warps(width):
            assert len({rg for rg, _ in warp}) == tiled.WARP_ROW_GROUPS
            assert len({cg for _, cg in warp}) == tiled.WARP_COLUMN_GROUPS
        every = {tiled.thread_tile(t, width) for t in range(F.THREADS)}
        g = F.tiled_geometry(width, "float")
        assert every == {(r, c) for r in range(g["row_groups"]) for c in range(g["column_groups"])}
