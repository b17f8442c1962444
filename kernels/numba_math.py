"""Scalar math shared by the Numba backends: one source for the CPU and the CUDA kernels.

The activations and losses are the scalar forms of :mod:`backprop.kernels.registry`; the optimizer
updates are written here. All are plain Python in the subset that both ``numba.njit`` and
``numba.cuda.jit(device=True)`` compile. :func:`build` compiles them with the decorator it is given
and returns the compiled helpers, with the dispatch on codes generated from the registry
(:func:`dispatch`): :mod:`backprop.kernels.numba_cpu` builds them with ``njit`` and
:mod:`backprop.kernels.numba_cuda` with ``cuda.jit(device=True)``. Importing this module imports no
Numba, and closes the registry (the codes are numbered once).

Activations and losses are dispatched by an integer code (:data:`ACT_CODES`, :data:`LOSS_CODES`)
inside one kernel, so each kernel is compiled once per dtype instead of once per activation and dtype.

Precision: every constant is made with the dtype of the kernel's arrays (``consts(a)`` returns
a tuple of ``a.dtype.type`` scalars) and the ``math`` functions follow their argument's type in
Numba (``math.exp`` of a float32 is ``expf``), so float32 kernels compute in float32 throughout.
Mixing a bare Python literal such as ``0.5`` into float32 arithmetic would promote to float64:
write ``c[HALF]`` instead.

Numba's on-disk cache (``cache=True``) is keyed on the source file of a kernel, not on this module
nor the registry: the CPU kernels that dispatch on the codes therefore close over a key that includes
:data:`REGISTRY_KEY`, a digest of every scalar form, which Numba's cache index includes. After editing
the optimizer steps here, delete the ``*.nbi``/``*.nbc`` files in ``kernels/numba_cpu/__pycache__`` (an
installed package is rewritten as a whole, so users are not affected).
"""

from __future__ import annotations

import math
from types import FunctionType, SimpleNamespace
from typing import Any, Callable

from . import registry as r
from .registry import HALF, INV_SQRT2, INV_SQRT_2PI, NAN, ONE, S_ALPHA, S_LAMBDA, S_LAMBDA_ALPHA, ZERO  # noqa: F401

# ----------------------------------------------------------------------------- codes
#: Activation name -> code, in the registry's order. The registry is closed from here on.
ACT_CODES: dict[str, int] = {name: i for i, name in enumerate(r.ACTIVATIONS)}
LOSS_CODES: dict[str, int] = {name: i for i, name in enumerate(r.LOSSES)}
r.close("numba")
#: Activations whose slope reads the pre-activation ``u`` rather than the output ``y``.
NEEDS_U = frozenset(ACT_CODES[n] for n, a in r.ACTIVATIONS.items() if a.needs_u)
#: ``f(u) = u``: no pass, no slope.
LINEAR = frozenset(ACT_CODES[n] for n, a in r.ACTIVATIONS.items() if a.linear)
#: The row-wise pair, computed by hand in the kernels: softmax, and cross-entropy from its logits.
SOFTMAX = ACT_CODES["softmax"]
CROSS_ENTROPY = LOSS_CODES["cross_entropy"]
#: The digest of the registry that the dispatching CPU kernels key their on-disk cache on.
REGISTRY_KEY = r.registry_key()


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


#: (output, loss) -> (loss code, activation code, fused, needs u) for every pair that goes together
_PAIRS = {(o, loss): (LOSS_CODES[loss], ACT_CODES[o], rec.fused, rec.fused or r.ACTIVATIONS[o].needs_u)
          for loss, rec in r.LOSSES.items() for o in r.loss_outputs(loss)}


def output_loss_codes(output: str, loss: str, has_u: bool) -> tuple[int, int, bool]:
    """``(loss code, activation code, fused)`` of an output/loss pair, checked: the fused pairs and the
    activations whose slope reads ``u`` need the logits ``u``, and a row-wise output goes with its fused
    loss only."""
    pair = _PAIRS.get((output, loss))
    if pair is None:
        loss_code(loss), act_code(output)  # an unknown name is named as such
        raise ValueError(f"output {output!r} does not go with loss {loss!r}; "
                         f"{loss!r} takes outputs: {', '.join(r.loss_outputs(loss))}")
    lcode, acode, fused, needs_u = pair
    if needs_u and not has_u:
        raise ValueError(f"{output}/{loss} needs the output logits u")
    return lcode, acode, fused


