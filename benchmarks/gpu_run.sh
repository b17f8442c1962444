#!/usr/bin/env bash
# The GPU check of the cupy backend, in one call on a machine with a CUDA GPU and CuPy (PyTorch for
# the comparison), no network needed:
#
#   bash benchmarks/gpu_run.sh [OUTDIR]        # OUTDIR: default $OUT, else bench-out
#
# 1. installs the project (editable, no dependencies; a symlink shim if that install fails),
# 2. runs every test, the GPU ones included (-m "gpu or not gpu"): pytest.txt, junit.xml,
# 3. times a training step against PyTorch eager: gpu_vs_torch.json / .md (benchmarks/gpu_vs_torch.py).
#
# Everything lands in OUTDIR, with env.txt (nvidia-smi, versions). Exit status: non-zero if the
# tests or the benchmark failed. Time limits (seconds) can be changed with TEST_TIMEOUT and
# BENCH_TIMEOUT; PYTEST_ARGS replaces the test selection (default: tests/); BENCH_ARGS is passed on.
set -u
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-bench-out}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
start=$(date +%s)

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    "$PY" - <<'PYEOF'
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "cupy", "torch", "numba", "numba_cuda", "pytest"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "not importable:", exc)
try:
    import cupy
    print("cuda runtime", cupy.cuda.runtime.runtimeGetVersion(), "driver", cupy.cuda.runtime.driverGetVersion())
    print("device", cupy.cuda.runtime.getDeviceProperties(0)["name"])
except Exception as exc:  # noqa: BLE001
    print("cupy device query failed:", exc)
PYEOF
} > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

echo "== install"
if "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUTDIR/install.txt" 2>&1; then
    echo "installed (editable)"
else
    # the package maps backprop.kernels to ./kernels: rebuild that layout with symlinks
    shim="$(mktemp -d)"
    mkdir -p "$shim/backprop"
    for f in backprop/*; do ln -s "$PWD/$f" "$shim/backprop/"; done
    ln -s "$PWD/kernels" "$shim/backprop/kernels"
    export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "editable install failed (see install.txt); using the shim $shim"
fi
"$PY" -c "from backprop.kernels import cupy_gpu as k; print('cupy backend available:', k.is_available(), k.unavailable_reason())"

echo "== tests"
# shellcheck disable=SC2086
timeout "${TEST_TIMEOUT:-400}" "$PY" -m pytest -q ${PYTEST_ARGS:-tests/} -m "gpu or not gpu" -p no:cacheprovider \
    -rfEs --junitxml="$OUTDIR/junit.xml" > "$OUTDIR/pytest.txt" 2>&1
test_rc=$?
tail -n 60 "$OUTDIR/pytest.txt"
[ "$test_rc" -eq 124 ] && echo "tests: stopped by TEST_TIMEOUT"

echo "== benchmark"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-170}" "$PY" benchmarks/gpu_vs_torch.py --out "$OUTDIR" ${BENCH_ARGS:-} \
    > "$OUTDIR/bench.txt" 2>&1
bench_rc=$?
cat "$OUTDIR/bench.txt"
[ "$bench_rc" -eq 124 ] && echo "benchmark: stopped by BENCH_TIMEOUT"

echo "== done in $(( $(date +%s) - start )) s: tests rc=$test_rc, benchmark rc=$bench_rc; files in $OUTDIR"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
