"""benchmarks/gpu_run.sh, the one prepared GPU run, checked on the CPU: its dry mode end to end (the same phases
and files, on the fake CuPy and the CUDA simulator), a test phase cut short at its limit, and the wheels it
installs (benchmarks/gpu_run_wheels.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
PHASES = ["env", "wheels", "install", "gpu-tests", "bench", "cuda-tests"]
#: What a run writes besides the benchmark's sections.
RUN_FILES = {"env.txt", "wheels.txt", "install.txt", "pytest-gpu.txt", "junit-gpu.xml", "bench.txt",
             "gpu_vs_torch.json", "gpu_vs_torch.md", "pytest-cuda.txt", "junit-cuda.xml", "summary.md"}
#: The script's settings, left out of the environment the tests give it.
SETTINGS = {"DRY_RUN", "ARCHIVE", "BUDGET", "PHASES", "WHEEL_DIR", "PYTEST_ARGS", "BENCH_ARGS", "BENCH_SECTIONS",
            "TEST_WORKERS", "GPU_TEST_MARK", "CUDA_TEST_MARK", "COMMIT", "OUT"}


def dry_run(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess:
    """``bash gpu_run.sh --dry-run ARGS`` in ``tmp_path`` with this Python and no wheels."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("PYTEST_")}
    env.update(PYTHON=sys.executable, WHEEL_DIR=str(tmp_path / "no-wheels"), **settings)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], env=env, capture_output=True, text=True,
                          timeout=240, cwd=str(tmp_path))


def junit_cases(path: Path) -> list[ElementTree.Element]:
    return list(ElementTree.parse(path).getroot().iter("testcase"))


def summary_rows(out: Path) -> dict[str, list[str]]:
    """Phase -> its cells in summary.md's table."""
    lines = (out / "summary.md").read_text().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    return {row[0]: row[1:] for row in cells[1:]}


@pytest.mark.exhaustive  # 20 s: with the phase cut short below, run before changing gpu_run.sh
def test_dry_run_writes_every_file_and_passes(tmp_path):
    """Every phase runs and succeeds, the test phases select the cupy (skipped here) and numba-cuda tests (run
    under the simulator), the benchmark's device sections run on the fake CuPy, and the archive holds it all."""
    import json

    out, archive = tmp_path / "out", tmp_path / "run.tar.gz"
    proc = dry_run(tmp_path, "--archive", "run.tar.gz", "out")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    written = {p.name for p in out.iterdir()}
    assert RUN_FILES <= written, RUN_FILES - written
    rows = summary_rows(out)
    assert list(rows) == PHASES and all(r[2] == "ok" for r in rows.values()), rows
    assert proc.stdout.rstrip().endswith(f"| cuda-tests | {' | '.join(rows['cuda-tests'])} |")  # the table is last

    gpu, cuda = junit_cases(out / "junit-gpu.xml"), junit_cases(out / "junit-cuda.xml")
    assert gpu and all("[cupy-" in c.get("name") and c.find("skipped") is not None for c in gpu)
    assert cuda and all("[numba-cuda-" in c.get("name") and not list(c) for c in cuda)  # passed: no child
    assert rows["cuda-tests"][3].startswith(f"{len(cuda)} passed") and "failed" not in rows["cuda-tests"][3]

    doc = json.loads((out / "gpu_vs_torch.json").read_text())
    status = {s["name"]: s["status"] for s in doc["sections"]}
    assert [status[n] for n in ("step", "fused", "epilogues", "api", "tf32", "fit")] == ["ok"] * 6, status
    env = (out / "env.txt").read_text()
    assert "mode: dry run" in env and "device: the CUDA simulator" in env and "versions: python " in env
    assert "holds no usable wheel" in (out / "wheels.txt").read_text()
    with tarfile.open(archive) as tar:
        assert {Path(n).name for n in tar.getnames() if n != "out"} == written


