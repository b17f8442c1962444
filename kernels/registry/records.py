"""The record types of the registry, the constants they use and the scalar language of the compiled backends.

:class:`Activation` and :class:`Loss` hold, side by side, each backend's form of one activation or loss
(see :mod:`backprop.kernels.registry`).

The scalar language (Numba forms): plain Python functions of scalars in the subset that ``numba.njit``
and ``numba.cuda.jit(device=True)`` compile. They read their constants from the tuple ``c`` that
:func:`consts` makes with the arrays' dtype (``c[ONE]``, not ``1.0``, which would turn float32 math into
float64), and call ``exp``, ``expm1``, ``log1p``, ``tanh`` and ``erf`` by these names: each backend
compiles them with its own versions of those (:func:`backprop.kernels.numba_math.build`; the float32
``log1p`` of the CPU backend is accurate on ``[0, 1]`` only, where the forms call it). ``log`` and ``sqrt``
are ``math``'s everywhere. A scalar form calls another one by its name (the one defined in its module, or
imported there). Scalar forms are marked with :func:`scalar`, which lists them in the order they are defined.

CUDA C: expressions over the element type ``T`` (``float`` or ``double``), literals cast (``(T)1``);
``v`` is the pre-activation, ``y`` the output, ``u`` the pre-activation of a slope that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import sqrt
from typing import Any, Callable

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
        from . import _outputs_of  # the derived tables live beside the tables (loaded by the time this runs)

        return _outputs_of(self)

    def check_param(self, param: float) -> None:
        if self.param_range is None:
            return
        lo, hi = self.param_range
        if not lo < param < hi:
            raise ValueError(f"{self.name} {self.param_name} must lie in ({lo:g}, {hi:g}), got {param}")
