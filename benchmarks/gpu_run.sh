#!/usr/bin/env bash
# The one prepared script for a session on a GPU machine (CUDA GPU, CuPy and/or numba-cuda; PyTorch for
# the comparisons), no network needed:
#
#   bash benchmarks/gpu_run.sh [OUTDIR]        # OUTDIR: default $OUT, else bench-out
#
# 1. env.txt: nvidia-smi, versions;
# 2. installs the project: python3 -m pip install --no-deps --no-build-isolation -e . (install.txt; a
#    symlink shim if that install fails);
# 3. runs the tests marked gpu (PYTEST_MARK, default "gpu": those that need the device, about 800; CI runs
#    the others on a CPU; "gpu or not gpu" runs all, which does not fit the default budget): pytest.txt,
#    junit.xml;
# 4. runs benchmarks/gpu_vs_torch.py (backprop.bench.user_paths): one .json + .md per section, each written
#    the moment the section ends, and gpu_vs_torch.json / .md summing them up; bench.txt.
#
# Everything lands in OUTDIR. The whole run keeps to a budget of BUDGET seconds (default 300): each phase
# has its own limit (INSTALL_TIMEOUT 60, TEST_TIMEOUT 150, BENCH_TIMEOUT 150 by default) and never gets
# more than what the budget has left; the benchmark stops starting sections 15 s before its limit
# (--time-limit), so a section cut short is the only thing lost. PYTEST_ARGS replaces the test selection
# (default: tests/); BENCH_ARGS is passed on to the benchmark (e.g. "--no-compile"). BENCH_SECTIONS sets the
# sections and their order (default: the ones open work needs first, step,fused,epilogues,api,graph,tf32,fit;
# the CPU section has its own results), so that a run cut short by its limit loses the least.
# Exit status: non-zero if the tests or the benchmark failed or ran out of time.
#
# Wheels the machine lacks (nvmath-python for graph=True on CuPy, and its cuda-bindings, cuda-core,
# cuda-pathfinder) may travel in .whl/ at the repository root; they are installed first into /tmp/site,
# put on PYTHONPATH. Fetch them where pip reaches the index, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl nvmath-python==1.0.0 cuda-bindings cuda-core cuda-pathfinder
set -u
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-bench-out}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-300}"
start=$(date +%s)

left() { echo $(( BUDGET - ($(date +%s) - start) )); }
# limit PHASE_DEFAULT: the phase's own limit, capped by what the budget has left (at least 10 s)
limit() { local l; l=$(left); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 10 ] && l=10; echo "$l"; }

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "budget: ${BUDGET} s"
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    timeout 60 "$PY" - <<'PYEOF'
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "cupy", "torch", "numba", "numba_cuda", "pytest", "triton"):
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

if compgen -G ".whl/*.whl" > /dev/null; then
    echo "== wheels from .whl/"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUTDIR/wheels.txt" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
        || echo "installing .whl/ failed (see wheels.txt); going on without them"
fi

echo "== install ($(left) s left)"
if timeout "$(limit "${INSTALL_TIMEOUT:-60}")" "$PY" -m pip install --no-deps --no-build-isolation -e . \
        > "$OUTDIR/install.txt" 2>&1; then
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
timeout 60 "$PY" -c "import backprop as bp; print('backends available:', bp.available_backends())"

echo "== tests ($(left) s left)"
# shellcheck disable=SC2086
timeout "$(limit "${TEST_TIMEOUT:-150}")" "$PY" -m pytest -q ${PYTEST_ARGS:-tests/} -m "${PYTEST_MARK:-gpu}" \
    -p no:cacheprovider -rfEs --junitxml="$OUTDIR/junit.xml" > "$OUTDIR/pytest.txt" 2>&1
test_rc=$?
tail -n 60 "$OUTDIR/pytest.txt"
[ "$test_rc" -eq 124 ] && echo "tests: stopped by their time limit"

bench_limit=$(limit "${BENCH_TIMEOUT:-150}")
echo "== benchmark (limit ${bench_limit} s)"
# shellcheck disable=SC2086
timeout "$bench_limit" "$PY" benchmarks/gpu_vs_torch.py --out "$OUTDIR" --time-limit $(( bench_limit > 30 ? bench_limit - 15 : bench_limit / 2 )) \
    --compile-budget 40 --sections "${BENCH_SECTIONS:-step,fused,epilogues,api,graph,tf32,fit}" ${BENCH_ARGS:-} \
    > "$OUTDIR/bench.txt" 2>&1
bench_rc=$?
cat "$OUTDIR/bench.txt"
[ "$bench_rc" -eq 124 ] && echo "benchmark: stopped by its time limit (the sections written before are in $OUTDIR)"

echo "== done in $(( $(date +%s) - start )) s: tests rc=$test_rc, benchmark rc=$bench_rc; files in $OUTDIR"
ls -l "$OUTDIR"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
