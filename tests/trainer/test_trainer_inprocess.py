"""The fit loop with in-process workers (no Ray) and single-turn hooks: phases, validation means per data_source,
the predictions dump, checkpoint + resume of the data position, and the GRPO path (no critic, uid groups)."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from verl.protocol import DataProto
from verl.trainer.main_ppo import run_ppo
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, RewardResult
from verl.workers.rollout.base import SamplingConfig

T = 6  # response width


def _row(i: int, source: str) -> dict:
    return {"data_source": source, "prompt": [{"role": "user", "content": f"question number {i} about the fox"}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": [f"a{i}"], "search_keys": [["k"]]}},
            "extra_info": {"split": "train", "index": i, "support_docs": [{"title": "t", "text": "x"}]},
            "id": f"{source}_{i}"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from verl.utils.tiny_model import save_tiny_model

    d = tmp_path_factory.mktemp("inproc")
    rows = [_row(i, "hotpot" if i % 3 == 0 else "musi") for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), d / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:6]), d / "val.parquet")
    model = save_tiny_model(str(d / "model"), hidden_size=32, num_layers=1, num_heads=2)
    return str(d / "train.parquet"), str(d / "val.parquet"), model


def build_rollout_fn(config: dict, tokenizer):
    """Single-turn generation: responses (B, T) right-padded, every generated token trainable."""
    def rollout(batch: DataProto, backend, validate: bool) -> DataProto:
        ids, mask = batch.batch["input_ids"], batch.batch["attention_mask"]
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        outs = backend.generate(prompts, SamplingConfig(max_new_tokens=T, greedy=validate, stop=("zzz",)))
        responses = torch.full((len(outs), T), tokenizer.pad_token_id, dtype=torch.long)
        response_mask = torch.zeros((len(outs), T), dtype=torch.long)
        for i, o in enumerate(outs):
            responses[i, :len(o.token_ids)] = torch.tensor(o.token_ids, dtype=torch.long)
            response_mask[i, :len(o.token_ids)] = 1
        response_mask[:, 0] = 1  # at least one trainable token per row (the reward sits on the last one)
        attention = torch.cat([mask, response_mask], 1)
        return DataProto.from_dict(tensors={
            "prompts": ids, "responses": responses, "response_mask": response_mask,
            "input_ids": torch.cat([ids, responses], 1), "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).clamp(min=0)},
            non_tensors={**batch.non_tensor_batch, "response_text": ["r"] * len(outs),
                         "num_searches": [1] * len(outs)})
    return rollout


def build_reward_fn(config: dict, tokenizer):
    """Score 1 at the last trainable token of rows with an even dataset index; per-sample em = f1 = that score, and
    the row's targets, read from its opaque ``reward_model`` column (the default row adapter keeps it as is)."""
    def reward(batch: DataProto) -> RewardResult:
        mask = batch.batch["response_mask"]
        last = mask.cumsum(-1).argmax(-1)  # (B,) index of the last 1
        even = torch.tensor([int(i) % 2 == 0 for i in batch.non_tensor_batch["index"]], dtype=torch.float32)
        scores = torch.zeros(mask.shape)
        scores[torch.arange(len(batch)), last] = even
        targets = [rm["ground_truth"]["target"] for rm in batch.non_tensor_batch["reward_model"]]
        samples = [{"ground_truth": t, "em": float(e), "f1": float(e), "prediction": "p"}
                   for t, e in zip(targets, even)]
        return RewardResult(scores, {"reward/overall/mean": float(even.mean())}, samples)
    return reward


