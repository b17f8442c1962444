"""The scripts in examples/ run, quickly, and do what they say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "1"}
    return subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120,
                          env=env)


def test_xor_is_learned_by_a_2_2_1_network():
    out = run("xor.py")
    assert out.returncode == 0, out.stdout + out.stderr
    for activation in ("tanh", "sigmoid"):
        assert f"{activation}: solved with seed" in out.stdout
    for x, t in (((0, 0), 0), ((0, 1), 1), ((1, 0), 1), ((1, 1), 0)):
        assert f"x = {x}  target {t}" in out.stdout


def test_perceptron_separates_a_separable_set_and_not_xor():
    out = run("perceptron.py")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "converged=True" in out.stdout and "training accuracy 1.000" in out.stdout
    assert "XOR: converged=False" in out.stdout


def test_two_ranks_train_as_one_process_with_the_whole_minibatch():
    """The README's data-parallel command (with --check): 2 ranks end where one process with batch 2B does."""
    import re
    import shutil

    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpi4py mpich)")
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    out = subprocess.run([mpiexec, "-n", "2", sys.executable, str(EXAMPLES / "train_distributed.py"), "--check",
                          "--epochs", "5"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 rank(s) x batch 32" in out.stdout
    found = re.search(r"largest relative parameter difference (\S+)", out.stdout)
    assert found and float(found.group(1)) <= 1e-6, out.stdout


@pytest.mark.parametrize("name", ["xor.py", "perceptron.py", "train_distributed.py"])
def test_examples_are_documented(name):
    text = (EXAMPLES / name).read_text()
    assert text.startswith('"""') and f"python examples/{name}" in text
