#!/usr/bin/env bash
# The one prepared run on a GPU machine (CUDA GPU, CuPy, numba-cuda; PyTorch for the comparisons; no network):
# both GPU backends' tests and the benchmark in one call that keeps to a budget, first compiles included.
#
#   bash benchmarks/gpu_run.sh [--dry-run] [--archive FILE] [OUTDIR]
#
# OUTDIR: default benchmarks/results/gpu/<date>-<device>/. The phases, in priority order (PHASES, a comma-separated
# list, reorders or drops them), each under its own limit (in s, set by the variable named) capped by what BUDGET
# (330 s) has left:
#   env         env.txt: mode, date, commit, nvidia-smi, nvcc, the Python packages' versions, the device (ENV_TIMEOUT 40);
#   wheels      wheels.txt: benchmarks/gpu_run_wheels.py installs the wheels of WHEEL_DIR (.whl/, searched
#               recursively) whose distributions the machine lacks, nvmath-python above all, with --no-deps into a
#               folder appended to PYTHONPATH: the machine's own cuda-bindings, cuda-core, ... are never shadowed
#               (WHEELS_TIMEOUT 40);
#   install     install.txt: pip install --no-deps --no-build-isolation -e . (a symlink shim if that fails) and the
#               backends available (INSTALL_TIMEOUT 60);
#   gpu-tests   pytest-gpu.txt, junit-gpu.xml: the tests marked gpu, the cupy backend's (GPU_TESTS_TIMEOUT 110);
#   bench       bench.txt and what benchmarks/gpu_vs_torch.py writes: one .json + .md per section the moment it
#               ends, gpu_vs_torch.json/.md summing them up; no section starts in its last 15 s (BENCH_TIMEOUT 110);
#   cuda-tests  pytest-cuda.txt, junit-cuda.xml: the tests marked cuda, the numba-cuda backend's (CUDA_TESTS_TIMEOUT 70);
# and after each phase summary.md: mode, date, commit, device, versions, each phase's time and outcome (printed last).
#
# Every phase runs under `timeout -s INT -k 15` in a process group of its own: at its limit pytest is interrupted
# and still writes its summary (-rfEs names the failures) and its junit.xml, the benchmark keeps the sections it
# wrote; 15 s later the phase and whatever it started are killed. Other settings: PYTHON (python3); PYTEST_ARGS
# (the paths and options of both test phases, default tests/); GPU_TEST_MARK, CUDA_TEST_MARK (default "gpu",
# "cuda", each "and not exhaustive"); TEST_WORKERS (pytest-xdist workers, default 4 where it is installed; 0: one
# process); BENCH_SECTIONS (step,fused,epilogues,api,graph,tf32,fit); BENCH_ARGS (more options of the benchmark,
# e.g. "--no-compile"); COMMIT (the commit to record where the tree has no git metadata). --archive FILE (or
# ARCHIVE) also packs OUTDIR into FILE (.tar.gz; paths from the repository root when OUTDIR is inside it), renewed
# after every phase, for machines that give back few files. Exit status: 0 if every phase succeeded within its
# limit, 1 if not, 2 on bad usage.
#
# --dry-run (or DRY_RUN=1) runs the same phases and writes the same files on a machine without a GPU, in under a
# minute: numba-cuda under the CUDA simulator, the benchmark on the fake CuPy of tests/test_cupy_backend.py
# (python -m tests.fake_gpu_bench: tiny nets, no PyTorch), the environment left as it is (a shim instead of pip
# install), 16 tests of tests/test_kernels.py per test phase, one xdist worker, BUDGET 150, OUTDIR
# bench-out/gpu-run-dry; so that a broken script is found before a GPU is lent (tests/test_gpu_run.py runs it).
set -u
caller_dir=$PWD
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

DRY="${DRY_RUN:-0}"
ARCHIVE="${ARCHIVE:-}"
OUTDIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --archive) [ $# -ge 2 ] || { echo "--archive needs a file" >&2; exit 2; }; ARCHIVE="$2"; shift ;;
        --archive=*) ARCHIVE="${1#*=}" ;;
        -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUTDIR="$1" ;;
    esac
    shift
