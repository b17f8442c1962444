"""One record per activation and per loss: everything each backend needs to compute it.

Adding an activation is one :class:`Activation` entry in this file (or one call of
:func:`add_activation` before a backend is first used). The record holds, side by side:

* its name, aliases, the range of its parameter ``alpha`` and its weight initialization;
* the NumPy forms ``f(u)`` and its slope, written with ufuncs into ``out`` (they also run on CuPy arrays);
* one scalar form of each, compiled by both Numba backends (CPU and CUDA) from the same source;
* the CUDA C expressions of the CuPy backend (and any device helper they call).

The slope is written, where the activation is invertible, as the notes' slope of the neural output

    phi(y) = f'(f^{-1}(y)),

so that the forward pass keeps only ``y = f(u)`` per layer; GELU and SiLU are not invertible and
read the pre-activation ``u`` instead (``needs_u``). Every backend builds its dispatch from these
records: an activation or loss missing here cannot be computed anywhere, and an unknown code gives
NaN in the kernels, never another formula.

Losses are records too (:class:`Loss`): value and output delta in each form, the targets they accept,
the output activations they go with, and their scikit-learn names.

The scalar language (Numba forms): plain Python functions of scalars in the subset that ``numba.njit``
and ``numba.cuda.jit(device=True)`` compile. They read their constants from the tuple ``c`` that
:func:`consts` makes with the arrays' dtype (``c[ONE]``, not ``1.0``, which would turn float32 math into
float64), and call ``exp``, ``expm1``, ``log1p``, ``tanh`` and ``erf`` by these names: each backend
compiles them with its own versions of those (:func:`backprop.kernels.numba_math.build`; the float32
``log1p`` of the CPU backend is accurate on ``[0, 1]`` only, where the forms call it). ``log`` and ``sqrt``
are ``math``'s everywhere. A scalar form
calls another one by its name here. Scalar forms are marked with :func:`scalar`.

CUDA C: expressions over the element type ``T`` (``float`` or ``double``), literals cast (``(T)1``);
``v`` is the pre-activation, ``y`` the output, ``u`` the pre-activation of a slope that needs it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from math import erf, exp, expm1, log, log1p, sqrt, tanh  # noqa: F401 - the names the scalar forms call
from typing import Any, Callable

__all__ = [
    "ACTIVATIONS", "LOSSES", "FUSED_PAIRS", "SELU_ALPHA", "SELU_LAMBDA", "Activation", "Loss",
    "ActivationSpec", "LossSpec", "add_activation", "add_loss", "activation_name", "loss_name", "scalar",
    "registry_key",
]

SELU_LAMBDA = 1.0507009873554805
SELU_ALPHA = 1.6732632423543772
_INV_SQRT2 = 1.0 / sqrt(2.0)
_INV_SQRT_2PI = 1.0 / sqrt(2.0 * 3.141592653589793)
_SELU_LAMBDA_ALPHA = SELU_LAMBDA * SELU_ALPHA
_NAN = float("nan")
#: The tanh form of GELU: ``sqrt(2 / pi)`` and the cubic coefficient (cuBLASLt's GELU epilogue uses this form).
_SQRT_2_OVER_PI = sqrt(2.0 / 3.141592653589793)
GELU_TANH_CUBIC = 0.044715

#: Every scalar form, in the order it was defined (numba_math compiles them all, in this order).
SCALAR_FUNCTIONS: list[Callable[..., Any]] = []


def scalar(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` as a scalar form: the Numba backends compile it (see the module docstring)."""
    SCALAR_FUNCTIONS.append(fn)
    return fn


# ----------------------------------------------------------------------------- the scalar constants
#: Indices into the tuple of :func:`consts`.
(ZERO, ONE, HALF, INV_SQRT2, INV_SQRT_2PI, S_LAMBDA, S_ALPHA, S_LAMBDA_ALPHA, NAN, SQRT_2_OVER_PI, CUBIC,
 CUBIC3) = range(12)


@scalar
def consts(a):  # type: ignore[no-untyped-def]
    """The constants of the scalar forms, typed with array ``a``'s dtype."""
    dt = a.dtype.type
    return (dt(0.0), dt(1.0), dt(0.5), dt(_INV_SQRT2), dt(_INV_SQRT_2PI), dt(SELU_LAMBDA), dt(SELU_ALPHA),
            dt(_SELU_LAMBDA_ALPHA), dt(_NAN), dt(_SQRT_2_OVER_PI), dt(GELU_TANH_CUBIC), dt(3 * GELU_TANH_CUBIC))


