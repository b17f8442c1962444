"""The benchmark suite: ``backprop-bench --quick`` end to end, the power-law fit and the flop ratio."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backprop.bench import fit_power_law, flop_counts, flop_ratio, main, parse_sizes, sizes_for_params
from backprop.bench.fd import fd_gradient
from backprop.bench.nets import n_params, step_flop_ratio
from backprop.bench.timing import time_ops

from .conftest import must_not_run, snapshot

# --------------------------------------------------------------------------- fit


@pytest.mark.parametrize("k", [0.5, 1.0, 2.0, 2.7])
def test_fit_recovers_exponent(k: float) -> None:
    n = np.geomspace(1e3, 1e7, 9)
    fit = fit_power_law(n, 3e-9 * n**k)
    assert fit.slope == pytest.approx(k, abs=1e-9)
    assert fit.coef == pytest.approx(3e-9, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    assert (fit.n_min, fit.n_max, fit.n_points) == (pytest.approx(1e3), pytest.approx(1e7), 9)


def test_fit_with_noise_stays_close() -> None:
    rng = np.random.default_rng(0)
    n = np.geomspace(1e3, 1e7, 13)
    t = 2e-8 * n**1.0 * rng.lognormal(0.0, 0.05, n.size)
    fit = fit_power_law(n, t)
    assert abs(fit.slope - 1.0) < 0.05
    assert fit.stderr < 0.05
    assert fit.predict(1e5) == pytest.approx(2e-8 * 1e5, rel=0.2)


def test_fit_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(ValueError):
        fit_power_law([1e3], [1.0])
    with pytest.raises(ValueError):
        fit_power_law([1e3, 1e3], [1.0, 2.0])
    with pytest.raises(ValueError):
        fit_power_law([1e3, 1e4], [1.0, -2.0])


# --------------------------------------------------------------------------- operation counts


def test_flop_ratio_of_square_and_single_layer_nets() -> None:
    assert flop_ratio([100, 100, 100, 100]) == pytest.approx(1 + 1 + 2 / 3)
    assert flop_ratio([784, 10]) == pytest.approx(2.0)  # the first layer needs no input delta
    assert flop_ratio([50] * 101) == pytest.approx(3 - 1 / 100)  # tends to 3 with many layers
    fwd = 784 * 256 + 256 * 10
    assert flop_ratio([784, 256, 10]) == pytest.approx(2 + 256 * 10 / fwd)


def test_flop_counts_are_exact() -> None:
    f = flop_counts([3, 4, 5], batch=2)
    assert f == {"forward": 2 * 2 * (12 + 20), "weight_gradients": 2 * 2 * (12 + 20),
                 "input_deltas": 2 * 2 * 20, "sgd_update": 2 * (4 * 4 + 5 * 5)}
    assert step_flop_ratio([3, 4, 5], 2) == pytest.approx((128 + 128 + 80 + 82) / 128)


def test_sizes() -> None:
    s = sizes_for_params(1e4, depth=3)
    assert s == [57] * 4 and abs(n_params(s) - 1e4) / 1e4 < 0.02
    nets = parse_sizes("1e3:1e5:5,784-256-10,1e3")
    counts = [n_params(x) for x in nets]
    assert counts == sorted(counts) and len(nets) == 6  # the repeated 1e3 is dropped
    assert [784, 256, 10] in nets
    assert len(parse_sizes("1e3:1e7")) == 13  # 3 a decade by default
    for bad in ("abc", "1e3:x", "5-0-3", ""):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_timer_counts_samples() -> None:
    calls = []
    t = time_ops({"a": lambda: calls.append(1), "b": lambda: sum(range(100))}, repeats=4, warmup=1,
                 min_sample_time=1e-4)
    assert set(t) == {"a", "b"}
    for timing in t.values():
        assert len(timing.samples) == 4 and timing.inner >= 1
        assert 0 < timing.min <= timing.median <= timing.max
        assert timing.first_call > 0


def test_timer_fixed_inner_and_paired_ratio() -> None:
    from backprop.bench.timing import Timing, paired_ratio

    calls = []
    t = time_ops({"a": lambda: calls.append(1)}, repeats=2, warmup=0, inner=3)
    assert t["a"].inner == 3 and len(calls) == 1 + 2 * 3  # the cold call, then 2 samples of 3
    with pytest.raises(ValueError):
        time_ops({"a": lambda: None}, repeats=1, inner=0)
    # per-repeat ratios 2, 2, 10: the median of the pairs ignores the repeat that drifted
    assert paired_ratio(Timing([2.0, 4.0, 10.0]), Timing([1.0, 2.0, 1.0])) == pytest.approx(2.0)


def test_fd_gradient_matches_backprop() -> None:
    import backprop as bp

    net = bp.MLP([3, 4, 2], dtype="float64", seed=1, backend="numpy")
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    before = net.get_params()
    fd = fd_gradient(net, x, t)
    _, bp_grads = net.loss_and_grads_device(x, t)
    for (gw, gb), (bw, bb) in zip(fd, bp_grads):
        np.testing.assert_allclose(gw, bw, atol=1e-6)
        np.testing.assert_allclose(gb, bb, atol=1e-6)
    for (w0, b0), (w1, b1) in zip(before, net.get_params()):  # parameters restored exactly
        np.testing.assert_array_equal(w0, w1)
        np.testing.assert_array_equal(b0, b1)


# --------------------------------------------------------------------------- the command


def test_cli_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    # one BLAS thread and no retries: this checks the plumbing, fast even on a busy machine
    rc = main(["--quick", "--backends", "numpy", "--out", str(out), "--no-progress", "--threads", "1",
               "--retries", "0", "--no-malloc-tune"])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == "backprop-bench/1"
    assert doc["machine"]["versions"]["numpy"] == np.__version__
    assert doc["machine"]["cpu"] and doc["machine"]["date"]
    [res] = doc["backends"]
    assert res["backend"] == "numpy" and not res["errors"]
    ok = [r for r in res["sizes"] if r["status"] == "ok"]
    assert len(ok) >= 5
    assert ok[-1]["n_params"] / ok[0]["n_params"] > 500  # nearly three decades even in --quick
    for r in ok:
        for op in ("forward", "gradient", "step"):
            t = r["timings"][op]
            assert len(t["samples"]) == doc["config"]["repeats"]
            assert 0 < t["min"] <= t["median"] <= t["max"]
        assert 0 < r["ratio_grad"] < 1e4 and 0 < r["ratio_step"] < 1e4  # figures: noisy on a busy machine
        assert r["flop_ratio"] == pytest.approx(2 + 2 / 3)
    for op in ("forward", "gradient", "step", "finite_differences"):
        fit = res["fits"][op]
        assert math.isfinite(fit["slope"]) and fit["n_points"] >= 2 and fit["rule"]
    fd = [f for f in res["finite_differences"] if f["status"] == "ok"]
    assert any(f["measured"] for f in fd)
    for f in fd:
        assert f["time"] > 0 and f["speedup"] > 1
        if f["measured"]:
            assert f["rel_error"] < 0.1  # float32 forward differences agree with backprop
    assert res["batch"] == 256 and res["batch_default"]  # the CPU default
    assert doc["config"]["batch"] is None and "4096 on a GPU" in doc["config"]["batch_rule"]
    md = (out / "report.md").read_text()
    assert "grad/fwd" in md and "Finite differences" in md
    assert "numpy 256 (default on a CPU)" in md
    png = out / "scaling.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "scaling.png" in md


def test_cli_peer_missing_and_bad_usage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    rc = main(["--backends", "numpy", "--sizes", "1e3,4e3", "--no-fd", "--repeats", "1", "--warmup", "0",
               "--min-sample-time", "0", "--peers", "torch", "--no-plot", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["peers"]["torch"]["status"] == "unavailable"
    assert "not installed" in doc["peers"]["torch"]["message"]
    assert not (tmp_path / "scaling.png").exists()
    assert main(["--backends", "nosuch", "--out", str(tmp_path)]) == 2
    assert main(["--sizes", "abc", "--out", str(tmp_path)]) == 2
    assert main(["--peers", "jax", "--out", str(tmp_path)]) == 2


class _Stub:
    def __init__(self, is_gpu: bool) -> None:
        self.is_gpu = is_gpu


def test_default_batch_depends_on_the_device() -> None:
    """4096 on a GPU (large nets GEMM-bound there), 256 on a CPU; --batch overrides both."""
    from backprop.bench import BenchConfig
    from backprop.bench.cli import _config, build_parser

    gpu, cpu = _Stub(True), _Stub(False)
    cfg = BenchConfig()
    assert cfg.batch is None and cfg.batch_for(gpu) == 4096 and cfg.batch_for(cpu) == 256
    given = BenchConfig(batch=512)
    assert given.batch_for(gpu) == 512 and given.batch_for(cpu) == 512
    assert _config(build_parser().parse_args([])).batch is None
    assert _config(build_parser().parse_args(["--batch", "64"])).batch_for(gpu) == 64
    assert "4096 on a GPU backend" in build_parser().format_help()


def test_explicit_batch_is_used(tmp_path: Path) -> None:
    rc = main(["--backends", "numpy", "--sizes", "1e3,4e3", "--no-fd", "--repeats", "1", "--warmup", "0",
               "--min-sample-time", "0", "--batch", "32", "--no-plot", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    [res] = doc["backends"]
    assert res["batch"] == 32 and not res["batch_default"] and doc["config"]["batch_rule"] == "--batch"
    assert all(r["batch"] == 32 for r in res["sizes"])
    assert "batch: numpy 32;" in (tmp_path / "report.md").read_text()


def test_module_help_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "backprop.bench", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "backprop-bench" in proc.stdout and "--quick" in proc.stdout and "--peers" in proc.stdout


def test_sizes_that_do_not_fit_are_skipped_not_fatal() -> None:
    from backprop.backend import resolve_backend
    from backprop.bench import BenchConfig, run_backend

    cfg = BenchConfig(sizes="1e3,1e4", repeats=1, warmup=0, min_sample_time=0.0, fd=False, mem_fraction=1e-12)
    res = run_backend(resolve_backend("numpy"), cfg)
    assert [r["status"] for r in res["sizes"]] == ["skipped", "skipped"]
    assert all("GiB free" in r["message"] for r in res["sizes"]) and res["errors"] == 0


# --------------------------------------------------------------------------- options checked up front

#: Bad values, each refused before any work starts and before anything is written (exit status 2, the last
#: line of stderr naming the option, no traceback). The first element is the option the error must name;
#: {file} is an existing regular file, {dir} the test's folder, {taken} a folder whose results.json is a folder.
BAD_OPTIONS: list[list[str]] = [
    ["--backends", "nosuch"],
    ["--backends", "numpy,auto"],
    ["--sizes", "inf"],
    ["--sizes", "nan"],
    ["--sizes", "1e3,-1e3"],
    ["--sizes", "1e400"],
    ["--sizes", "1e3:inf"],
    ["--sizes", "1e3:1e400"],
    ["--sizes", "1e7:1e3"],
    ["--sizes", "1e3:1e7:0"],
    ["--sizes", "1e3:1e7:100000000"],
    ["--sizes", "784-0-10"],
    ["--sizes", "784-256-1e3"],
    ["--sizes", "1e20"],
    ["--sizes", "abc"],
    ["--sizes", ","],
    ["--depth", "0"],
    ["--depth", "100000"],
    ["--depth", "two"],
    ["--batch", "0"],
    ["--batch", "1.5"],
    ["--batch", "99999999999"],
    ["--repeats", "0"],
    ["--warmup", "-1"],
    ["--min-sample-time", "nan"],
    ["--min-sample-time", "inf"],
    ["--min-sample-time", "-0.1"],
    ["--min-sample-time", "1e300"],
    ["--dtype", "float16"],
    ["--out", "{file}"],
    ["--out", "{file}/x"],
    ["--out", "{file}/x/y"],
    ["--out", ""],
    ["--out", "{dir}/" + "x" * 300],
    ["--out", "{taken}"],
    ["--fd-max-n", "nan"],
    ["--fd-max-n", "-1"],
    ["--fd-batch", "0"],
    ["--fd-repeats", "0"],
    ["--fd-time-limit", "nan"],
    ["--fd-time-limit", "-5"],
    ["--fd-time-limit", "0"],
    ["--fit-min-n", "nan"],
    ["--fit-min-n", "inf"],
    ["--fit-min-n", "0"],
    ["--overhead-factor", "nan"],
    ["--overhead-factor", "-1"],
    ["--peers", "jax"],
    ["--threads", "-1"],
    ["--threads", "0"],
    ["--threads", "1e9"],
    ["--lr", "inf"],
    ["--lr", "nan"],
    ["--lr", "0"],
    ["--lr", "-1"],
    ["--lr", "1e-50"],  # 0 in float32, the default --dtype
    ["--lr", "1e39"],  # inf in float32
    ["--lr", "1e-320", "--dtype", "float64"],  # subnormal in float64
    ["--seed", "-1"],
    ["--seed", "1.5"],
    ["--seed", str(2**64)],
    ["--retries", "-1"],
    ["--retries", "x"],
]


@pytest.mark.parametrize("argv", BAD_OPTIONS, ids=lambda a: " ".join(a)[:60])
def test_bad_option_is_refused_up_front(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import backprop.bench.cli as cli

    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    taken = tmp_path / "taken"
    (taken / "results.json").mkdir(parents=True)
    argv = [a.format(file=afile, dir=tmp_path, taken=taken) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    monkeypatch.chdir(tmp_path)  # where a relative --out would land
    for name in ("run_backend", "tune_malloc", "set_threads", "make_peer", "machine_info", "_backends"):
        monkeypatch.setattr(cli, name, must_not_run(name))
    before = snapshot(tmp_path)
    rc = main(argv + ["--no-progress", "--no-plot"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"backprop-bench: error: argument {argv[0]}"), last
    assert snapshot(tmp_path) == before  # nothing created, nothing written


def test_good_options_pass_the_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every option at an edge of what it accepts parses and passes the checks; nothing is created."""
    from backprop.bench.cli import MAX_SEED, _check, _config, build_parser, check_args

    parser = build_parser()
    out = tmp_path / "new" / "dir"
    args = parser.parse_args([
        "--backends", "numpy", "--sizes", "1e3:1e7:5,784-256-10,1,1e15", "--depth", "1", "--batch", "1",
        "--repeats", "1", "--warmup", "0", "--min-sample-time", "0", "--dtype", "float64", "--out", str(out),
        "--no-fd", "--fd-max-n", "0", "--no-fd-extrapolation", "--fd-batch", "1", "--fd-repeats", "1",
        "--fd-time-limit", "0.5", "--fit-min-n", "1e4", "--overhead-factor", "0.5", "--peers", "torch",
        "--threads", "1", "--lr", "1e-300", "--seed", str(MAX_SEED), "--retries", "0", "--no-malloc-tune",
        "--no-plot", "--no-progress", "--quick",
    ])
    check_args(parser, args)
    _check(_config(args))
    assert (args.depth, args.batch, args.warmup, args.min_sample_time, args.seed) == (1, 1, 0, 0.0, MAX_SEED)
    assert not (tmp_path / "new").exists()
    monkeypatch.chdir(tmp_path)
    defaults = parser.parse_args([])  # the defaults pass too, with the default --out not there yet
    check_args(parser, defaults)
    assert defaults.out == "bench-out" and defaults.lr == 1e-7 and not (tmp_path / "bench-out").exists()
    check_args(parser, parser.parse_args(["--out", str(tmp_path)]))  # an existing directory is fine