done
case "$DRY" in "" | 0) DRY=0 ;; *) DRY=1 ;; esac

# absolute: a path given relative to where the script was called from
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$caller_dir/$1" ;; esac; }

# the GPU's name as a folder name (nvidia-h200), "no-gpu" without nvidia-smi, "dry-run" in the dry mode
device_slug() {
    local name=""
    [ "$DRY" = 1 ] && { echo dry-run; return; }
    command -v nvidia-smi > /dev/null && name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -n 1)
    name=$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
    echo "${name:-no-gpu}"
}

if [ -n "$OUTDIR" ]; then
    OUTDIR=$(absolute "$OUTDIR")
elif [ "$DRY" = 1 ]; then
    OUTDIR="$ROOT/bench-out/gpu-run-dry"
else
    OUTDIR="$ROOT/benchmarks/results/gpu/$(date -u +%Y-%m-%d)-$(device_slug)"
fi
[ -n "$ARCHIVE" ] && ARCHIVE=$(absolute "$ARCHIVE")
mkdir -p "$OUTDIR" || exit 2

PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-$([ "$DRY" = 1 ] && echo 150 || echo 330)}"
PHASES="${PHASES:-env,wheels,install,gpu-tests,bench,cuda-tests}"
WHEEL_DIR=$(absolute "${WHEEL_DIR:-$ROOT/.whl}")
BENCH_SECTIONS="${BENCH_SECTIONS:-step,fused,epilogues,api,graph,tf32,fit}"
if [ "$DRY" = 1 ]; then
    export NUMBA_ENABLE_CUDASIM=1
    PYTEST_ARGS="${PYTEST_ARGS:-tests/test_kernels.py -k 'sgd_update or momentum_update or adam_update'}"
    BENCH_ARGS="${BENCH_ARGS:---quick --backend cupy --no-torch --repeats 1 --fit-repeats 1 --min-sample-time 0 --gemm-size 16}"
    default_workers=1
else
    export NUMBA_ENABLE_CUDASIM="${NUMBA_ENABLE_CUDASIM:-0}"  # the GPU itself, never the simulator
    PYTEST_ARGS="${PYTEST_ARGS:-tests/}"
    BENCH_ARGS="${BENCH_ARGS:-}"
    default_workers=4
fi
eval "test_selection=($PYTEST_ARGS)" || exit 2
eval "bench_options=($BENCH_ARGS)" || exit 2
if [ -z "${TEST_WORKERS:-}" ]; then
    TEST_WORKERS=0
    "$PY" -c "import xdist" 2> /dev/null && TEST_WORKERS=$default_workers
fi
for phase in ${PHASES//,/ }; do
    case "$phase" in env | wheels | install | gpu-tests | bench | cuda-tests) ;;
        *) echo "unknown phase $phase in PHASES (env, wheels, install, gpu-tests, bench, cuda-tests)" >&2; exit 2 ;;
    esac
done

start=$(date +%s)
MODE=$([ "$DRY" = 1 ] && echo "dry run (no GPU: fake CuPy, CUDA simulator)" || echo "GPU run")
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
COMMIT="${COMMIT:-$(git rev-parse --short HEAD 2> /dev/null || echo unknown)}"
git status --porcelain 2> /dev/null | grep -q . && COMMIT="$COMMIT (with changes)"
scratch=()  # the folders made for this run (the wheels' site, the shim), removed at its end
group=""    # the process group of the phase running, killed if the run itself is stopped
trap '[ -z "$group" ] || kill -KILL -- "-$group" 2> /dev/null; rm -rf "${scratch[@]}"' EXIT
trap 'exit 130' INT TERM HUP
left() { echo $(( BUDGET - ($(date +%s) - start) )); }

# run_limited LIMIT CMD...: CMD in a process group of its own; SIGINT at LIMIT s (to CMD alone: pytest then
# stops its workers and writes its summary and junit.xml), SIGKILL 15 s later; then the rest of the group is killed.
run_limited() {
    local limit=$1 pid rc
    shift
    if ! command -v setsid > /dev/null; then
        timeout -s INT -k 15 "$limit" "$@"
        return
    fi
    setsid timeout --foreground -s INT -k 15 "$limit" "$@" &
    pid=$!
    group=$pid
    wait "$pid"
    rc=$?
    kill -KILL -- "-$pid" 2> /dev/null
    group=""
    return "$rc"
}