# ----------------------------------------------------------------------------- records
NumpyForm = Callable[..., Any]


@dataclass(frozen=True)
class Activation:
    """One activation: ``f``, its slope, and each backend's form of both.

    NumPy forms: ``f(v, alpha, out, ops)`` writes ``f(v)`` into ``out``; ``phi(y, u, alpha, out, ops)``
    writes the slope (from ``y``, or from ``u`` when ``needs_u``). ``ops`` gives ``ops.xm`` (the array
    module), ``ops.scratch(like, tag, dtype=None)`` (a reusable temporary) and ``ops.erf(a, out)``.
    ``f`` may be called with ``out`` being ``v`` only when ``in_place`` says it reads ``v`` before
    writing ``out``. Scalar forms: ``scalar_f(v, alpha, c)`` and ``scalar_phi(y, u, alpha, c)``.
    CUDA C: ``cuda_f`` (of ``v`` and ``alpha``) and ``cuda_phi`` (of ``y``, or ``u`` when ``needs_u``,
    and ``alpha``), with any device function they call in ``cuda_helpers``.
    """

    name: str
    formula: str
    derivative: str
    f: NumpyForm
    phi: NumpyForm | None
    scalar_f: Callable[..., Any] | None
    scalar_phi: Callable[..., Any] | None
    cuda_f: str | None
    cuda_phi: str | None
    cuda_helpers: str = ""
    aliases: tuple[str, ...] = ()
    needs_u: bool = False
    #: usable in a hidden layer (softmax and step are not differentiable elementwise there)
    hidden: bool = True
    #: usable as the output of an elementwise loss (mse, mae, huber)
    output: bool = True
    #: f(u) = u: the kernels skip its pass and its slope
    linear: bool = False
    #: row-wise (softmax): the kernels compute it by hand, and it has no elementwise slope
    rowwise: bool = False
    in_place: bool = False
    default_alpha: float = 0.0
    #: its name in scikit-learn's estimators (``activation``, ``out_activation_``), when it has one
    sklearn_name: str | None = None
    #: ``(low, high, low_closed, high_closed)`` of ``alpha``; ``None``: any finite alpha (unused)
    alpha_range: tuple[float, float, bool, bool] | None = None
    init: str = "glorot"

    def check_alpha(self, alpha: float) -> None:
        """A ``ValueError`` naming the activation when ``alpha`` lies outside its range."""
        if self.alpha_range is None:
            return
        lo, hi, lo_closed, hi_closed = self.alpha_range
        inside = (alpha >= lo if lo_closed else alpha > lo) and (alpha <= hi if hi_closed else alpha < hi)
        if not inside:
            interval = f"{'[' if lo_closed else '('}{lo:g}, {hi:g}{']' if hi_closed else ')'}"
            raise ValueError(f"{self.name} alpha must lie in {interval}, got {alpha}")


@dataclass(frozen=True)
class Loss:
    """One loss: its value and its output delta ``delta = dE/du`` in each backend's form.

    ``E`` is the mean over the batch of the per-sample loss ``L``. Elementwise losses (not ``fused``)
    give ``delta = dL/dy * phi(y) / batch``; fused pairs read the logits and give ``(y - t) / batch``.
    NumPy forms: ``value(y, u, t, k, ops)`` returns the loss of each element, an array of ``y``'s shape
    (a scratch array of ``ops``, overwritten by the next call: sum it at once), whose row sums are the
    per-sample losses ``L``;
    ``grad(r, k, out, ops)`` writes ``dL/dy`` of the residual ``r = y - t`` into ``out`` (``out`` may be
    ``r``). Scalar forms: ``scalar_value(y, u, t, k, c)`` per element and ``scalar_grad(r, k, c)``.
    CUDA C: ``cuda_body`` sets ``l`` (the element's loss) and ``d`` (its delta, already divided by
    ``batch``), with ``SLOPE`` standing for the output activation's slope expression.
    Row-wise losses (cross-entropy) are computed by hand in the kernels and have only ``value``.
    """

    name: str
    per_sample: str
    delta: str
    value: NumpyForm
    grad: NumpyForm | None
    scalar_value: Callable[..., Any] | None
    scalar_grad: Callable[..., Any] | None
    cuda_body: str | None
    #: the output activations it goes with; ``None``: every activation with ``output`` set (see ``outputs``)
    allowed_outputs: tuple[str, ...] | None = None
    fused: bool = False
    rowwise: bool = False
    aliases: tuple[str, ...] = ()
    #: its name in scikit-learn's estimators, when it has one
    sklearn_name: str | None = None
    default_param: float = 0.0
    #: ``(low, high)`` of the parameter, both open; ``None``: no parameter
    param_range: tuple[float, float] | None = None
    param_name: str = "parameter"
    #: the targets it accepts: ``"real"``, ``"nonnegative"``, ``"unit"`` (in [0, 1]) or ``"distribution"``
    #: (rows in [0, 1] summing to 1; 1-D integer labels become one-hot rows)
    targets: str = "real"
    #: how a prediction counts as correct (``count_correct``'s rule), if accuracy means anything
    correct_rule: str | None = None

    @property
    def outputs(self) -> tuple[str, ...]:
        """The output activations this loss goes with."""
        return _outputs_of(self)

    def check_param(self, param: float) -> None:
        if self.param_range is None:
            return
        lo, hi = self.param_range
        if not lo < param < hi:
            raise ValueError(f"{self.name} {self.param_name} must lie in ({lo:g}, {hi:g}), got {param}")


