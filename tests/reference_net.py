"""The float64 reference of a whole network's passes, shared by the tests of the fused narrow-network kernels
(the GPU twin's in ``test_fused_mlp``, the Numba CPU backend's in ``test_numba_fused_mlp``)."""

from __future__ import annotations

import numpy as np

from backprop.kernels import numpy_ref as ref
from backprop.kernels.registry import ACTIVATIONS

#: Alphas other than the registry's defaults, so that a kernel that ignores the alpha it is given shows.
ALPHA = {"leaky_relu": 0.05, "elu": 0.7}


def alpha_of(act: str) -> float:
    return ALPHA.get(act, ACTIVATIONS[act].default_alpha)


class Net:
    """A random network of ``sizes`` and activations ``acts`` in the flat parameter layout, with its
    reference passes (``numpy_ref`` in float64 on the parameters rounded to ``dtype``)."""

    def __init__(self, rng, sizes, acts, dtype):
        self.sizes, self.acts, self.dtype = list(sizes), list(acts), dtype
        self.W = [(rng.normal(size=(o, i)) / np.sqrt(i)).astype(dtype).astype(np.float64)
                  for i, o in zip(sizes[:-1], sizes[1:])]
        self.b = [(0.1 * rng.normal(size=o)).astype(dtype).astype(np.float64) for o in sizes[1:]]
        self.alphas = np.array([alpha_of(a) if a in ACTIVATIONS else 0.0 for a in acts])
        self.keep_u = [ACTIVATIONS[a].needs_u or i == len(acts) - 1 for i, a in enumerate(acts)]

    @property
    def params(self) -> np.ndarray:
        """``[W^1 | ... | W^L | b^1 | ... | b^L]``, flat, in float64."""
        return np.concatenate([W.ravel() for W in self.W] + list(self.b))

    def forward(self, x):
        """Each layer's ``y`` and ``u``."""
        ys, us = [], []
        for W, b, act, alpha in zip(self.W, self.b, self.acts, self.alphas):
            x, u = ref.layer_forward(x, W, b, act, alpha, True)
            ys.append(x)
            us.append(u)
        return ys, us

    def backward(self, x, ys, us, delta):
        """The flat gradients (the parameters' layout) from ``delta^L``."""
        dW, db = [None] * len(self.W), [None] * len(self.W)
        for i in range(len(self.W) - 1, -1, -1):
            dW[i], db[i] = ref.weight_gradients(delta, ys[i - 1] if i else x)
            if i:
                delta = ref.delta_backward(delta, self.W[i], ys[i - 1], us[i - 1], self.acts[i - 1], self.alphas[i - 1])
        return np.concatenate([g.ravel() for g in dW] + db)
