#!/usr/bin/env bash
# Every GPU check in one command, for a lent single-GPU machine with torch + transformers and no network:
#   1. bench/retrieval_gpu.py run: e5-sized fp16 encoder, flat index on the GPU, queries/s at batch 512, top-3
#      agreement with exact fp32 (needs `bench/retrieval_gpu.py prepare --dir .gpu/retrieval` run beforehand on a
#      machine with the shared data, FAISS and the bundled MiniLM)
#   2. scripts/gpu_smoke.sh: two StePPO steps on the GPU, a checkpoint, a resume
#   3. bench/gpu_train_check.py: a Qwen2.5-1.5B-shaped random model (no model hub): actor update MFU packed and
#      padded, compute_log_prob tokens/s, peak memory with and without gradient checkpointing, HF rollout tokens/s
#      (about 3 minutes on an H100; killed after TRAIN_CHECK_TIMEOUT_S, default 450 s)
#   4. bench/faiss_gpu_check.py (when the faiss-gpu-cu12 wheel is in .whl-faiss/, `pip download --no-deps
#      faiss-gpu-cu12 -d .whl-faiss`, 46 MiB, git-ignored: carry .whl-faiss alone): FAISS's own GPU build behind --faiss_gpu, Flat /
#      IVF-Flat / IVF-PQ sharded and replicated vs the CPU index; it goes to /tmp/site_faiss, apart from faiss-cpu;
#      it loads the CUDA 12 runtime and cuBLAS from the nvidia-*-cu12 packages, so it needs a torch built for CUDA 12
#
#   bash scripts/gpu_checks.sh OUT_DIR        (wheels in .whl/, from scripts/gpu_wheels.sh, go to /tmp/site first)
#   GPU_CHECKS="train" bash scripts/gpu_checks.sh OUT_DIR     (only some parts: any of retrieval smoke train faiss)
# Results land in OUT_DIR: retrieval_gpu.json + .log, gpu_smoke.log, train_check/gpu_train_check.{json,md} + .log.
# Turn the JSONs into bench/RESULTS.md sections with `python bench/retrieval_gpu.py report --json
# OUT_DIR/retrieval_gpu.json` and `python bench/gpu_train_check.py --report OUT_DIR/train_check/gpu_train_check.json`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:?usage: bash scripts/gpu_checks.sh OUT_DIR}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=python3
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
status=0
PARTS=" ${GPU_CHECKS:-retrieval smoke train$(compgen -G ".whl-faiss/faiss_gpu*.whl" >/dev/null && echo " faiss")} "
if [[ "$PARTS" == *" retrieval "* ]]; then
  echo "== retrieval (bench/retrieval_gpu.py run)"
  timeout "${RETRIEVAL_TIMEOUT_S:-300}" "$PY" bench/retrieval_gpu.py run --dir .gpu/retrieval \
    --out "$OUT_DIR/retrieval_gpu.json" 2>&1 | grep -v -e "Loading weights" -e "Writing model" \
    | tee "$OUT_DIR/retrieval_gpu.log" || status=1
fi
if [[ "$PARTS" == *" smoke "* ]]; then
  echo "== trainer (scripts/gpu_smoke.sh)"
  timeout "${SMOKE_TIMEOUT_S:-240}" bash scripts/gpu_smoke.sh --out /tmp/gpu_smoke --device cuda 2>&1 \
    | grep -v -e "Loading weights" | tail -60 | tee "$OUT_DIR/gpu_smoke.log" || status=1
fi
if [[ "$PARTS" == *" train "* ]]; then
  echo "== training check (bench/gpu_train_check.py, Qwen2.5-1.5B shape)"
  timeout "${TRAIN_CHECK_TIMEOUT_S:-450}" "$PY" bench/gpu_train_check.py --device cuda \
    --out "$OUT_DIR/train_check" 2>&1 | tee "$OUT_DIR/gpu_train_check.log" || status=1
fi
if [[ "$PARTS" == *" faiss "* ]]; then
  echo "== FAISS's GPU build (bench/faiss_gpu_check.py)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_faiss \
    .whl-faiss/faiss_gpu*.whl || status=1
  # its loader preloads libcudart/libcublas from the nvidia-* packages torch's CUDA build installed
  PYTHONPATH="/tmp/site_faiss${PYTHONPATH:+:$PYTHONPATH}" timeout "${FAISS_CHECK_TIMEOUT_S:-300}" "$PY" \
    bench/faiss_gpu_check.py --out "$OUT_DIR/faiss_gpu.json" 2>&1 | tee "$OUT_DIR/faiss_gpu.log" || status=1
fi
echo "gpu_checks: exit $status"
exit $status
