#!/usr/bin/env bash
# The whole method on the embedded demo dataset (settings: the preset config/demo.py), on a CPU in
# minutes (bench/RESULTS.md):
#   1. make the demo dataset (DFL2Ldata/demo, once)
#   2. pretrain a small pool of conv4 APIs (pretrained_blackbox/demo/..., once; resumable)
#   3. BiDf-MKD, API-SS, zero-order (black-box) synthesis, 5-way 1-shot meta-training
#   4. the upper bound: MAML on the real meta-train images, same number of tasks
#   5. 600-task meta-test evaluations, 5-way 1-shot and 5-shot, of the random-init meta model and of the
#      two meta-trained models (chosen on meta_val; the 5-shot rows reuse the 1-shot-trained models)
#   6. results.md / results.json and figs/ in the run directory (its path is the last line printed)
# Two workers keep both cores busy (docs/demo.md): worker 1 runs 2 then 3, worker 2 runs 4 (it needs
# no API pool, so it starts beside 2), and both then take the evaluations of 5 from one queue.
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
rm -rf "$OUT/.queue" "$OUT"/.failed_*; mkdir -p "$OUT/.queue"   # the evaluation queue's claims (a rerun starts afresh)
echo "[demo] run directory: $OUT"
# One thread per process: small-batch meta-learning runs faster that way (bench/RESULTS.md). The API
# visits' large batches do scale, so BiDf-MKD gives them both threads (--visit_threads 2), and its replay
# tasks and evaluations two lanes (--task_exec lanes:2: two tasks at once, one thread each: the same
# numbers, bit for bit).
export OMP_NUM_THREADS=1

T0=$SECONDS
seconds() { echo $((SECONDS - T0)) > "$OUT/.seconds_$1"; }   # seconds() NAME: when NAME ended

echo "[demo] == data"
python -m dataset.demo --data_root ./DFL2Ldata
seconds data

# The evaluation queue: each job is METHOD:SHOT, taken by the first free worker once its model exists.
EVAL_JOBS=(random_init:5 random_init:1 maml_real:5 maml_real:1 bidf_mkd:5 bidf_mkd:1)
checkpoint() { [ "$1" = random_init ] && echo random || echo "$OUT/$1/best.pth"; }
model_ready() {   # model_ready METHOD: 0 once trained, 1 while training, 2 if its training failed
  [ "$1" = random_init ] || [ -f "$OUT/$1/summary.json" ] && return 0
  [ -f "$OUT/.failed_$1" ] && return 2
  return 1
}
take_evaluations() {   # run queued evaluations until none is left to claim
  local job method shot rc exec
  for job in "${EVAL_JOBS[@]}"; do
    mkdir "$OUT/.queue/$job" 2>/dev/null || continue      # claimed by the other worker
    method=${job%:*}; shot=${job#*:}
    while rc=0; model_ready "$method" || rc=$?; [ "$rc" = 1 ]; do sleep 2; done
    [ "$rc" = 2 ] && continue
    # BiDf-MKD's two evaluations come last, with nothing left for the other worker to run: two lanes
    # each (two tasks at once, one thread per lane: the same accuracies) keep both cores busy to the end.
    exec=sequential; [ "$method" = bidf_mkd ] && exec=lanes:2
    python main.py --preset demo "${RECIPE[@]}" --evaluate "$(checkpoint "$method")" --num_sup_test "$shot" \
      --episode_test "$TEST_TASKS" --task_exec "$exec" --out_dir "$OUT/eval/${method}_${shot}shot" --resume \
      > "$OUT/eval/${method}_${shot}shot.log" 2>&1 \
      || { touch "$OUT/.failed_evaluation_${method}_${shot}shot"; continue; }
    grep -h "^done:" "$OUT/eval/${method}_${shot}shot.log" || true
  done
}
train() {   # train METHOD FLAGS...: one meta-training run (a failure is marked for the queue)
  local method=$1; shift
  python main.py --preset demo "${RECIPE[@]}" "${SCALE[@]}" --out_dir "$OUT/$method" --resume "$@" \
    || { touch "$OUT/.failed_$method"; return 1; }
  seconds "$method"
}

# Worker 2 (log: baselines.log): MAML on the real images, then evaluations.
( train maml_real --baseline maml_real && take_evaluations ) > "$OUT/baselines.log" 2>&1 &
worker2=$!
# Worker 1 (shown): the API pool, BiDf-MKD, then evaluations.
echo "[demo] == pretrain (beside it: MAML on real images; log: $OUT/baselines.log)"
python pretrain.py --preset demo "${API_EPOCHS[@]}" ${DEMO_APIS:+--APInum "$DEMO_APIS"} || touch "$OUT/.failed_bidf_mkd"
seconds pretrain
echo "[demo] == bidf_mkd"
[ -f "$OUT/.failed_bidf_mkd" ] || train bidf_mkd --visit_threads 2 --task_exec lanes:2 || true
echo "[demo] == evaluations (600 tasks per row; logs: $OUT/eval/)"
take_evaluations
wait "$worker2" || true
rm -rf "$OUT/.queue"
failed=$(cd "$OUT" && ls -A | sed -n 's/^\.failed_//p')
if [ -n "$failed" ]; then
  echo "[demo] failed: $failed; see $OUT/baselines.log, $OUT/eval/*.log or the messages above" >&2
  rm -f "$OUT"/.failed_*     # a rerun with DEMO_OUT=$OUT retries them
  exit 1
fi
grep -h "^done:" "$OUT/baselines.log" || true
seconds total

{ printf '{"total": %d, "stages": {' "$(cat "$OUT/.seconds_total")"; sep=""
  for k in data pretrain bidf_mkd maml_real; do
    printf '%s"%s_ended": %d' "$sep" "$k" "$(cat "$OUT/.seconds_$k")"; sep=", "; done
  printf '}}\n'; } > "$OUT/timing.json"
python -m reporting "$OUT" --note "Demo scale: the preset config/demo.py${SCALE[*]:+ with ${SCALE[*]}}, --recipe ${DEMO_RECIPE:-faithful}; models chosen on meta_val (100 tasks); the 5-shot rows evaluate the 1-shot-trained models; two workers, one thread each (BiDf-MKD's API visits: two)."
echo "[demo] results: $OUT"
