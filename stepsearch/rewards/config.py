"""RewardConfig: the frozen, validated reward settings (the trainer converts its Hydra ``reward`` node once).

Defaults follow the released StepSearch code (SPEC.md §0.1); the paper's choices and the ablations of Table 3 are
one override each (see :data:`ABLATIONS` and docs/rewards.md).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["RewardConfig", "ABLATIONS", "ANSWER_METRICS"]

ANSWER_METRICS = ("f1", "em")
_KEY_MODES = ("max", "latest")


@dataclass(frozen=True)
class RewardConfig:
    format_fail_score: float = -1.0
    """Whole outcome reward when the format gate fails (released: −1; the paper: 0)."""
    answer_metric: str = "f1"
    """r_answer: "f1" (max token F1 over gold strings, 4 decimals) or "em"."""
    use_search_key_reward: bool = True
    """Add γ_key · r_key to the outcome reward (``trainer.search_key_reward``)."""
    key_reward_mode: str = "max"
    """r_key: "max" (paper formula) or "latest" (released overwrite algorithm, SPEC §1.4)."""
    search_key_coef: float = 0.618
    """γ_key (released default argument; the paper gives no value)."""
    use_step_rewards: bool = True
    """Master switch for the per-round step rewards (``trainer.search_steps_reward``)."""
    use_info_gain: bool = True
    """Include G^t in the step score (``trainer.information_gain``)."""
    use_redundancy_penalty: bool = True
    """Subtract P^t in the step score (``trainer.redundancy_penalty``)."""
    step_reward_scale: float = 0.6
    """Step rewards are scale · (G^t − P^t) (released code; the paper does not mention a scale)."""
    step_rewards_on_format_fail: bool = False
    """Keep the step rewards when the format gate fails (released: dropped; set true to keep them)."""

    def __post_init__(self):
        if self.answer_metric not in ANSWER_METRICS:
            raise ValueError(f"[reward] answer_metric '{self.answer_metric}' is unknown; valid: {list(ANSWER_METRICS)}")
        if self.key_reward_mode not in _KEY_MODES:
            raise ValueError(f"[reward] key_reward_mode '{self.key_reward_mode}' is unknown; valid: {list(_KEY_MODES)}")
        for name in ("format_fail_score", "search_key_coef", "step_reward_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"[reward] {name} must be a finite number, got {value!r}")
        for f in dataclasses.fields(self):
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"[reward] {f.name} must be true or false, got {getattr(self, f.name)!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RewardConfig":
        """Build from a plain mapping (e.g. ``OmegaConf.to_container(cfg.reward)``); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"[reward] unknown keys {unknown}; valid keys: {sorted(known)}")
        return cls(**dict(values))

    @classmethod
    def for_ablation(cls, name: str, **overrides: Any) -> "RewardConfig":
        """The config of one paper setting (Tables 2–3), e.g. ``for_ablation("no_key")``; see :data:`ABLATIONS`."""
        if name not in ABLATIONS:
            raise ValueError(f"[reward] ablation '{name}' is unknown; valid: {sorted(ABLATIONS)}")
        return cls.from_mapping({**ABLATIONS[name], **overrides})


# Paper Table 3 rows ("w/o X" turns X off; "ow X" keeps only X) and Table 2's PPO baseline (answer F1 only).
ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_key": {"use_search_key_reward": False},
    "no_penalty": {"use_redundancy_penalty": False},
    "no_info_gain": {"use_info_gain": False},
    "no_step": {"use_step_rewards": False},
    "ppo": {"use_search_key_reward": False, "use_step_rewards": False,
            "use_info_gain": False, "use_redundancy_penalty": False},
    "only_key": {"use_step_rewards": False, "use_info_gain": False, "use_redundancy_penalty": False},
    "only_penalty": {"use_search_key_reward": False, "use_info_gain": False},
    "only_info_gain": {"use_search_key_reward": False, "use_redundancy_penalty": False},
    "only_step": {"use_search_key_reward": False},
}
