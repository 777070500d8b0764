#!/usr/bin/env bash
# `make demo`: the whole StepSearch pipeline offline on CPU, on the synthetic multi-hop world (docs/demo.md).
#   world -> MiniLM index -> retrieval server (+ Redis cache) -> warm start (SFT on a scripted searcher that
#   stops searching too early)
#   -> held-out eval (before) -> StePPO (verl.trainer.main_ppo, configs/cpu_demo.yaml) -> held-out eval (after)
#   -> learning-curve PNG + trajectory viewer HTML.
# Everything it starts (redis-server, the retrieval server) is stopped on exit, also on failure or Ctrl-C.
# Knobs (environment): DEMO_OUT (runs/demo), DEMO_SEED (0), DEMO_STEPS (20), DEMO_SFT_STEPS (the SFT cap, 2000),
# DEMO_THREADS (1: torch threads of the evaluations, which query the retriever all the time), DEMO_SOLO_THREADS (2:
# of the index build, the warm start and StePPO, which compute while the retriever idles),
# DEMO_PROGRESS_S (20: a progress line at least this often),
# DEMO_NUM_TRAIN (800), DEMO_NUM_TEST (100), DEMO_HOPS (2:1, i.e. 2-hop questions only; 2:0.5,3:0.3,4:0.2 is the
# world's default mix), DEMO_NUM_ENTITIES (240: a world of N people has at most 4N distinct 2-hop questions),
# DEMO_PREMATURE (0.6, the scripted searcher's premature-answer probability),
# DEMO_COPY (1.0, its probability of copying the top-ranked passage's name), DEMO_HIDDEN (128, the tiny Qwen2's
# hidden size), DEMO_SFT_STOP_ACC (0.85: SFT stops once held-out copy accuracy on names and relations reaches it;
# 0 runs all DEMO_SFT_STEPS), DEMO_SFT_MIN_STEPS (600), DEMO_SFT_PLATEAU (3: SFT also stops once that accuracy
# gained <= 0.01 over this many checks of 100 steps, from 0.8 on; 0 turns it off), DEMO_REUSE (0),
# PY (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-runs/demo}
SEED=${DEMO_SEED:-0}
STEPS=${DEMO_STEPS:-20}
SFT_STEPS=${DEMO_SFT_STEPS:-2000}
# One intra-op thread per process while the retriever and a model share the 2 cores: torch's default thread pool
# oversubscribes them (a tiny-model step measured 4-6x slower with 2 threads than with 1 under load). The stages
# that compute while the retriever idles (index build; warm start: SFT; StePPO: 97% of a step is forward/backward)
# use DEMO_SOLO_THREADS (an SFT step: 365 ms on 2 threads, 630 ms on 1, quiet 2-core AMD EPYC, AVX2).
THREADS=${DEMO_THREADS:-1}
SOLO_THREADS=${DEMO_SOLO_THREADS:-2}
source scripts/run_lib.sh
offline_env "$THREADS"

START_S=$(date +%s)
stop_on_exit demo

# stage NAME [LOG]: print the stage; while it runs, a heartbeat prints the newest line of LOG at least every
# DEMO_PROGRESS_S seconds, whether or not stdout is a terminal.
stage() {
  echo "[demo $(( $(date +%s) - START_S ))s] $1"
  printf '%s\t%s\n' "$1" "${2:-}" > "$OUT/logs/.stage"
}
heartbeat() {
  set +e +o pipefail  # a stage log with no line yet must not end the heartbeat
  local name log line
  while sleep "${DEMO_PROGRESS_S:-20}"; do
    [ -f "$OUT/logs/.stage" ] && IFS=$'\t' read -r name log < "$OUT/logs/.stage" || continue
    line=""
    [ -n "$log" ] && [ -f "$log" ] && line=$(tr '\r' '\n' < "$log" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-150)
    echo "[demo $(( $(date +%s) - START_S ))s]   ... ${name%% (*}${line:+ | $line}"
  done
}

rm -rf "$OUT/rl" "$OUT/eval_before" "$OUT/eval_after"
mkdir -p "$OUT/logs"
rm -f "$OUT/logs/.stage"
heartbeat &
PIDS+=($!)
# DEMO_REUSE=1 keeps an existing world, index and warm-started model in $OUT (RL and evaluation run again).
REUSE=0
if [ "${DEMO_REUSE:-0}" = 1 ] && [ -f "$OUT/sft_model/warm_start.json" ] && [ -f "$OUT/index/manifest.json" ]; then
  REUSE=1
fi

if [ $REUSE = 0 ]; then
stage "1/8 world (seed $SEED)"
"$PY" -m stepsearch.envs.make_world --out "$OUT/world" --seed "$SEED" --num_train "${DEMO_NUM_TRAIN:-800}" \
  --num_test "${DEMO_NUM_TEST:-100}" --hop_weights "${DEMO_HOPS:-2:1}" --num_entities "${DEMO_NUM_ENTITIES:-240}"

