"""Issue 14 defects 1, 5 and 9 (trainer side): config checks, the dual-clip default, the warm-up schedule and the
EOS ids of the vLLM backend."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from verl.trainer.main_ppo import build_run_config
from verl.trainer.ppo import core_algos as ca
from verl.utils.hydra_to_dataclass import OptimConfig
from verl.workers.fsdp_workers import build_lr_scheduler

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
PAPER_CONFIGS = ["ppo_trainer", "stepsearch_qwen2.5_3b", "stepsearch_qwen2.5_7b"]


def _run(name, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return build_run_config(compose(config_name=name, overrides=list(overrides)))


# ---- defect 1: a critic regressed toward 0 on observation tokens --------------------------------------------------
@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_masked_gae_with_value_loss_on_observations_is_refused_naming_both_keys(name):
    with pytest.raises(ValueError, match=r"value_loss_on_observations=true.*mask_observations_in_gae=true"):
        _run(name, "critic.value_loss_on_observations=true")


@pytest.mark.parametrize("mask_gae, loss_on_obs", [(True, False), (False, True), (False, False)])
def test_the_other_combinations_build(mask_gae, loss_on_obs):
    run = _run("stepsearch_qwen2.5_3b", f"algorithm.mask_observations_in_gae={str(mask_gae).lower()}",
               f"critic.value_loss_on_observations={str(loss_on_obs).lower()}")
    assert (run.algorithm.mask_observations_in_gae, run.critic.value_loss_on_observations) == (mask_gae, loss_on_obs)


def test_grpo_has_no_critic_so_the_combination_is_not_checked():
    run = _run("stepsearch_qwen2.5_3b", "algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=2",
               "critic.value_loss_on_observations=true")
    assert run.algorithm.adv_estimator == "grpo"


def test_why_the_combination_is_refused_and_what_the_allowed_one_trains_toward():
    # one row, T = 4: model, observation, observation, model; outcome reward 1 at t = 3; γ = λ = 1
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 0.9]])
    mask = torch.tensor([[1, 0, 0, 1]])
    _, masked_returns = ca.compute_gae_advantage_return(rewards, values, mask, 1.0, 1.0, skip_masked=True,
                                                        whiten=False)
    # masked chain: returns = reward-to-go on generated tokens, 0 on the observations (a value target of 0 there)
    assert masked_returns.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    _, all_returns = ca.compute_gae_advantage_return(rewards, values, mask, 1.0, 1.0, skip_masked=False,
                                                     whiten=False)
    # all positions (the allowed pair with value_loss_on_observations=true): R_t = Σ_{k≥t} r_k = 1 everywhere
    assert all_returns.tolist() == [[1.0, 1.0, 1.0, 1.0]]


# ---- defect 5: dual clip off -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_dual_clip_is_off_in_the_paper_configs(name):
    assert _run(name).actor.clip_ratio_c is None


def test_dual_clip_is_one_override():
    assert _run("stepsearch_qwen2.5_3b", "actor_rollout_ref.actor.clip_ratio_c=3.0").actor.clip_ratio_c == 3.0


# ---- defect 9: warm-up starts at 0, reaches the full LR at update W ------------------------------------------------
@pytest.mark.parametrize("optim, total, expected", [
    # W = int(0.4 · 10) = 4 updates: factor u / W = 0, 0.25, 0.5, 0.75, then 1
    (OptimConfig(lr=1.0, warmup_ratio=0.4), 10, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]),
    # explicit W = 2: 0, 0.5, 1, 1
    (OptimConfig(lr=2.0, warmup_steps=2), 10, [0.0, 1.0, 2.0, 2.0]),
    # no warm-up: the full LR from the first update
    (OptimConfig(lr=1.0), 10, [1.0, 1.0]),
])
def test_warmup_learning_rates_per_update(optim, total, expected):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=optim.lr)
    sched = build_lr_scheduler(opt, optim, total)
    seen = []
    for _ in expected:
        seen.append(opt.param_groups[0]["lr"])   # the LR the next update uses
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected, abs=1e-12)


# ---- defect 9: vLLM EOS ids also from generation_config.json -----------------------------------------------------
def test_vllm_eos_ids_include_the_generation_config(tmp_path):
    from transformers import GenerationConfig

    from verl.utils.tiny_model import save_tiny_model
    from verl.workers.rollout.base import eos_ids_of
    from verl.workers.rollout.vllm import generation_config_of

    from transformers import AutoTokenizer

    path = save_tiny_model(str(tmp_path / "m"), vocab_size=64)
    tok = AutoTokenizer.from_pretrained(path)
    assert generation_config_of(path) is not None  # save_pretrained writes one with the tokenizer's eos only
    GenerationConfig(eos_token_id=[tok.eos_token_id, 7, 9]).save_pretrained(path)  # e.g. Qwen's <|im_end|>
    assert eos_ids_of(tok, generation_config_of(path)) == sorted({tok.eos_token_id, 7, 9})
    (tmp_path / "m" / "generation_config.json").unlink()
    assert generation_config_of(path) is None
