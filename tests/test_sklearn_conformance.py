"""``benchmarks/sklearn_conformance.py``: scikit-learn's own MLP test file, run against backprop's estimators."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sklearn_conformance.py"

#: Tests of scikit-learn's test_mlp.py that backprop's estimators pass on the numpy backend (scikit-learn 1.9:
#: 57 of 59; its two pandas tests skip where pandas is not installed). It should only ever rise.
MIN_PASSED = 57


def _script():
    spec = importlib.util.spec_from_file_location("sklearn_conformance", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_import_line_is_rewritten_exactly_once() -> None:
    conf = _script()
    rest = "from sklearn.preprocessing import scale\n"
    source = f"import numpy as np\n{conf.ORIGINAL}\n{rest}"
    assert conf.rewritten(source) == f"import numpy as np\n{conf.REPLACEMENT}\n{rest}"
    for bad in ("import numpy as np\n", f"{conf.ORIGINAL}\n{conf.ORIGINAL}\n", f"    {conf.ORIGINAL}\n",
                f"{conf.ORIGINAL}, something_else\n"):
        with pytest.raises(ValueError, match="occurs [02] times"):
            conf.rewritten(bad)


@pytest.mark.parametrize("argv", [["--backends", "nosuch"], ["--min-passed", "-1"], ["--min-passed", "1.5"],
                                  ["--timeout", "0"], ["--timeout", "nan"], ["--json", "{dir}"],
                                  ["--json", "{dir}/missing/x.json"], ["--json", ""]])
def test_bad_option_is_refused_up_front(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = _script()
    argv = [a.format(dir=tmp_path) for a in argv]
    assert conf.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"{conf.PROG}: error: argument {argv[0]}: "), last
    assert list(tmp_path.iterdir()) == []


def _collects_unmodified(conf, folder: Path) -> tuple[bool, str]:
    """Whether pytest can collect scikit-learn's unmodified test file here (if not, the environment is at
    fault, not backprop's estimators)."""
    folder.mkdir()
    (folder / "test_mlp.py").write_text(conf.locate_test_file().read_text())
    (folder / "pytest.ini").write_text("[pytest]\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "sklearn.conftest", "-p", "no:cacheprovider",
                           "--collect-only", "-q", "test_mlp.py"], cwd=folder, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]


@pytest.mark.slow
def test_sklearn_test_file_on_numpy(tmp_path: Path) -> None:
    """At least MIN_PASSED of scikit-learn's MLP tests pass with backprop's estimators on the numpy backend."""
    report = tmp_path / "conformance.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--backends", "numpy", "--min-passed", str(MIN_PASSED),
                           "--json", str(report)], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    conf = _script()
    if proc.returncode == conf.NOT_INSTALLED:
        pytest.skip(proc.stderr.strip())
    assert report.is_file(), proc.stdout + proc.stderr
    run = json.loads(report.read_text())["runs"]["numpy"]
    if not run["ran"]:
        collects, output = _collects_unmodified(conf, tmp_path / "unmodified")
        if not collects:
            pytest.skip(f"pytest cannot run scikit-learn's test file here: {output}")
        pytest.fail(f"pytest could not run the rewritten test file (exit {run['pytest_exit']}):\n{run['output_tail']}")
    assert run["passed"] >= MIN_PASSED, f"{run['passed']} passed; failed: {json.dumps(run['failed_tests'], indent=1)}"
    assert proc.returncode == 0, proc.stdout + proc.stderr
