#!/usr/bin/env bash
# End-to-end check of the retrieval server's GPU path over HTTP, in one command (scripts/gpu_server_check.py):
# a random-weight e5-base-shaped encoder, a Flat index over the bundled 1,000-passage wiki-18 sample, the real
# server (`--device cuda --encoder_mode fast --faiss_gpu`, 127.0.0.1, no Redis) answering 512 real questions,
# top-3 agreement with the exact fp32 CPU path, queries/s for 8 clients x 64 queries per request, /health.
#
#   bash scripts/gpu_server_check.sh OUT_DIR [gpu_server_check.py args]     # GPU machine (device tool, carry .whl)
#   bash scripts/gpu_server_check.sh /tmp/gsc --device cpu --layers 1        # quick local run on CPU
#
# Where python3 lacks FAISS/FastAPI/uvicorn/pydantic (the GPU machine), the wheels in .whl/ (scripts/gpu_wheels.sh) go to
# /tmp/site first (faiss-cpu, fastapi, starlette, pydantic(-core), uvicorn, tenacity, ...; cp312, no deps).
# Locally .venv/bin/python is used when present. Writes OUT_DIR/gpu_server_check.json, server.log,
# build_index.log and gpu_server_check.log; exit 0 pass, 1 a check failed, 2 an error.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:?usage: bash scripts/gpu_server_check.sh OUT_DIR [args for scripts/gpu_server_check.py]}"
shift
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PY:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import faiss, fastapi, uvicorn, pydantic, tenacity" 2>/dev/null; then
  compgen -G ".whl/*.whl" >/dev/null || { echo "gpu_server_check: $PY lacks faiss/fastapi and .whl/ has no wheels" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout "${CHECK_TIMEOUT_S:-280}" "$PY" scripts/gpu_server_check.py --out "$OUT_DIR" "$@" 2>&1 \
  | grep --line-buffered -v -e "Loading weights" -e "Writing model" | tee "$OUT_DIR/gpu_server_check.log"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "gpu_server_check: timed out after ${CHECK_TIMEOUT_S:-280}s"
echo "gpu_server_check: exit $status"
exit "$status"
