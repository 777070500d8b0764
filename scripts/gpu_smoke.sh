#!/usr/bin/env bash
# One command for a single-GPU machine with torch + transformers (no Ray, vLLM, FAISS or network):
# two in-process StePPO steps on a tiny model, a checkpoint, a resume; prints tokens/s and peak memory.
# Runs on CPU too (device auto). Extra arguments go to scripts/gpu_smoke.py (--device, --hidden, --layers, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" scripts/gpu_smoke.py "$@"
