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


@pytest.mark.parametrize("name", ["xor.py", "perceptron.py"])
def test_examples_are_documented(name):
    text = (EXAMPLES / name).read_text()
    assert text.startswith('"""') and f"python examples/{name}" in text
