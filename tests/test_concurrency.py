"""Sharing a network between threads (backprop.concurrency, backprop.step.Workspaces): inference from any
number of threads gives the bits of sequential calls; training from a second thread is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import numpy as np
import pytest

import backprop as bp
from backprop import step
from backprop.concurrency import ConcurrentTrainingError, _holds, exclusive, reading

from .conftest import switching_often


def _free(obj: Any) -> bool:
    """Nothing holds ``obj``: no change nor read under way."""
    h = _holds.get(obj)
    return h is None or (h.thread is None and h.depth == 0 and not h.reads)


def _mixed_calls(rng: np.random.Generator, n: int, batches: list[int], n_in: int,
                 n_out: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``n`` calls (kind, X, T), kinds and batch sizes in turn."""
    calls = []
    for i in range(n):
        rows = batches[i % len(batches)]
        T = np.eye(n_out)[rng.integers(0, n_out, rows)]
        calls.append((("predict", "loss", "forward", "loss_and_grads")[i % 4], rng.normal(size=(rows, n_in)), T))
    return calls


def _call(net: bp.MLP, kind: str, X: np.ndarray, T: np.ndarray) -> Any:
    """One inference call, its result on the host."""
    k = net.backend.kernels
    if kind == "predict":
        return net.predict(X)
    if kind == "loss":
        return net.loss(X, T)
    if kind == "forward":
        return k.to_host(net.forward(X))
    loss, grads = net.loss_and_grads(X, T)
    return [loss] + [k.to_host(a) for pair in grads for a in pair]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(np.array_equal(a, b))


def test_threads_infer_the_bits_of_sequential_calls(backend, small, rng):
    """8 threads x 50 calls (predict, loss, forward, loss_and_grads; batches of 1, 7, 64, 513 rows) on one
    network give exactly the results of the same calls made one after another. Under the CUDA simulator (a
    quarter of a second a launch) 4 threads x 3 calls on batches of 1 and 3 rows."""
    n_threads, per_thread, sizes, batches = (4, 3, [6, 8, 4], [1, 3]) if small else \
        (8, 50, [20, 64, 64, 5], [1, 7, 64, 513])
    net = bp.MLP(sizes, activation="tanh", head="multiclass", dtype="float64", seed=3, backend=backend.name)
    calls = _mixed_calls(rng, n_threads * per_thread, batches, sizes[0], sizes[-1])
    expected = [_call(net, *c) for c in calls]
    barrier = threading.Barrier(n_threads)

    def worker(start: int) -> list[Any]:
        barrier.wait()
        return [_call(net, *calls[i]) for i in range(start, len(calls), n_threads)]

    with switching_often() if not small else nullcontext(), ThreadPoolExecutor(n_threads) as pool:
        results = list(pool.map(worker, range(n_threads)))
    wrong = [i for w in range(n_threads) for i, got in zip(range(w, len(calls), n_threads), results[w])
             if not _same(got, expected[i])]
    assert not wrong, f"{len(wrong)} of {len(calls)} concurrent results differ from the sequential ones"


def test_each_thread_keeps_its_own_workspaces():
    net = bp.MLP([3, 4, 2], backend="numpy")
    mine = step.workspace(net, 5)
    assert step.workspace(net, 5) is mine and len(net.workspaces) == 1 and net.workspaces.last_batch() == 5
    other: dict[str, Any] = {}

    def elsewhere() -> None:
        other["ws"], other["count"] = step.workspace(net, 5), len(net.workspaces)

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert other["ws"] is not mine and other["count"] == 1
    assert step.workspace(net, 5) is mine
    twin = net.to_backend("numpy")
    assert len(twin.workspaces) == 0 and step.workspace(twin, 5) is not mine


