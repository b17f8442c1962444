"""The numba backend's first-compile notice, and ``python -m backprop.warmup``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

from backprop import warmup  # noqa: E402
from backprop.kernels import numba_cpu as k  # noqa: E402
from backprop.kernels.numba_cpu import notice  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {key: v for key, v in os.environ.items() if key not in ("BACKPROP_QUIET", "NUMBA_CACHE_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


# --------------------------------------------------------------------------- the compile notice
@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process in which the notice was not printed yet, BACKPROP_QUIET unset."""
    monkeypatch.setattr(notice, "_noticed", False)
    monkeypatch.delenv("BACKPROP_QUIET", raising=False)


def test_notice_once_per_process(fresh: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert notice._compile_notice(k.KERNELS[0]) is True
    assert notice._compile_notice(k.KERNELS[1]) is False
    out, err = capsys.readouterr()
    assert out == "" and err == k.COMPILE_NOTICE + "\n"
    assert "first run only, cached afterwards" in k.COMPILE_NOTICE


def test_notice_ignores_other_functions(fresh: None, capsys: pytest.CaptureFixture[str]) -> None:
    from numba import njit

    @njit
    def not_a_kernel(x):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        return x + 1

    assert notice._compile_notice(not_a_kernel) is False
    assert notice._compile_notice(None) is False
    assert not_a_kernel(1) == 2  # a real compilation of a function that is not a kernel
    assert capsys.readouterr().err == "" and notice._noticed is False


@pytest.mark.parametrize("value", ["1", "true", "yes", "YES"])
def test_notice_silenced(fresh: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                         value: str) -> None:
    monkeypatch.setenv("BACKPROP_QUIET", value)
    assert notice._compile_notice(k.KERNELS[0]) is False
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("BACKPROP_QUIET", "0")  # "0" / "" mean not quiet
    assert notice._compile_notice(k.KERNELS[0]) is True


def test_notice_listens_to_numba_compile_events(fresh: None, capsys: pytest.CaptureFixture[str]) -> None:
    from numba.core import event

    with event.trigger_event("numba:compile", data={"dispatcher": k.KERNELS[2], "args": (), "return_type": None}):
        pass
    assert capsys.readouterr().err == k.COMPILE_NOTICE + "\n"


_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from backprop.kernels import numba_cpu as k
    for dt in sys.argv[1:]:  # a second compilation: still one notice
        assert k.all_finite(np.ones(3, dt))
    s = k._all_finite.stats
    print(sum(s.cache_misses.values()), sum(s.cache_hits.values()))
""")


@pytest.mark.slow
def test_notice_only_on_a_cold_cache(tmp_path: Path) -> None:
    """A cold on-disk cache (a fresh NUMBA_CACHE_DIR): the notice, once; the same cache warm: none."""
    env = _env(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    cold = subprocess.run([sys.executable, "-c", _SCRIPT, "float32", "float64"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert cold.returncode == 0, cold.stderr
    assert cold.stdout.split() == ["2", "0"]  # compiled both
    assert cold.stderr.count(k.COMPILE_NOTICE) == 1
    warm = subprocess.run([sys.executable, "-c", _SCRIPT, "float32", "float64"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.split() == ["0", "2"]  # loaded both from the cache
    assert k.COMPILE_NOTICE not in warm.stderr
    quiet = subprocess.run([sys.executable, "-c", _SCRIPT, "float32"],
                           env=_env(NUMBA_CACHE_DIR=str(tmp_path / "other"), BACKPROP_QUIET="1"),
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stdout.split() == ["1", "0"]
    assert k.COMPILE_NOTICE not in quiet.stderr


# --------------------------------------------------------------------------- warm-up
def test_warm_up_every_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    assert warmup.main(["--dtypes", "float32,float64"]) == 0
    out = capsys.readouterr().out
    n = len(k.KERNELS)
    assert f"numba float32: {n}/{n} kernels ready" in out and f"numba float64: {n}/{n} kernels ready" in out
    assert "done in" in out
    for dt in (np.float32, np.float64):
        assert all(warmup._has_dtype(f, np.dtype(dt)) for f in k.KERNELS)


def test_warm_up_function() -> None:
    (res,) = warmup.warm_up("numba", ["float64", np.float64])
    assert res.ok and res.dtype == "float64" and res.kernels == len(k.KERNELS) and res.missing == ()
    assert res.compiled >= 0 and res.loaded >= 0 and res.seconds >= 0 and res.cache_path


@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "numpy"}, "backend: expected one of numba"),
    ({"backend": "cupy"}, "backend"),
    ({"dtypes": "float16"}, "dtypes: expected float32 and/or float64"),
    ({"dtypes": "float32,int8"}, "dtypes"),
    ({"dtypes": [None]}, "dtypes"),
    ({"dtypes": ""}, "dtypes"),
])
def test_warm_up_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        warmup.warm_up(**kwargs)


@pytest.mark.parametrize("argv", [["--backends", "cupy"], ["--backends", ""], ["--dtypes", "float16"],
                                  ["--bogus"]])
def test_cli_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        warmup.main(argv)
    assert exc.value.code == 2
    assert "python -m backprop.warmup" in capsys.readouterr().err


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        warmup.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--backends" in out and "--dtypes" in out and "ahead of time" in out


def test_cli_as_module(tmp_path: Path) -> None:
    """``python -m backprop.warmup`` (kernels probably cached already: a second or two)."""
    run = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "backprop.warmup", "--dtypes",
                          "float32"], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "numba float32:" in run.stdout and "kernels ready" in run.stdout and "done in" in run.stdout