def test_out_that_cannot_be_created_after_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Should the directory still fail to be created (the file system changed since the check), the run
    stops there with status 2, before any timing."""
    import backprop.bench.cli as cli

    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setattr(cli, "out_problem", lambda out: None)
    monkeypatch.setattr(cli, "run_backend", must_not_run("run_backend"))
    rc = main(["--backends", "numpy", "--no-malloc-tune", "--no-progress", "--out", str(afile / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("backprop-bench: error: argument --out: cannot create")


def test_bad_option_exit_status_of_the_command(tmp_path: Path) -> None:
    """The command itself (not only main()) exits with status 2 and one error line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "backprop.bench", "--sizes", "inf", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("backprop-bench: error: argument --sizes: ")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- the verdict on noise, the plot


def _fake_doc(*, busy: str = "", load: list[float] | None = None, unstable: bool = False,
              ratio: float = 2.7, backends: tuple[str, ...] = ("numpy",)) -> dict:
    """A small results document, as ``backprop-bench`` writes it, for the report and the plot."""
    def timing(med: float) -> dict:
        return {"median": med, "q1": med * 0.98, "q3": med * 1.02, "min": med * 0.97, "max": med * 1.03,
                "samples": [med] * 3, "first_call_excess": 0.0}

    ns = [1e3, 1e4, 1e5, 1e6]
    fit = {"slope": 1.0, "stderr": 0.01, "r2": 0.999, "n_min": 1e4, "n_max": 1e6, "n_points": 3, "coef": 1e-8,
           "rule": "GEMM-bound sizes", "n_used": ns[1:]}
    res = []
    for name in backends:
        sizes = [{"status": "ok", "n_params": n, "sizes": [int(n ** 0.5)] * 4, "unstable": unstable and n > 1e3,
                  "timings": {"forward": timing(n * 1e-8), "gradient": timing(n * 1e-8 * (ratio if n == 1e5 else 2.7)),
                              "step": timing(n * 1e-8 * 2.8)},
                  "ratio_grad": ratio if n == 1e5 else 2.7, "ratio_step": 2.8, "flop_ratio": 2 + 2 / 3,
                  "in_fit": n > 1e3} for n in ns]
        res.append({"backend": name, "is_gpu": False, "batch": 256, "batch_default": True, "sizes": sizes,
                    "finite_differences": [], "fits": {"forward": fit, "gradient": fit, "step": fit,
                                                       "finite_differences": None},
                    "checks": {"gemm_bound_sizes": ns[1:], "unstable_sizes": ns[1:] if unstable else [],
                               "max_ratio_grad": max(ratio, 2.7), "max_ratio_step": 2.8, "max_ratio_grad_best": 2.7,
                               "max_ratio_step_best": 2.8, "max_flop_ratio": 2 + 2 / 3,
                               "ratio_grad_at_most_3": ratio <= 3, "ratio_step_at_most_3": True,
                               "ratio_grad_at_most_5": ratio <= 5, "ratio_step_at_most_5": True},
                    "messages": [], "errors": [], "first_call_excess": {}})
    load = load or [0.5, 0.5, 0.5]
    return {
        "schema": "backprop-bench/1", "command": "backprop-bench --quick", "duration_s": 3.0,
        "config": {"dtype": "float32", "depth": 3, "repeats": 3, "warmup": 1, "min_sample_time": 0.002,
                   "lr": 1e-7, "overhead_factor": 30.0, "fd_max_n": 5e3, "batch": None, "unstable_spread": 0.1,
                   "batch_rule": "256 on a CPU", "malloc": ""},
        "machine": {"date": "2026-01-01T00:00:00+00:00", "backprop": "0.1.0", "cpu": "Test CPU", "cpu_count": 2,
                    "cpus_usable": 2, "memory_bytes": 2**33, "platform": "Linux", "python": "3.11",
                    "versions": {"numpy": np.__version__}, "blas": [], "gpus": []},
        "load_average": {"start": load, "end": [0.5, 0.5, 0.5]},
        "cpu_pressure": {"start": None, "end": None},
        "busy_at_start": busy, "peers": {}, "backends": res, "skipped_backends": {},
    }


