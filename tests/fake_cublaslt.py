"""A CPU model of ``nvmath.bindings.cublasLt`` for the fake CuPy of test_cupy_backend.

It works as cuBLASLt's documentation says, on the fake device memory:

* descriptors copy an attribute's value when it is set, from host memory of the attribute's type
  (the sizes must match);
* the heuristic checks the layouts against the data type, the compute type against the scale type,
  and the epilogue's limits as nvmath-python checks them: the ReLU bit mask's leading dimension a
  multiple of 128 bits, the GELU aux's a multiple of 8, ``k > 1`` for DRELU, DGELU and BGRADB (BGRADB
  takes ``k = 1`` from cuBLASLt 12.3.4). It refuses what ``refused`` lists (as
  CUBLAS_STATUS_NOT_SUPPORTED), and it records the alignments the algorithm may assume: those the
  preference promised for A, B, C, D, and those of the bias and aux pointers on the descriptor then;
* ``matmul`` reads alpha, beta, and the bias and aux pointers when the call is issued. It checks each
  pointer against the alignment its algorithm assumed (a less aligned bias or aux is refused), the
  workspace, and that the stream is CuPy's current one. It runs the call on that stream, or records it
  while the stream captures.

Epilogues, in the column-major ``D (m x n) = alpha op(A) op(B)``:

* bias: ``+ bias[i]``, a vector of ``m``;
* ReLU: ``x > 0 ? x : 0``, so NaN becomes 0 as cuBLASLt does;
* GELU: the tanh form;
* the AUX forms write the pre-activation (GELU) or the bits ``x > 0`` (ReLU), column-major with the aux ``ld``;
* DRELU: ``D`` where the mask bit is set, else 0;
* DGELU: ``D`` times the tanh form's slope at the aux;
* BGRADB: the sums over ``k`` of ``op(B)``, ``n`` of them, into the bias pointer.
"""

from __future__ import annotations

import ctypes
import enum
import types
from typing import Any

import numpy as np

from tests import test_graph as colmajor_ref


class Epilogue(enum.IntEnum):  # cublasLtEpilogue_t
    DEFAULT = 1
    RELU = 2
    RELU_AUX = 130
    BIAS = 4
    RELU_BIAS = 6
    RELU_AUX_BIAS = 134
    DRELU = 136
    DRELU_BGRAD = 152
    GELU = 32
    GELU_AUX = 160
    GELU_BIAS = 36
    GELU_AUX_BIAS = 164
    DGELU = 192
    DGELU_BGRAD = 208
    BGRADA = 256
    BGRADB = 512


class MatmulDescAttribute(enum.IntEnum):
    COMPUTE_TYPE = 0
    SCALE_TYPE = 1
    TRANSA = 3
    TRANSB = 4
    EPILOGUE = 7
    BIAS_POINTER = 8
    EPILOGUE_AUX_POINTER = 11
    EPILOGUE_AUX_LD = 12


class MatmulPreferenceAttribute(enum.IntEnum):
    MAX_WORKSPACE_BYTES = 1
    MIN_ALIGNMENT_A_BYTES = 5
    MIN_ALIGNMENT_B_BYTES = 6
    MIN_ALIGNMENT_C_BYTES = 7
    MIN_ALIGNMENT_D_BYTES = 8


_DESC_TYPES = {
    MatmulDescAttribute.COMPUTE_TYPE: np.int32, MatmulDescAttribute.SCALE_TYPE: np.int32,
    MatmulDescAttribute.TRANSA: np.int32, MatmulDescAttribute.TRANSB: np.int32,
    MatmulDescAttribute.EPILOGUE: np.uint32, MatmulDescAttribute.BIAS_POINTER: np.int64,
    MatmulDescAttribute.EPILOGUE_AUX_POINTER: np.int64, MatmulDescAttribute.EPILOGUE_AUX_LD: np.int64,
}
_PREF_TYPES = {MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES: np.uint64,
               **{a: np.uint32 for a in MatmulPreferenceAttribute if a.name.startswith("MIN_ALIGNMENT")}}
HEURISTIC_RESULT = np.dtype([("algo", [("data_", "<u8", (8,))]), ("workspace_size", "<u8"), ("state", "<i4"),
                             ("waves_count", "<f4"), ("reserved", "<i4", (4,))])
_DATA = {0: np.dtype(np.float32), 1: np.dtype(np.float64)}  # cudaDataType_t
_COMPUTE = {68: 0, 77: 0, 70: 1}  # cublasComputeType_t -> the scale type it goes with
_SQRT_2_OVER_PI, _CUBIC = np.sqrt(2 / np.pi), 0.044715


