"""The FSDP workers on CPU: in-process (1 rank) and on Ray with 2 gloo ranks (FSDP2 fully_shard)."""
import os
import stat

import numpy as np
import pytest
import torch

from verl.protocol import DataProto
from verl.utils.fs import current_umask
from verl.utils.hydra_to_dataclass import FSDPConfig, OptimConfig, RolloutConfig
from verl.workers.worker_config import ActorConfig, CriticConfig
from verl.workers.rollout.base import SamplingConfig

P, T = 6, 4


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from verl.utils.tiny_model import save_tiny_model
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_lm")), hidden_size=32, num_layers=2, num_heads=2)


def _worker_configs(model_dir, world_size):
    from verl.workers.fsdp_workers import WorkerConfig

    common = dict(model_path=model_dir, tokenizer_path=model_dir, fsdp=FSDPConfig(), rollout=RolloutConfig(),
                  device="cpu", total_steps=4, seed=3)
    actor = WorkerConfig(role_config=ActorConfig(ppo_mini_batch_size=4, ppo_micro_batch_size_per_device=2,
                                                 forward_micro_batch_size_per_device=2, world_size=world_size),
                         optim=OptimConfig(lr=1e-2), use_ref=True, **common)
    critic = WorkerConfig(role_config=CriticConfig(ppo_mini_batch_size=4, ppo_micro_batch_size_per_device=2,
                                                   forward_micro_batch_size_per_device=2, world_size=world_size),
                          optim=OptimConfig(lr=1e-2), use_ref=False, **common)
    return actor, critic


def _batch(seed=0, B=4):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, 200, (B, P), generator=g)
    responses = torch.randint(3, 200, (B, T), generator=g)
    attention = torch.ones(B, P + T, dtype=torch.long)
    attention[0, :2] = 0  # left padding in row 0
    response_mask = torch.tensor([[1, 1, 0, 1]] * B, dtype=torch.float32)  # position 2: an observation token
    return DataProto.from_dict(tensors={
        "input_ids": torch.cat([prompts, responses], 1), "attention_mask": attention, "responses": responses,
        "response_mask": response_mask, "position_ids": (attention.cumsum(-1) - 1).clamp(min=0)})


def _train_once(actor_wg, critic_wg, data):
    data = data.union(actor_wg.compute_log_prob(data)).union(actor_wg.compute_ref_log_prob(data))
    data = data.union(critic_wg.compute_values(data))
    adv = torch.tensor([[1.0, -0.5, 0.0, 0.25]] * len(data))
    data = data.union(DataProto.from_dict(tensors={"advantages": adv, "returns": adv + 0.1}))
    return data, actor_wg.update_actor(data), critic_wg.update_critic(data)


