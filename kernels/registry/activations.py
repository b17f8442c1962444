"""The activation records: each activation's NumPy form, its scalar form and its slope beside it.

Adding an activation is one :class:`~backprop.kernels.registry.records.Activation` entry here, listed in
:data:`ACTIVATIONS` (or one call of :func:`backprop.kernels.registry.add_activation` before a backend is first
used). The slope is written, where the activation is invertible, as the slope of the neural output

    phi(y) = f'(f^{-1}(y)),

so that the forward pass keeps only ``y = f(u)`` per layer; GELU and SiLU are not invertible and read the
pre-activation ``u`` instead (``needs_u``). The scalar forms follow the scalar language of
:mod:`backprop.kernels.registry.records`, the CUDA C forms its conventions.
"""

from __future__ import annotations

from math import erf, exp, expm1, log1p, tanh  # noqa: F401 - the names the scalar forms call

from .records import (
    _INV_SQRT2, _INV_SQRT_2PI, _SQRT_2_OVER_PI, CUBIC, CUBIC3, GELU_TANH_CUBIC, HALF, INV_SQRT2, INV_SQRT_2PI, ONE,
    S_ALPHA, S_LAMBDA, S_LAMBDA_ALPHA, SELU_ALPHA, SELU_LAMBDA, SQRT_2_OVER_PI, ZERO, Activation, scalar,
)


