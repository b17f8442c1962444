"""Scalar math shared by the Numba backends: one source for the CPU and the CUDA kernels.

The functions here are plain Python written in the subset that both ``numba.njit`` and
``numba.cuda.jit(device=True)`` compile. :func:`build` compiles them with the decorator it is
given and returns the compiled helpers; :mod:`backprop.kernels.numba_cpu` builds them with
``njit(inline="always")`` and :mod:`backprop.kernels.numba_cuda` with ``cuda.jit(device=True)``.
Importing this module imports no Numba.

Activations and losses are dispatched by an integer code (:data:`ACT_CODES`,
:data:`LOSS_CODES`) inside one kernel, so each kernel is compiled once per dtype instead of once
per activation and dtype.

Precision: every constant is made with the dtype of the kernel's arrays (``consts(a)`` returns
a tuple of ``a.dtype.type`` scalars) and the ``math`` functions follow their argument's type in
Numba (``math.exp`` of a float32 is ``expf``), so float32 kernels compute in float32 throughout.
Mixing a bare Python literal such as ``0.5`` into float32 arithmetic would promote to float64:
write ``c[HALF]`` instead.

Note for developers: Numba's on-disk cache (``cache=True``) is keyed on the source file of the
kernel, not on this file. After editing this module, delete the ``*.nbi``/``*.nbc`` files in
``kernels/__pycache__`` (an installed package is rewritten as a whole, so users are not affected).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable

from .spec import ACTIVATIONS, LOSSES, SELU_ALPHA, SELU_LAMBDA

# ----------------------------------------------------------------------------- codes
IDENTITY, STEP, SIGMOID, TANH, RELU, LEAKY_RELU, ELU, SELU, SOFTPLUS, GELU, SILU, SOFTMAX = range(12)
ACT_CODES: dict[str, int] = {
    "identity": IDENTITY, "step": STEP, "sigmoid": SIGMOID, "tanh": TANH, "relu": RELU,
    "leaky_relu": LEAKY_RELU, "elu": ELU, "selu": SELU, "softplus": SOFTPLUS, "gelu": GELU,
    "silu": SILU, "softmax": SOFTMAX,
}
#: Activations whose slope reads the pre-activation ``u`` rather than the output ``y``.
NEEDS_U = frozenset(ACT_CODES[n] for n, s in ACTIVATIONS.items() if s.needs_u)

MSE, MAE, HUBER, BCE, CROSS_ENTROPY = range(5)
LOSS_CODES: dict[str, int] = {"mse": MSE, "mae": MAE, "huber": HUBER, "bce": BCE, "cross_entropy": CROSS_ENTROPY}

assert set(ACT_CODES) == set(ACTIVATIONS) and set(LOSS_CODES) == set(LOSSES), "spec and codes disagree"

# indices into the constants tuple returned by ``consts``
ZERO, ONE, HALF, INV_SQRT2, INV_SQRT_2PI, S_LAMBDA, S_ALPHA, S_LAMBDA_ALPHA, NAN = range(9)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SELU_LAMBDA = SELU_LAMBDA
_SELU_ALPHA = SELU_ALPHA
_SELU_LAMBDA_ALPHA = SELU_LAMBDA * SELU_ALPHA
_NAN = math.nan


def act_code(name: str) -> int:
    try:
        return ACT_CODES[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}") from None


def loss_code(name: str) -> int:
    try:
        return LOSS_CODES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}") from None


def output_loss_codes(output: str, loss: str, has_u: bool) -> tuple[int, int]:
    """``(loss code, activation code)`` of an output/loss pair, checked: the fused pairs and GELU/SiLU
    need the logits ``u``, and a softmax output goes with cross-entropy only."""
    lcode, acode = loss_code(loss), act_code(output)
    if not has_u and (lcode in (BCE, CROSS_ENTROPY) or acode in NEEDS_U):
        raise ValueError(f"{output}/{loss} needs the output logits u")
    if acode == SOFTMAX and lcode != CROSS_ENTROPY:
        raise ValueError("a softmax output goes with the cross_entropy loss only")
    return lcode, acode


# ----------------------------------------------------------------------------- sources
def _consts(a):  # type: ignore[no-untyped-def]
    """The constants of the kernels, typed with ``a``'s dtype (an array)."""
    dt = a.dtype.type
    return (dt(0.0), dt(1.0), dt(0.5), dt(_INV_SQRT2), dt(_INV_SQRT_2PI), dt(_SELU_LAMBDA),
            dt(_SELU_ALPHA), dt(_SELU_LAMBDA_ALPHA), dt(_NAN))