# ----------------------------------------------------------------------------- activations
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


# ----------------------------------------------------------------------------- losses
def _np_mse(y, u, t, k, ops):  # type: ignore[no-untyped-def]
    r = ops.xm.subtract(y, t, out=ops.scratch(y, "loss"))
    ops.xm.multiply(r, r, out=r)
    r *= 0.5  # a power of two: their sum is 0.5 times the sum of the squares, bit for bit (no underflow)
    return r


def _np_mse_grad(r, k, out, ops):  # type: ignore[no-untyped-def]
    if out is not r:
        out[...] = r
    return out


@scalar
def mse_value(y, u, t, k, c):  # type: ignore[no-untyped-def]
    r = y - t
    return c[HALF] * r * r


@scalar
def mse_grad(r, k, c):  # type: ignore[no-untyped-def]
    return r


MSE = Loss(
    "mse", "1/2 sum_i (d_i - y_i)^2", "(y - d) phi(y) / batch", _np_mse, _np_mse_grad, mse_value, mse_grad,
    "T r = y - t; l = (T)0.5 * r * r; d = r * SLOPE / batch;", aliases=("squared_error",),
    sklearn_name="squared_error",
)


def _np_mae(y, u, t, k, ops):  # type: ignore[no-untyped-def]
    r = ops.xm.subtract(y, t, out=ops.scratch(y, "loss"))
    return ops.xm.abs(r, out=r)


def _np_mae_grad(r, k, out, ops):  # type: ignore[no-untyped-def]
    return ops.xm.sign(r, out=out)


@scalar
def mae_value(y, u, t, k, c):  # type: ignore[no-untyped-def]
    return abs(y - t)


@scalar
def mae_grad(r, k, c):  # type: ignore[no-untyped-def]
    # np.sign: 0 for 0, NaN for NaN
    return c[ONE] if r > c[ZERO] else (-c[ONE] if r < c[ZERO] else r * c[ZERO])


MAE = Loss(
    "mae", "sum_i |d_i - y_i|", "sign(y - d) phi(y) / batch", _np_mae, _np_mae_grad, mae_value, mae_grad,
    "T r = y - t; l = fabs(r); d = bp_sign(r) * SLOPE / batch;",
    aliases=("absolute_error",), sklearn_name="absolute_error",
)


def _np_huber(y, u, t, k, ops):  # type: ignore[no-untyped-def]
    # m (|r| - m / 2) with m = min(|r|, k)
    xm = ops.xm
    a = xm.subtract(y, t, out=ops.scratch(y, "loss"))
    xm.abs(a, out=a)
    m = xm.minimum(a, k, out=ops.scratch(y, "aux"))
    m *= 0.5
    a -= m
    m *= 2
    a *= m
    return a


def _np_huber_grad(r, k, out, ops):  # type: ignore[no-untyped-def]
    return ops.xm.clip(r, -k, k, out=out)


@scalar
def huber_value(y, u, t, k, c):  # type: ignore[no-untyped-def]
    r = y - t
    a = abs(r)
    return c[HALF] * r * r if a <= k else k * (a - c[HALF] * k)


@scalar
def huber_grad(r, k, c):  # type: ignore[no-untyped-def]
    return -k if r < -k else (k if r > k else r)  # np.clip; NaN passes through