# --------------------------------------------------------------------------- the phases (each: LIMIT -> status)
NOTE=""  # a phase's one-line outcome beside its status (the pytest counts, what the wheels gave)

phase_env() {
    {
        echo "mode: $MODE"
        echo "date: $DATE"
        echo "commit: $COMMIT"
        echo "budget: $BUDGET s; phases: $PHASES; test workers: $TEST_WORKERS"
        if command -v nvidia-smi > /dev/null; then nvidia-smi 2>&1; else echo "nvidia-smi: not found"; fi
        if command -v nvcc > /dev/null; then echo "nvcc: $(nvcc --version 2>&1 | tail -n 1)"; else echo "nvcc: not found"; fi
        run_limited "$1" "$PY" benchmarks/gpu_run_env.py
    } > "$OUTDIR/env.txt" 2>&1
    local rc=$?
    cat "$OUTDIR/env.txt"
    return "$rc"
}

phase_wheels() {
    local site rc
    site=$(mktemp -d "${TMPDIR:-/tmp}/gpu-run-site.XXXXXX")
    scratch+=("$site")
    run_limited "$1" "$PY" benchmarks/gpu_run_wheels.py "$WHEEL_DIR" "$site" > "$OUTDIR/wheels.txt" 2>&1
    rc=$?
    cat "$OUTDIR/wheels.txt"
    case "$rc" in
        0) export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$site"; NOTE="installed into $site" ;;
        3) NOTE="no usable wheel"; rc=0 ;;
    esac
    return "$rc"
}

# a copy of the package's layout (backprop.kernels is ./kernels) in symlinks, first on PYTHONPATH
use_shim() {
    local shim f
    shim=$(mktemp -d "${TMPDIR:-/tmp}/gpu-run-shim.XXXXXX")
    scratch+=("$shim")
    mkdir -p "$shim/backprop"
    for f in backprop/*; do
        [ "$f" = backprop/kernels ] || ln -s "$ROOT/$f" "$shim/backprop/"
    done
    ln -s "$ROOT/kernels" "$shim/backprop/kernels"
    export PYTHONPATH="$shim:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    echo "using the shim $shim (PYTHONPATH=$PYTHONPATH)"
}

phase_install() {
    if [ "$DRY" = 1 ]; then
        { echo "dry run: nothing is installed"; use_shim; } > "$OUTDIR/install.txt"
    elif run_limited "$1" "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUTDIR/install.txt" 2>&1; then
        echo "installed (editable)" >> "$OUTDIR/install.txt"
    else
        { echo "the editable install failed (above)"; use_shim; } >> "$OUTDIR/install.txt"
        NOTE="shim"
    fi
    run_limited 60 "$PY" -c "import backprop as bp; print('backends available:', bp.available_backends())" \
        >> "$OUTDIR/install.txt" 2>&1
    local rc=$?
    tail -n 3 "$OUTDIR/install.txt"
    return "$rc"
}

# the counts line of a pytest output ("3 failed, 500 passed, 14 skipped in 98.20s")
pytest_counts() {
    grep -E '(passed|failed|skipped|error|errors|xfailed|xpassed|deselected|no tests ran).* in [0-9.]+s' "$1" \
        | tail -n 1 | sed 's/^=* *//; s/ *=*$//'
}

# run_pytest LIMIT NAME MARK: the test selection marked MARK -> pytest-NAME.txt, junit-NAME.xml
run_pytest() {
    local limit=$1 name=$2 mark=$3 workers=() rc
    [ "$TEST_WORKERS" -gt 0 ] && workers=(-n "$TEST_WORKERS")
    run_limited "$limit" "$PY" -m pytest "${test_selection[@]}" -m "$mark" ${workers[@]+"${workers[@]}"} \
        -p no:cacheprovider -q -rfEs --durations=10 --junitxml="$OUTDIR/junit-$name.xml" \
        > "$OUTDIR/pytest-$name.txt" 2>&1
    rc=$?
    tail -n 40 "$OUTDIR/pytest-$name.txt"
    NOTE=$(pytest_counts "$OUTDIR/pytest-$name.txt")
    [ "$rc" -eq 5 ] && NOTE="no test selected"
    return "$rc"
}

