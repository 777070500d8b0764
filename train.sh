#!/usr/bin/env bash
# Train a StepSearch agent with StePPO.
#
#   bash train.sh [--config-name NAME] [hydra overrides ...]
#   bash train.sh trainer.total_training_steps=2 data.train_batch_size=8
#
# Config: with a GPU, configs/stepsearch_qwen2.5_3b.yaml (the paper's settings); without one, configs/cpu_demo.yaml
# (configs/cpu_test.yaml if cpu_demo does not exist). Before starting, the retriever named by retriever.url must
# answer a query, otherwise this fails fast. Multi-node: see docs/training.md.
set -euo pipefail
cd "$(dirname "$0")"
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0

CONFIG=""
if [ "${1:-}" = "--config-name" ]; then CONFIG="$2"; shift 2; fi
if [ -z "$CONFIG" ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    CONFIG=stepsearch_qwen2.5_3b
  elif [ -f configs/cpu_demo.yaml ]; then
    CONFIG=cpu_demo
  else
    CONFIG=cpu_test
  fi
fi
echo "train.sh: config ${CONFIG}"

# The retriever URL after the overrides, read through Hydra itself.
URL=$("$PY" - "$CONFIG" "$@" <<'PYEOF'
import os, sys
from hydra import compose, initialize_config_dir
name, overrides = sys.argv[1], [a for a in sys.argv[2:] if not a.startswith("-")]
with initialize_config_dir(config_dir=os.path.abspath("configs"), version_base="1.3"):
    print(compose(config_name=name, overrides=overrides).retriever.url)
PYEOF
)
"$PY" -m stepsearch.train --check-retriever "$URL"

exec "$PY" -m verl.trainer.main_ppo --config-name "$CONFIG" "$@"