def _np_identity(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    if out is not v:
        out[...] = v
    return out


def _np_one(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    out.fill(1)
    return out


@scalar
def identity_f(v, alpha, c):  # type: ignore[no-untyped-def]
    return v


@scalar
def identity_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    return c[ONE]


IDENTITY = Activation(
    "identity", "u", "phi(y) = 1", _np_identity, _np_one, identity_f, identity_phi, "v", "(T)1",
    aliases=("linear",), linear=True, in_place=True, sklearn_name="identity",
)


def _np_step(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    return ops.xm.heaviside(v, 0, out=out)


def _np_zero(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    out.fill(0)
    return out


@scalar
def step_f(v, alpha, c):  # type: ignore[no-untyped-def]
    return c[ONE] if v > c[ZERO] else c[ZERO]


@scalar
def step_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    return c[ZERO]


STEP = Activation(
    "step", "1 if u > 0 else 0", "phi(y) = 0 (perceptrons only)", _np_step, _np_zero, step_f, step_phi,
    "(v > (T)0 ? (T)1 : (T)0)", "(T)0", output=False,
)


def _np_sigmoid(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    # 1 / (1 + exp(-v)); exp overflows to inf for very negative v, and 1 / inf = 0 is right
    xm = ops.xm
    with ops.ignore_overflow():
        xm.negative(v, out=out)
        xm.exp(out, out=out)
    out += 1
    return xm.reciprocal(out, out=out)


def _np_sigmoid_phi(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    ops.xm.subtract(1, y, out=out)
    out *= y
    return out


@scalar
def sigmoid_f(v, alpha, c):  # type: ignore[no-untyped-def]
    # 1 / (1 + exp(-v)), written so that neither branch overflows
    e = exp(-abs(v))
    return c[ONE] / (c[ONE] + e) if v >= c[ZERO] else e / (c[ONE] + e)


@scalar
def sigmoid_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    return y * (c[ONE] - y)


SIGMOID = Activation(
    "sigmoid", "1 / (1 + exp(-u))", "phi(y) = y (1 - y)", _np_sigmoid, _np_sigmoid_phi, sigmoid_f, sigmoid_phi,
    "bp_sigmoid(v)", "(y * ((T)1 - y))", aliases=("logistic",), in_place=True, sklearn_name="logistic",
    cuda_helpers="""
/* 1 / (1 + exp(-v)) without overflow in either branch */
__device__ __forceinline__ T bp_sigmoid(T v) {
    T e = exp(-fabs(v));
    return v >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);
}
""",
)


def _np_tanh(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    return ops.xm.tanh(v, out=out)


def _np_tanh_phi(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    ops.xm.multiply(y, y, out=out)
    return ops.xm.subtract(1, out, out=out)


@scalar
def tanh_f(v, alpha, c):  # type: ignore[no-untyped-def]
    return tanh(v)


@scalar
def tanh_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    return c[ONE] - y * y


TANH = Activation(
    "tanh", "tanh(u)", "phi(y) = 1 - y^2", _np_tanh, _np_tanh_phi, tanh_f, tanh_phi, "tanh(v)",
    "((T)1 - y * y)", in_place=True, sklearn_name="tanh",
)


def _np_relu(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    return ops.xm.maximum(v, 0, out=out)


def _np_relu_phi(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    return ops.xm.sign(y, out=out)  # y = max(u, 0) >= 0: 1 where positive, 0 elsewhere


@scalar
def relu_f(v, alpha, c):  # type: ignore[no-untyped-def]
    return c[ZERO] if v < c[ZERO] else v  # NaN passes through, as with np.maximum


@scalar
def relu_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    return c[ONE] if y > c[ZERO] else c[ZERO]


RELU = Activation(
    "relu", "max(u, 0)", "phi(y) = 1 if y > 0 else 0", _np_relu, _np_relu_phi, relu_f, relu_phi, "bp_relu(v)",
    "(y > (T)0 ? (T)1 : (T)0)", init="he", in_place=True, sklearn_name="relu",
    cuda_helpers="""
/* max(v, 0) that lets NaN through, like numpy.maximum */
__device__ __forceinline__ T bp_relu(T v) { return v < (T)0 ? (T)0 : v; }
""",
)


def _np_leaky_relu(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    xm = ops.xm
    xm.multiply(v, alpha, out=out)
    xm.copyto(out, v, where=xm.greater(v, 0, out=ops.scratch(v, "mask", bool)))
    return out


def _np_leaky_relu_phi(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    out.fill(alpha)
    ops.xm.copyto(out, 1, where=ops.xm.greater(y, 0, out=ops.scratch(y, "mask", bool)))
    return out


@scalar
def leaky_relu_f(v, alpha, c):  # type: ignore[no-untyped-def]
    return v if v > c[ZERO] else alpha * v


@scalar
def leaky_relu_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    return c[ONE] if y > c[ZERO] else alpha


LEAKY_RELU = Activation(
    "leaky_relu", "u if u > 0 else alpha u", "phi(y) = 1 if y > 0 else alpha", _np_leaky_relu, _np_leaky_relu_phi,
    leaky_relu_f, leaky_relu_phi, "(v > (T)0 ? v : alpha * v)", "(y > (T)0 ? (T)1 : alpha)",
    default_alpha=0.01, alpha_range=(0.0, 1.0, True, False), init="he",
)


def _np_elu_with(v, a, out, ops):  # type: ignore[no-untyped-def]
    """``v if v > 0 else a (exp(v) - 1)`` into ``out`` (ELU, and SELU before its scale)."""
    xm = ops.xm
    xm.minimum(v, 0, out=out)
    xm.expm1(out, out=out)
    out *= a
    xm.copyto(out, v, where=xm.greater(v, 0, out=ops.scratch(v, "mask", bool)))
    return out


def _np_elu(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    return _np_elu_with(v, alpha, out, ops)


def _np_elu_phi(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    ops.xm.add(y, alpha, out=out)
    ops.xm.copyto(out, 1, where=ops.xm.greater(y, 0, out=ops.scratch(y, "mask", bool)))
    return out


@scalar
def elu_f(v, alpha, c):  # type: ignore[no-untyped-def]
    return v if v > c[ZERO] else alpha * expm1(v)


@scalar
def elu_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    return c[ONE] if y > c[ZERO] else y + alpha


ELU = Activation(
    "elu", "u if u > 0 else alpha (exp(u) - 1)", "phi(y) = 1 if y > 0 else y + alpha", _np_elu, _np_elu_phi,
    elu_f, elu_phi, "(v > (T)0 ? v : alpha * expm1(v))", "(y > (T)0 ? (T)1 : y + alpha)",
    default_alpha=1.0, alpha_range=(0.0, float("inf"), False, False), init="he",
)


def _np_selu(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    _np_elu_with(v, SELU_ALPHA, out, ops)
    out *= SELU_LAMBDA
    return out


def _np_selu_phi(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    ops.xm.add(y, SELU_LAMBDA * SELU_ALPHA, out=out)
    ops.xm.copyto(out, SELU_LAMBDA, where=ops.xm.greater(y, 0, out=ops.scratch(y, "mask", bool)))
    return out


@scalar
def selu_f(v, alpha, c):  # type: ignore[no-untyped-def]
    return c[S_LAMBDA] * (v if v > c[ZERO] else c[S_ALPHA] * expm1(v))


@scalar
def selu_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    return c[S_LAMBDA] if y > c[ZERO] else y + c[S_LAMBDA_ALPHA]


SELU = Activation(
    "selu", "lambda (u if u > 0 else alpha (exp(u) - 1))", "phi(y) = lambda if y > 0 else y + lambda alpha",
    _np_selu, _np_selu_phi, selu_f, selu_phi,
    f"((T){SELU_LAMBDA!r} * (v > (T)0 ? v : (T){SELU_ALPHA!r} * expm1(v)))",
    f"(y > (T)0 ? (T){SELU_LAMBDA!r} : y + (T){SELU_LAMBDA * SELU_ALPHA!r})", init="lecun_normal",
)


def _np_softplus(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    # max(v, 0) + log(1 + exp(-|v|)), which never overflows
    xm = ops.xm
    xm.abs(v, out=out)
    xm.negative(out, out=out)
    xm.exp(out, out=out)
    xm.log1p(out, out=out)
    out += xm.maximum(v, 0, out=ops.scratch(v, "aux"))
    return out


def _np_softplus_phi(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    ops.xm.negative(y, out=out)
    ops.xm.expm1(out, out=out)
    return ops.xm.negative(out, out=out)


@scalar
def softplus_f(v, alpha, c):  # type: ignore[no-untyped-def]
    # log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|))
    m = v if v > c[ZERO] else c[ZERO]
    return m + log1p(exp(-abs(v)))


@scalar
def softplus_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    return -expm1(-y)


SOFTPLUS = Activation(
    "softplus", "log(1 + exp(u))", "phi(y) = 1 - exp(-y)", _np_softplus, _np_softplus_phi, softplus_f,
    softplus_phi, "bp_softplus(v)", "(-expm1(-y))", init="he",
    cuda_helpers="""
/* log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|)) */
__device__ __forceinline__ T bp_softplus(T v) { return (v < (T)0 ? (T)0 : v) + log1p(exp(-fabs(v))); }
""",
)


def _np_gelu_cdf(v, out, ops):  # type: ignore[no-untyped-def]
    """``Phi(v) = (1 + erf(v / sqrt 2)) / 2`` into ``out``."""
    ops.xm.multiply(v, _INV_SQRT2, out=out)
    ops.erf(out, out)
    out += 1
    out *= 0.5
    return out


def _np_gelu(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    _np_gelu_cdf(v, out, ops)
    out *= v
    return out


def _np_gelu_phi(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    # Phi(u) + u pdf(u), pdf the standard normal density
    _np_gelu_cdf(u, out, ops)
    pdf = ops.xm.multiply(u, u, out=ops.scratch(u, "aux"))
    pdf *= -0.5
    ops.xm.exp(pdf, out=pdf)
    pdf *= _INV_SQRT_2PI
    pdf *= u
    out += pdf
    return out


@scalar
def gelu_cdf(v, c):  # type: ignore[no-untyped-def]
    return c[HALF] * (c[ONE] + erf(v * c[INV_SQRT2]))


@scalar
def gelu_f(v, alpha, c):  # type: ignore[no-untyped-def]
    return v * gelu_cdf(v, c)


@scalar
def gelu_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    return gelu_cdf(u, c) + u * (exp(-c[HALF] * u * u) * c[INV_SQRT_2PI])


GELU = Activation(
    "gelu", "u Phi(u), Phi(u) = (1 + erf(u / sqrt 2)) / 2", "f'(u) = Phi(u) + u exp(-u^2 / 2) / sqrt(2 pi)  (keeps u)",
    _np_gelu, _np_gelu_phi, gelu_f, gelu_phi, "(v * bp_gelu_cdf(v))",
    "(bp_gelu_cdf(u) + u * (exp((T)-0.5 * u * u) * (T)0.39894228040143267794))", needs_u=True, init="he",
    cuda_helpers="""
/* Phi(v) = (1 + erf(v / sqrt 2)) / 2, exact GELU (no tanh approximation) */
__device__ __forceinline__ T bp_gelu_cdf(T v) { return (T)0.5 * ((T)1 + erf(v * (T)0.70710678118654752440)); }
""",
)


def _np_gelu_tanh_t(v, out, ops):  # type: ignore[no-untyped-def]
    """``tanh(sqrt(2 / pi) (v + 0.044715 v^3))`` into ``out``."""
    ops.xm.multiply(v, v, out=out)
    out *= GELU_TANH_CUBIC
    out += 1
    out *= v
    out *= _SQRT_2_OVER_PI
    return ops.xm.tanh(out, out=out)


def _np_gelu_tanh(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    _np_gelu_tanh_t(v, out, ops)
    out += 1
    out *= v
    out *= 0.5
    return out


def _np_gelu_tanh_phi(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    # (1 + t) / 2 + u (1 - t^2) sqrt(2 / pi) (1 + 3 c u^2) / 2
    t = _np_gelu_tanh_t(u, ops.scratch(u, "aux"), ops)
    ops.xm.multiply(u, u, out=out)
    out *= 3 * GELU_TANH_CUBIC
    out += 1
    out *= u
    out *= _SQRT_2_OVER_PI
    tt = ops.xm.multiply(t, t, out=ops.scratch(u, "aux2"))
    ops.xm.subtract(1, tt, out=tt)
    out *= tt
    out += t
    out += 1
    out *= 0.5
    return out


@scalar
def gelu_tanh_t(v, c):  # type: ignore[no-untyped-def]
    return tanh(c[SQRT_2_OVER_PI] * (v + c[CUBIC] * v * v * v))


@scalar
def gelu_tanh_f(v, alpha, c):  # type: ignore[no-untyped-def]
    return c[HALF] * v * (c[ONE] + gelu_tanh_t(v, c))


@scalar
def gelu_tanh_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    t = gelu_tanh_t(u, c)
    return c[HALF] * (c[ONE] + t) + c[HALF] * u * (c[ONE] - t * t) * c[SQRT_2_OVER_PI] * (c[ONE] + c[CUBIC3] * u * u)


GELU_TANH = Activation(
    "gelu_tanh", "u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) / 2  (the tanh approximation of GELU)",
    "f'(u) = (1 + t) / 2 + u (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 u^2) / 2, t = tanh(...)  (keeps u)",
    _np_gelu_tanh, _np_gelu_tanh_phi, gelu_tanh_f, gelu_tanh_phi, "((T)0.5 * v * ((T)1 + bp_gelu_tanh_t(v)))",
    "bp_gelu_tanh_slope(u)", needs_u=True, init="he",
    cuda_helpers="""
/* tanh(sqrt(2/pi) (v + 0.044715 v^3)), the tanh form of GELU */
__device__ __forceinline__ T bp_gelu_tanh_t(T v) {
    return tanh((T)0.79788456080286535588 * (v + (T)0.044715 * v * v * v));
}
__device__ __forceinline__ T bp_gelu_tanh_slope(T u) {
    T t = bp_gelu_tanh_t(u);
    return (T)0.5 * ((T)1 + t)
        + (T)0.5 * u * ((T)1 - t * t) * (T)0.79788456080286535588 * ((T)1 + (T)0.134145 * u * u);
}
""",
)


def _np_silu(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    _np_sigmoid(v, alpha, out, ops)
    out *= v
    return out


def _np_silu_phi(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    # s (1 + u (1 - s)), s = sigmoid(u)
    _np_sigmoid(u, alpha, out, ops)
    t = ops.xm.subtract(1, out, out=ops.scratch(u, "aux"))
    t *= u
    t += 1
    out *= t
    return out


@scalar
def silu_f(v, alpha, c):  # type: ignore[no-untyped-def]
    return v * sigmoid_f(v, alpha, c)


@scalar
def silu_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    s = sigmoid_f(u, alpha, c)
    return s * (c[ONE] + u * (c[ONE] - s))


SILU = Activation(
    "silu", "u sigmoid(u)", "f'(u) = s (1 + u (1 - s)), s = sigmoid(u)  (keeps u)", _np_silu, _np_silu_phi,
    silu_f, silu_phi, "(v * bp_sigmoid(v))", "bp_silu_slope(u)", needs_u=True, init="he",
    cuda_helpers="""
__device__ __forceinline__ T bp_silu_slope(T u) {
    T s = bp_sigmoid(u);
    return s * ((T)1 + u * ((T)1 - s));
}
""",
)


def _np_exp(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    with ops.ignore_overflow():  # inf for large v: the loss is then inf, and the step's guard refuses it
        return ops.xm.exp(v, out=out)


def _np_exp_phi(y, u, alpha, out, ops):  # type: ignore[no-untyped-def]
    out[...] = y
    return out


@scalar
def exp_f(v, alpha, c):  # type: ignore[no-untyped-def]
    return exp(v)


@scalar
def exp_phi(y, u, alpha, c):  # type: ignore[no-untyped-def]
    return y


EXP = Activation(
    "exp", "exp(u)", "phi(y) = y; fused with poisson: delta = (y - t) / batch", _np_exp, _np_exp_phi, exp_f,
    exp_phi, "exp(v)", "y", hidden=False, output=False, in_place=True, sklearn_name="exp",
)


def _np_softmax(v, alpha, out, ops):  # type: ignore[no-untyped-def]
    xm = ops.xm
    m = ops.scratch(v, "row", shape=(v.shape[0], 1))
    v.max(axis=1, keepdims=True, out=m)
    xm.subtract(v, m, out=out)
    xm.exp(out, out=out)
    out.sum(axis=1, keepdims=True, out=m)
    out /= m
    return out


SOFTMAX = Activation(
    "softmax", "exp(u_i) / sum_j exp(u_j)", "fused with cross_entropy: delta = (y - t) / batch",
    _np_softmax, None, None, None, None, None, hidden=False, output=False, rowwise=True, in_place=True,
    sklearn_name="softmax",
)

#: name -> record, in code order (the Numba backends number them in this order).
ACTIVATIONS: dict[str, Activation] = {
    a.name: a for a in (IDENTITY, STEP, SIGMOID, TANH, RELU, LEAKY_RELU, ELU, SELU, SOFTPLUS, GELU, GELU_TANH, SILU,
                        EXP, SOFTMAX)
}
