"""bp.set_num_threads / bp.limit_threads / bp.get_num_threads, and the benchmark's set_threads built on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest

import backprop as bp
from backprop import threads

tpc = pytest.importorskip("threadpoolctl")


def _blas() -> list[int]:
    return [d["num_threads"] for d in tpc.threadpool_info() if d.get("user_api") == "blas"]


def _numba() -> int | None:
    if "numba" not in sys.modules:
        try:
            import numba  # noqa: F401
        except ImportError:
            return None
    return int(sys.modules["numba"].get_num_threads())


@pytest.fixture(autouse=True)
def _restore_limits() -> Iterator[None]:
    """Whatever a test sets, the next one starts from this process's limits."""
    limiter = tpc.threadpool_limits(limits=None)  # records the current limits
    before = _numba()
    process_limit, block_limits = threads._process_limit, list(threads._block_limits)
    yield
    threads._process_limit, threads._block_limits[:] = process_limit, block_limits
    limiter.restore_original_limits()
    if before is not None:
        sys.modules["numba"].set_num_threads(before)


@pytest.mark.parametrize("n", [0, -1, -8])
def test_rejects_non_positive(n: int) -> None:
    blas, nb = _blas(), _numba()
    for call in (bp.set_num_threads, lambda n: bp.limit_threads(n).__enter__()):
        with pytest.raises(ValueError, match=r"n must be a positive int, got -?\d"):
            call(n)
    assert (_blas(), _numba()) == (blas, nb)  # nothing changed


@pytest.mark.parametrize("n", [1.0, 1.5, "2", None, True, np.float64(2.0)])
def test_rejects_non_integers(n: object) -> None:
    with pytest.raises(TypeError, match="n must be a positive int"):
        bp.set_num_threads(n)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="n must be a positive int"):
        with bp.limit_threads(n):  # type: ignore[arg-type]
            pass


def test_set_num_threads_limits_blas_and_numba() -> None:
    done = bp.set_num_threads(np.int64(1))  # NumPy integers are integers
    assert "BLAS/OpenMP via threadpoolctl" in done
    assert _blas() and set(_blas()) == {1}
    if _numba() is not None:
        assert "numba" in done and _numba() == 1
    got = bp.get_num_threads()
    assert got["blas"] == 1 and got.get("numba", 1) == 1


def test_numba_limit_is_clamped() -> None:
    numba = pytest.importorskip("numba")
    bp.set_num_threads(10_000)
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS


def test_limit_threads_restores() -> None:
    blas, nb = _blas(), _numba()
    with bp.limit_threads(1) as done:
        assert "BLAS/OpenMP via threadpoolctl" in done
        assert set(_blas()) == {1}
        if nb is not None:
            assert _numba() == 1
    assert (_blas(), _numba()) == (blas, nb)


def test_limit_threads_restores_on_exception() -> None:
    blas, nb = _blas(), _numba()
    with pytest.raises(RuntimeError, match="boom"):
        with bp.limit_threads(1):
            raise RuntimeError("boom")
    assert (_blas(), _numba()) == (blas, nb)


def test_nested_limits_restore_in_order() -> None:
    blas = _blas()
    with bp.limit_threads(2):
        outer = _blas()
        with bp.limit_threads(1):
            assert set(_blas()) == {1}
        assert _blas() == outer and max(outer) <= 2
    assert _blas() == blas


def test_without_threadpoolctl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import threadpoolctl -> ImportError
    with pytest.raises(ImportError, match=r"threadpoolctl.*pip install threadpoolctl.*backprop-kernels\[bench\]"):
        bp.set_num_threads(1)
    with pytest.raises(ImportError, match="strict=False"):
        with bp.limit_threads(1):
            pass
    nb = _numba()
    with bp.limit_threads(1, strict=False) as done:
        assert "BLAS/OpenMP via threadpoolctl" not in done
        if nb is not None:
            assert done == ["numba"] and _numba() == 1
    assert _numba() == nb
    assert set(bp.get_num_threads()) <= {"numba"}


def test_without_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_numba", lambda: None)
    with bp.limit_threads(1) as done:
        assert done == ["BLAS/OpenMP via threadpoolctl"]
    assert "numba" not in bp.get_num_threads()


def test_bench_set_threads_uses_the_same_limits() -> None:
    from backprop.bench.machine import restore_threads, set_threads

    blas, nb = _blas(), _numba()
    done = set_threads(1)
    assert "BLAS/OpenMP via threadpoolctl" in done
    assert set(_blas()) == {1}
    if nb is not None:
        assert "numba" in done and _numba() == 1
    set_threads(2)  # stacked: restore_threads undoes both
    restore_threads()
    assert (_blas(), _numba()) == (blas, nb)
    restore_threads()  # nothing left to undo: a no-op


def test_bench_set_threads_without_threadpoolctl(monkeypatch: pytest.MonkeyPatch) -> None:
    from backprop.bench.machine import restore_threads, set_threads

    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    nb = _numba()
    try:
        assert set_threads(1) == (["numba"] if nb is not None else [])  # no error, as before
    finally:
        restore_threads()
    assert _numba() == nb


def test_reapply_uses_the_limit_in_force() -> None:
    """reapply() applies the innermost open block's limit, else the process-wide one, also when that was set
    inside a block that has since closed."""
    tpc.threadpool_limits(limits=2)
    with bp.limit_threads(3):
        bp.set_num_threads(1)
        threads.reapply()
        assert max(_blas()) <= 3  # a limit is a ceiling: reapply lowers pools above it, never raises one
    # the block gave back the limits it found (2); the process-wide limit set inside it is still the one in force
    threads.reapply()
    assert _blas() and set(_blas()) == {1}


LATE_LIBRARIES = textwrap.dedent("""
    import json, sys
    import numpy as np
    import backprop as bp
    from threadpoolctl import threadpool_info
    bp.set_num_threads(1)  # before any backend loaded its libraries
    with bp.limit_threads(1):
        pass  # a block's end restores the limits it found, and leaves the process-wide limit in force
    for name in sys.argv[1:]:
        bp.MLP([8, 16, 2], backend=name, seed=0).predict(np.zeros((4, 8)))
    pools = {info["filepath"]: info["num_threads"] for info in threadpool_info()}
    numba = sys.modules.get("numba")
    print(json.dumps({"pools": pools, "numba": numba.get_num_threads() if numba else None}))
""")


@pytest.mark.parametrize("backends", [["numba"], ["numpy", "numba"]])
def test_a_limit_holds_for_libraries_loaded_later(backends: list[str]) -> None:
    """set_num_threads(1) before a backend is first used: the BLAS and OpenMP libraries that Numba and its
    kernels load afterwards (an OpenMP runtime for its threading layer, SciPy's OpenBLAS for compiled linear
    algebra) run one thread too, and so does Numba; in a fresh process, so that every library loads after the
    limit."""
    pytest.importorskip("numba")
    # the pools' own defaults: none of the variables that would set them (the suite's workers set some)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", LATE_LIBRARIES, *backends], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["pools"] and all(n == 1 for n in got["pools"].values()), got
    assert got["numba"] == 1
