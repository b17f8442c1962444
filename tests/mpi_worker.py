"""The processes of the distributed tests: ``mpiexec -n N python -m tests.mpi_worker MODE OUT [CASES]``.

``train``: every case of the JSON list ``CASES`` trained with ``fit(distributed=True)``; each rank writes
its parameters and history to ``OUT/rank<r>.npz``. ``mismatch``: rank 1 passes another batch size, then
other data, then epochs=0; every rank writes the errors it got. ``fail``: rank 1's callback raises in
epoch 2 (the job must end with an error). ``hang``: rank 1 sleeps outside ``fit`` (the watchdog must end
the job). The tests build the single-process reference with :func:`build` too, so both sides train the
same network on the same data.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Rows of the shared data set: 95, of which fit's validation_split=0.1 keeps 85 for training, so that with
#: batch 7 the last step of 2 ranks (14 rows each) and of 3 ranks (21 rows) holds a single row.
ROWS, FEATURES, CLASSES = 95, 5, 3


def data(rows: int = ROWS) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(rows, FEATURES)), rng.integers(0, CLASSES, size=rows)


def build(case: dict[str, Any]) -> tuple[Any, Any]:
    """The network and optimizer of ``case`` (backend, optimizer, dtype, ...)."""
    import backprop as bp

    net = bp.MLP([FEATURES, 8, 6, CLASSES], activation=case.get("activation", "tanh"), head="multiclass",
                 dtype=case.get("dtype", "float64"), seed=case.get("net_seed", 3), backend=case["backend"])
    opt = {"sgd": lambda: bp.SGD(0.1),
           "momentum": lambda: bp.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
           "adam": lambda: bp.Adam(1e-2, weight_decay=1e-3)}[case["optimizer"]]()
    return net, opt


def fit_options(case: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """The options of ``fit`` for ``case`` with ``batch_size`` rows a step (per rank, when distributed)."""
    return dict(epochs=case.get("epochs", 3), batch_size=batch_size, shuffle=case.get("shuffle", True),
                validation_split=0.1, seed=case.get("seed", 5))


def _train(comm: Any, out: Path, cases: list[dict[str, Any]]) -> None:
    saved: dict[str, np.ndarray] = {}
    for i, case in enumerate(cases):
        X, y = data(case.get("rows", ROWS))
        net, opt = build(case)
        history = net.fit(X, y, distributed=True, optimizer=opt, **fit_options(case, case["batch_size"]))
        saved[f"params{i}"] = np.array(net.backend.kernels.to_host(net.params), dtype=np.float64)
        saved[f"loss{i}"] = np.array(history.loss)
        saved[f"val_loss{i}"] = np.array(history.val_loss)
    np.savez(out / f"rank{comm.rank}.npz", **saved)


def main(argv: list[str]) -> None:
    import backprop as bp

    mode, out = argv[0], Path(argv[1])
    comm = bp.distributed.init(timeout=float(argv[2]) if mode == "hang" else bp.distributed.DEFAULT_TIMEOUT)
    if mode == "train":
        _train(comm, out, json.loads(argv[2]))
        return
    X, y = data()
    net, opt = build({"backend": "numpy", "optimizer": "sgd"})
    if mode == "mismatch":  # another batch size on rank 1, then other data there
        said = []
        for batch, Xr, epochs in ((7 + comm.rank, X, 1), (7, X + 1e-3 * comm.rank, 1), (7, X, 1 - comm.rank)):
            try:
                net.fit(Xr, y, epochs=epochs, batch_size=batch, optimizer=opt, distributed=True)
                said.append("no error")
            except Exception as exc:
                said.append(f"{type(exc).__name__}: {exc}")
        (out / f"rank{comm.rank}.json").write_text(json.dumps(said))
        return
    if mode == "fail":
        def fails_on_rank_1(net: Any, epoch: int, history: Any) -> None:
            if comm.rank == 1 and epoch == 2:
                raise RuntimeError("rank 1's callback fails in epoch 2")

        net.fit(X, y, epochs=50, batch_size=7, optimizer=opt, distributed=True, callbacks=[fails_on_rank_1])
        (out / f"finished{comm.rank}").write_text("fit returned")
        return
    if mode == "hang":
        if comm.rank == 1:
            time.sleep(60)  # never joins fit's first collective
        net.fit(X, y, epochs=1, batch_size=7, optimizer=opt, distributed=True)
        return
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
