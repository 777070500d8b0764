"""RewardConfig validation, from_mapping and the ablation registry."""
from pathlib import Path

import pytest

from stepsearch.rewards.reward_config import ABLATIONS, RewardConfig

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
    with pytest.raises(ValueError, match="ablation 'nokey' is unknown; valid: \\['full', 'wo_key_reward'"):
        RewardConfig.for_ablation("nokey")


# Expected switches per row of the paper's Table 3: (r_key, steps master, G, P, r_sub), worked out from the row
# names ("w/o X": everything but X; "ow X": answer reward + X only; PPO: answer F1 only).
TABLE_3 = {
    "full": (True, True, True, True, False),
    "wo_key_reward": (False, True, True, True, False),
    "wo_penalty": (True, True, True, False, False),
    "wo_info_gain": (True, True, False, True, False),
    "wo_steps_reward": (True, False, False, False, False),
    "ppo": (False, False, False, False, False),
    "ow_key_reward": (True, False, False, False, False),
    "ow_penalty": (False, True, False, True, False),
    "ow_info_gain": (False, True, True, False, False),
    "ow_steps_reward": (False, True, True, True, False),
    "ow_sub_answer": (False, False, False, False, True),
}
SWITCHES = ("use_search_key_reward", "use_step_rewards", "use_info_gain", "use_redundancy_penalty",
            "use_sub_answer_reward")


@pytest.mark.parametrize("row", sorted(TABLE_3))
def test_each_table_3_row_is_one_override(row):
    cfg = RewardConfig.from_mapping({"ablation": row})
    assert tuple(getattr(cfg, s) for s in SWITCHES) == TABLE_3[row]
    assert RewardConfig.for_ablation(row) == cfg


def test_every_row_is_listed_and_a_row_wins_over_the_yaml_defaults():
    assert set(ABLATIONS) == set(TABLE_3)
    defaults = _yaml_reward_defaults()
    # the trainer passes every key of the YAML (all switches at their default, true/false); the row still decides
    cfg = RewardConfig.from_mapping({**defaults, "ablation": "ow_penalty"})
    assert tuple(getattr(cfg, s) for s in SWITCHES) == TABLE_3["ow_penalty"]


def test_a_switch_that_contradicts_the_row_is_an_error():
    with pytest.raises(ValueError, match=r"ablation=ow_info_gain sets use_info_gain=True, but use_info_gain=False"):
        RewardConfig.from_mapping({"ablation": "ow_info_gain", "use_info_gain": False})
    with pytest.raises(ValueError, match=r"ablation=ppo needs use_search_key_reward=False"):
        RewardConfig(ablation="ppo")                          # rows are applied by from_mapping / for_ablation
    # "full" forces nothing: single switches still compose (bench/credit_assignment.py relies on it)
    cfg = RewardConfig.from_mapping({"use_search_key_reward": False, "use_step_rewards": False})
    assert (cfg.use_search_key_reward, cfg.use_step_rewards, cfg.use_info_gain) == (False, False, True)


def _yaml_reward_defaults() -> dict:
    import yaml

    path = Path(__file__).resolve().parents[2] / "configs" / "ppo_trainer.yaml"
    return yaml.safe_load(path.read_text())["reward"]


def test_dataclass_defaults_equal_the_yaml_defaults():
    import dataclasses

    assert {f.name: f.default for f in dataclasses.fields(RewardConfig)} == _yaml_reward_defaults()


def test_format_options_are_validated():
    with pytest.raises(ValueError, match=r"format_check 'strict' is unknown; valid: \['released', 'paper'\]"):
        RewardConfig(format_check="strict")
    with pytest.raises(ValueError, match=r"format_gate 'zero' is unknown"):
        RewardConfig(format_gate="zero")
