"""One StePPO step of the Ray trainer on the real pretrained model, then its HF export (docs/real_model.md).

``python -m verl.trainer.main_ppo --config-name cpu_test model.path=<SmolLM2>``: one FSDP rank on Ray, the HF
rollout, the real retrieval server over the bundled MuSiQue sample's supporting paragraphs
(tests/trainer/resume_runs.py ``musi_server``), and a parquet from scripts/data_process/musi_search.py with the
paper prompt, which the trainer renders with the model's own tokenizer and chat template. One step on 2 rows with
small lengths (2 turns of 16 tokens), saved and exported at step 1; the sharded 2-rank checkpoint and export are
tested on the tiny model (tests/trainer/test_e2e_cpu.py), so one rank keeps this test to what only a real model shows
(Llama architecture, tied embeddings, a 49k vocabulary, a real chat template) at a fraction of the cost. The
export must reload with plain ``AutoModelForCausalLM.from_pretrained``
(no missing or unexpected keys), hold exactly the actor weights of the step-1 checkpoint (read back from its
torch.distributed.checkpoint files, not from the export code path), differ from the initial weights (the step
updated the policy), carry the real tokenizer and chat template, and still answer a question.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.real_model_fixture import REPO_ROOT
from tests.trainer.resume_runs import musi_server, read_jsonl, trainer_env  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

MUSIQUE_SAMPLE = REPO_ROOT / "data" / "samples" / "musique_ans_train_100.json"
ROWS = 2  # data.train_batch_size: one mini-batch of 2 rows on the one rank
ONE_RANK = ("trainer.dp_size=1", f"data.train_batch_size={ROWS}", f"actor_rollout_ref.actor.ppo_mini_batch_size={ROWS}",
            f"critic.ppo_mini_batch_size={ROWS}")
SMALL_LENGTHS = ("actor_rollout_ref.rollout.max_new_tokens=16", "agent.max_turns=1", "agent.max_obs_length=128",
                 "agent.max_response_length=256")
"""max_turns 1: one turn and the forced final turn, 2 x 16 generated tokens and at most one observation per row."""
ACTOR_LR = "actor_rollout_ref.optim.lr=1.0e-6"
"""The paper's order of magnitude (docs/method.md: actor lr 7e-7). With cpu_test's 1e-4, one AdamW step moves every
weight by ~1e-4, and this model then answers the check question in French instead of naming Paris."""


@pytest.fixture(scope="module")
def paper_parquet(tmp_path_factory) -> str:
    """The bundled MuSiQue sample through the data pipeline (paper template; the chat template is applied by the
    trainer's dataset with the tokenizer of model.path)."""
    out = tmp_path_factory.mktemp("musi_paper")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "data_process" / "musi_search.py"), "--local_dir",
                    str(out), "--input", str(MUSIQUE_SAMPLE), "--template", "paper"], check=True,
                   capture_output=True, timeout=300)
    return str(out / "musi_answerable_train.parquet")


def dcp_actor_state(step_dir: str, work) -> dict[str, torch.Tensor]:
    """The actor's model state as the trainer checkpointed it (torch.distributed.checkpoint, one file per rank),
    converted to a single torch.save file without any process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = work / "actor_state.pt"
    dcp_to_torch_save(os.path.join(step_dir, "actor", "dcp"), str(out))
    return torch.load(out, weights_only=False)["model"]


def test_one_step_on_the_real_model_and_hf_export(tmp_path, real_model_dir, real_model, paper_parquet, musi_server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl.utils import checkpoint as ckpt

    initial, tokenizer = real_model
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-name", "cpu_test",
           f"model.path={real_model_dir}", f"data.train_files=[{paper_parquet}]", f"retriever.url={musi_server}",
           f"trainer.default_local_dir={out_dir}", "trainer.total_training_steps=1", "trainer.save_freq=1",
           *ONE_RANK, *SMALL_LENGTHS, ACTOR_LR]
    env = {**trainer_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=2000, start_new_session=True)
    wall = time.perf_counter() - t0
    output = done.stdout.decode(errors="replace")
    (tmp_path / "trainer.log").write_text(output)
    assert done.returncode == 0, output[-6000:]

    [m] = read_jsonl(out_dir / "metrics.jsonl")
    print(f"[trainer_real] wall {wall:.0f}s; step metrics: " + ", ".join(
        f"{k}={m[k]:.4g}" for k in sorted(m) if k.startswith(("timing_s/", "actor/", "critic/", "perf/", "response",
                                                              "search/"))))
    assert m["step"] == 1 and m["actor/updated"] == 1.0 and m["actor/lr"] == 1.0e-6
    for key in ("actor/pg_loss", "actor/grad_norm", "critic/vf_loss", "critic/grad_norm"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), (key, m[key])
    # the prompts were rendered with SmolLM2's chat template: the paper prompt is ~300 tokens with it
    prompt_tokens = (m["perf/total_tokens"] - ROWS * m["response_length_with_obs/mean"]) / ROWS
    print(f"[trainer_real] mean prompt length {prompt_tokens:.1f} tokens")
    assert 300 <= prompt_tokens <= 512, prompt_tokens

    step_dir = ckpt.step_dir(str(out_dir), 1)
    assert ckpt.read_latest(str(out_dir)) == 1 and ckpt.is_complete(step_dir)
    hf_dir = os.path.join(step_dir, "hf")
    exported, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(exported).__name__ == "LlamaForCausalLM" and exported.config.tie_word_embeddings
    assert exported.config.num_hidden_layers == initial.config.num_hidden_layers == 30
    assert sum(p.numel() for p in exported.parameters()) == 134_515_008

    # the export holds exactly the trained actor of the checkpoint
    saved = dcp_actor_state(step_dir, tmp_path)
    export_sd = exported.state_dict()
    tied = {"lm_head.weight"}  # tied to embed_tokens; the checkpoint may list it or not
    assert set(saved) - tied == set(export_sd) - tied
    for name, tensor in saved.items():
        assert export_sd[name].dtype == torch.float32 and torch.equal(export_sd[name], tensor.float()), name
    # ... which the step moved away from the initial weights
    initial_sd = initial.state_dict()
    moved = {name: float((export_sd[name] - initial_sd[name]).abs().max()) for name in export_sd}
    changed = sum(d > 0 for d in moved.values())
    print(f"[trainer_real] {changed} of {len(moved)} tensors changed, max |change| {max(moved.values()):.3g}")
    assert changed > 0.9 * len(moved)

    # the real tokenizer and chat template went into the export, and the exported model still answers
    exported_tok = AutoTokenizer.from_pretrained(hf_dir)
    assert len(exported_tok) == len(tokenizer) == 49152
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert exported_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    ids = exported_tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        new = exported.eval().generate(**ids, max_new_tokens=16, do_sample=False,
                                       pad_token_id=exported_tok.pad_token_id)[0, ids["input_ids"].shape[1]:]
    answer = exported_tok.decode(new, skip_special_tokens=True)
    print(f"[trainer_real] exported model answers {answer!r}")
    assert "Paris" in answer