def test_in_process_workers_step_save_load_export(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from verl.single_controller.base import LocalWorkerGroup
    from verl.workers.fsdp_workers import ActorRolloutRefWorker, CriticWorker

    actor_cfg, critic_cfg = _worker_configs(tiny_model_dir, 1)
    actor = LocalWorkerGroup(ActorRolloutRefWorker, "actor", config=actor_cfg)
    critic = LocalWorkerGroup(CriticWorker, "critic", config=critic_cfg)
    actor.init_model(); critic.init_model()
    data, a_metrics, c_metrics = _train_once(actor, critic, _batch())
    # Before the first update the policy equals the reference: identical log-probs.
    assert torch.allclose(data.batch["old_log_probs"], data.batch["ref_log_probs"])
    assert np.isfinite(a_metrics[0]["actor/pg_loss"]) and np.isfinite(c_metrics[0]["critic/vf_loss"])
    actor.sync_rollout_weights()
    w = actor.workers[0]
    rollout_sd = w.backend.model.state_dict()
    for name, value in w.module.state_dict().items():  # the rollout copy now holds the updated weights
        assert torch.equal(rollout_sd[name], value), name
    out = actor.generate([[5, 6, 7], [8, 9]], SamplingConfig(max_new_tokens=3, seed=11))
    assert len(out) == 2 and all(len(o.token_ids) <= 3 for o in out)
    step_dir = str(tmp_path / "global_step_1")
    actor.save_checkpoint(step_dir); critic.save_checkpoint(step_dir)
    actor.export_hf(os.path.join(step_dir, "hf"))
    after_save = actor.compute_log_prob(data).batch["old_log_probs"]
    _train_once(actor, critic, _batch(seed=1))  # move the weights away from the checkpoint
    assert not torch.allclose(actor.compute_log_prob(data).batch["old_log_probs"], after_save)
    actor.load_checkpoint(step_dir); critic.load_checkpoint(step_dir)
    assert torch.allclose(actor.compute_log_prob(data).batch["old_log_probs"], after_save, atol=1e-6)
    exported = AutoModelForCausalLM.from_pretrained(os.path.join(step_dir, "hf"))
    umask = current_umask()  # the export follows it: no 0700 temp folder, no 0600 safetensors
    assert stat.S_IMODE(os.stat(os.path.join(step_dir, "hf")).st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(os.path.join(step_dir, "hf", "model.safetensors")).st_mode) == 0o666 & ~umask
    for name, value in exported.state_dict().items():
        assert torch.allclose(value, w.module.state_dict()[name]), name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_ranks_fsdp2_match_one_rank(tiny_model_dir):
    """FSDP2 over 2 gloo ranks: log-probs equal the single-process ones; both ranks stay in sync."""
    ray = pytest.importorskip("ray")
    from verl.single_controller.base import LocalWorkerGroup
    from verl.single_controller.ray import RayResourcePool, RayWorkerGroup
    from verl.workers.fsdp_workers import ActorRolloutRefWorker

    data = _batch(B=4)
    local_cfg, _ = _worker_configs(tiny_model_dir, 1)
    local = LocalWorkerGroup(ActorRolloutRefWorker, "actor", config=local_cfg)
    local.init_model()
    expected = local.compute_log_prob(data).batch["old_log_probs"]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool = RayResourcePool(2, 1.0, 0, timeout_s=60)
        actor_cfg, _ = _worker_configs(tiny_model_dir, 2)
        wg = RayWorkerGroup(pool, ActorRolloutRefWorker, "actor", {"config": actor_cfg}, 1.0, timeout_s=240)
        wg.init_model()
        got = wg.compute_log_prob(data).batch["old_log_probs"]
        assert torch.allclose(got, expected, atol=1e-5)
        data = data.union(DataProto.from_dict(tensors={"old_log_probs": got,
                                                       "advantages": torch.ones(4, T), "returns": torch.ones(4, T)}))
        metrics = wg.update_actor(data)
        assert len(metrics) == 2 and all(np.isfinite(m["actor/pg_loss"]) for m in metrics)
        wg.sync_rollout_weights()
        greedy = SamplingConfig(max_new_tokens=4, greedy=True)
        a, b = wg.generate([[5, 6, 7], [5, 6, 7]], greedy)  # one prompt per rank: same weights, same tokens
        assert a.token_ids == b.token_ids
    finally:
        ray.shutdown()


def test_update_counters_survive_checkpoint(tiny_model_dir, tmp_path):
    """Actor/Critic._num_updates seeds the mini-batch shuffling: it is saved and restored with the worker."""
    from verl.single_controller.base import LocalWorkerGroup
    from verl.workers.fsdp_workers import ActorRolloutRefWorker, CriticWorker

    actor_cfg, critic_cfg = _worker_configs(tiny_model_dir, 1)
    actor = LocalWorkerGroup(ActorRolloutRefWorker, "actor", config=actor_cfg)
    critic = LocalWorkerGroup(CriticWorker, "critic", config=critic_cfg)
    actor.init_model(); critic.init_model()
    a, c = actor.workers[0].actor, critic.workers[0].critic
    _train_once(actor, critic, _batch())
    _train_once(actor, critic, _batch(seed=1))
    assert (a._num_updates, c._num_updates) == (2, 2)  # one update_policy / update_critic call each
    step_dir = str(tmp_path / "global_step_2")
    actor.save_checkpoint(step_dir); critic.save_checkpoint(step_dir)
    _train_once(actor, critic, _batch(seed=2))
    assert (a._num_updates, c._num_updates) == (3, 3)
    actor.load_checkpoint(step_dir); critic.load_checkpoint(step_dir)
    assert (a._num_updates, c._num_updates) == (2, 2)
    # Fresh workers (a resumed run) start at 0 and get the saved counters back.
    actor2 = LocalWorkerGroup(ActorRolloutRefWorker, "actor", config=actor_cfg)
    critic2 = LocalWorkerGroup(CriticWorker, "critic", config=critic_cfg)
    actor2.init_model(); critic2.init_model()
    assert (actor2.workers[0].actor._num_updates, critic2.workers[0].critic._num_updates) == (0, 0)
    actor2.load_checkpoint(step_dir); critic2.load_checkpoint(step_dir)
    assert (actor2.workers[0].actor._num_updates, critic2.workers[0].critic._num_updates) == (2, 2)
