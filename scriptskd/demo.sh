#!/usr/bin/env bash
# The whole method on the embedded demo dataset (settings: the preset config/demo.py), on a CPU in
# minutes (bench/RESULTS.md):
#   1. make the demo dataset (DFL2Ldata/demo, once)
#   2. pretrain a small pool of conv4 APIs (pretrained_blackbox/demo/..., once; resumable)
#   3. BiDf-MKD, API-SS, zero-order (black-box) synthesis, 5-way 1-shot meta-training, and beside it
#   4. the upper bound: MAML on the real meta-train images, same number of tasks
#   5. 600-task meta-test evaluations, 5-way 1-shot and 5-shot, of the random-init meta model and of the
#      two meta-trained models (chosen on meta_val; the 5-shot rows reuse the 1-shot-trained models)
#   6. results.md / results.json and figs/ in the run directory (its path is the last line printed)
# Interrupted? Rerun with DEMO_OUT=<that directory>: finished stages are skipped, the rest resumes.
# Scale knobs (environment): DEMO_APIS, DEMO_TASKS, DEMO_Q, DEMO_GEN_ITERS, DEMO_TEST_TASKS.
# DEMO_RECIPE=improved runs every row (method and baselines) with --recipe improved.
set -eo pipefail
. "$(dirname "$0")/env.sh"

# Scale knobs: unset, the preset config/demo.py decides; set, they override it.
SCALE=(${DEMO_APIS:+--APInum "$DEMO_APIS"} ${DEMO_TASKS:+--episode_train "$DEMO_TASKS"} ${DEMO_Q:+--q "$DEMO_Q"}
       ${DEMO_GEN_ITERS:+--generate_iterations "$DEMO_GEN_ITERS"})
API_EPOCHS=(${DEMO_API_EPOCHS:+--epochs "$DEMO_API_EPOCHS"})
RECIPE=(--recipe "${DEMO_RECIPE:-faithful}")
TEST_TASKS=${DEMO_TEST_TASKS:-600}  # final meta-test tasks per row
OUT=${DEMO_OUT:-runs/demo-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/eval"
echo "[demo] run directory: $OUT"

declare -A SECONDS_OF
stage() {   # stage NAME CMD...: run and time one stage
  local name=$1 t0=$SECONDS; shift
  echo "[demo] == $name"
  "$@"
  SECONDS_OF[$name]=$((SECONDS - t0))
}
T0=$SECONDS

stage data python -m dataset.demo --data_root ./DFL2Ldata
stage pretrain python pretrain.py --preset demo "${API_EPOCHS[@]}" ${DEMO_APIS:+--APInum "$DEMO_APIS"}

evaluate() {   # evaluate METHOD CHECKPOINT SHOT: 600-task meta_test accuracy of one model
  python main.py --preset demo "${RECIPE[@]}" --evaluate "$2" --num_sup_test "$3" --episode_test "$TEST_TASKS" \
    --out_dir "$OUT/eval/$1_$3shot" --resume
}
bidf_mkd() {   # the method, then its two evaluations
  python main.py --preset demo "${RECIPE[@]}" "${SCALE[@]}" --out_dir "$OUT/bidf_mkd" --resume
  evaluate bidf_mkd "$OUT/bidf_mkd/best.pth" 1
  evaluate bidf_mkd "$OUT/bidf_mkd/best.pth" 5
}
baselines() {  # the upper bound (MAML on real images) and the floor (random init), with their evaluations
  python main.py --preset demo "${RECIPE[@]}" "${SCALE[@]}" --out_dir "$OUT/maml_real" --baseline maml_real --resume
  for shot in 1 5; do
    evaluate maml_real "$OUT/maml_real/best.pth" "$shot"
    evaluate random_init random "$shot"
  done
}
# Small-batch meta-learning runs faster on one thread per process than on two threads
# (bench/RESULTS.md), so the method and the baselines run side by side, one core each. The method's
# progress is shown; the baselines' goes to a log.
echo "[demo] == bidf_mkd, with the baselines alongside (log: $OUT/baselines.log)"
t0=$SECONDS
( export OMP_NUM_THREADS=1; baselines > "$OUT/baselines.log" 2>&1; echo $((SECONDS - t0)) > "$OUT/.baselines_seconds" ) &
pid=$!
( export OMP_NUM_THREADS=1; bidf_mkd )
SECONDS_OF[bidf_mkd]=$((SECONDS - t0))
wait "$pid" || { echo "[demo] the baselines failed; see $OUT/baselines.log" >&2; tail -3 "$OUT/baselines.log" >&2; exit 1; }
SECONDS_OF[baselines]=$(cat "$OUT/.baselines_seconds")
grep -h "^done:" "$OUT/baselines.log" || true

{ printf '{"total": %d, "stages": {' "$((SECONDS - T0))"; sep=""
  for k in data pretrain bidf_mkd baselines; do printf '%s"%s": %d' "$sep" "$k" "${SECONDS_OF[$k]}"; sep=", "; done
  printf '}}\n'; } > "$OUT/timing.json"
python -m reporting "$OUT" --note "Demo scale: the preset config/demo.py${SCALE[*]:+ with ${SCALE[*]}}, --recipe ${DEMO_RECIPE:-faithful}; models chosen on meta_val (100 tasks); the 5-shot rows evaluate the 1-shot-trained models; bidf_mkd and the baselines ran side by side, one core each."
echo "[demo] results: $OUT"
