"""RewardConfig: the frozen, validated reward settings (the trainer converts its Hydra ``reward`` node once).

Each choice where the paper and the released StepSearch code differ is one field; configs/ppo_trainer.yaml holds
the defaults (the one source: each field's default is read from its ``reward`` section, docs/configuration.md) and
docs/rewards.md lists which value is the paper's and which the released code's. The rows of the paper's Table 3 are
one override each: ``ablation=<row>`` (see :data:`ABLATIONS`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from verl.utils.hydra_to_dataclass import yaml_default

__all__ = ["RewardConfig", "ABLATIONS", "ANSWER_METRICS", "FORMAT_CHECKS", "FORMAT_GATES"]

ANSWER_METRICS = ("f1", "em")
FORMAT_CHECKS = ("released", "paper")
FORMAT_GATES = ("released", "paper")
_KEY_MODES = ("max", "latest")
_CHOICES = {"answer_metric": ANSWER_METRICS, "key_reward_mode": _KEY_MODES, "format_check": FORMAT_CHECKS,
            "format_gate": FORMAT_GATES}

@dataclass(frozen=True)
class RewardConfig:
    ablation: str = yaml_default("reward.ablation")
    """Paper Table 3 row (a key of ABLATIONS); it sets the switches of that row (``from_mapping`` applies it)."""
    format_check: str = yaml_default("reward.format_check")
    """"released": a closed <answer> block with only whitespace after it; "paper": also exactly one <answer>
    and at least one <think>…</think><search>…</search> round, both counted on the policy's own text."""
    format_gate: str = yaml_default("reward.format_gate")
    """What a format failure costs. "released": the whole outcome is format_fail_score (r_key dropped) and the
    step rewards are dropped unless step_rewards_on_format_fail; "paper": only r_answer becomes 0 (γ_key·r_key
    and the step rewards stay)."""
    format_fail_score: float = yaml_default("reward.format_fail_score")
    """Outcome reward on a format failure under format_gate="released" (released code: −1)."""
    answer_metric: str = yaml_default("reward.answer_metric")
    """r_answer: "f1" (max token F1 over gold strings, 4 decimals) or "em"."""
    use_search_key_reward: bool = yaml_default("reward.use_search_key_reward")
    """Add γ_key · r_key to the outcome reward (``trainer.search_key_reward``)."""
    key_reward_mode: str = yaml_default("reward.key_reward_mode")
    """r_key: "max" (paper formula) or "latest" (released overwrite algorithm, docs/method.md §1.4)."""
    search_key_coef: float = yaml_default("reward.search_key_coef")
    """γ_key (released default argument; the paper gives no value)."""
    use_step_rewards: bool = yaml_default("reward.use_step_rewards")
    """Master switch for the per-round step rewards (``trainer.search_steps_reward``)."""
    use_info_gain: bool = yaml_default("reward.use_info_gain")
    """Include G^t in the step score (``trainer.information_gain``)."""
    use_redundancy_penalty: bool = yaml_default("reward.use_redundancy_penalty")
    """Subtract P^t in the step score (``trainer.redundancy_penalty``)."""
    step_reward_scale: float = yaml_default("reward.step_reward_scale")
    """Step rewards are scale · (G^t − P^t) (released code; the paper does not mention a scale)."""
    step_rewards_on_format_fail: bool = yaml_default("reward.step_rewards_on_format_fail")
    """format_gate="released" only: keep the step rewards when the format check fails (released: dropped)."""
    use_sub_answer_reward: bool = yaml_default("reward.use_sub_answer_reward")
    """Add sub_answer_coef · r_sub (the "ow sub-answer" row, with the "sub_answer" prompt template)."""
    sub_answer_coef: float = yaml_default("reward.sub_answer_coef")
    """Weight of r_sub; the paper gives none, so it takes γ_key's value."""

    def __post_init__(self):
        for name, valid in _CHOICES.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"[reward] {name} '{getattr(self, name)}' is unknown; valid: {list(valid)}")
        for name in ("format_fail_score", "search_key_coef", "step_reward_scale", "sub_answer_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"[reward] {name} must be a finite number, got {value!r}")
        for f in dataclasses.fields(self):
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"[reward] {f.name} must be true or false, got {getattr(self, f.name)!r}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"[reward] ablation '{self.ablation}' is unknown; valid: {list(ABLATIONS)}")
        for name, value in ABLATIONS[self.ablation].items():
            if getattr(self, name) != value:
                raise ValueError(f"[reward] ablation={self.ablation} needs {name}={value}, got {getattr(self, name)}; "
                                 f"build the config with RewardConfig.from_mapping or for_ablation")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RewardConfig":
        """Build from a plain mapping (e.g. ``OmegaConf.to_container(cfg.reward)``); unknown keys are an error.

        The ablation row's switches replace the mapping's values; a switch the mapping moved off its default in
        the other direction is a contradiction and an error (``ablation=ow_info_gain`` with
        ``use_info_gain=false``).
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise KeyError(f"[reward] unknown keys {unknown}; valid keys: {sorted(fields)}")
        values = {**{name: f.default for name, f in fields.items()}, **values}   # absent keys: their defaults
        row_name = values["ablation"]
        if row_name not in ABLATIONS:
            raise ValueError(f"[reward] ablation '{row_name}' is unknown; valid: {list(ABLATIONS)}")
        for name, forced in ABLATIONS[row_name].items():
            given = values[name]
            if given != forced and given != fields[name].default:
                raise ValueError(f"[reward] ablation={row_name} sets {name}={forced}, but {name}={given} was also "
                                 f"given; drop one of the two")
            values[name] = forced
        return cls(**values)

    @classmethod
    def for_ablation(cls, name: str, **overrides: Any) -> "RewardConfig":
        """The config of one row of the paper's Table 3, e.g. ``for_ablation("wo_key_reward")``."""
        return cls.from_mapping({**overrides, "ablation": name})


def _row(*on: str) -> dict[str, bool]:
    """Every reward switch, True only for ``on``."""
    return {name: name in on for name in _SWITCHES}


_SWITCHES = ("use_search_key_reward", "use_step_rewards", "use_info_gain", "use_redundancy_penalty",
             "use_sub_answer_reward")
_STEPS = ("use_step_rewards", "use_info_gain", "use_redundancy_penalty")
# The rows of the paper's Table 3, in its order ("w/o X": X off; "ow X": the answer reward plus X only). "full"
# (StePPO, the default) forces nothing, so the individual switches still compose; every other row sets all five
# switches. "ppo" is Table 2's PPO baseline (answer F1 only). "ow_sub_answer" also needs data built with the
# "sub_answer" prompt template (stepsearch.data.prompts), whose <sub_answer_k> tags r_sub scores.
ABLATIONS: dict[str, dict[str, bool]] = {
    "full": {},
    "wo_key_reward": _row(*_STEPS),
    "wo_penalty": _row("use_search_key_reward", "use_step_rewards", "use_info_gain"),
    "wo_info_gain": _row("use_search_key_reward", "use_step_rewards", "use_redundancy_penalty"),
    "wo_steps_reward": _row("use_search_key_reward"),
    "ppo": _row(),
    "ow_key_reward": _row("use_search_key_reward"),
    "ow_penalty": _row("use_step_rewards", "use_redundancy_penalty"),
    "ow_info_gain": _row("use_step_rewards", "use_info_gain"),
    "ow_steps_reward": _row(*_STEPS),
    "ow_sub_answer": _row("use_sub_answer_reward"),
}