# ----------------------------------------------------------------------------- dispatch
def dispatch(jit: Callable[[Callable], Any], name: str, params: str, cases: dict[int, Callable | None],
             default: Callable) -> Any:
    """Compile ``name(params)``, a ladder on its parameter ``code``: ``if code == k: return cases[k](...)``
    with every parameter but ``code`` (``return`` alone when ``cases[k]`` is ``None``), else
    ``default(...)`` with all of them. The source is generated, so that one branch per record needs no
    hand-written code, and an unknown code reaches ``default``, never another record's formula."""
    names = [p.strip() for p in params.split(",")]
    args = ", ".join(n for n in names if n != "code")
    env: dict[str, Any] = {"_default": default}
    lines = [f"def {name}({params}):"]
    for k, fn in cases.items():
        if fn is None:
            lines.append(f"    if code == {k}:\n        return")
        else:
            env[f"_case{k}"] = fn
            lines.append(f"    if code == {k}:\n        return _case{k}({args})")
    lines.append(f"    return _default({params})")
    exec("\n".join(lines), env)  # noqa: S102 - source built above from integers and fixed names
    return jit(env[name])


def _rebind(fn: Callable, names: dict[str, Any]) -> Callable:
    """``fn`` with ``names`` replacing its globals: the same code, calling the backend's math and the
    compiled scalar forms."""
    g = {**fn.__globals__, **names}
    return FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)


def _nan_activate(v, code, alpha, c):  # type: ignore[no-untyped-def]
    return c[NAN]  # an unknown code never falls through to a formula: NaN, which the step's guard refuses


def _nan_slope(y, u, code, alpha, c):  # type: ignore[no-untyped-def]
    return c[NAN]


def _nan_loss(y, u, t, code, k, c):  # type: ignore[no-untyped-def]
    return c[NAN]


def _nan_grad(r, code, k, c):  # type: ignore[no-untyped-def]
    return c[NAN]


def _make(jit: Callable[[Callable], Any], exp: Any, tanh: Any, expm1: Any, log1p: Any) -> SimpleNamespace:
    # every scalar form of the registry, compiled in order with the backend's math; a form calls the
    # compiled forms defined before it
    names: dict[str, Any] = {"exp": exp, "tanh": tanh, "expm1": expm1, "log1p": log1p}
    compiled: dict[Any, Any] = {}
    for fn in r.SCALAR_FUNCTIONS:
        compiled[fn] = names[fn.__name__] = jit(_rebind(fn, names))
    acts = [(ACT_CODES[n], a) for n, a in r.ACTIVATIONS.items() if not a.rowwise]
    losses = [(LOSS_CODES[n], x) for n, x in r.LOSSES.items() if not x.rowwise]
    activate = dispatch(jit, "activate", "v, code, alpha, c", {k: compiled[a.scalar_f] for k, a in acts},
                        jit(_nan_activate))
    slope = dispatch(jit, "slope", "y, u, code, alpha, c", {k: compiled[a.scalar_phi] for k, a in acts},
                     jit(_nan_slope))
    elementwise_loss = dispatch(jit, "elementwise_loss", "y, u, t, code, k, c",
                                {k: compiled[x.scalar_value] for k, x in losses}, jit(_nan_loss))
    loss_grad = dispatch(jit, "loss_grad", "r, code, k, c",
                         {k: compiled[x.scalar_grad] for k, x in losses if x.scalar_grad is not None},
                         jit(_nan_grad))

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
        consts=compiled[r.consts], activate=activate, slope=slope, elementwise_loss=elementwise_loss,
        loss_grad=loss_grad, activations={a.name: (compiled[a.scalar_f], compiled[a.scalar_phi]) for _, a in acts},
        losses={x.name: (compiled[x.scalar_value], compiled.get(x.scalar_grad)) for _, x in losses},
    )


def build(jit: Callable[[Callable], Any], exp: Any = math.exp, tanh: Any = math.tanh, expm1: Any = math.expm1,
          log1p: Any = math.log1p) -> SimpleNamespace:
    """Compile the scalar helpers with ``jit`` (a decorator) and return them in a namespace.

    ``exp``, ``tanh``, ``expm1`` and ``log1p`` are the functions they call: ``math``'s by default;
    the CPU backend passes float32 versions that LLVM can vectorize (``log1p`` is only ever
    called on ``[0, 1]``)."""
    return _make(jit, exp, tanh, expm1, log1p)
