"""``exp``, ``tanh``, ``expm1`` and ``log1p`` for the Numba CPU kernels: libm's for float64, float32 polynomials for float32.

Each is a plain Python function (``math``'s) with a Numba overload: for a float32 argument the overload is a
polynomial of a few ulp that LLVM vectorizes, where libm's ``expf`` would be one call per element (NumPy's
``exp`` is SIMD). ``log1p`` is accurate on ``[0, 1]`` only, where the registry's scalar forms call it. The
CUDA backend compiles the scalar forms with ``math``'s functions, so these live with the CPU backend, not in
:mod:`backprop.kernels.numba_math` (which imports no Numba).
"""

from __future__ import annotations

import math

import numpy as np
from numba import types
from numba.extending import overload


def exp(x):  # type: ignore[no-untyped-def]
    """``exp`` for the kernels: libm's for float64; for float32 the polynomial below, which LLVM
    vectorizes (libm's ``expf`` is a call per element, NumPy's ``exp`` is SIMD)."""
    return math.exp(x)


@overload(exp, jit_options={"error_model": "numpy"})
def _exp_overload(x):  # type: ignore[no-untyped-def]
    if x != types.float32:
        return lambda x: math.exp(x)

    def exp32(x):  # type: ignore[no-untyped-def]
        # Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, then Cephes' degree-6 polynomial
        # (max error about 1 ulp); 2^k is built from its bits in two halves so that results
        # down to the denormals come out right. np.floor, not math.floor: the latter is int64.
        f = np.float32
        xc = x
        if xc < f(-104.0):
            xc = f(-104.0)
        if xc > f(88.75):
            xc = f(88.75)
        if not (xc == xc):
            xc = f(0.0)
        k = np.floor(xc * f(1.4426950408889634) + f(0.5))
        r = xc - k * f(0.693359375) - k * f(-2.12194440e-4)
        p = f(1.9875691500e-4)
        p = p * r + f(1.3981999507e-3)
        p = p * r + f(8.3334519073e-3)
        p = p * r + f(4.1665795894e-2)
        p = p * r + f(1.6666665459e-1)
        p = p * r + f(5.0000001201e-1)
        y = p * r * r + r + f(1.0)
        ki = np.int32(k)
        k1 = ki >> np.int32(1)
        s1 = np.int32((k1 + np.int32(127)) << np.int32(23)).view(np.float32)
        s2 = np.int32((ki - k1 + np.int32(127)) << np.int32(23)).view(np.float32)
        res = y * s1 * s2
        if x < f(-104.0):
            res = f(0.0)
        if x > f(88.72283935546875):
            res = f(np.inf)
        if not (x == x):
            res = x
        return res

    return exp32


def tanh(x):  # type: ignore[no-untyped-def]
    return math.tanh(x)


@overload(tanh, inline="always", jit_options={"error_model": "numpy"})
def _tanh_overload(x):  # type: ignore[no-untyped-def]
    if x != types.float32:
        return lambda x: math.tanh(x)

    def tanh32(x):  # type: ignore[no-untyped-def]
        # Cephes tanhf: odd polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above (about 2 ulp)
        f = np.float32
        ax = abs(x)
        z = x * x
        p = f(-5.70498872745e-3)
        p = p * z + f(2.06390887954e-2)
        p = p * z + f(-5.37397155531e-2)
        p = p * z + f(1.33314422036e-1)
        p = p * z + f(-3.33332819422e-1)
        small = p * z * x + x
        big = f(1.0) - f(2.0) / (exp(ax + ax) + f(1.0))
        big = -big if x < f(0.0) else big
        return small if ax < f(0.625) else big

    return tanh32


def expm1(x):  # type: ignore[no-untyped-def]
    return math.expm1(x)


@overload(expm1, inline="always", jit_options={"error_model": "numpy"})
def _expm1_overload(x):  # type: ignore[no-untyped-def]
    if x != types.float32:
        return lambda x: math.expm1(x)

    def expm1_32(x):  # type: ignore[no-untyped-def]
        # Taylor series to x^8 / 8! below |x| = 0.5 (relative error < 1e-8), exp(x) - 1 above
        f = np.float32
        p = f(1.0 / 40320.0)
        p = p * x + f(1.0 / 5040.0)
        p = p * x + f(1.0 / 720.0)
        p = p * x + f(1.0 / 120.0)
        p = p * x + f(1.0 / 24.0)
        p = p * x + f(1.0 / 6.0)
        p = p * x + f(0.5)
        small = (p * x + f(1.0)) * x
        big = exp(x) - f(1.0)
        return small if abs(x) < f(0.5) else big

    return expm1_32


def log1p(x):  # type: ignore[no-untyped-def]
    """``log(1 + x)``; the registry's scalar forms call it only with ``0 <= x <= 1``."""
    return math.log1p(x)


@overload(log1p, jit_options={"error_model": "numpy"})
def _log1p_overload(x):  # type: ignore[no-untyped-def]
    if x != types.float32:
        return lambda x: math.log1p(x)

    def log1p32(x):  # type: ignore[no-untyped-def]
        # log(1 + x) = 2 atanh(s), s = x / (2 + x) in [0, 1/3] for x in [0, 1]: odd series to s^17
        f = np.float32
        s = x / (f(2.0) + x)
        z = s * s
        p = f(1.0 / 17.0)
        p = p * z + f(1.0 / 15.0)
        p = p * z + f(1.0 / 13.0)
        p = p * z + f(1.0 / 11.0)
        p = p * z + f(1.0 / 9.0)
        p = p * z + f(1.0 / 7.0)
        p = p * z + f(1.0 / 5.0)
        p = p * z + f(1.0 / 3.0)
        p = p * z + f(1.0)
        return f(2.0) * s * p

    return log1p32
