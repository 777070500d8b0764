#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the lent GPU machine lacks for scripts/gpu_checks.sh and
# scripts/gpu_server_check.sh: pure-python or cp312 wheels, no dependencies resolved (each one is listed), and the
# uncased WordPiece tokenizer files of the bundled MiniLM (the random-weight e5-sized encoder's tokenizer).
# Run on a machine with the package registry and the project's .venv:   bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
WHEELS=(tenacity==9.2.1 faiss-cpu==1.15.1 fastapi==0.136.3 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 uvicorn==0.54.0 typing-extensions==4.16.0 annotated-doc==0.0.7)
mkdir -p .whl/e5-tokenizer
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
MINILM=$("$PY" -c "from stepsearch.search.encoders import resolve_model; print(resolve_model('minilm')[1])")
cp "$MINILM"/{tokenizer.json,tokenizer_config.json,vocab.txt,special_tokens_map.json} .whl/e5-tokenizer/
du -sh .whl