class cuBLASLtError(Exception):
    pass


def _read(ptr: int, size: int, dtype: Any) -> int:
    dt = np.dtype(dtype)
    assert size == dt.itemsize, f"attribute of {dt} set with {size} bytes"
    return int(np.frombuffer(ctypes.string_at(ptr, size), dtype=dt)[0])


def _promise(ptr: int) -> int:
    """The alignment an algorithm chosen for pointer ``ptr`` may assume: its own, up to 256 (NULL: 256)."""
    return min(256, ptr & -ptr) if ptr else 256


def _gelu_t(x: np.ndarray) -> np.ndarray:
    return np.tanh(_SQRT_2_OVER_PI * (x + _CUBIC * x * x * x))


def make(env: Any, refused: set, calls: list) -> types.ModuleType:
    """The fake module on the fake device of ``env`` (``flat``, ``current``, ``run``, ``host_value``,
    ``stream``). ``refused``: ``(epilogue name, dtype)`` pairs the heuristic refuses; ``calls`` gets
    ``(epilogue name, stream pointer, capturing)`` for each matmul issued."""
    lib = types.ModuleType("nvmath.bindings.cublasLt")
    handles: set = set()
    descs: dict = {}
    layouts: dict = {}
    prefs: dict = {}
    counter = [0x9000]

    def new_id() -> int:
        counter[0] += 16
        return counter[0]

    def create() -> int:
        h = new_id()
        handles.add(h)
        return h

    def matmul_desc_create(compute: int, scale: int) -> int:
        if compute not in _COMPUTE or _COMPUTE[compute] != scale:
            raise cuBLASLtError("CUBLAS_STATUS_INVALID_VALUE: compute and scale types do not go together")
        d = new_id()
        descs[d] = {MatmulDescAttribute.COMPUTE_TYPE: compute, MatmulDescAttribute.SCALE_TYPE: scale,
                    MatmulDescAttribute.TRANSA: 0, MatmulDescAttribute.TRANSB: 0,
                    MatmulDescAttribute.EPILOGUE: int(Epilogue.DEFAULT), MatmulDescAttribute.BIAS_POINTER: 0,
                    MatmulDescAttribute.EPILOGUE_AUX_POINTER: 0, MatmulDescAttribute.EPILOGUE_AUX_LD: 0}
        return d

    def matmul_desc_set_attribute(desc: int, attr: int, buf: int, size: int) -> None:
        attr = MatmulDescAttribute(attr)
        descs[desc][attr] = _read(buf, size, _DESC_TYPES[attr])

    def matrix_layout_create(dtype: int, rows: int, cols: int, ld: int) -> int:
        if dtype not in _DATA or rows < 0 or cols < 0 or ld < max(1, rows):
            raise cuBLASLtError(f"CUBLAS_STATUS_INVALID_VALUE: layout {rows}x{cols} ld {ld}")
        lay = new_id()
        layouts[lay] = (_DATA[dtype], int(rows), int(cols), int(ld))
        return lay

    def matmul_preference_create() -> int:
        p = new_id()
        prefs[p] = {a: 0 for a in MatmulPreferenceAttribute}
        prefs[p][MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES] = 0
        for a in MatmulPreferenceAttribute:
            if a.name.startswith("MIN_ALIGNMENT"):
                prefs[p][a] = 256  # cuBLASLt's default promise
        return p

    def matmul_preference_set_attribute(pref: int, attr: int, buf: int, size: int) -> None:
        attr = MatmulPreferenceAttribute(attr)
        prefs[pref][attr] = _read(buf, size, _PREF_TYPES[attr])

    def _shape(desc: int, a: int, b: int, d: int) -> tuple:
        D = descs[desc]
        ta, tb = D[MatmulDescAttribute.TRANSA], D[MatmulDescAttribute.TRANSB]
        (dta, ra, ca, _), (dtb, rb, cb, _), (dtd, m, n, _) = layouts[a], layouts[b], layouts[d]
        k = ra if ta else ca
        # op(A) is m x k, op(B) is k x n
        if (ca if ta else ra) != m or (rb if tb else cb) != n or (cb if tb else rb) != k:
            raise cuBLASLtError("CUBLAS_STATUS_INVALID_VALUE: the layouts do not multiply")
        if not dta == dtb == dtd == _DATA[D[MatmulDescAttribute.SCALE_TYPE]]:
            raise cuBLASLtError("CUBLAS_STATUS_NOT_SUPPORTED: mixed data types")
        return m, n, k, dtd

    def matmul_algo_get_heuristic(handle, desc, a, b, c, d, pref, requested, results, count) -> None:
        assert handle in handles and requested >= 1 and c == d
        m, n, k, dt = _shape(desc, a, b, d)
        D = descs[desc]
        ep = Epilogue(D[MatmulDescAttribute.EPILOGUE])
        ld = D[MatmulDescAttribute.EPILOGUE_AUX_LD]
        if (ep.name, dt) in refused:
            raise cuBLASLtError(f"CUBLAS_STATUS_NOT_SUPPORTED: {ep.name} in {dt}")
        if ep in (Epilogue.RELU_AUX_BIAS, Epilogue.DRELU) and (ld % 128 or ld < m):
            raise cuBLASLtError(f"CUBLAS_STATUS_INVALID_VALUE: ReLU mask ld {ld}")
        if ep in (Epilogue.GELU_AUX_BIAS, Epilogue.DGELU) and (ld % 8 or ld < m):
            raise cuBLASLtError(f"CUBLAS_STATUS_INVALID_VALUE: GELU aux ld {ld}")
        if ep in (Epilogue.DRELU, Epilogue.DGELU, Epilogue.BGRADB) and k < 2:
            raise cuBLASLtError(f"CUBLAS_STATUS_NOT_SUPPORTED: {ep.name} with k = {k}")
        P = prefs[pref]
        res = np.zeros(1, HEURISTIC_RESULT)
        res["algo"]["data_"][0, 0] = desc  # the descriptor it was found for
        res["algo"]["data_"][0, 1:5] = [P[a] for a in MatmulPreferenceAttribute if a.name.startswith("MIN_ALIGN")]
        # the bias and aux pointers on the descriptor now (NULL: any) fix the alignment the algorithm assumes
        res["algo"]["data_"][0, 5:7] = [_promise(D[MatmulDescAttribute.BIAS_POINTER]),
                                        _promise(D[MatmulDescAttribute.EPILOGUE_AUX_POINTER])]
        ctypes.memmove(results, res.ctypes.data, HEURISTIC_RESULT.itemsize)
        ctypes.c_int32.from_address(count).value = 1

    def matmul(handle, desc, alpha, A, adesc, B, bdesc, beta, C, cdesc, Dp, ddesc, algo, workspace, ws_size,
               stream) -> None:
        assert handle in handles and C == Dp and cdesc == ddesc
        m, n, k, dt = _shape(desc, adesc, bdesc, ddesc)
        found = np.frombuffer(ctypes.string_at(algo, HEURISTIC_RESULT.itemsize), HEURISTIC_RESULT)[0]
        assert int(found["algo"]["data_"][0]) == desc, "an algorithm found for another descriptor"
        for ptr, promised in zip((A, B, C, Dp), found["algo"]["data_"][1:5]):
            assert ptr % int(promised) == 0, f"pointer {ptr:#x} less aligned than the {int(promised)} promised"
        D = dict(descs[desc])  # what the call reads when it is issued
        for attr, promised in zip((MatmulDescAttribute.BIAS_POINTER, MatmulDescAttribute.EPILOGUE_AUX_POINTER),
                                  found["algo"]["data_"][5:7]):
            if D[attr] % int(promised):
                raise cuBLASLtError(f"CUBLAS_STATUS_INVALID_VALUE: {attr.name} {D[attr]:#x} less aligned than the "
                                    f"{int(promised)} bytes its algorithm was chosen for")
        ep = Epilogue(D[MatmulDescAttribute.EPILOGUE])
        cur = env.current()
        assert stream == cur.ptr, f"matmul on stream {stream:#x}, CuPy's current is {cur.ptr:#x}"
        assert workspace and ws_size > 0, "no workspace: cuBLASLt would allocate"
        env.flat(workspace, np.uint8, ws_size)
        al, be = env.host_value(alpha, dt), env.host_value(beta, dt)
        assert be == 0.0
        _, ra, ca, lda = layouts[adesc]
        _, rb, cb, ldb = layouts[bdesc]
        Am = env.flat(A, dt, lda * (ca - 1) + ra)
        Bm = env.flat(B, dt, ldb * (cb - 1) + rb)
        ldd = layouts[ddesc][3]
        Dm = env.flat(Dp, dt, ldd * (n - 1) + m)
        bias = aux = None
        if ep in (Epilogue.BIAS, Epilogue.RELU_BIAS, Epilogue.RELU_AUX_BIAS, Epilogue.GELU_BIAS,
                  Epilogue.GELU_AUX_BIAS, Epilogue.BGRADB):
            ptr = D[MatmulDescAttribute.BIAS_POINTER]
            assert ptr, "no bias pointer"
            bias = env.flat(ptr, dt, n if ep == Epilogue.BGRADB else m)
        ld = D[MatmulDescAttribute.EPILOGUE_AUX_LD]
        if ep in (Epilogue.RELU_AUX_BIAS, Epilogue.DRELU):
            ptr = D[MatmulDescAttribute.EPILOGUE_AUX_POINTER]
            assert ptr, "no aux pointer"
            aux = env.flat(ptr, np.uint8, ld // 8 * n)
        elif ep in (Epilogue.GELU_AUX_BIAS, Epilogue.DGELU):
            ptr = D[MatmulDescAttribute.EPILOGUE_AUX_POINTER]
            assert ptr, "no aux pointer"
            aux = env.flat(ptr, dt, ld * (n - 1) + m)
        ta, tb = D[MatmulDescAttribute.TRANSA], D[MatmulDescAttribute.TRANSB]
        calls.append((ep.name, stream, cur._ops is not None))

        def fn() -> None:
            a_op = colmajor_ref.colmajor(Am, ra, ca, lda)
            b_op = colmajor_ref.colmajor(Bm, rb, cb, ldb)
            a_op, b_op = (np.array(a_op.T if ta else a_op), np.array(b_op.T if tb else b_op))
            x = (al * (a_op @ b_op)).astype(dt)
            out = colmajor_ref.colmajor(Dm, m, n, ldd)
            if ep in (Epilogue.BIAS, Epilogue.RELU_BIAS, Epilogue.RELU_AUX_BIAS, Epilogue.GELU_BIAS,
                      Epilogue.GELU_AUX_BIAS):
                x = x + bias[:, None]
            if ep == Epilogue.RELU_AUX_BIAS:
                bits = np.zeros(ld * n, dtype=bool)
                idx = (np.arange(m)[:, None] + ld * np.arange(n)[None, :]).ravel()
                bits[idx] = (x > 0).ravel()
                aux[...] = np.packbits(bits, bitorder="little")
            if ep == Epilogue.GELU_AUX_BIAS:
                colmajor_ref.colmajor(aux, m, n, ld)[...] = x
            if ep in (Epilogue.RELU_BIAS, Epilogue.RELU_AUX_BIAS):
                x = np.where(x > 0, x, 0).astype(dt)
            elif ep in (Epilogue.GELU_BIAS, Epilogue.GELU_AUX_BIAS):
                x = (0.5 * x * (1 + _gelu_t(x))).astype(dt)
            elif ep == Epilogue.DRELU:
                bits = np.unpackbits(aux, bitorder="little").astype(bool)
                idx = np.arange(m)[:, None] + ld * np.arange(n)[None, :]
                x = np.where(bits[idx], x, 0).astype(dt)
            elif ep == Epilogue.DGELU:
                g = np.array(colmajor_ref.colmajor(aux, m, n, ld))
                t = _gelu_t(g)
                slope = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _CUBIC * g * g)
                x = (x * slope).astype(dt)
            elif ep == Epilogue.BGRADB:
                bias[...] = b_op.sum(axis=0).astype(dt)
            elif ep not in (Epilogue.DEFAULT, Epilogue.BIAS):
                raise cuBLASLtError(f"the model does not run {ep.name}")
            out[...] = x

        env.run(fn, env.stream(stream))

    def destroy(_x: int) -> None:
        pass

    lib.Epilogue, lib.MatmulDescAttribute, lib.MatmulPreferenceAttribute = \
        Epilogue, MatmulDescAttribute, MatmulPreferenceAttribute
    lib.cuBLASLtError = cuBLASLtError
    lib.matmul_heuristic_result_dtype = HEURISTIC_RESULT
    lib.get_matmul_desc_attribute_dtype = lambda attr: _DESC_TYPES[MatmulDescAttribute(attr)]
    lib.get_matmul_preference_attribute_dtype = lambda attr: _PREF_TYPES[MatmulPreferenceAttribute(attr)]
    lib.create, lib.matmul_desc_create, lib.matmul_desc_set_attribute = create, matmul_desc_create, \
        matmul_desc_set_attribute
    lib.matrix_layout_create, lib.matmul_preference_create = matrix_layout_create, matmul_preference_create
    lib.matmul_preference_set_attribute, lib.matmul_algo_get_heuristic = matmul_preference_set_attribute, \
        matmul_algo_get_heuristic
    lib.matmul, lib.matmul_preference_destroy, lib.matmul_desc_destroy = matmul, destroy, destroy
    lib.matrix_layout_destroy = destroy
    return lib