HUBER = Loss(
    "huber", "sum_i h(y_i - d_i), h(r) = r^2/2 if |r| <= k else k (|r| - k/2)", "clip(y - d, -k, k) phi(y) / batch",
    _np_huber, _np_huber_grad, huber_value, huber_grad,
    "T r = y - t; T a = fabs(r); l = a <= k ? (T)0.5 * r * r : k * (a - (T)0.5 * k); "
    "d = bp_clip(r, k) * SLOPE / batch;",
    sklearn_name="huber", default_param=1.0, param_range=(0.0, float("inf")), param_name="threshold",
)


def _np_bce(y, u, t, k, ops):  # type: ignore[no-untyped-def]
    # softplus(u) - t u, the cross-entropy of sigmoid(u) against t
    s = _np_softplus(u, 0.0, ops.scratch(u, "loss"), ops)
    s -= ops.xm.multiply(t, u, out=ops.scratch(u, "aux"))
    return s


@scalar
def bce_value(y, u, t, k, c):  # type: ignore[no-untyped-def]
    return softplus_f(u, k, c) - t * u


BCE = Loss(
    "bce", "-sum_i [d_i log y_i + (1 - d_i) log(1 - y_i)], from logits", "(y - d) / batch", _np_bce, None,
    bce_value, None, "l = bp_softplus(u) - t * u; d = (y - t) / batch;", allowed_outputs=("sigmoid",), fused=True,
    aliases=("binary_cross_entropy",), targets="unit", correct_rule="threshold",
)


def _np_cross_entropy(y, u, t, k, ops):  # type: ignore[no-untyped-def]
    # sum_i t_i (lse(u) - u_i), lse by the row max
    xm = ops.xm
    batch = u.shape[0]
    s = ops.scratch(u, "loss")
    m = ops.scratch(u, "row", shape=(batch, 1))
    lse = ops.scratch(u, "row_lse", shape=(batch, 1))
    u.max(axis=1, keepdims=True, out=m)
    xm.subtract(u, m, out=s)
    xm.exp(s, out=s)
    s.sum(axis=1, keepdims=True, out=lse)
    xm.log(lse, out=lse)
    lse += m
    xm.subtract(lse, u, out=s)
    s *= t
    return s


CROSS_ENTROPY = Loss(
    "cross_entropy", "-sum_i d_i log y_i, from logits with log-sum-exp", "(y - d) / batch", _np_cross_entropy,
    None, None, None, None, allowed_outputs=("softmax",), fused=True, rowwise=True, aliases=("log_loss",),
    targets="distribution", correct_rule="argmax",
)

def _np_poisson(y, u, t, k, ops):  # type: ignore[no-untyped-def]
    # exp(u) - t u + t log t - t (y = exp(u)): half the Poisson deviance, 0 where y = t
    xm = ops.xm
    s = xm.multiply(t, u, out=ops.scratch(u, "loss"))
    xm.subtract(y, s, out=s)
    a = ops.scratch(u, "aux")
    a.fill(1)
    xm.copyto(a, t, where=xm.greater(t, 0, out=ops.scratch(u, "mask", bool)))
    xm.log(a, out=a)  # log t where t > 0; 0 elsewhere (t log t taken as 0 there, as scipy's xlogy)
    a *= t
    a -= t
    s += a
    return s


@scalar
def poisson_value(y, u, t, k, c):  # type: ignore[no-untyped-def]
    return y - t * u + (t * log(t) if t > c[ZERO] else c[ZERO]) - t


POISSON = Loss(
    "poisson", "sum_i exp(u_i) - d_i u_i + d_i log d_i - d_i (half the Poisson deviance), from logits",
    "(y - d) / batch", _np_poisson, None, poisson_value, None,
    "l = y - t * u + (t > (T)0 ? t * log(t) : (T)0) - t; d = (y - t) / batch;", allowed_outputs=("exp",),
    fused=True, sklearn_name="poisson", targets="nonnegative",
)

#: name -> record, in code order.
LOSSES: dict[str, Loss] = {loss.name: loss for loss in (MSE, MAE, HUBER, BCE, CROSS_ENTROPY, POISSON)}


# ----------------------------------------------------------------------------- derived tables
#: loss name -> the output activations it goes with (emptied whenever a record is added)
_OUTPUTS: dict[str, tuple[str, ...]] = {}


def _outputs_of(loss: Loss) -> tuple[str, ...]:
    outputs = _OUTPUTS.get(loss.name)
    if outputs is None:
        outputs = loss.allowed_outputs
        if outputs is None:
            outputs = tuple(n for n, a in ACTIVATIONS.items() if a.output)
        _OUTPUTS[loss.name] = outputs
    return outputs