def test_report_says_when_the_run_was_noisy() -> None:
    from backprop.bench.report import markdown_report, noise_verdict, terminal_report

    noisy = _fake_doc(busy="the load average (22.6) exceeds the 2 CPUs", load=[22.6, 20.0, 14.0], ratio=9.2)
    v = noise_verdict(noisy)
    assert v["noisy"] and v["max_ratio"] == pytest.approx(9.2) and v["max_ratio_backend"] == "numpy"
    md = markdown_report(noisy, "scaling.png")
    para = next(line for line in md.splitlines() if line.startswith("**Noisy run**"))
    assert "load average 22.6 on 2 CPUs" in para and "9.20" in para and "above 5" in para
    assert "Rerun on an idle machine" in para
    assert md.index("**Noisy run**") < md.index("- machine:")  # near the top, before the details
    assert "warning: noisy run" in terminal_report(noisy)

    quiet = _fake_doc()
    assert not noise_verdict(quiet)["noisy"]
    md = markdown_report(quiet, None)
    assert "**Quiet run**" in md and "Noisy run" not in md
    assert "noisy run" not in terminal_report(quiet)

    # unsteady timings alone make a run noisy, even on a machine that looked idle at both ends
    unsteady = _fake_doc(unstable=True)
    v = noise_verdict(unsteady)
    assert v["noisy"] and any("unsteady" in r and "numpy 3 of 3" in r for r in v["reasons"])
    assert "**Noisy run**" in markdown_report(unsteady, None)

    # results written before the run recorded the load at the end: the verdict at the start still counts
    old = _fake_doc(busy="other work competes for the CPUs")
    del old["load_average"], old["cpu_pressure"]
    assert noise_verdict(old)["noisy"]