phase_gpu_tests() { run_pytest "$1" gpu "${GPU_TEST_MARK:-gpu and not exhaustive}"; }
phase_cuda_tests() { run_pytest "$1" cuda "${CUDA_TEST_MARK:-cuda and not exhaustive}"; }

phase_bench() {
    local limit=$1 bench rc
    if [ "$DRY" = 1 ]; then bench=(-m tests.fake_gpu_bench); else bench=(benchmarks/gpu_vs_torch.py); fi
    run_limited "$limit" "$PY" "${bench[@]}" --out "$OUTDIR" --time-limit $(( limit > 30 ? limit - 15 : limit / 2 )) \
        --compile-budget 40 --sections "$BENCH_SECTIONS" ${bench_options[@]+"${bench_options[@]}"} \
        > "$OUTDIR/bench.txt" 2>&1
    rc=$?
    cat "$OUTDIR/bench.txt"
    NOTE=$(grep -E '^wrote ' "$OUTDIR/bench.txt" | tail -n 1)
    return "$rc"
}

# --------------------------------------------------------------------------- the record
rows=()

status_of() {
    case "$1" in
        0) echo ok ;;
        124) echo "stopped at its limit" ;;
        137) echo "killed 15 s after its limit" ;;
        *) echo "failed (exit $1)" ;;
    esac
}

# recorded LINE: the value of the line "LINE: value" of env.txt ("not recorded" without one)
recorded() {
    local value
    value=$(grep -m 1 "^$1:" "$OUTDIR/env.txt" 2> /dev/null | cut -d' ' -f2-)
    echo "${value:-not recorded}"
}

write_summary() {
    local row
    {
        echo "# $MODE, $DATE: $(recorded device)"
        echo
        echo "- commit: $COMMIT"
        echo "- device: $(recorded device)"
        echo "- versions: $(recorded versions)"
        echo "- budget: $BUDGET s, $(( $(date +%s) - start )) s used"
        echo
        echo "| phase | limit (s) | took (s) | outcome | |"
        echo "|---|---|---|---|---|"
        for row in "${rows[@]}"; do echo "$row"; done
    } > "$OUTDIR/summary.md"
    if [ -n "$ARCHIVE" ]; then
        case "$OUTDIR" in
            "$ROOT"/*) tar -czf "$ARCHIVE" -C "$ROOT" "${OUTDIR#"$ROOT"/}" ;;
            *) tar -czf "$ARCHIVE" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" ;;
        esac
    fi
}

failed=0
for phase in ${PHASES//,/ }; do
    case "$phase" in
        env) cap=${ENV_TIMEOUT:-40} ;;
        wheels) cap=${WHEELS_TIMEOUT:-40} ;;
        install) cap=${INSTALL_TIMEOUT:-60} ;;
        gpu-tests) cap=${GPU_TESTS_TIMEOUT:-110} ;;
        bench) cap=${BENCH_TIMEOUT:-110} ;;
        cuda-tests) cap=${CUDA_TESTS_TIMEOUT:-70} ;;
    esac
    budget_left=$(left)
    lim=$(( cap < budget_left ? cap : budget_left ))
    NOTE=""
    if [ "$lim" -lt 10 ]; then
        echo "== $phase: skipped, $budget_left s of the budget left"
        rows+=("| $phase | $cap | 0 | skipped: the budget was spent | |")
        failed=1
        write_summary
        continue
    fi
    echo "== $phase (limit $lim s, $budget_left s of the budget left)"
    t0=$(date +%s)
    "phase_${phase//-/_}" "$lim"
    rc=$?
    [ "$rc" -eq 0 ] || failed=1
    rows+=("| $phase | $lim | $(( $(date +%s) - t0 )) | $(status_of "$rc") | ${NOTE//|/\\|} |")
    write_summary
done

echo "== done: files in $OUTDIR${ARCHIVE:+, packed into $ARCHIVE}"
ls "$OUTDIR"
cat "$OUTDIR/summary.md"
exit "$failed"