def loss_outputs(name: str) -> tuple[str, ...]:
    """The output activations that loss ``name`` goes with."""
    return _outputs_of(LOSSES[name])


def _fused_pairs() -> set[tuple[str, str]]:
    return {(o, n) for n, loss in LOSSES.items() if loss.fused for o in _outputs_of(loss)}


#: Output/loss pairs whose delta is computed from the logits in one stable step.
FUSED_PAIRS: set[tuple[str, str]] = _fused_pairs()


def activation_name(name: str) -> str | None:
    """The registry name of activation ``name`` or of one of its aliases (any case); ``None`` if unknown."""
    key = name.strip().lower()
    for a in ACTIVATIONS.values():
        if key == a.name or key in a.aliases:
            return a.name
    return None


def loss_name(name: str) -> str | None:
    """The registry name of loss ``name`` or of one of its aliases (any case); ``None`` if unknown."""
    key = name.strip().lower()
    for loss in LOSSES.values():
        if key == loss.name or key in loss.aliases:
            return loss.name
    return None


# ----------------------------------------------------------------------------- additions
#: Set by a backend when it builds its dispatch from the registry: after that, the tables are closed.
_BUILT_BY: list[str] = []


def _open() -> None:
    if _BUILT_BY:
        raise RuntimeError(f"the registry is closed: backend {_BUILT_BY[0]!r} has built its kernels from it; "
                           "add activations and losses before any backend is first used")


def add_activation(record: Activation) -> None:
    """Register a new activation: every backend then computes it (call before a backend is first used)."""
    if not isinstance(record, Activation):
        raise TypeError(f"add_activation takes an Activation record, got {type(record).__name__}")
    _open()
    names = {record.name, *record.aliases}
    taken = [n for n in names if activation_name(n) is not None]
    if taken:
        raise ValueError(f"activation name {taken[0]!r} is taken")
    for fn in (record.scalar_f, record.scalar_phi):
        if fn is not None and fn not in SCALAR_FUNCTIONS:
            scalar(fn)
    # softmax stays last: the row-wise record keeps its code after every elementwise one
    items = list(ACTIVATIONS.items())
    ACTIVATIONS.clear()
    ACTIVATIONS.update([*[(n, a) for n, a in items if not a.rowwise], (record.name, record),
                        *[(n, a) for n, a in items if a.rowwise]])
    _OUTPUTS.clear()
    FUSED_PAIRS.clear()
    FUSED_PAIRS.update(_fused_pairs())


def add_loss(record: Loss) -> None:
    """Register a new loss (call before a backend is first used)."""
    if not isinstance(record, Loss):
        raise TypeError(f"add_loss takes a Loss record, got {type(record).__name__}")
    _open()
    taken = [n for n in (record.name, *record.aliases) if loss_name(n) is not None]
    if taken:
        raise ValueError(f"loss name {taken[0]!r} is taken")
    for fn in (record.scalar_value, record.scalar_grad):
        if fn is not None and fn not in SCALAR_FUNCTIONS:
            scalar(fn)
    LOSSES[record.name] = record
    _OUTPUTS.clear()
    FUSED_PAIRS.clear()
    FUSED_PAIRS.update(_fused_pairs())


def close(backend: str) -> None:
    """Called by a backend as it builds its dispatch: the tables stay as they are from now on."""
    if not _BUILT_BY:
        _BUILT_BY.append(backend)


def _code_key(code: Any) -> bytes:
    """Bytes that identify a code object's behaviour (stable across processes, unlike ``marshal``)."""
    parts = [code.co_code, repr(code.co_names).encode(), repr(code.co_varnames).encode()]
    for const in code.co_consts:
        parts.append(_code_key(const) if hasattr(const, "co_code") else repr(const).encode())
    return b"\x00".join(parts)


def registry_key() -> str:
    """A digest of every scalar form and of the codes' order: the Numba kernels that dispatch on the codes
    key their on-disk cache on it, so that a changed registry never loads a kernel compiled from another."""
    h = hashlib.sha256()
    for name in (*ACTIVATIONS, "|", *LOSSES):
        h.update(name.encode() + b"\x00")
    for fn in SCALAR_FUNCTIONS:
        h.update(fn.__name__.encode() + _code_key(fn.__code__))
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- former names
#: The record types under the names of the earlier table module.
ActivationSpec = Activation
LossSpec = Loss
