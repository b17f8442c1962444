"""The benchmarks on the user's paths (``benchmarks/gpu_vs_torch.py``, :mod:`backprop.bench.user_paths`) and
the section writer (:mod:`backprop.bench.sections`): end to end in ``--quick`` mode on the CPU, a failing
section, the time limit, and the PyTorch twin where PyTorch is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backprop.bench import user_paths
from backprop.bench.sections import SectionWriter, SkipSection

from .conftest import must_not_run, snapshot

ROOT = Path(__file__).resolve().parents[1]
GPU_SECTIONS = ("fit", "api", "step", "graph", "tf32", "fused", "epilogues")


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
    """Sections 1-7 on the numpy backend (--backend): fit, API and step run; graph, TF32, fused and epilogues say
    why not."""
    rc = user_paths.main(["--quick", "--out", str(tmp_path), "--backend", "numpy",
                          "--sections", ",".join(GPU_SECTIONS)])
    assert rc == 0
    by_name = {s["name"]: s for s in _summary(tmp_path)["sections"]}
    assert [by_name[n]["status"] for n in GPU_SECTIONS] == ["ok", "ok", "ok"] + ["skipped"] * 4
    assert "CUDA graph" in by_name["graph"]["reason"] and "set_tf32" in by_name["tf32"]["reason"]
    assert "no fused kernels" in by_name["fused"]["reason"] and "set_epilogues" in by_name["epilogues"]["reason"]
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


# --------------------------------------------------------------------------- checked options
PROG = "python benchmarks/gpu_vs_torch.py"

#: a bad value of every option that takes one; "{file}" is a regular file, "{dir}" the (temporary) working
#: directory, "{taken}" a folder whose summary file name is taken by a directory
BAD_OPTIONS = [
    ["--out", "{file}"],
    ["--out", "{file}/x"],
    ["--out", "{file}/x/y"],
    ["--out", ""],
    ["--out", "  "],
    ["--out", "{dir}/" + "x" * 300],
    ["--out", "{taken}"],
    ["--out", "{taken}", "--sections", "cpu"],  # the summary file is written whichever sections run
    ["--sections", "nosuch"],
    ["--sections", "fit,nosuch"],
    ["--sections", ""],
    ["--sections", " , "],
    ["--backend", "nosuch"],
    ["--backend", ""],
    ["--backend", "numpy,numba"],
    ["--cpu-backends", "nosuch"],
    ["--cpu-backends", "numpy,nosuch"],
    ["--cpu-backends", ""],
    ["--cpu-backends", "auto"],
    ["--repeats", "0"],
    ["--repeats", "-1"],
    ["--repeats", "1.5"],
    ["--repeats", "nan"],
    ["--repeats", str(2**31)],
    ["--fit-repeats", "0"],
    ["--fit-repeats", "-3"],
    ["--fit-repeats", "inf"],
    ["--cpu-repeats", "0"],
    ["--cpu-repeats", "x"],
    ["--min-sample-time", "nan"],
    ["--min-sample-time", "inf"],
    ["--min-sample-time", "-0.01"],
    ["--min-sample-time", "1e300"],
    ["--compile-budget", "nan"],
    ["--compile-budget", "inf"],
    ["--compile-budget", "-1"],
    ["--gemm-size", "0"],
    ["--gemm-size", "-64"],
    ["--gemm-size", "1e3"],
    ["--threads", "0"],
    ["--threads", "-1"],
    ["--threads", "5000"],
    ["--threads", "nan"],
    ["--time-limit", "0"],
    ["--time-limit", "-1"],
    ["--time-limit", "nan"],
    ["--time-limit", "inf"],
]


class _Reached(Exception):
    """Raised in place of the first piece of work: the options passed every check."""


def _guard(monkeypatch: pytest.MonkeyPatch, *, reach: list | None = None) -> None:
    """Every function that would do work fails the test when called; with ``reach``, building the run's
    ``Context`` (the first work) records the options in ``reach`` and raises :class:`_Reached` instead."""
    for key, (stem, title, _) in list(user_paths.SECTIONS.items()):
        monkeypatch.setitem(user_paths.SECTIONS, key, (stem, title, must_not_run(f"section {key}")))
    for module, names in ((user_paths.context, ("time_ops", "TorchPeer", "resolve_backend")),
                          (user_paths.cpu, ("resolve_backend",)),
                          (user_paths.cli, ("SectionWriter", "machine_info", "set_threads", "cpu_backends"))):
        for name in names:
            monkeypatch.setattr(module, name, must_not_run(name))
    if reach is None:
        monkeypatch.setattr(user_paths.cli, "Context", must_not_run("Context"))
    else:
        def first_work(args):
            reach.append(args)
            raise _Reached

        monkeypatch.setattr(user_paths.cli, "Context", first_work)


@pytest.mark.parametrize("argv", BAD_OPTIONS, ids=lambda a: " ".join(a)[:60])
def test_bad_option_is_refused_up_front(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Status 2 and one last line naming the option, no traceback, nothing created, no work done."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    taken = tmp_path / "taken"
    (taken / "gpu_vs_torch.json").mkdir(parents=True)
    argv = [a.format(file=afile, dir=tmp_path, taken=taken) for a in argv]
    monkeypatch.chdir(tmp_path)  # where the default --out, bench-out, would land
    monkeypatch.delenv("OUT", raising=False)
    _guard(monkeypatch)
    before = snapshot(tmp_path)
    rc = user_paths.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{PROG}: error: argument {argv[0]}: "), last
    assert snapshot(tmp_path) == before  # nothing created, nothing written


def test_unknown_names_list_the_known_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from backprop.kernels import BACKEND_MODULES

    _guard(monkeypatch)
    for option, known in (("--sections", list(user_paths.SECTIONS)), ("--backend", list(BACKEND_MODULES)),
                          ("--cpu-backends", list(BACKEND_MODULES))):
        assert user_paths.main([option, "nosuch", "--out", str(tmp_path / "o")]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "'nosuch'" in last and "known: " + ", ".join(known) in last, last


def test_out_that_is_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A folder, or a summary file in it, that cannot be written is refused (write access is simulated as
    denied, so that the test holds when run as root too)."""
    _guard(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "gpu_vs_torch.md").write_text("old")
    real_access = os.access
    denied: set[Path] = set()
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) not in denied and real_access(path, mode))
    cases = [({locked / "gpu_vs_torch.md"}, locked, "gpu_vs_torch.md exists and is not writable"),
             ({locked}, locked, "is not writable"),
             ({locked}, locked / "new", "cannot create the directory")]
    for deny, out, why in cases:
        denied.clear()
        denied.update(deny)
        assert user_paths.main(["--out", str(out), "--sections", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"{PROG}: error: argument --out: ") and why in last, last
    assert not (locked / "new").exists() and (locked / "gpu_vs_torch.md").read_text() == "old"


GOOD_EDGES = [
    # the smallest values that make sense; names in any case, with spaces, repeated
    ["--repeats", "1", "--fit-repeats", "1", "--cpu-repeats", "1", "--min-sample-time", "0", "--compile-budget", "0",
     "--gemm-size", "1", "--threads", "1", "--time-limit", "1e-9", "--sections", " CPU , fit,cpu",
     "--backend", " NumPy ", "--cpu-backends", "numba, NUMPY,numpy", "--out", "{dir}/new/nested/dir"],
    # the largest
    ["--repeats", str(2**31 - 1), "--fit-repeats", str(2**31 - 1), "--cpu-repeats", str(2**31 - 1),
     "--min-sample-time", "3600", "--compile-budget", "1e300", "--gemm-size", str(2**31 - 1), "--threads", "4096",
     "--time-limit", "1e300", "--backend", "auto", "--out", "{dir}"],
    # every flag, and the defaults (the default --out, bench-out, not there yet)
    ["--quick", "--no-torch", "--no-compile", "--no-tf32"],
]


@pytest.mark.parametrize("argv", GOOD_EDGES, ids=["smallest", "largest", "defaults"])
def test_good_options_pass_the_checks(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Every option at an edge of what it accepts passes the checks (main goes on to its first piece of
    work, replaced here); nothing runs and nothing is created."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    reached: list = []
    _guard(monkeypatch, reach=reached)
    (tmp_path / "gpu_vs_torch.md").write_text("an earlier run's summary: overwritten, not refused")
    before = snapshot(tmp_path)
    with pytest.raises(_Reached):
        user_paths.main([a.format(dir=tmp_path) for a in argv])
    assert capsys.readouterr().err == ""
    assert snapshot(tmp_path) == before
    (args,) = reached
    if "--sections" in argv:  # normalised: stripped, lower-case, each once, in the order given
        assert (args.sections, args.backend, args.cpu_backends) == ("cpu,fit", "numpy", "numba,numpy")
        assert (args.repeats, args.min_sample_time, args.compile_budget, args.time_limit) == (1, 0.0, 0.0, 1e-9)
    if "--quick" in argv:
        assert args.out == "bench-out" and args.sections == ",".join(user_paths.SECTIONS)
        assert args.cpu_backends == "numpy,numba" and args.backend == "auto" and args.compile_budget == 120.0


def test_out_from_the_environment_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The default of --out, $OUT, is checked as if given."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("OUT", str(afile))
    _guard(monkeypatch)
    assert user_paths.main([]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"{PROG}: error: argument --out: ")


def test_out_that_cannot_be_created_after_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Should the folder still fail to be created (the file system changed since the check), the run stops
    there with status 2, before any section."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setattr(user_paths.cli, "out_problem", lambda out, names: None)
    for key, (stem, title, _) in list(user_paths.SECTIONS.items()):
        monkeypatch.setitem(user_paths.SECTIONS, key, (stem, title, must_not_run(f"section {key}")))
    rc = user_paths.main(["--out", str(afile / "x"), "--no-torch", "--sections", "cpu", "--cpu-backends", "numpy"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"{PROG}: error: argument --out: cannot create")


def test_bad_option_exit_status_of_the_script(tmp_path: Path) -> None:
    """The script itself (not only main()) exits with status 2 and one error line, no traceback."""
    script = ROOT / "benchmarks" / "gpu_vs_torch.py"
    proc = subprocess.run([sys.executable, str(script), "--time-limit", "nan", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{PROG}: error: argument --time-limit: ")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- the PyTorch twin
@pytest.mark.parametrize("head,activation", [("regression", "relu"), ("multiclass", "tanh")])
def test_torch_twin_takes_the_same_step(head: str, activation: str) -> None:
    """The twin's loss and its parameters after one SGD step with momentum match backprop's (float64)."""
    pytest.importorskip("torch")
    from backprop import MLP, SGD
    from backprop.bench.torch_peer import TorchPeer

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
    from backprop.bench.torch_peer import TorchPeer

    peer = TorchPeer()
    rng = np.random.default_rng(0)
    net = MLP([4, 8, 3], head="multiclass", seed=0, backend="numpy")
    X = rng.standard_normal((50, 4)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    epoch = peer.epoch_fn(net, X, y, "cpu", batch_size=16, lr=0.05)
    first, second = epoch(), epoch()
    assert np.isfinite(first) and np.isfinite(second) and second < first * 1.5
