"""Frozen, validated configs for the actor and the critic (the trainer converts its Hydra tree once).

Batch-size semantics follow veRL: `ppo_mini_batch_size` is *global* and counted in prompts (it is
multiplied by `rollout_n`, then divided by `world_size`); `*_micro_batch_size_per_device` are local.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from verl.trainer.ppo.core_algos import KL_ESTIMATORS, LOSS_AGG_MODES

__all__ = ["ActorConfig", "CriticConfig", "ActorRefModelConfig", "config_from_mapping"]

# actor_rollout_ref.model.use_remove_padding: one switch for the actor, the reference and the critic.
DEFAULT_USE_REMOVE_PADDING = True


def _positive_int(role: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"[{role}] {name} must be a positive int, got {value!r}")


def _check_batch_sizes(role: str, cfg) -> None:
    for name in ("ppo_mini_batch_size", "ppo_micro_batch_size_per_device", "forward_micro_batch_size_per_device",
                 "rollout_n", "world_size", "ppo_epochs"):
        _positive_int(role, name, getattr(cfg, name))
    global_rows = cfg.ppo_mini_batch_size * cfg.rollout_n
    if global_rows % cfg.world_size != 0:
        raise ValueError(f"[{role}] ppo_mini_batch_size × rollout_n ({cfg.ppo_mini_batch_size} × {cfg.rollout_n} = "
                         f"{global_rows}) must be divisible by world_size ({cfg.world_size})")
    per_device = global_rows // cfg.world_size
    if per_device % cfg.ppo_micro_batch_size_per_device != 0:
        raise ValueError(f"[{role}] ppo_micro_batch_size_per_device ({cfg.ppo_micro_batch_size_per_device}) must "
                         f"divide the per-device mini-batch ({per_device} = ppo_mini_batch_size × rollout_n / "
                         f"world_size)")
    if cfg.grad_clip is not None and cfg.grad_clip <= 0:
        raise ValueError(f"[{role}] grad_clip must be > 0 or None, got {cfg.grad_clip}")
    if cfg.loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"[{role}] loss_agg_mode '{cfg.loss_agg_mode}' is not one of {list(LOSS_AGG_MODES)}")
    for name in ("ppo_max_token_len_per_gpu", "forward_max_token_len_per_gpu"):
        _positive_int(role, name, getattr(cfg, name))


@dataclass(frozen=True)
class ActorRefModelConfig:
    """``actor_rollout_ref.model``: how the actor, the reference and the critic run their models."""
    # Forward/backward on packed sequences (verl/utils/packing.py): no compute on pad tokens.
    use_remove_padding: bool = DEFAULT_USE_REMOVE_PADDING


@dataclass(frozen=True)
class _BatchSizes:
    @property
    def ppo_mini_batch_size_per_device(self) -> int:
        """Rows of one optimizer step on one device."""
        return self.ppo_mini_batch_size * self.rollout_n // self.world_size

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.ppo_mini_batch_size_per_device // self.ppo_micro_batch_size_per_device

    def check_train_batch(self, role: str, rows_on_device: int) -> None:
        """The rows one device receives for an update must split into whole mini-batches."""
        if rows_on_device % self.ppo_mini_batch_size_per_device != 0:
            raise ValueError(f"[{role}] the per-device batch ({rows_on_device} rows) must be a multiple of the "
                             f"per-device mini-batch ({self.ppo_mini_batch_size_per_device} = ppo_mini_batch_size "
                             f"{self.ppo_mini_batch_size} × rollout_n {self.rollout_n} / world_size {self.world_size})")


@dataclass(frozen=True)
class ActorConfig(_BatchSizes):
    """Policy update settings. Defaults follow docs/method.md §1.10 / train.sh where they exist."""
    ppo_mini_batch_size: int = 32                    # global, in prompts
    ppo_micro_batch_size_per_device: int = 16        # rows per forward/backward
    forward_micro_batch_size_per_device: int = 16    # rows per no-grad log-prob forward
    rollout_n: int = 1
    world_size: int = 1
    ppo_epochs: int = 1
    shuffle: bool = False
    seed: int = 0                                    # mini-batch shuffling
    clip_ratio_low: float = 0.2                      # ε_low
    clip_ratio_high: float = 0.2                     # ε_high (> ε_low: DAPO clip-higher)
    clip_ratio_c: float | None = None                # dual-clip c (> 1); None (StepSearch) disables it
    entropy_coeff: float = 0.0                       # released StepSearch: 0.001
    use_kl_loss: bool = False                        # GRPO-style KL loss against ref_log_probs
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    loss_agg_mode: str = "token-mean"
    grad_clip: float | None = 1.0
    temperature: float = 1.0                         # must equal the rollout's sampling temperature
    use_bf16_autocast: bool = False                  # GPU: bf16 autocast around the forward pass
    gradient_checkpointing: bool = False
    # Sequence packing (verl/utils/packing.py); the trainer sets it from actor_rollout_ref.model.use_remove_padding.
    use_remove_padding: bool = DEFAULT_USE_REMOVE_PADDING
    # Token-budget micro-batches: rows grouped so that each micro-batch holds at most this many real tokens
    # (Σ attention_mask); replaces ppo_micro_batch_size_per_device / forward_micro_batch_size_per_device.
    use_dynamic_bsz: bool = False
    ppo_max_token_len_per_gpu: int = 16384           # per forward/backward (update)
    forward_max_token_len_per_gpu: int = 16384       # per no-grad forward (log-probs, values)

    def __post_init__(self):
        _check_batch_sizes("actor", self)
        if not 0 <= self.clip_ratio_low < 1 or self.clip_ratio_high < 0:
            raise ValueError(f"[actor] need 0 <= clip_ratio_low < 1 and clip_ratio_high >= 0, got "
                             f"{self.clip_ratio_low}, {self.clip_ratio_high}")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1:
            raise ValueError(f"[actor] clip_ratio_c must be > 1 (or None), got {self.clip_ratio_c}")
        if self.kl_loss_type not in KL_ESTIMATORS:
            raise ValueError(f"[actor] kl_loss_type '{self.kl_loss_type}' is not one of {sorted(KL_ESTIMATORS)}")
        if self.temperature <= 0:
            raise ValueError(f"[actor] temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class CriticConfig(_BatchSizes):
    """Value update settings (docs/method.md §1.10 item 5)."""
    ppo_mini_batch_size: int = 32
    ppo_micro_batch_size_per_device: int = 16
    forward_micro_batch_size_per_device: int = 16
    rollout_n: int = 1
    world_size: int = 1
    ppo_epochs: int = 1
    shuffle: bool = False
    seed: int = 0
    cliprange_value: float = 0.5
    loss_agg_mode: str = "token-mean"
    grad_clip: float | None = 1.0
    # False: values and the value loss live on response_mask (generated tokens). True: on the response
    # part of attention_mask, observations included, as the released StepSearch code does.
    value_loss_on_observations: bool = False
    use_bf16_autocast: bool = False
    gradient_checkpointing: bool = False
    # Sequence packing (verl/utils/packing.py); the trainer sets it from actor_rollout_ref.model.use_remove_padding.
    use_remove_padding: bool = DEFAULT_USE_REMOVE_PADDING
    # Token-budget micro-batches: rows grouped so that each micro-batch holds at most this many real tokens
    # (Σ attention_mask); replaces ppo_micro_batch_size_per_device / forward_micro_batch_size_per_device.
    use_dynamic_bsz: bool = False
    ppo_max_token_len_per_gpu: int = 16384           # per forward/backward (update)
    forward_max_token_len_per_gpu: int = 16384       # per no-grad forward (log-probs, values)

    def __post_init__(self):
        _check_batch_sizes("critic", self)
        if self.cliprange_value <= 0:
            raise ValueError(f"[critic] cliprange_value must be > 0, got {self.cliprange_value}")


def config_from_mapping(cls, mapping: Mapping[str, Any], role: str):
    """Build ActorConfig/CriticConfig from a plain mapping (e.g. OmegaConf.to_container); unknown keys raise."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise KeyError(f"[{role}] unknown config key(s) {unknown}; valid: {sorted(known)}")
    return cls(**dict(mapping))
