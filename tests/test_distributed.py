"""Data-parallel training (backprop.distributed): sharding, the engines, and real ``mpiexec`` runs of 2 and 3
processes against one process training on the concatenated batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import backprop as bp
from backprop import distributed as dist
from backprop.kernels.contract import Capabilities
from backprop.staging import Batches

from .mpi_worker import build, data, fit_options

ROOT = Path(__file__).resolve().parents[1]


def _mpi():
    try:
        return dist._mpi()
    except ImportError as exc:
        pytest.skip(str(exc))


def _mpiexec() -> str:
    _mpi()
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec (pip install mpich)")
    return found


def _run(n: int, *args: str, timeout: float = 900, simulator: bool = False) -> subprocess.CompletedProcess[str]:
    """``mpiexec -n n python -m tests.mpi_worker *args``, one thread per rank (``simulator``: numba-cuda under
    the CUDA simulator)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.run([_mpiexec(), "-n", str(n), sys.executable, "-m", "tests.mpi_worker", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_rows_of_rank_split_every_global_batch(size):
    for total in range(1, 4 * size + 2):
        counts = [dist.rows_of_rank(total, r, size) for r in range(size)]
        assert counts == [len(range(r, total, size)) for r in range(size)]
        assert sum(counts) == total


@pytest.mark.parametrize("size,n,batch", [(2, 29, 4), (3, 25, 4), (3, 24, 4), (4, 9, 3), (1, 10, 3)])
@pytest.mark.parametrize("shuffled", [True, False])
def test_each_step_of_the_ranks_is_the_global_minibatch(size, n, batch, shuffled):
    """The ranks' rows of step s are rows s*size*batch ... of the epoch's order: the minibatch one process
    with batch size*batch takes (row i of X holds i, so the gathered rows name themselves)."""
    k = bp.get_backend().kernels
    X = np.arange(n, dtype=np.float64).reshape(n, 1)
    order = np.random.default_rng(0).permutation(n) if shuffled else None
    expected = order if shuffled else np.arange(n)
    steps = []
    for r in range(size):
        parallel = dist.DataParallel(SimpleNamespace(rank=r, size=size), SimpleNamespace(backend=bp.get_backend()))
        batches = Batches(k, X, X, np.float64)
        staging = lambda rows: (k.zeros((rows, 1), np.float64), k.zeros((rows, 1), np.float64))  # noqa: E731
        steps.append([(total, rows, None if x is None else k.to_host(x)[:, 0].astype(int).tolist())
                      for total, rows, x, _ in parallel.epoch(batches, batch, order, staging)])
    assert len({len(s) for s in steps}) == 1 and len(steps[0]) == -(-n // (size * batch))
    for s, per_rank in enumerate(zip(*steps)):
        lo = s * size * batch
        total = min(size * batch, n - lo)
        assert all(t == total for t, _, _ in per_rank)
        taken = sorted(i for _, rows, idx in per_rank for i in (idx or []))
        assert taken == sorted(expected[lo:lo + total].tolist())
        assert [rows for _, rows, _ in per_rank] == [dist.rows_of_rank(total, r, size) for r in range(size)]


# --------------------------------------------------------------------------- one process
def test_without_init_a_process_is_rank_0_of_1():
    if not dist.is_initialized():
        assert (dist.rank(), dist.size()) == (0, 1)


def test_bad_distributed_values_fail_before_training():
    X, y = data()
    net, opt = build({"backend": "numpy", "optimizer": "sgd"})
    before = net.params.copy()
    with pytest.raises(TypeError, match="distributed must be True, False or"):
        net.fit(X, y, epochs=1, optimizer=opt, distributed="yes")
    assert np.array_equal(net.params, before)


def test_one_rank_trains_as_no_distribution_at_all():
    """A communicator of one process: the same parameters, bit for bit, as a plain fit."""
    MPI = _mpi()
    comm = dist.Communicator(MPI.COMM_SELF)
    X, y = data()
    for case in ({"backend": "numpy", "optimizer": "adam"}, {"backend": "numba", "optimizer": "momentum"}):
        try:
            a, opt_a = build(case)
        except ValueError as exc:
            pytest.skip(str(exc))
        b, opt_b = build(case)
        ha = a.fit(X, y, optimizer=opt_a, distributed=comm, **fit_options(case, 7))
        hb = b.fit(X, y, optimizer=opt_b, **fit_options(case, 7))
        assert np.array_equal(a.params, b.params)
        assert ha.loss == hb.loss and ha.val_loss == hb.val_loss


def test_distributed_rejects_lbfgs_and_graphs_on_every_rank():
    MPI = _mpi()
    comm = dist.Communicator(MPI.COMM_SELF)
    X, y = data()
    net, opt = build({"backend": "numpy", "optimizer": "sgd"})
    with pytest.raises(ValueError, match="not LBFGS"):
        net.fit(X, y, optimizer=bp.LBFGS(), distributed=comm)
    with pytest.raises(ValueError, match="does not replay CUDA graphs"):
        net.fit(X, y, optimizer=opt, graph=True, distributed=comm)


def test_timeout_must_be_positive():
    _mpi()
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            dist.Communicator(timeout=bad)
    for bad in ("60", True, [1]):
        with pytest.raises(TypeError, match="timeout must be a number of seconds or None"):
            dist.Communicator(timeout=bad)


# --------------------------------------------------------------------------- engines
def test_engine_choice():
    """Host arrays go to MPI as they are; a GPU backend's hook is used, and without one (or when it cannot
    start) the arrays go through the host, with a warning."""
    MPI = _mpi()
    comm = dist.Communicator(MPI.COMM_SELF)
    gpu, nccl = Capabilities(gpu=True), Capabilities(gpu=True, collectives=True)
    host = SimpleNamespace(NAME="host", CAPABILITIES=Capabilities())
    assert isinstance(comm.engine(host), dist._HostEngine)
    engine = object()
    hooked = SimpleNamespace(NAME="hooked", CAPABILITIES=nccl, collective=lambda size, rank, share: engine,
                             copy_into=None)
    assert comm.engine(hooked) is engine

    def cannot(size, rank, share):
        raise ImportError("no NCCL")

    for module in (SimpleNamespace(NAME="no-nccl", CAPABILITIES=nccl, collective=cannot, copy_into=lambda d, s: None),
                   SimpleNamespace(NAME="no-hook", CAPABILITIES=gpu, copy_into=lambda d, s: None)):
        with pytest.warns(RuntimeWarning, match="through the host"):
            assert isinstance(comm.engine(module), dist._StagedEngine)


def test_nccl_engine_calls(monkeypatch):
    """The cupy hook: rank 0's NCCL id is shared, then each sum or broadcast is one NCCL call on the current
    stream with the arrays' addresses, sizes and types (a stand-in NCCL records them: no GPU here)."""
    from backprop.kernels import cupy_gpu

    calls = []

    class Comm:
        def __init__(self, size, uid, rank):
            calls.append(("init", size, uid, rank))

        def allReduce(self, *args):
            calls.append(("allReduce", *args))

        def bcast(self, *args):
            calls.append(("bcast", *args))

    nccl = SimpleNamespace(NCCL_FLOAT32=7, NCCL_FLOAT64=8, NCCL_SUM=0, NcclCommunicator=Comm,
                           get_unique_id=lambda: "uid-of-rank-0")
    fake_cupy = SimpleNamespace(cuda=SimpleNamespace(get_current_stream=lambda: SimpleNamespace(ptr=99)))
    monkeypatch.setattr(cupy_gpu.collectives, "_nccl", lambda: nccl)
    monkeypatch.setattr(cupy_gpu.collectives, "_cupy", fake_cupy)

    def array(ptr, n, dtype):
        return SimpleNamespace(data=SimpleNamespace(ptr=ptr), size=n, dtype=np.dtype(dtype))

    engine = cupy_gpu.collective(3, 2, lambda v: "uid-of-rank-0" if v is None else pytest.fail("rank 2 made an id"))
    recv, send = array(1000, 12, "float64"), array(2000, 12, "float64")
    engine.all_reduce(recv)
    engine.all_reduce(recv, send)
    engine.broadcast(array(3000, 5, "float32"), root=0)
    assert calls == [("init", 3, "uid-of-rank-0", 2), ("allReduce", 1000, 1000, 12, 8, 0, 99),
                     ("allReduce", 2000, 1000, 12, 8, 0, 99), ("bcast", 3000, 5, 7, 0, 99)]
    with pytest.raises(ValueError, match="float32 or float64"):
        engine.all_reduce(array(1, 2, "float16"))


# --------------------------------------------------------------------------- mpiexec runs
CASES = [dict(backend=b, optimizer=o, batch_size=7) for b in ("numpy", "numba") for o in ("sgd", "momentum", "adam")]
CASES[1]["shuffle"] = False
CASES[4]["activation"] = "relu"


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_ranks_train_as_one_process_with_the_concatenated_batch(n, tmp_path):
    """N ranks with batch B reach the parameters of one process with batch N*B (to 1e-6 relative; in fact
    to rounding), the same on every rank bit for bit, with SGD, momentum and Adam on numpy and numba; the
    last step of each epoch leaves some ranks without rows."""
    cases = [c for c in CASES if c["backend"] in bp.available_backends()]
    out = _run(n, "train", str(tmp_path), json.dumps(cases))
    assert out.returncode == 0, out.stdout + out.stderr
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(n)]
    X, y = data()
    for i, case in enumerate(cases):
        net, opt = build(case)
        history = net.fit(X, y, optimizer=opt, **fit_options(case, n * case["batch_size"]))
        one = np.asarray(net.params, dtype=np.float64)
        for r, saved in enumerate(ranks):
            assert np.array_equal(saved[f"params{i}"], ranks[0][f"params{i}"]), (case, r)
        rel = np.max(np.abs(ranks[0][f"params{i}"] - one)) / np.max(np.abs(one))
        assert rel <= 1e-6, (case, rel)
        np.testing.assert_allclose(ranks[0][f"loss{i}"], history.loss, rtol=1e-9)
        np.testing.assert_allclose(ranks[0][f"val_loss{i}"], history.val_loss, rtol=1e-9)


@pytest.mark.slow
def test_a_gpu_backend_without_collectives_reduces_through_the_host(tmp_path):
    """numba-cuda (under the CUDA simulator here) has no device collectives: its arrays go through the host, with
    a warning, and 2 ranks still reach one process's parameters with the doubled batch."""
    try:
        bp.backend.resolve_backend("numba-cuda")
    except ValueError as exc:
        pytest.skip(str(exc))
    if not bp.backend.resolve_backend("numba-cuda").is_simulated:
        pytest.skip("runs on the CUDA simulator; a real GPU takes the GPU tests")
    # 40 rows: 36 to train on, 14 a step over the ranks, the last step 8 (a simulated launch costs a lot)
    case = {"backend": "numba-cuda", "optimizer": "adam", "batch_size": 7, "epochs": 1, "rows": 40}
    out = _run(2, "train", str(tmp_path), json.dumps([case]), simulator=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reducing through the host" in out.stderr
    X, y = data(case["rows"])
    net, opt = build(case)
    net.fit(X, y, optimizer=opt, **fit_options(case, 14))
    got = [np.load(tmp_path / f"rank{r}.npz")["params0"] for r in range(2)]
    assert np.array_equal(got[0], got[1])
    one = net.backend.kernels.to_host(net.params)
    assert np.max(np.abs(got[0] - one)) / np.max(np.abs(one)) <= 1e-6


@pytest.mark.slow
def test_ranks_that_disagree_all_raise(tmp_path):
    """Different options or data on one rank, or a check failing there alone: every rank raises, none hangs."""
    out = _run(2, "mismatch", str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for r in range(2):
        batch, data_, epochs = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert "DistributedError" in batch and "batch_size" in batch and "rank 0: 7, rank 1: 8" in batch, batch
        assert "DistributedError" in data_ and "the ranks disagree on data_checksum" in data_, data_
    # a check that fails on rank 1 alone: its own error there, the same failure named on rank 0
    assert json.loads((tmp_path / "rank1.json").read_text())[2].startswith("ValueError: epochs")
    epochs = json.loads((tmp_path / "rank0.json").read_text())[2]
    assert epochs.startswith("DistributedError: fit's checks failed on rank 1 of 2: ValueError: epochs"), epochs


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_with_an_error(tmp_path):
    """Rank 1's callback raises in epoch 2 of 50: the job ends (no hang), with a non-zero status and a message
    naming the rank and the error, and no rank finishes fit."""
    out = _run(2, "fail", str(tmp_path), timeout=300)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "rank 1 of 2" in text and "rank 1's callback fails in epoch 2" in text, text
    assert not list(tmp_path.glob("finished*"))


@pytest.mark.slow
def test_a_rank_that_never_comes_ends_the_job_after_the_timeout(tmp_path):
    out = _run(2, "hang", str(tmp_path), "3", timeout=300)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "waited more than 3 s for the other ranks" in text and "rank 0 of 2" in text, text


def test_checkpoints_are_written_by_rank_0_only(tmp_path, monkeypatch):
    X, y = data()
    for r, written in ((1, False), (0, True)):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        net, opt = build({"backend": "numpy", "optimizer": "sgd"})
        path = tmp_path / f"as-rank-{r}.npz"
        net.fit(X, y, epochs=1, optimizer=opt, callbacks=[bp.callbacks.checkpoint(path)])
        assert path.exists() is written
