"""GPU smoke test of the StePPO trainer on one machine without Ray, vLLM, FAISS, Hydra or network.

    bash scripts/gpu_smoke.sh [--out DIR] [--device auto|cpu|cuda] [--hidden 256] [--layers 4]

What runs: the real trainer loop (verl/trainer/ppo/ray_trainer.py) with in-process workers (ray.enable=false;
FSDP2 + bf16 on GPU), a tiny Qwen2 built from a config and warm-started to emit searches, the HF rollout
backend, the real StepSearch agent loop and rewards, and a scripted in-process retriever (word-overlap ranking
over the MuSiQue sample's paragraphs, standing in for the FAISS server). Two PPO steps, a checkpoint, then a
resume that trains a third step. Prints tokens/s and peak memory. Needs torch, transformers, pyarrow, numpy,
scikit-learn, tqdm, pyyaml, plus httpx and tenacity (imported by the agent loop; pure-python wheels).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MUSIQUE_SAMPLE = REPO / "data" / "samples" / "musique_ans_train_100.json"


def _check_imports() -> None:
    missing = []
    for name in ("torch", "transformers", "pyarrow", "sklearn", "yaml", "tqdm", "httpx", "tenacity"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.exit(f"gpu_smoke: missing python packages {missing}; install them (httpx and tenacity are small "
                 f"pure-python wheels that can be carried to an offline machine)")


class ScriptedRetriever:
    """In-process stand-in for the retrieval server: ranks the MuSiQue sample's paragraphs by word overlap
    with the query (deterministic, no FAISS); returns hits in the server's format."""

    def __init__(self, parquet: str):
        import pyarrow.parquet as pq

        seen, self.docs = set(), []
        for row in pq.read_table(parquet).to_pylist():
            for d in row["extra_info"]["support_docs"]:
                key = (d["title"], d["text"])
                if key not in seen:
                    seen.add(key)
                    self.docs.append({"id": f"doc{len(self.docs)}", "title": d["title"], "text": d["text"],
                                      "contents": f'"{d["title"]}"\n{d["text"]}'})
        self.bags = [Counter(re.findall(r"\w+", (d["title"] + " " + d["text"]).lower())) for d in self.docs]

    def retrieve(self, queries: list[str], topk: int = 3) -> list[list[dict]]:
        results = []
        for q in queries:
            words = Counter(re.findall(r"\w+", q.lower()))
            scores = [sum(min(c, bag[w]) for w, c in words.items()) for bag in self.bags]
            order = sorted(range(len(self.docs)), key=lambda i: (-scores[i], i))[:topk]
            results.append([{"document": self.docs[i], "score": float(scores[i])} for i in order])
        return results

    async def aretrieve(self, queries: list[str], topk: int = 3) -> list[list[dict]]:
        return self.retrieve(queries, topk)


_RETRIEVER: ScriptedRetriever | None = None


def build_rollout_fn(config: dict, tokenizer):
    """The StepSearch agent over the scripted retriever (trainer.rollout_fn for this script)."""
    import dataclasses

    from stepsearch.agent.loop import run_rollout
    from stepsearch.train import agent_config_from

    train_cfg = agent_config_from(config)
    val_cfg = dataclasses.replace(train_cfg, greedy=True, seed=0)

    def rollout(batch, backend, validate: bool):
        return run_rollout(batch, backend, _RETRIEVER, tokenizer, val_cfg if validate else train_cfg)
    return rollout


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def smoke_config(model_dir: str, parquet: str, out_dir: str, device: str, steps: int) -> dict:
    """configs/ppo_trainer.yaml (plain YAML, no Hydra) with the smoke-test overrides."""
    import yaml

    base = yaml.safe_load(open(REPO / "configs" / "ppo_trainer.yaml"))
    base.pop("hydra", None)
    import torch

    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return _merge(base, {
        "data": {"train_files": [parquet], "val_files": [], "max_prompt_length": 512, "train_batch_size": 8},
        "model": {"path": model_dir},
        "actor_rollout_ref": {
            "actor": {"ppo_mini_batch_size": 8, "ppo_micro_batch_size_per_device": 4,
                      "forward_micro_batch_size_per_device": 8},
            "optim": {"lr": 1e-4, "warmup_ratio": 0.0},
            # on a GPU the HF rollout copy goes to host memory during the updates (engine sleep)
            "rollout": {"backend": "hf", "max_new_tokens": 32, "enable_sleep_mode": on_gpu}},
        "critic": {"ppo_mini_batch_size": 8, "ppo_micro_batch_size_per_device": 4,
                   "forward_micro_batch_size_per_device": 8, "optim": {"lr": 1e-3, "warmup_ratio": 0.0}},
        "reward": {"step_rewards_on_format_fail": True},
        "agent": {"max_turns": 2, "topk": 2, "max_obs_length": 192, "max_context_length": 2048,
                  "max_response_length": 512, "logprobs": True},
        "retriever": {"url": "in-process"},
        "trainer": {"experiment_name": "gpu_smoke", "logger": ["console", "jsonl"], "default_local_dir": out_dir,
                    "total_training_steps": steps, "save_freq": 2, "test_freq": -1, "n_gpus_per_node": 1 if on_gpu
                    else 0, "dp_size": 1, "device": device, "rollout_fn": "__main__.build_rollout_fn",
                    "progress_bar": False},
        "ray": {"enable": False},
    })