def test_no_kakade_in_the_help_and_the_report() -> None:
    from backprop.bench.cli import build_parser
    from backprop.bench.report import markdown_report

    text = " ".join(build_parser().format_help().split())  # argparse wraps the lines
    assert "Kakade" not in text and "cheap gradient principle" in text and "Baur" in text
    md = markdown_report(_fake_doc(), None)
    assert "Kakade" not in md and "cheap gradient principle" in md


def test_plot_banner_legend_and_colours(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from backprop.bench.plot import backend_color, build_figure, plot_results

    def texts(fig) -> str:
        return "\n".join(t.get_text() for f in [fig, *fig.subfigs] for t in f.texts)

    noisy = _fake_doc(busy="the load average (22.6) exceeds the 2 CPUs", load=[22.6, 20.0, 14.0], ratio=9.2,
                      backends=("numpy", "numba"))
    fig = build_figure(noisy)
    assert "NOISY RUN" in texts(fig) and "Rerun on an idle machine" in texts(fig)
    assert plot_results(noisy, tmp_path / "noisy.png") is None
    assert (tmp_path / "noisy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fig = build_figure(_fake_doc(backends=("numpy", "numba")))
    assert "NOISY RUN" not in texts(fig)
    fig.canvas.draw()
    axes = fig.axes
    assert len(axes) == 2
    [leg] = [leg for f in [fig, *fig.subfigs] for leg in f.legends]
    box = leg.get_window_extent()
    for ax in axes:
        assert not box.overlaps(ax.get_window_extent())  # the legend is outside the data
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    labels = [t.get_text() for t in leg.get_texts()]
    assert any(lab.startswith("numpy (CPU)") for lab in labels) and any(lab.startswith("numba (CPU)") for lab in labels)
    assert any("cheap gradient principle" in lab for lab in labels)
    assert any("operation count ratio" in lab for lab in labels)
    assert any(t.get_text().startswith(" fit from N = 1.00e4") for t in axes[0].texts)
    # one colour per backend, the same in both panels
    assert backend_color("numpy") != backend_color("numba")
    for ax in axes:
        colours = {str(line.get_color()) for line in ax.get_lines()}
        assert {backend_color("numpy"), backend_color("numba")} <= colours
