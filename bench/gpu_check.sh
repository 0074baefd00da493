#!/usr/bin/env bash
# The checks to run on a machine with a GPU, in one go (docs/benchmarks.md):
#   1. the test suite on CUDA (BIDF_TEST_DEVICE=cuda: every device-independent test runs there; cpu_only
#      tests skip, with their reason, in tests.log)
#   2. every benchmark cell on CUDA, as the markdown tables of bench/RESULTS.md
#   3. one whole API-SS visit at the paper's settings (32x32, 200 generator steps, q 100), not extrapolated
#   4. the projected cost of a paper API-SS run on this GPU (python -m bench --estimate), as the defaults
#      run it (--task_exec auto: tasks vmapped in chunks of 16 on a GPU) and one task at a time
# Outputs go to $GPU_CHECK_OUT (default bench/out/gpu/); each step's log is there too.
#   bash bench/gpu_check.sh              # on the GPU machine
#   BIDF_VENV=none bash bench/gpu_check.sh   # with the torch already installed there (no network)
#   bash bench/gpu_check.sh --dry-run    # print the commands and check that they parse; needs no GPU
# With pytest-xdist installed the tests run over 6 workers (much shorter on a GPU machine's many cores:
# bench/RESULTS.md, "GPU").
set -eo pipefail
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "error: unknown argument $1; use --dry-run or nothing" >&2; exit 2 ;;
esac
. "$(dirname "$0")/../scriptskd/env.sh"
OUT=${GPU_CHECK_OUT:-bench/out/gpu}
XDIST=""
python -c "import xdist" >/dev/null 2>&1 && XDIST="-n 6 --dist loadfile"

STEPS=(
  "tests|env BIDF_TEST_DEVICE=cuda bash tests/run.sh -rs $XDIST"
  "bench|python -m bench --device cuda --markdown --out $OUT/bench.json"
  "visit|python -m bench --device cuda --only kd --scales paper --sizes 32 --kd_steps 200 --out $OUT/visit.json --markdown"
  "estimate|python -m bench --device cuda --estimate --out $OUT/estimate.json -- --preset paper_ss"
  "estimate_seq|python -m bench --device cuda --estimate --out $OUT/estimate_seq.json -- --preset paper_ss --task_exec sequential"
)

if [ "$DRY" = 1 ]; then
  # what each python -m bench command would do, parsed by its own parser (nothing is measured)
  for s in "${STEPS[@]}"; do
    name=${s%%|*}; cmd=${s#*|}
    echo "[gpu_check] $name: $cmd > $OUT/$name.log"
    case "$cmd" in
      "python -m bench"*)
        # shellcheck disable=SC2086
        python -c 'import sys; from bench.__main__ import parse_args; parse_args(sys.argv[1:])' ${cmd#python -m bench } ;;
      *) [ -f tests/run.sh ] || { echo "error: tests/run.sh is missing" >&2; exit 1; } ;;
    esac
  done
  python -c 'import torch; print(f"[gpu_check] dry run: commands parse; torch {torch.__version__}, "
                                 f"CUDA available: {torch.cuda.is_available()}")'
  exit 0
fi

python -c 'import sys, torch; torch.cuda.is_available() or sys.exit(
  "error: torch sees no CUDA device; bench/gpu_check.sh runs on a GPU machine (--dry-run checks it anywhere)")'
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>/dev/null || true
failed=()
for s in "${STEPS[@]}"; do
  name=${s%%|*}; cmd=${s#*|}
  echo "[gpu_check] $name: $cmd"
  t0=$SECONDS
  # shellcheck disable=SC2086
  if $cmd > "$OUT/$name.log" 2>&1; then
    echo "[gpu_check] $name: ok in $((SECONDS - t0)) s ($OUT/$name.log)"
  else
    echo "[gpu_check] $name: FAILED after $((SECONDS - t0)) s; last lines of $OUT/$name.log:" >&2
    tail -5 "$OUT/$name.log" >&2
    failed+=("$name")
  fi
done
[ ${#failed[@]} -eq 0 ] || { echo "[gpu_check] failed: ${failed[*]}" >&2; exit 1; }
echo "[gpu_check] done: tables in $OUT/bench.log and $OUT/visit.log, projections in $OUT/estimate.log and $OUT/estimate_seq.log"
