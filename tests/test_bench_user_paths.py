"""The benchmarks on the user's paths (``benchmarks/gpu_vs_torch.py``, :mod:`backprop.bench.user_paths`) and
the section writer (:mod:`backprop.bench.sections`): end to end in ``--quick`` mode on the CPU, a failing
section, the time limit, and the PyTorch twin where PyTorch is installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backprop.bench import user_paths
from backprop.bench.sections import SectionWriter, SkipSection

ROOT = Path(__file__).resolve().parents[1]
GPU_SECTIONS = ("fit", "api", "step", "graph", "tf32")


def _gpu_backend_here() -> bool:
    backend, _ = user_paths.Context._device_backend("auto")
    return backend is not None


def _summary(out: Path) -> dict:
    return json.loads((out / "gpu_vs_torch.json").read_text())


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed


def test_quick_run_on_the_cpu(tmp_path: Path, no_torch: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every section in --quick mode: the GPU ones skipped with the reason, the CPU one written as JSON and
    Markdown with the machine, the command and the date. (On a GPU machine the GPU is hidden from the run:
    this checks the CPU-only path; benchmarks/gpu_run.sh runs the GPU sections for real.)"""
    if _gpu_backend_here():
        monkeypatch.setattr(user_paths.Context, "_device_backend",
                            staticmethod(lambda spec: (None, "no GPU backend works here (hidden by the test)")))
    rc = user_paths.main(["--quick", "--out", str(tmp_path), "--cpu-backends", "numpy"])
    assert rc == 0
    doc = _summary(tmp_path)
    assert [s["name"] for s in doc["sections"]] == list(user_paths.SECTIONS)
    by_name = {s["name"]: s for s in doc["sections"]}
    for name in GPU_SECTIONS:
        assert by_name[name]["status"] == "skipped"
        assert "no GPU backend works here" in by_name[name]["reason"]
    cpu = json.loads((tmp_path / "cpu_step_vs_torch.json").read_text())
    assert cpu["schema"] == "backprop-bench-section/1"
    assert cpu["machine"]["cpu"] and cpu["machine"]["date"] and cpu["machine"]["versions"]["numpy"] == np.__version__
    assert "--quick" in cpu["command"] and cpu["written"]
    sec = cpu["section"]
    assert sec["status"] == "ok" and sec["load_average"]["start"] is not None
    assert [r[3] for r in sec["tables"][0]["rows"]] == ["numpy", "numpy"]
    for case in sec["cases"].values():
        for name in ("numpy/train_step", "numpy/train_step_device"):
            t = case["timings"][name]
            assert len(t["samples"]) == 2 and 0 < t["min"] <= t["median"] <= t["max"]
    assert all(t["measured"] is None and t["met"] is None for t in sec["targets"])  # no PyTorch here
    assert any("PyTorch not measured" in n for n in sec["notes"])
    md = (tmp_path / "cpu_step_vs_torch.md").read_text()
    assert "- machine:" in md and "- load average" in md and "- command:" in md and "| mnist_like |" in md
    summary_md = (tmp_path / "gpu_vs_torch.md").read_text()
    assert "cpu_step_vs_torch.md" in summary_md and "| cpu | ok |" in summary_md
    for name in GPU_SECTIONS:  # a skipped section still has its files, saying why
        stem = user_paths.SECTIONS[name][0]
        assert (tmp_path / f"{stem}.json").exists()
        assert "Skipped: no GPU backend" in (tmp_path / f"{stem}.md").read_text()


def test_device_sections_on_a_cpu_backend(tmp_path: Path, no_torch: None) -> None:
    """Sections 1-5 on the numpy backend (--backend): fit, API and step run; graph and TF32 say why not."""
    rc = user_paths.main(["--quick", "--out", str(tmp_path), "--backend", "numpy",
                          "--sections", ",".join(GPU_SECTIONS)])
    assert rc == 0
    by_name = {s["name"]: s for s in _summary(tmp_path)["sections"]}
    assert [by_name[n]["status"] for n in GPU_SECTIONS] == ["ok", "ok", "ok", "skipped", "skipped"]
    assert "CUDA graph" in by_name["graph"]["reason"] and "set_tf32" in by_name["tf32"]["reason"]
    fit = by_name["fit"]
    assert {"host", "device"} <= set(fit["timings"]) and all(np.isfinite(v) for v in fit["epoch_loss"].values())
    assert fit["timings"]["host"]["repeats"] == 1 and fit["timings"]["host"]["first_call"] > 0
    api = by_name["api"]
    assert len(api["targets"]) == 2 * len(user_paths.API_CASES)
    assert all(t["measured"] > 0 for t in api["targets"])
    step = by_name["step"]
    assert [r[0] for r in step["tables"][0]["rows"]] == [c.name for c in user_paths.STEP_CASES]
    assert step["gemm"]["flops_per_s"] > 0 and "fraction_of_gemm" in step["cases"]["gemm_bound"]


