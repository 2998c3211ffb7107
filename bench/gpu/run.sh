#!/usr/bin/env bash
# One command for a fresh GPU machine with torch and no internet: install what bigpt needs from
# the wheels carried in bench/gpu/wheels/py<VERSION>/ (bench/gpu/fetch_wheels.sh makes them where
# there is internet), then run tests/test_gpu.py and the throughput benchmark (bench/gpu/throughput.py).
# About 6-8 minutes on one H100. See bench/gpu/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash bench/gpu/run.sh [--out DIR] [--steps N] [--skip-tests] [--skip-bench] [--dry-run]
                             [--te-wheels DIR] [-- BENCHMARK_ARGS...]
  --out DIR        where logs, the installed packages and throughput.json go (default: $OUT, else runs/gpu-bench)
  --steps N        benchmark steps, the first 3 left out of the medians (default 12)
  --skip-tests     do not run tests/test_gpu.py
  --skip-bench     do not run the throughput benchmark
  --dry-run        install and check imports, print the plan and what would run; needs no GPU
  --te-wheels DIR  try to install Transformer Engine from DIR (no index, no build isolation) within
                   TE_INSTALL_TIMEOUT seconds (default 240); without it, or if it fails, the tests
                   that need it skip and the benchmark uses megatron-core's local layers
  after --         passed to bench/gpu/throughput.py (--recipe R, --gpus N, table.key=value ...)
Time limits (seconds): TEST_TIMEOUT (default 330), BENCH_TIMEOUT (default 200).
EOF
}

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$REPO/runs/gpu-bench}
STEPS=12 TESTS=1 BENCH=1 DRY=0 TE_WHEELS=""
BENCH_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --steps) STEPS=${2:?--steps needs a number}; shift 2 ;;
        --skip-tests) TESTS=0; shift ;;
        --skip-bench) BENCH=0; shift ;;
        --dry-run) DRY=1; shift ;;
        --te-wheels) TE_WHEELS=${2:?--te-wheels needs a directory}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; BENCH_ARGS=("$@"); break ;;
        *) echo "bench/gpu/run.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case "$STEPS" in ''|*[!0-9]*) echo "bench/gpu/run.sh: --steps must be a whole number, got '$STEPS'" >&2; exit 2 ;; esac
[ "$STEPS" -gt 3 ] || { echo "bench/gpu/run.sh: --steps must be more than 3 (the warmup steps)" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
say() { echo "== $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

# ---------------------------------------------------------------- install (no index, no internet)
version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
WHEELS="$REPO/bench/gpu/wheels/py$version"
if [ ! -d "$WHEELS" ]; then
    echo "bench/gpu/run.sh: no wheels for Python $version in $WHEELS; where there is internet run" \
         "'bash bench/gpu/fetch_wheels.sh $version' and carry bench/gpu/wheels here" >&2
    exit 2
fi
"$PYTHON" -c 'import torch' 2>/dev/null || { echo "bench/gpu/run.sh: torch does not import with $PYTHON" >&2; exit 2; }
SITE="$OUT/site"
# Only what this Python lacks (torch's own numpy, typing_extensions, ... stay); megatron-core always.
missing=$("$PYTHON" - "$WHEELS" <<'EOF'
import importlib.metadata, pathlib, re, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        importlib.metadata.version(name)
        if re.sub(r"[-_.]+", "_", name).lower() != "megatron_core":
            continue
    except importlib.metadata.PackageNotFoundError:
        pass
    print(wheel)
EOF
)
# shellcheck disable=SC2086  # one wheel path per word
"$PYTHON" -m pip install -q --no-index --no-deps --ignore-requires-python --upgrade --target "$SITE" $missing
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    # emerging-optimizers uses typing.override (3.12); what scripts/setup.sh's .pth line does, here
    # for the PYTHONPATH folder (which reads no .pth files)
    echo 'import typing, typing_extensions; typing.override = getattr(typing, "override", typing_extensions.override)' \
        > "$SITE/sitecustomize.py"
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$TE_WHEELS" ]; then
    if timeout "${TE_INSTALL_TIMEOUT:-240}" "$PYTHON" -m pip install -q --no-index --find-links "$TE_WHEELS" \
            --no-build-isolation --target "$SITE" "transformer-engine[pytorch]>=2.17,<2.18" >"$OUT/te_install.log" 2>&1; then
        say "Transformer Engine installed from $TE_WHEELS"
    else
        say "Transformer Engine did not install within ${TE_INSTALL_TIMEOUT:-240} s (see $OUT/te_install.log): going on without it"
    fi
fi
say "$("$PYTHON" -c '
import importlib.util, torch, megatron.core as m
te = "Transformer Engine " + ("installed" if importlib.util.find_spec("transformer_engine") else "not installed")
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, megatron-core {m.__version__}, {te}; {cuda}")')"

TEST_COMMAND=("$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_gpu.py)
BENCH_COMMAND=("$PYTHON" bench/gpu/throughput.py --steps "$STEPS" --out "$OUT/throughput" "${BENCH_ARGS[@]}")
cd "$REPO"
if [ "$DRY" = 1 ]; then
    [ "$TESTS" = 1 ] && say "would run: timeout ${TEST_TIMEOUT:-330} ${TEST_COMMAND[*]}"
    [ "$BENCH" = 1 ] && say "would run: timeout ${BENCH_TIMEOUT:-200} ${BENCH_COMMAND[*]}"
    "${BENCH_COMMAND[@]}" --dry-run | tee -a "$OUT/summary.txt"
    exit 0
fi
"$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' \
    || { echo "bench/gpu/run.sh: torch sees no CUDA device (--dry-run runs without one)" >&2; exit 2; }

status=0
if [ "$TESTS" = 1 ]; then
    say "tests/test_gpu.py (log: $OUT/tests.log)"
    if timeout "${TEST_TIMEOUT:-330}" "${TEST_COMMAND[@]}" >"$OUT/tests.log" 2>&1; then result=passed; else result="FAILED (exit $?)"; status=1; fi
    say "tests: $result: $(tail -1 "$OUT/tests.log")"
    grep -E "^(SKIPPED|FAILED|ERROR)" "$OUT/tests.log" | tee -a "$OUT/summary.txt" || true
fi
if [ "$BENCH" = 1 ]; then
    say "throughput (log: $OUT/throughput/run.log)"
    if ! timeout "${BENCH_TIMEOUT:-200}" "${BENCH_COMMAND[@]}" 2>&1 | tee -a "$OUT/summary.txt"; then status=1; fi
fi
say "done (exit $status); summary in $OUT/summary.txt"
exit $status