def _report(out_dir: str, label: str, first_step: int = 1) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    rows = [r for r in rows if r["step"] >= first_step]
    for r in rows:
        print(f"[{label}] step {r['step']}: step {r['timing_s/step']:.2f}s | gen {r['perf/gen_tokens_per_s']:.0f} "
              f"tok/s | throughput {r['perf/throughput']:.0f} tok/s | peak memory {r['perf/max_memory_gb']:.2f} GiB "
              f"| pg_loss {r['actor/pg_loss']:.4f} | vf_loss {r['critic/vf_loss']:.4f} | searches "
              f"{r['search/num_searches/mean']:.2f} | step_reward {r['reward/step_reward/mean']:.4f} | "
              f"logprob_diff {r.get('rollout/logprob_diff_mean', float('nan')):.2e} | "
              f"sleep {r.get('perf/rollout_sleep_s', 0.0):.3f}s")
    return rows[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "outputs" / "gpu_smoke"))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--warm_steps", type=int, default=100)
    args = ap.parse_args(argv)
    _check_imports()
    import shutil

    import torch

    from tests.trainer.warm_start import build_warm_policy
    from verl.trainer.main_ppo import run_ppo
    from verl.utils import checkpoint as ckpt

    global _RETRIEVER
    shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.perf_counter()
    from stepsearch.data.conversions import MusiConfig, build_musi
    parquet, _ = build_musi(MusiConfig(local_dir=os.path.join(args.out, "data"), input=str(MUSIQUE_SAMPLE)))
    model_dir = build_warm_policy(os.path.join(args.out, "model"), parquet, steps=args.warm_steps,
                                  hidden_size=args.hidden, num_layers=args.layers)
    _RETRIEVER = ScriptedRetriever(parquet)
    print(f"setup (data + warm start) {time.perf_counter() - t0:.1f}s; device "
          f"{'cuda: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != 'cpu' else 'cpu'}")
    run_dir = os.path.join(args.out, "run")
    run_ppo(smoke_config(model_dir, parquet, run_dir, args.device, steps=2))
    first = _report(run_dir, "run 1")
    if ckpt.read_latest(run_dir) != 2:
        sys.exit("gpu_smoke: FAILED - no complete checkpoint at step 2")
    run_ppo(smoke_config(model_dir, parquet, run_dir, args.device, steps=3))  # resume_mode=auto -> step 3
    last = _report(run_dir, "resumed", first_step=3)
    trace = [json.loads(line) for line in open(os.path.join(run_dir, "data_trace.jsonl"))]
    ok = [r["step"] for r in trace] == [1, 2, 3] and last["step"] == 3 and ckpt.read_latest(run_dir) == 3
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(os.path.join(ckpt.step_dir(run_dir, 3), "hf"))
    print(f"gpu_smoke: {'OK' if ok else 'FAILED'} - 2 steps, checkpoint, resume to step 3, HF export loads; "
          f"tokens/s (gen) {last['perf/gen_tokens_per_s']:.0f}, peak memory {max(first['perf/max_memory_gb'], last['perf/max_memory_gb']):.2f} GiB, "
          f"total {time.perf_counter() - t0:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
