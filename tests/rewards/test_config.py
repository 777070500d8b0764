"""RewardConfig validation, from_mapping and the ablation registry."""
import pytest

from stepsearch.rewards.config import ABLATIONS, RewardConfig

pytestmark = pytest.mark.timeout(30)


def test_defaults_are_the_released_ones():
    cfg = RewardConfig()
    assert (cfg.format_fail_score, cfg.search_key_coef, cfg.step_reward_scale, cfg.key_reward_mode) == \
        (-1.0, 0.618, 0.6, "max")


def test_validation_messages_name_the_field():
    with pytest.raises(ValueError, match=r"\[reward\] key_reward_mode 'best' is unknown; valid: \['max', 'latest'\]"):
        RewardConfig(key_reward_mode="best")
    with pytest.raises(ValueError, match=r"answer_metric 'acc'"):
        RewardConfig(answer_metric="acc")
    with pytest.raises(ValueError, match="step_reward_scale must be a finite number"):
        RewardConfig(step_reward_scale=float("nan"))
    with pytest.raises(TypeError, match="use_info_gain must be true or false"):
        RewardConfig(use_info_gain="yes")
    with pytest.raises(KeyError, match=r"unknown keys \['gamma_key'\]"):
        RewardConfig.from_mapping({"gamma_key": 0.5})
    with pytest.raises(ValueError, match="ablation 'nokey' is unknown"):
        RewardConfig.for_ablation("nokey")


def test_each_paper_ablation_is_one_override():
    full = RewardConfig()
    flags = ("use_search_key_reward", "use_step_rewards", "use_info_gain", "use_redundancy_penalty")
    for name, off in [("no_key", "use_search_key_reward"), ("no_penalty", "use_redundancy_penalty"),
                      ("no_info_gain", "use_info_gain"), ("no_step", "use_step_rewards")]:
        cfg = RewardConfig.for_ablation(name)
        assert [getattr(cfg, f) for f in flags] == [f != off for f in flags]
        assert len(ABLATIONS[name]) == 1
    ppo = RewardConfig.for_ablation("ppo")
    assert not any(getattr(ppo, f) for f in flags)
    assert RewardConfig.for_ablation("full") == full