def _config(train, val, model, out, **trainer):
    return {
        "data": {"train_files": [train], "val_files": [val], "max_prompt_length": 48, "train_batch_size": 4,
                 "val_batch_size": 4},
        "model": {"path": model},
        "actor_rollout_ref": {"actor": {"ppo_mini_batch_size": 4, "ppo_micro_batch_size_per_device": 2,
                                        "forward_micro_batch_size_per_device": 4},
                              "optim": {"lr": 1e-3}, "rollout": {"max_new_tokens": T}},
        "critic": {"ppo_mini_batch_size": 4, "ppo_micro_batch_size_per_device": 2,
                   "forward_micro_batch_size_per_device": 4, "optim": {"lr": 1e-3}},
        "algorithm": {"adv_estimator": "gae"},
        "trainer": {"logger": ["jsonl"], "default_local_dir": out, "total_training_steps": 2, "save_freq": 2,
                    "test_freq": 2, "n_gpus_per_node": 0, "dp_size": 1, "device": "cpu", "progress_bar": False,
                    "row_adapter": "", "rollout_fn": f"{__name__}.build_rollout_fn",
                    "reward_fn": f"{__name__}.build_reward_fn",
                    **trainer},
        "ray": {"enable": False},
    }


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.timeout(300)
def test_fit_validation_checkpoint_and_resume(files, tmp_path):
    train, val, model = files
    out = str(tmp_path / "run")
    last = run_ppo(_config(train, val, model, out))
    for name in ("gen", "old_log_prob", "ref", "values", "reward", "kl", "adv", "update_critic", "update_actor",
                 "sync_weights"):
        assert last[f"timing_s/{name}"] >= 0.0
    assert np.isfinite(last["actor/pg_loss"]) and np.isfinite(last["critic/vf_loss"])
    assert last["timing_s/trainer_overhead"] >= 0.0
    # search/* statistics have one writer, the rollout hook; this toy hook writes none (num_searches is only a
    # non-tensor), so the trainer adds none either.
    assert not [k for k in last if k.startswith("search/")]
    # Validation rows 0..5: hotpot = {0, 3}, musi = {1, 2, 4, 5}; em = 1 for even indices.
    assert last["val/hotpot/em"] == pytest.approx(0.5)     # (1 + 0) / 2
    assert last["val/musi/em"] == pytest.approx(0.5)       # (0 + 1 + 1 + 0) / 4
    assert last["val/all/f1"] == pytest.approx(0.5)        # 3 / 6
    assert last["val/musi/n"] == 4.0
    preds = _jsonl(os.path.join(out, "predictions", "step_2.jsonl"))
    assert [p["id"] for p in preds] == [f"{'hotpot' if i % 3 == 0 else 'musi'}_{i}" for i in range(6)]
    assert preds[1]["ground_truth"] == ["a1"] and preds[1]["em"] == 0.0
    # Resume: total 3 steps -> only step 3 runs, with the batch an uninterrupted run would draw next.
    run_ppo(_config(train, val, model, out, total_training_steps=3, save_freq=3))
    trace = _jsonl(os.path.join(out, "data_trace.jsonl"))
    assert [r["step"] for r in trace] == [1, 2, 3]
    order = np.random.default_rng(1).permutation(12)  # data.seed 1, epoch 0: batches of 4 in this order
    assert [r["index"] for r in trace] == [order[0:4].tolist(), order[4:8].tolist(), order[8:12].tolist()]
    assert [m["step"] for m in _jsonl(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]


@pytest.mark.timeout(300)
def test_grpo_groups_by_index_and_needs_no_critic(files, tmp_path):
    train, val, model = files
    cfg = _config(train, val, model, str(tmp_path / "grpo"), total_training_steps=1, save_freq=-1, test_freq=-1)
    cfg["algorithm"] = {"adv_estimator": "grpo", "use_kl_in_reward": False}
    cfg["actor_rollout_ref"]["rollout"]["n"] = 2
    cfg["actor_rollout_ref"]["actor"]["use_kl_loss"] = True
    last = run_ppo(cfg)
    assert "critic/vf_loss" not in last and "timing_s/values" in last
    # Both samples of a prompt share its reward (even index -> 1, odd -> 0), so every group has std 0 and
    # mean = its reward: all GRPO advantages are 0.
    assert last["critic/advantages/mean"] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(last["actor/kl_loss"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("estimator", ["rloo", "reinforce_plus_plus"])
def test_every_registered_estimator_trains_without_critic(files, tmp_path, estimator):
    """algorithm.adv_estimator reaches RLOO and REINFORCE++ through the registry (GAE and GRPO: the tests above)."""
    from verl.trainer.ppo.core_algos import ADVANTAGE_ESTIMATORS

    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce_plus_plus"}  # a new one needs a test here
    train, val, model = files
    cfg = _config(train, val, model, str(tmp_path / estimator), total_training_steps=1, save_freq=-1, test_freq=-1)
    cfg["algorithm"] = {"adv_estimator": estimator, "use_kl_in_reward": False}
    cfg["actor_rollout_ref"]["rollout"]["n"] = 2
    last = run_ppo(cfg)
    assert "critic/vf_loss" not in last and np.isfinite(last["actor/pg_loss"])
    if estimator == "rloo":
        # both samples of a prompt share its reward, so s_i - mean of the other sample = 0 for every row
        assert last["critic/advantages/max"] == pytest.approx(0.0, abs=1e-6)
        assert last["critic/advantages/min"] == pytest.approx(0.0, abs=1e-6)
    else:
        # returns G_t > 0 on rewarded rows, whitened over the batch: mean 0, both signs present
        assert last["critic/advantages/mean"] == pytest.approx(0.0, abs=1e-5)
        assert last["critic/advantages/max"] > 0.5 and last["critic/advantages/min"] < -0.5
        assert last["critic/returns/mean"] > 0.0


def test_group_estimators_refuse_one_sample_per_prompt(files, tmp_path):
    from verl.trainer.main_ppo import build_run_config

    train, val, model = files
    cfg = _config(train, val, model, str(tmp_path / "rloo1"))
    cfg["algorithm"] = {"adv_estimator": "rloo", "use_kl_in_reward": False}
    with pytest.raises(ValueError, match="adv_estimator=rloo needs actor_rollout_ref.rollout.n >= 2"):
        build_run_config(cfg)
    cfg["algorithm"] = {"adv_estimator": "ppo"}
    with pytest.raises(ValueError, match=re.escape("adv_estimator must be one of gae|grpo|rloo|reinforce_plus_plus, got 'ppo'")):
        build_run_config(cfg)


@pytest.mark.timeout(300)
def test_resume_skips_half_written_checkpoint_and_missing_marker(files, tmp_path, caplog):
    """Fault test: the newest save lost its COMPLETE marker and `latest` is gone -> resume from the last complete
    checkpoint (step 1), with warnings, and redo step 2 with the same batch."""
    import logging

    from verl.utils import checkpoint as ckpt

    train, val, model = files
    out = str(tmp_path / "run")
    run_ppo(_config(train, val, model, out, save_freq=1, test_freq=-1, max_ckpt_to_keep=3))
    os.remove(os.path.join(out, ckpt.LATEST_FILE))
    os.remove(os.path.join(ckpt.step_dir(out, 2), ckpt.COMPLETE_FILE))  # as if killed while saving step 2
    with caplog.at_level(logging.WARNING):
        run_ppo(_config(train, val, model, out, save_freq=1, test_freq=-1, max_ckpt_to_keep=3))
    assert "no latest_checkpointed_iteration.txt" in caplog.text
    assert "skipping half-written checkpoint" in caplog.text
    trace = _jsonl(os.path.join(out, "data_trace.jsonl"))
    assert [r["step"] for r in trace] == [1, 2, 2]
    assert trace[2]["index"] == trace[1]["index"] and trace[2]["worker_rng"] == trace[1]["worker_rng"]
    assert ckpt.read_latest(out) == 2 and ckpt.is_complete(ckpt.step_dir(out, 2))


@pytest.mark.timeout(300)
def test_critic_warmup_skips_actor_updates(files, tmp_path):
    train, val, model = files
    cfg = _config(train, val, model, str(tmp_path / "warmup"), total_training_steps=1, save_freq=-1, test_freq=-1,
                  critic_warmup=1)
    last = run_ppo(cfg)
    assert last["actor/updated"] == 0.0 and "actor/pg_loss" not in last and "perf/weight_sync_s" not in last
    assert np.isfinite(last["critic/vf_loss"])
