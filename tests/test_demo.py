"""backprop.demo: the digits and MNIST demos, and the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backprop import demo

from .test_datasets import fake_mnist


def test_digits_demo_reports_accuracy_and_time(capsys, tmp_path):
    pytest.importorskip("sklearn")
    code = demo.main(["digits", "--epochs", "5", "--hidden", "32", "--no-progress", "--backend", "numpy",
                      "--plot", str(tmp_path / "c.png"), "--save", str(tmp_path / "net.npz")])
    out = capsys.readouterr().out
    assert code == 0
    acc = float(re.search(r"backprop\s+test accuracy (\d\.\d+)\s+training time (\d+\.\d+) s", out).group(1))
    assert acc > 0.85
    assert "1347 training / 450 test samples" in out and "hidden (32,)" in out and "backend numpy" in out
    assert (tmp_path / "c.png").stat().st_size > 0
    import backprop as bp

    assert bp.MLP.load(tmp_path / "net.npz").sizes == [64, 32, 10]


def test_digits_demo_compares_with_sklearn(capsys):
    pytest.importorskip("sklearn")
    assert demo.main(["--epochs", "3", "--hidden", "16", "--no-progress", "--compare-sklearn", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"scikit-learn\s+test accuracy \d\.\d+\s+training time \d+\.\d+ s \(best of 2\)", out)
    assert "MLPClassifier, 3 epochs, float32" in out
    assert re.search(r"backprop vs scikit-learn: accuracy [+-]\d\.\d+, \d+\.\d+x the speed", out)


def test_progress_bar_on_request(capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    assert demo.main(["--epochs", "2", "--hidden", "8", "--progress", "--backend", "numpy"]) == 0
    err = capsys.readouterr().err
    assert "2/2" in err and "val_acc=" in err


def test_mnist_demo_on_small_idx_files(capsys, tmp_path):
    rng = np.random.default_rng(0)
    fake_mnist(tmp_path, rng, n_train=40, n_test=10, rows=5, cols=5)
    args = ["--mnist", str(tmp_path), "--epochs", "2", "--hidden", "8", "--no-progress", "--backend", "numpy"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "40 training / 10 test samples, 25 features, 10 classes" in out
    assert re.search(r"backprop\s+test accuracy", out)


def test_mnist_errors(capsys, tmp_path):
    assert demo.main(["--mnist", str(tmp_path / "missing"), "--no-progress"]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        demo.main(["mnist"])
    assert info.value.code == 2
    assert "--mnist PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0"])


def test_python_dash_m_and_console_script_entry():
    env = {**os.environ, "CI": "1"}
    out = subprocess.run([sys.executable, "-m", "backprop.demo", "--help"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0 and "--compare-sklearn" in out.stdout and "--mnist" in out.stdout
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'backprop-demo = "backprop.demo:main"' in pyproject