@pytest.mark.exhaustive  # 19 s
def test_a_test_phase_cut_short_keeps_its_summary_and_junit(tmp_path):
    """At its limit a test phase gets SIGINT: pytest (with an xdist worker) still writes its counts and junit.xml;
    the run says the phase stopped at its limit and exits with 1."""
    out = tmp_path / "out"
    proc = dry_run(tmp_path, "out", PHASES="cuda-tests", CUDA_TESTS_TIMEOUT="12", TEST_WORKERS="1",
                   PYTEST_ARGS="tests/test_kernels.py -k output_error")  # 72 tests, over 20 s here
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert summary_rows(out)["cuda-tests"][2] == "stopped at its limit"
    text = (out / "pytest-cuda.txt").read_text()
    counts = summary_rows(out)["cuda-tests"][3]
    assert "!! KeyboardInterrupt !!" in text and " passed in " in counts, text[-3000:]
    assert text.rstrip().splitlines()[-1] == counts, text[-3000:]  # ends with its counts, not a second traceback
    cases = junit_cases(out / "junit-cuda.xml")
    assert len([c for c in cases if c.get("name")]) < 72


# --------------------------------------------------------------------------- the wheels
def make_wheel(folder: Path, distribution: str, version: str, tag: str = "py3-none-any") -> Path:
    """A minimal wheel of ``distribution`` holding one module, named after it."""
    module, stem = distribution.replace("-", "_").split("_")[0], distribution.replace("-", "_")
    info = f"{stem}-{version}.dist-info"
    files = {f"{module}/__init__.py": f"__version__ = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n",
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def install_wheels(wheels: Path, target: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run_wheels.py"), str(wheels), str(target)],
                          capture_output=True, text=True, timeout=180, env=env)


def test_wheels_installs_the_newest_nvmath_python_and_nothing_the_machine_has(tmp_path):
    """Searched recursively: the newest nvmath-python wheel for this Python is installed, an older one, one for
    another platform and a wheel of a distribution the machine has (numpy) are not, so nothing is shadowed."""
    wheels, target = tmp_path / "whl", tmp_path / "site"
    make_wheel(wheels, "nvmath-python", "0.0.1")
    make_wheel(wheels / "old", "nvmath-python", "0.0.0")
    make_wheel(wheels / "deeper" / "still", "numpy", "0.0.1")
    make_wheel(wheels, "nvmath-python", "0.0.2", tag="cp27-cp27m-win32")
    proc = install_wheels(wheels, target)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in target.iterdir()) == ["nvmath", "nvmath_python-0.0.1.dist-info"]
    lines = proc.stdout.splitlines()
    assert any(line.startswith(f"skipped {wheels}/deeper/still/numpy-0.0.1") and "the machine's own numpy" in line
               for line in lines), lines
    assert any("nvmath_python-0.0.0" in line and "a newer nvmath-python" in line for line in lines), lines
    assert any("nvmath_python-0.0.2" in line and "not built for this Python" in line for line in lines), lines
    assert f"nvmath-python 0.0.1 from {target / 'nvmath'}" in lines, lines


def test_wheels_says_so_when_there_is_nothing_to_install(tmp_path):
    make_wheel(tmp_path / "whl", "numpy", "0.0.1")
    for folder in (tmp_path / "whl", tmp_path / "missing"):
        proc = install_wheels(folder, tmp_path / "site")
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert f"{folder} holds no usable wheel" in proc.stdout
    assert not (tmp_path / "site").exists()


# --------------------------------------------------------------------------- the record of the machine
def test_env_record_fails_without_a_device_and_takes_the_simulator_for_one(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_run_env
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setattr(gpu_run_env, "cupy_device", lambda: None)
    monkeypatch.setattr(gpu_run_env, "numba_cuda_device", lambda: None)
    assert gpu_run_env.main() == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("versions: python ") and "numpy " in lines[0] and lines[1] == "device: none"
    assert lines[-1].startswith("no GPU found")
    monkeypatch.setattr(gpu_run_env, "numba_cuda_device", lambda: "the CUDA simulator")
    assert gpu_run_env.main() == 0
    assert "device: the CUDA simulator" in capsys.readouterr().out.splitlines()
