"""backprop: backpropagation for multilayer perceptrons, with fused kernels on CPU and GPU.

>>> import backprop as bp
>>> net = bp.MLP([2, 4, 1], activation="tanh", output="sigmoid", loss="bce", seed=0)
"""

from __future__ import annotations

from . import callbacks, datasets, distributed, schedules
from .activations import ACTIVATIONS, Activation
from .backend import Backend, available_backends, get_backend, set_backend, use_backend
from .concurrency import ConcurrentTrainingError
from .gradcheck import gradcheck, numerical_grads
from .losses import HEADS, LOSSES, Loss
from .network import MLP, Layer, NonFiniteLossError
from .lbfgs import LBFGS
from .optimizers import SGD, Adam, Optimizer
from .perceptron import Perceptron
from .threads import get_num_threads, limit_threads, set_num_threads
from .training import History

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "HEADS",
    "LBFGS",
    "LOSSES",
    "MLP",
    "SGD",
    "Activation",
    "Adam",
    "Backend",
    "ConcurrentTrainingError",
    "History",
    "Layer",
    "Loss",
    "NonFiniteLossError",
    "Optimizer",
    "Perceptron",
    "available_backends",
    "callbacks",
    "datasets",
    "distributed",
    "schedules",
    "get_backend",
    "get_num_threads",
    "gradcheck",
    "limit_threads",
    "numerical_grads",
    "set_backend",
    "set_num_threads",
    "use_backend",
]