def test_failing_section_keeps_what_was_written(tmp_path: Path, no_torch: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A section that raises is recorded with its error; the sections before it are already on disk when it
    runs, and the ones after it still run."""
    seen = {}

    def boom(ctx: user_paths.Context) -> dict:
        seen["cpu file"] = (tmp_path / "cpu_step_vs_torch.json").exists()
        seen["summary"] = [s["name"] for s in _summary(tmp_path)["sections"]]
        raise RuntimeError("out of luck")

    stem, title, _ = user_paths.SECTIONS["api"]
    monkeypatch.setitem(user_paths.SECTIONS, "api", (stem, title, boom))
    rc = user_paths.main(["--quick", "--out", str(tmp_path), "--cpu-backends", "numpy", "--backend", "numpy",
                          "--sections", "cpu,api,tf32"])
    assert rc == 1
    assert seen == {"cpu file": True, "summary": ["cpu"]}
    doc = _summary(tmp_path)
    assert [s["name"] for s in doc["sections"]] == ["cpu", "api", "tf32"]
    cpu, api, tf32 = doc["sections"]
    assert cpu["status"] == "ok" and tf32["status"] == "skipped"  # numpy has no TF32
    assert api["status"] == "error" and api["error"] == "RuntimeError: out of luck" and "boom" in api["traceback"]
    api_md = (tmp_path / "api_overhead.md").read_text()
    assert "**Failed**: RuntimeError: out of luck" in api_md
    assert json.loads((tmp_path / "api_overhead.json").read_text())["section"]["status"] == "error"


def test_section_writer_skip_and_time_limit(tmp_path: Path) -> None:
    w = SectionWriter(tmp_path, title="t", command="cmd", machine=_machine(), summary="sum")
    w.run("a", "A", lambda: {"tables": [{"header": ["x"], "rows": [["1"]]}],
                             "targets": [{"what": "w", "target": ">= 1", "measured": 2.0, "met": True}]}, echo=None)

    def skip() -> dict:
        raise SkipSection("not here")

    w.run("b", "B", skip, echo=None)
    w.deadline = 0.0  # past: nothing further starts
    w.run("c", "C", lambda: {}, echo=None)
    doc = json.loads((tmp_path / "sum.json").read_text())
    assert [(s["name"], s["status"]) for s in doc["sections"]] == [("a", "ok"), ("b", "skipped"), ("c", "skipped")]
    assert doc["sections"][1]["reason"] == "not here" and "time limit" in doc["sections"][2]["reason"]
    md = (tmp_path / "sum.md").read_text()
    assert "w: 2 (target >= 1, met)" in md and "measured 2; **met**" in (tmp_path / "a.md").read_text()
    assert w.failed == []


def _machine() -> dict:
    from backprop.bench.machine import machine_info

    return machine_info()


def test_script_runs_and_rejects_bad_usage(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "gpu_vs_torch.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--no-torch", "--sections", "cpu",
                           "--cpu-backends", "numpy", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cpu_step_vs_torch.md").exists() and "wrote 1 section(s)" in proc.stdout
    assert user_paths.main(["--sections", "nosuch", "--out", str(tmp_path)]) == 2


# --------------------------------------------------------------------------- the PyTorch twin
@pytest.mark.parametrize("head,activation", [("regression", "relu"), ("multiclass", "tanh")])
def test_torch_twin_takes_the_same_step(head: str, activation: str) -> None:
    """The twin's loss and its parameters after one SGD step with momentum match backprop's (float64)."""
    pytest.importorskip("torch")
    from backprop import MLP, SGD
    from backprop.bench.peers import TorchPeer

    peer = TorchPeer()
    rng = np.random.default_rng(0)
    net = MLP([5, 7, 6, 3], activation=activation, head=head, dtype="float64", seed=0, backend="numpy")
    x = rng.standard_normal((9, 5))
    t = np.eye(3)[rng.integers(0, 3, 9)] if head == "multiclass" else rng.standard_normal((9, 3))
    step = peer.step_fn(net, x, t, "cpu", lr=0.1, momentum=0.9)
    opt = SGD(0.1, momentum=0.9)
    for _ in range(2):
        assert step() == pytest.approx(net.train_step(x, t, opt), rel=1e-10)
    model_params = [p.detach().numpy() for p in step.model.parameters()]
    ours = [a for W, b in net.get_params() for a in (W, b)]
    for a, b in zip(model_params, ours):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_torch_epoch_runs() -> None:
    pytest.importorskip("torch")
    from backprop import MLP
    from backprop.bench.peers import TorchPeer

    peer = TorchPeer()
    rng = np.random.default_rng(0)
    net = MLP([4, 8, 3], head="multiclass", seed=0, backend="numpy")
    X = rng.standard_normal((50, 4)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    epoch = peer.epoch_fn(net, X, y, "cpu", batch_size=16, lr=0.05)
    first, second = epoch(), epoch()
    assert np.isfinite(first) and np.isfinite(second) and second < first * 1.5