stage "2/8 MiniLM index over the world's passages" "$OUT/logs/build_index.log"
OMP_NUM_THREADS=$SOLO_THREADS "$PY" -m stepsearch.search.build_index --corpus "$OUT/world/corpus.jsonl" --out "$OUT/index" --quiet \
  > "$OUT/logs/build_index.log" 2>&1
fi

stage "3/8 Redis + retrieval server on loopback" "$OUT/logs/retriever.log"
# exact fp32 retrieval (deterministic ranks on every CPU): the scripted searcher copies the top-ranked passage, and
# the guarded bf16 path of `fast` may order near-tied passages differently (docs/demo.md, runs M and N)
start_retriever "$OUT/index" "$OUT/logs" --encoder_mode sorted

if [ $REUSE = 0 ]; then
  stage "4/8 warm start: tiny Qwen2 + SFT on the scripted searcher (at most $SFT_STEPS steps)" "$OUT/logs/warmstart.log"
  rm -rf "$OUT/sft_model"
  OMP_NUM_THREADS=$SOLO_THREADS MKL_NUM_THREADS=$SOLO_THREADS "$PY" -m stepsearch.envs.warmstart --world_dir "$OUT/world" --retriever_url "$URL" --out "$OUT/sft_model" \
    --sft_steps "$SFT_STEPS" --seed "$SEED" --premature_answer_prob "${DEMO_PREMATURE:-0.6}" \
    --copy_correct_prob "${DEMO_COPY:-1.0}" --hidden_size "${DEMO_HIDDEN:-128}" \
    --stop_copy_acc "${DEMO_SFT_STOP_ACC:-0.85}" --min_sft_steps "${DEMO_SFT_MIN_STEPS:-600}" \
    --plateau_checks "${DEMO_SFT_PLATEAU:-3}" --plateau_min_acc 0.8 > "$OUT/logs/warmstart.log" 2>&1 \
    || { tail -30 "$OUT/logs/warmstart.log"; exit 1; }
  grep -E "held-out copy accuracy|sft stops" "$OUT/logs/warmstart.log" | sed 's/^[0-9-]* [0-9:,]* INFO /  /' || true
else
  stage "1,2,4/8 reusing $OUT/world, $OUT/index and $OUT/sft_model (DEMO_REUSE=1)"
fi

EVAL_ARGS=(--data "$OUT/world/test.parquet" --retriever_url "$URL" --index_dir "$OUT/index" --backend hf
           --max_prompt_length 96 --max_new_tokens 24 --max_response_length 400)
stage "5/8 held-out evaluation BEFORE RL" "$OUT/logs/eval_before.log"
"$PY" -m stepsearch.eval "${EVAL_ARGS[@]}" --model "$OUT/sft_model" --out "$OUT/eval_before" \
  > "$OUT/logs/eval_before.log" 2>&1

stage "6/8 StePPO ($STEPS steps, configs/cpu_demo.yaml)" "$OUT/logs/train.log"
OMP_NUM_THREADS=$SOLO_THREADS MKL_NUM_THREADS=$SOLO_THREADS "$PY" -m verl.trainer.main_ppo --config-name cpu_demo model.path="$OUT/sft_model" \
  "data.train_files=[$OUT/world/train.parquet]" "data.val_files=[$OUT/world/test.parquet]" \
  retriever.url="$URL" trainer.default_local_dir="$OUT/rl" trainer.total_training_steps="$STEPS" \
  trainer.save_freq="$STEPS" trainer.resume_mode=disable trainer.seed="$SEED" \
  > "$OUT/logs/train.log" 2>&1 || { tail -30 "$OUT/logs/train.log"; exit 1; }
grep -E "step [0-9]+ \|" "$OUT/logs/train.log" | tail -3 || true

stage "7/8 held-out evaluation AFTER RL" "$OUT/logs/eval_after.log"
"$PY" -m stepsearch.eval "${EVAL_ARGS[@]}" --model "$OUT/rl/global_step_$STEPS/hf" --out "$OUT/eval_after" \
  > "$OUT/logs/eval_after.log" 2>&1

stage "8/8 learning curve + trajectory viewer"
"$PY" -m stepsearch.viz --metrics "$OUT/rl/metrics.jsonl" --out "$OUT/learning_curve.png" --title "StePPO on the synthetic world"
"$PY" -m stepsearch.viz --predictions "$OUT/eval_after/predictions.jsonl" --out "$OUT/report_after.html"
"$PY" -m stepsearch.viz --predictions "$OUT/eval_before/predictions.jsonl" --out "$OUT/report_before.html"
"$PY" -m stepsearch.envs.demo_summary --out "$OUT" --wall_s $(( $(date +%s) - START_S ))
