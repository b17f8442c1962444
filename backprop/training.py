"""Minibatch training: epochs of shuffled batches, validation, history, progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .optimizers import SGD, Optimizer
from .validation import check_inputs, check_positive, check_targets

if TYPE_CHECKING:
    from .network import MLP

__all__ = ["History", "fit"]


@dataclass
class History:
    """Per-epoch record of a training run."""

    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return len(self.loss)

    def as_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.__dict__.items()}

    def plot(self, path: str | None = None) -> Any:
        """Draw loss (and validation curves) per epoch with matplotlib; save to ``path`` or show."""
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - matplotlib is in the test extras
            raise ImportError("History.plot needs matplotlib: pip install 'backprop[plot]'") from exc
        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = np.arange(1, self.epochs + 1)
        ax.plot(epochs, self.loss, label="training loss")
        if self.val_loss:
            ax.plot(epochs, self.val_loss, label="validation loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_yscale("log" if min(self.loss, default=1) > 0 else "linear")
        if self.val_accuracy:
            ax2 = ax.twinx()
            ax2.plot(epochs, self.val_accuracy, color="tab:green", label="validation accuracy")
            ax2.set_ylabel("accuracy")
        ax.legend(loc="upper right")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="epoch", leave=True)


def evaluate(net: MLP, X: np.ndarray, T: np.ndarray, batch_size: int = 4096) -> tuple[float, float | None]:
    """Mean loss on ``(X, T)`` (host arrays, already checked) and accuracy for classification heads."""
    k = net.backend.kernels
    total, correct = 0.0, 0
    classify = net.loss_fn.name in ("cross_entropy", "bce")
    for start in range(0, X.shape[0], batch_size):
        x = k.to_device(X[start:start + batch_size], net.dtype)
        t_host = T[start:start + batch_size]
        cache = net._forward_train(x)
        value, _ = net._output_error(cache, k.to_device(t_host, net.dtype))
        total += float(k.to_host(value)) * x.shape[0]
        if classify:
            y = k.to_host(cache[-1][0])
            if net.loss_fn.name == "cross_entropy":
                correct += int((y.argmax(1) == t_host.argmax(1)).sum())
            else:
                correct += int(((y > 0.5) == (t_host > 0.5)).all(axis=1).sum())
    n = X.shape[0]
    return total / n, (correct / n if classify else None)


Callback = Callable[["MLP", int, History], Any]


def fit(net: MLP, X: Any, T: Any, *, epochs: int = 10, batch_size: int = 32, optimizer: Optimizer | None = None,
        shuffle: bool = True, validation_data: tuple[Any, Any] | None = None, progress: bool = False,
        callbacks: Iterable[Callback] = (), schedule: Callable[[int], float] | None = None,
        seed: int | None = None) -> History:
    """Train ``net`` for ``epochs`` passes over ``(X, T)`` in minibatches of ``batch_size``.

    ``optimizer`` defaults to ``SGD(lr=0.01)``. ``schedule(epoch) -> lr`` sets the learning rate at the
    start of each epoch. A callback ``cb(net, epoch, history)`` runs after each epoch; returning ``True``
    stops training. All data is checked before any parameter changes. If the loss becomes non-finite,
    training stops with :class:`~backprop.network.NonFiniteLossError` naming the epoch and step, and the
    parameters are those of the last finite step.
    """
    from .network import NonFiniteLossError

    epochs = check_positive(epochs, "epochs", integer=True)
    batch_size = check_positive(batch_size, "batch_size", integer=True)
    optimizer = SGD(lr=0.01) if optimizer is None else optimizer
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a backprop optimizer (SGD, Adam), got {type(optimizer).__name__}")
    Xh = check_inputs(X, net.sizes[0], net.dtype)
    Th = check_targets(T, net.sizes[-1], net.loss_fn.name, Xh.shape[0], net.dtype)
    val = None
    if validation_data is not None:
        if not isinstance(validation_data, Sequence) or len(validation_data) != 2:
            raise TypeError("validation_data must be a pair (X_val, T_val)")
        Xv = check_inputs(validation_data[0], net.sizes[0], net.dtype, "X_val")
        val = (Xv, check_targets(validation_data[1], net.sizes[-1], net.loss_fn.name, Xv.shape[0], net.dtype,
                                 "T_val"))
    callbacks = list(callbacks)
    k = net.backend.kernels
    rng = np.random.default_rng(net.seed if seed is None else seed)
    n = Xh.shape[0]
    history = History()
    bar = _progress(epochs, progress)
    try:
        for epoch in range(1, epochs + 1):
            if schedule is not None:
                optimizer.lr = check_positive(schedule(epoch - 1), "scheduled learning rate")
            start = time.perf_counter()
            order = rng.permutation(n) if shuffle else np.arange(n)
            total = 0.0
            for step, lo in enumerate(range(0, n, batch_size), start=1):
                idx = order[lo:lo + batch_size]
                xb = k.to_device(Xh[idx], net.dtype)
                tb = k.to_device(Th[idx], net.dtype)
                try:
                    total += net.train_step_device(xb, tb, optimizer) * len(idx)
                except NonFiniteLossError:
                    raise NonFiniteLossError(
                        f"loss became non-finite at epoch {epoch}, step {step}; parameters are those of the "
                        f"last finite step (try a smaller learning rate)"
                    ) from None
            history.loss.append(total / n)
            history.lr.append(optimizer.lr)
            if val is not None:
                vl, va = evaluate(net, *val)
                history.val_loss.append(vl)
                if va is not None:
                    history.val_accuracy.append(va)
            history.epoch_time.append(time.perf_counter() - start)
            if bar is not None:
                post = {"loss": f"{history.loss[-1]:.4g}"}
                if history.val_loss:
                    post["val_loss"] = f"{history.val_loss[-1]:.4g}"
                if history.val_accuracy:
                    post["val_acc"] = f"{history.val_accuracy[-1]:.3f}"
                bar.set_postfix(post)
                bar.update(1)
            if any(cb(net, epoch, history) is True for cb in callbacks):
                break
    finally:
        if bar is not None:
            bar.close()
    return history