def _held_fit(net: bp.MLP, X: np.ndarray, T: np.ndarray, epochs: int) -> tuple[threading.Thread, threading.Event,
                                                                                 threading.Event, dict]:
    """``net.fit`` in another thread, paused after its first epoch until the returned ``release`` is set."""
    paused, release, out = threading.Event(), threading.Event(), {}

    def pause(net_: bp.MLP, epoch: int, history: Any) -> None:
        if epoch == 1:
            paused.set()
            release.wait(30)

    def run() -> None:
        try:
            out["history"] = net.fit(X, T, epochs=epochs, batch_size=8, optimizer=bp.SGD(lr=0.05, momentum=0.9),
                                     callbacks=[pause], seed=1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    t = threading.Thread(target=run, name="trainer")
    t.start()
    assert paused.wait(30)
    return t, paused, release, out


def test_training_from_a_second_thread_is_refused(rng):
    """While one thread fits a network, another thread's train_step, fit and set_params raise at once, changing
    nothing, and inference still runs; the fit ends with the parameters it would have reached alone."""
    X, T = rng.normal(size=(40, 4)), rng.normal(size=(40, 2))
    net = bp.MLP([4, 6, 2], dtype="float64", seed=0, backend="numpy")
    alone = bp.MLP([4, 6, 2], dtype="float64", seed=0, backend="numpy")
    alone.fit(X, T, epochs=3, batch_size=8, optimizer=bp.SGD(lr=0.05, momentum=0.9), seed=1)
    t, _, release, out = _held_fit(net, X, T, epochs=3)
    try:
        paused_params = net.get_params()
        for what, call in [("MLP.train_step", lambda: net.train_step(X, T, bp.SGD())),
                           ("fit", lambda: net.fit(X, T, epochs=1)),
                           ("MLP.set_params", lambda: net.set_params(paused_params))]:
            with pytest.raises(ConcurrentTrainingError, match=rf"^{what}: this MLP is being changed by fit in "
                                                              r"thread 'trainer'"):
                call()
        for (W, b), (W0, b0) in zip(net.get_params(), paused_params):
            np.testing.assert_array_equal(W, W0)
            np.testing.assert_array_equal(b, b0)
        assert net.predict(X).shape == (40, 2)
    finally:
        release.set()
        t.join(30)
    assert "error" not in out
    for (W, b), (W1, b1) in zip(net.get_params(), alone.get_params()):
        np.testing.assert_array_equal(W, W1)
        np.testing.assert_array_equal(b, b1)
    net.train_step(X, T, bp.SGD())  # free again
    assert _free(net)


def test_the_training_thread_may_step_inside_its_own_fit(rng):
    X, T = rng.normal(size=(16, 3)), rng.normal(size=(16, 1))
    net = bp.MLP([3, 4, 1], backend="numpy")
    losses = []
    net.fit(X, T, epochs=2, callbacks=[lambda n, e, h: losses.append(n.train_step(X, T, bp.SGD(lr=0.01)))])
    assert len(losses) == 2 and _free(net)


def test_a_change_waits_for_reads_under_way_and_refuses_new_ones():
    class Model:
        pass

    model, log = Model(), []
    reading_now, release = threading.Event(), threading.Event()

    def reader() -> None:
        with reading(model, "predict"):
            log.append("read")
            reading_now.set()
            release.wait(30)
            log.append("read done")

    def changer() -> None:
        with exclusive(model, "fit"):
            log.append("change")

    r = threading.Thread(target=reader)
    r.start()
    assert reading_now.wait(30)
    c = threading.Thread(target=changer, name="changer")
    c.start()
    while _holds[model].thread is None:  # the change has claimed the model and waits for the read
        threading.Event().wait(0.001)
    with pytest.raises(ConcurrentTrainingError, match="^predict: this Model is being changed by fit in thread "
                                                      "'changer'"):
        with reading(model, "predict"):
            pass
    c.join(0.3)
    assert c.is_alive() and log == ["read"]
    release.set()
    r.join(30)
    c.join(30)
    assert log == ["read", "read done", "change"] and _free(model)


def test_numba_kernels_release_the_gil():
    pytest.importorskip("numba")
    from backprop.kernels import numba_cpu

    for kernel in numba_cpu.KERNELS:
        assert kernel.targetoptions.get("nogil") is True, kernel


def test_numba_threads_under_the_workqueue_layer():
    """Numba's workqueue layer aborts the process when two threads run parallel kernels at once: under it the
    kernels run one at a time, and threaded inference still gives the sequential bits."""
    pytest.importorskip("numba")
    script = textwrap.dedent("""
        import threading, numpy as np, backprop as bp
        net = bp.MLP([8, 16, 3], head="multiclass", backend="numba", dtype="float64")
        X = [np.random.default_rng(i).normal(size=(1 + i % 9, 8)) for i in range(200)]
        want = [net.predict(x) for x in X]
        got = [None] * len(X)
        def work(w):
            for i in range(w, len(X), 4):
                got[i] = net.predict(X[i])
        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        import numba
        assert numba.threading_layer() == "workqueue", numba.threading_layer()
        assert all(np.array_equal(a, b) for a, b in zip(want, got))
        print("ok")
    """)
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", BACKPROP_QUIET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_threaded_inference_benchmark_writes_its_table(tmp_path):
    """benchmarks/threaded_inference.py on a tiny budget: a row per net, framework and call, in JSON and Markdown."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "threaded_inference.py"
    spec = importlib.util.spec_from_file_location("threaded_inference", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "t.json"
    try:
        assert module.main(["--backends", "numpy", "--batch", "4", "--rounds", "1", "--seconds", "0.001",
                            "--json", str(out)]) == 0
    finally:
        from backprop.bench.machine import restore_threads

        restore_threads()
    import json

    rows = json.loads(out.read_text())["rows"]
    assert {(r["net"], r["framework"], r["call"]) for r in rows} >= {
        (n, "backprop numpy", c) for n in module.NETS for c in ("predict", "forward_device")}
    assert all(r["speedup"] > 0 and r["calls"] >= 2 for r in rows)
    assert "| narrow_deep | backprop numpy | predict |" in out.with_suffix(".md").read_text()