def _make(jit: Callable[[Callable], Any], exp: Any, tanh: Any, expm1: Any, log1p: Any) -> SimpleNamespace:
    consts = jit(_consts)

    # -- activations f(v) and slopes phi(y) (u for GELU/SiLU), one pair per row of the spec;
    #    uniform signatures: f(v, alpha, c), d(y, u, alpha, c)
    def _sigmoid(v, alpha, c):  # type: ignore[no-untyped-def]
        # 1 / (1 + exp(-v)), written so that neither branch overflows (as the reference)
        e = exp(-abs(v))
        return c[ONE] / (c[ONE] + e) if v >= c[ZERO] else e / (c[ONE] + e)

    sigmoid = jit(_sigmoid)

    def _softplus(v, alpha, c):  # type: ignore[no-untyped-def]
        # log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|))
        m = v if v > c[ZERO] else c[ZERO]
        return m + log1p(exp(-abs(v)))

    softplus = jit(_softplus)

    def _gelu_cdf(v, c):  # type: ignore[no-untyped-def]
        return c[HALF] * (c[ONE] + math.erf(v * c[INV_SQRT2]))

    gelu_cdf = jit(_gelu_cdf)

    def _f_step(v, alpha, c):  # type: ignore[no-untyped-def]
        return c[ONE] if v > c[ZERO] else c[ZERO]

    def _f_tanh(v, alpha, c):  # type: ignore[no-untyped-def]
        return tanh(v)

    def _f_relu(v, alpha, c):  # type: ignore[no-untyped-def]
        return c[ZERO] if v < c[ZERO] else v  # NaN passes through, as with np.maximum

    def _f_leaky_relu(v, alpha, c):  # type: ignore[no-untyped-def]
        return v if v > c[ZERO] else alpha * v

    def _f_elu(v, alpha, c):  # type: ignore[no-untyped-def]
        return v if v > c[ZERO] else alpha * expm1(v)

    def _f_selu(v, alpha, c):  # type: ignore[no-untyped-def]
        return c[S_LAMBDA] * (v if v > c[ZERO] else c[S_ALPHA] * expm1(v))

    def _f_gelu(v, alpha, c):  # type: ignore[no-untyped-def]
        return v * gelu_cdf(v, c)

    def _f_silu(v, alpha, c):  # type: ignore[no-untyped-def]
        return v * sigmoid(v, alpha, c)

    def _d_sigmoid(y, u, alpha, c):  # type: ignore[no-untyped-def]
        return y * (c[ONE] - y)

    def _d_tanh(y, u, alpha, c):  # type: ignore[no-untyped-def]
        return c[ONE] - y * y

    def _d_relu(y, u, alpha, c):  # type: ignore[no-untyped-def]
        return c[ONE] if y > c[ZERO] else c[ZERO]

    def _d_leaky_relu(y, u, alpha, c):  # type: ignore[no-untyped-def]
        return c[ONE] if y > c[ZERO] else alpha

    def _d_elu(y, u, alpha, c):  # type: ignore[no-untyped-def]
        return c[ONE] if y > c[ZERO] else y + alpha

    def _d_selu(y, u, alpha, c):  # type: ignore[no-untyped-def]
        return c[S_LAMBDA] if y > c[ZERO] else y + c[S_LAMBDA_ALPHA]

    def _d_softplus(y, u, alpha, c):  # type: ignore[no-untyped-def]
        return -expm1(-y)

    def _d_gelu(y, u, alpha, c):  # type: ignore[no-untyped-def]
        pdf = exp(-c[HALF] * u * u) * c[INV_SQRT_2PI]
        return gelu_cdf(u, c) + u * pdf

    def _d_silu(y, u, alpha, c):  # type: ignore[no-untyped-def]
        s = sigmoid(u, alpha, c)
        return s * (c[ONE] + u * (c[ONE] - s))

    f_step, f_tanh, f_relu, f_leaky_relu = jit(_f_step), jit(_f_tanh), jit(_f_relu), jit(_f_leaky_relu)
    f_elu, f_selu, f_gelu, f_silu = jit(_f_elu), jit(_f_selu), jit(_f_gelu), jit(_f_silu)
    d_sigmoid, d_tanh, d_relu, d_leaky_relu = jit(_d_sigmoid), jit(_d_tanh), jit(_d_relu), jit(_d_leaky_relu)
    d_elu, d_selu, d_softplus, d_gelu, d_silu = jit(_d_elu), jit(_d_selu), jit(_d_softplus), jit(_d_gelu), jit(_d_silu)

    def _activate(v, code, alpha, c):  # type: ignore[no-untyped-def]
        """``f(v)`` for every elementwise activation (softmax is row-wise, in the kernels)."""
        if code == RELU:
            return f_relu(v, alpha, c)
        if code == IDENTITY:
            return v
        if code == STEP:
            return f_step(v, alpha, c)
        if code == SIGMOID:
            return sigmoid(v, alpha, c)
        if code == TANH:
            return f_tanh(v, alpha, c)
        if code == LEAKY_RELU:
            return f_leaky_relu(v, alpha, c)
        if code == ELU:
            return f_elu(v, alpha, c)
        if code == SELU:
            return f_selu(v, alpha, c)
        if code == SOFTPLUS:
            return softplus(v, alpha, c)
        if code == GELU:
            return f_gelu(v, alpha, c)
        if code == SILU:
            return f_silu(v, alpha, c)
        return c[NAN]  # an unknown code never falls through to a formula: NaN, which the step's guard refuses

    activate = jit(_activate)

    def _slope(y, u, code, alpha, c):  # type: ignore[no-untyped-def]
        """``phi(y) = f'(f^{-1}(y))``; GELU and SiLU read the pre-activation ``u`` instead."""
        if code == RELU:
            return d_relu(y, u, alpha, c)
        if code == IDENTITY:
            return c[ONE]
        if code == STEP:
            return c[ZERO]
        if code == SIGMOID:
            return d_sigmoid(y, u, alpha, c)
        if code == TANH:
            return d_tanh(y, u, alpha, c)
        if code == LEAKY_RELU:
            return d_leaky_relu(y, u, alpha, c)
        if code == ELU:
            return d_elu(y, u, alpha, c)
        if code == SELU:
            return d_selu(y, u, alpha, c)
        if code == SOFTPLUS:
            return d_softplus(y, u, alpha, c)
        if code == GELU:
            return d_gelu(y, u, alpha, c)
        if code == SILU:
            return d_silu(y, u, alpha, c)
        return c[NAN]

    slope = jit(_slope)

    # -- losses of the residual r = y - t (mse, mae, huber): value and dL/dy
    def _l_mse(r, k, c):  # type: ignore[no-untyped-def]
        return c[HALF] * r * r

    def _l_mae(r, k, c):  # type: ignore[no-untyped-def]
        return abs(r)

    def _l_huber(r, k, c):  # type: ignore[no-untyped-def]
        a = abs(r)
        return c[HALF] * r * r if a <= k else k * (a - c[HALF] * k)

    def _g_mae(r, k, c):  # type: ignore[no-untyped-def]
        # np.sign: 0 for 0, NaN for NaN
        return c[ONE] if r > c[ZERO] else (-c[ONE] if r < c[ZERO] else r * c[ZERO])

    def _g_huber(r, k, c):  # type: ignore[no-untyped-def]
        return -k if r < -k else (k if r > k else r)  # np.clip; NaN passes through

    l_mse, l_mae, l_huber, g_mae, g_huber = jit(_l_mse), jit(_l_mae), jit(_l_huber), jit(_g_mae), jit(_g_huber)

    def _elementwise_loss(r, code, k, c):  # type: ignore[no-untyped-def]
        if code == MSE:
            return l_mse(r, k, c)
        if code == MAE:
            return l_mae(r, k, c)
        if code == HUBER:
            return l_huber(r, k, c)
        return c[NAN]

    def _loss_grad(r, code, k, c):  # type: ignore[no-untyped-def]
        if code == MSE:
            return r
        if code == MAE:
            return g_mae(r, k, c)
        if code == HUBER:
            return g_huber(r, k, c)
        return c[NAN]

    # -- optimizer updates of one element: the new values, shared by the update kernels and their probes.
    #    The complements 1 - beta come from the host, formed in float64 and rounded to the dtype once.
    def _sgd_step(p, g, lr, wd, c):  # type: ignore[no-untyped-def]
        # p - lr (g + wd p); g alone without weight decay
        return p - lr * (g if wd == c[ZERO] else g + wd * p)

    def _momentum_step(p, g, v, lr, mu, nesterov, wd):  # type: ignore[no-untyped-def]
        # g' = g + wd p, v <- mu v + g', p <- p - lr v (Nesterov: p - lr (g' + mu v)); returns (p, v)
        gd = g + wd * p
        vn = mu * v + gd
        return (p - lr * (gd + mu * vn) if nesterov else p - lr * vn), vn

    def _adam_step(p, g, m, v, lr_c1, c2, b1, b2, omb1, omb2, eps, wd):  # type: ignore[no-untyped-def]
        # m <- b1 m + (1-b1) g', v <- b2 v + (1-b2) g'^2, p <- p - (lr / c1) m / (sqrt(v / c2) + eps)
        gd = g + wd * p
        mn = b1 * m + omb1 * gd
        vn = b2 * v + omb2 * gd * gd
        return p - lr_c1 * mn / (math.sqrt(vn / c2) + eps), mn, vn

    def _finite(v):  # type: ignore[no-untyped-def]
        return not (math.isnan(v) or math.isinf(v))

    return SimpleNamespace(
        sgd_step=jit(_sgd_step), momentum_step=jit(_momentum_step), adam_step=jit(_adam_step), finite=jit(_finite),
        consts=consts, sigmoid=sigmoid, softplus=softplus, gelu_cdf=gelu_cdf, activate=activate, slope=slope,
        elementwise_loss=jit(_elementwise_loss), loss_grad=jit(_loss_grad),
        f_step=f_step, f_tanh=f_tanh, f_relu=f_relu, f_leaky_relu=f_leaky_relu, f_elu=f_elu, f_selu=f_selu,
        f_gelu=f_gelu, f_silu=f_silu, d_sigmoid=d_sigmoid, d_tanh=d_tanh, d_relu=d_relu,
        d_leaky_relu=d_leaky_relu, d_elu=d_elu, d_selu=d_selu, d_softplus=d_softplus, d_gelu=d_gelu,
        d_silu=d_silu, l_mse=l_mse, l_mae=l_mae, l_huber=l_huber, g_mae=g_mae, g_huber=g_huber,
    )


def build(jit: Callable[[Callable], Any], exp: Any = math.exp, tanh: Any = math.tanh, expm1: Any = math.expm1,
          log1p: Any = math.log1p) -> SimpleNamespace:
    """Compile the scalar helpers with ``jit`` (a decorator) and return them in a namespace.

    ``exp``, ``tanh``, ``expm1`` and ``log1p`` are the functions they call: ``math``'s by default;
    the CPU backend passes float32 versions that LLVM can vectorize (``log1p`` is only ever
    called on ``[0, 1]``)."""
    return _make(jit, exp, tanh, expm1, log1p)
