"""The Hydra configs compose and convert into frozen dataclasses; bad values fail with the key named."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from verl.trainer.main_ppo import build_run_config

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def _compose(name, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("name", ["ppo_trainer", "stepsearch_qwen2.5_3b", "stepsearch_qwen2.5_7b"])
def test_model_configs_build(name):
    run = build_run_config(_compose(name))
    assert run.trainer.world_size == 8 and run.actor.world_size == 8  # derived, not written in the YAML
    assert run.algorithm.adv_estimator == "gae" and run.algorithm.kl_ctrl.kl_coef == 0.001
    assert run.actor.ppo_mini_batch_size_per_device * 8 == run.actor.ppo_mini_batch_size  # rollout.n = 1


def test_paper_values_in_3b_config():
    run = build_run_config(_compose("stepsearch_qwen2.5_3b"))
    assert (run.data.train_batch_size, run.actor.ppo_mini_batch_size) == (256, 64)
    assert (run.actor_optim.lr, run.critic_optim.lr) == (7e-7, 7e-6)
    assert (run.actor_optim.warmup_ratio, run.critic_optim.warmup_ratio) == (0.285, 0.015)
    assert (run.rollout.temperature, run.rollout.top_p) == (1.0, 1.0)
    assert run.trainer.total_training_steps == 500


def test_cpu_test_config_needs_paths_and_builds_with_them():
    cfg = _compose("cpu_test", "model.path=/m", "data.train_files=[/d.parquet]")
    run = build_run_config(cfg)
    assert run.trainer.world_size == 2 and run.trainer.device == "cpu" and run.actor.world_size == 2


def test_cpu_real_config_builds_with_paths():
    """configs/cpu_real.yaml (scripts/real_run.sh): one in-process CPU worker, token-budget micro-batches."""
    cfg = _compose("cpu_real", "model.path=/m", "data.train_files=[/d.parquet]", "data.val_files=[/v.parquet]")
    run = build_run_config(cfg)
    assert run.trainer.world_size == 1 and run.trainer.device == "cpu" and run.actor.world_size == 1
    assert run.actor.use_dynamic_bsz and run.critic.use_dynamic_bsz and run.actor.use_remove_padding
    assert run.data.train_batch_size == run.actor.ppo_mini_batch_size == 4


@pytest.mark.parametrize("override, error, match", [
    ("+actor_rollout_ref.actor.ppo_epoch=2", KeyError, r"\[actor_rollout_ref.actor\] unknown key\(s\) \['ppo_epoch'\]"),
    ("trainer.logger=[console,mlflow]", ValueError, r"unknown logger\(s\) \['mlflow'\]"),
    ("algorithm.adv_estimator=grpo", ValueError, "needs actor_rollout_ref.rollout.n >= 2"),
    ("data.train_batch_size=96", ValueError, r"ppo_mini_batch_size \(64\) must divide data.train_batch_size"),
    ("actor_rollout_ref.rollout.temperature=0.7", ValueError, "must equal rollout.temperature"),
    ("+actor_rollout_ref.actor.world_size=4", KeyError, "derived"),
])
def test_bad_overrides_name_the_key(override, error, match):
    with pytest.raises(error, match=match):
        build_run_config(_compose("stepsearch_qwen2.5_3b", override))


def test_stepsearch_hooks_build_agent_and_reward_configs():
    from omegaconf import OmegaConf

    from stepsearch.train import agent_config_from, reward_config_from

    cfg = OmegaConf.to_container(_compose("stepsearch_qwen2.5_3b", "reward.use_info_gain=false",
                                          "actor_rollout_ref.rollout.top_p=0.95"), resolve=True)
    agent = agent_config_from(cfg)
    assert (agent.max_turns, agent.topk, agent.top_p, agent.max_new_tokens) == (5, 3, 0.95, 800)
    reward = reward_config_from(cfg)
    assert reward.use_info_gain is False and reward.use_redundancy_penalty is True
    cfg["agent"]["temperature"] = 0.5
    with pytest.raises(KeyError, match="belong in actor_rollout_ref.rollout"):
        agent_config_from(cfg)


def test_retriever_section_is_checked_and_carries_a_token(monkeypatch):
    from omegaconf import OmegaConf

    from stepsearch.train import RetrieverConfig, build_rollout_fn, retriever_config_from

    monkeypatch.delenv("STEPSEARCH_RETRIEVAL_TOKEN", raising=False)
    cfg = OmegaConf.to_container(_compose("stepsearch_qwen2.5_3b", "+retriever.timeout_sec=5"), resolve=True)
    with pytest.raises(KeyError, match=r"\[retriever\] unknown key\(s\) \['timeout_sec'\]"):
        retriever_config_from(cfg)
    with pytest.raises(KeyError, match="timeout_sec"):  # the rollout hook refuses it too
        build_rollout_fn(cfg, tokenizer=None)
    cfg = OmegaConf.to_container(_compose("ppo_trainer"), resolve=True)
    assert retriever_config_from(cfg) == RetrieverConfig("http://127.0.0.1:8000", 30.0, 3, None)
    monkeypatch.setenv("STEPSEARCH_RETRIEVAL_TOKEN", "from-env")
    assert retriever_config_from(cfg).token == "from-env"  # unset in the YAML: the server's env var
    cfg["retriever"]["token"] = "s3cret"
    client = retriever_config_from(cfg).client()
    assert client.headers == {"Authorization": "Bearer s3cret"}
    with pytest.raises(Exception):  # frozen
        retriever_config_from(cfg).url = "x"
