#!/usr/bin/env bash
# Build a dense e5-base-v2 Flat index (Search-R1's setting: "passage: " prefix, mean pooling, max length 256).
#
#   bash build_index.sh CORPUS.jsonl[.gz] OUT_DIR [extra build_index flags, e.g. --index_factory HNSW64 --device cuda]
#
# ENCODER overrides the model (a local e5 folder when the machine has no hub access), e.g.
#   ENCODER=/models/e5-base-v2 bash build_index.sh wiki-18.jsonl.gz indexes/wiki18_e5
set -euo pipefail
cd "$(dirname "$0")"
if [ "$#" -lt 2 ]; then
  echo "usage: bash build_index.sh CORPUS.jsonl OUT_DIR [build_index flags]" >&2
  exit 2
fi
CORPUS="$1"; OUT="$2"; shift 2
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m stepsearch.search.build_index --corpus "$CORPUS" --out "$OUT" \
  --encoder "${ENCODER:-intfloat/e5-base-v2}" --pooling mean --max_length 256 --batch_size "${BATCH_SIZE:-512}" \
  --index_factory "${INDEX_FACTORY:-Flat}" --method dense "$@"
