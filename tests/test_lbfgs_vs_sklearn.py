"""``benchmarks/lbfgs_vs_sklearn.py``: its options, and a tiny run end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("threadpoolctl")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lbfgs_vs_sklearn.py"


def _script():
    spec = importlib.util.spec_from_file_location("lbfgs_vs_sklearn", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [["--backends", "nosuch"], ["--dtypes", "float16"], ["--hidden-layer-sizes", "0"],
                                  ["--hidden-layer-sizes", "64,x"], ["--alpha", "-1"], ["--alpha", "nan"],
                                  ["--max-iter", "0"], ["--tol", "inf"], ["--random-state", str(2**32)],
                                  ["--repeats", "0"], ["--threads", "0"], ["--trace-max-iter", "10"],
                                  ["--json", "{dir}"], ["--json", "{dir}/missing/x.json"]])
def test_bad_option_is_refused_up_front(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _script()
    argv = [a.format(dir=tmp_path) for a in argv]
    assert bench.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"{bench.PROG}: error: argument {argv[0]}: "), last
    assert list(tmp_path.iterdir()) == []


def test_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A few iterations in float64: backprop's loss follows scikit-learn's, reaches the target, and the trace
    ends where the timed fit did; the objective is restored afterwards."""
    import backprop.sklearn as bps

    bench = _script()
    objective = bps._LbfgsObjective
    out = tmp_path / "lbfgs.json"
    assert bench.main(["--backends", "numpy", "--dtypes", "float64", "--max-iter", "5", "--repeats", "1",
                       "--hidden-layer-sizes", "8", "--json", str(out)]) == 0
    assert bps._LbfgsObjective is objective
    assert "load average before" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    (row,) = doc["results"]
    assert row["n_iter"] == doc["sklearn"]["n_iter"] == 5
    assert abs(row["loss_vs_sklearn"]) < 1e-9
    assert row["target_iteration"] == 5 and row["trace_loss_at_n_iter"] == row["loss"]
    assert len(row["trace"]) == 10 and row["time_to_target_s"] > 0
