"""Frozen, validated configs for the actor and the critic (the trainer converts its Hydra tree once).

Batch-size semantics follow veRL: `ppo_mini_batch_size` is *global* and counted in prompts (it is
multiplied by `rollout_n`, then divided by `world_size`); `*_micro_batch_size_per_device` are local.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from verl.trainer.ppo.core_algos import KL_ESTIMATORS, LOSS_AGG_MODES
from verl.utils.hydra_to_dataclass import yaml_default

__all__ = ["ActorConfig", "CriticConfig", "ActorRefModelConfig", "config_from_mapping"]


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
    use_remove_padding: bool = yaml_default("actor_rollout_ref.model.use_remove_padding")


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
    """Policy update settings (``actor_rollout_ref.actor``). Every default is configs/ppo_trainer.yaml's, where each
    key is documented; ``rollout_n``, ``world_size`` and ``use_remove_padding`` are set by the trainer."""
    _A = "actor_rollout_ref.actor."
    ppo_mini_batch_size: int = yaml_default(_A + "ppo_mini_batch_size")                    # global, in prompts
    ppo_micro_batch_size_per_device: int = yaml_default(_A + "ppo_micro_batch_size_per_device")   # per forward/backward
    forward_micro_batch_size_per_device: int = yaml_default(_A + "forward_micro_batch_size_per_device")
    rollout_n: int = 1
    world_size: int = 1
    ppo_epochs: int = yaml_default(_A + "ppo_epochs")
    shuffle: bool = yaml_default(_A + "shuffle")
    seed: int = yaml_default(_A + "seed")                            # mini-batch shuffling
    clip_ratio_low: float = yaml_default(_A + "clip_ratio_low")      # ε_low
    clip_ratio_high: float = yaml_default(_A + "clip_ratio_high")    # ε_high (> ε_low: DAPO clip-higher)
    clip_ratio_c: float | None = yaml_default(_A + "clip_ratio_c")   # dual-clip c (> 1); None disables it
    entropy_coeff: float = yaml_default(_A + "entropy_coeff")
    use_kl_loss: bool = yaml_default(_A + "use_kl_loss")             # GRPO-style KL loss against ref_log_probs
    kl_loss_coef: float = yaml_default(_A + "kl_loss_coef")
    kl_loss_type: str = yaml_default(_A + "kl_loss_type")
    loss_agg_mode: str = yaml_default(_A + "loss_agg_mode")
    grad_clip: float | None = yaml_default(_A + "grad_clip")
    temperature: float = yaml_default(_A + "temperature")            # must equal the rollout's sampling temperature
    use_bf16_autocast: bool = yaml_default(_A + "use_bf16_autocast")  # GPU: bf16 autocast around the forward pass
    gradient_checkpointing: bool = yaml_default(_A + "gradient_checkpointing")
    # Sequence packing (verl/utils/packing.py); the trainer sets it from actor_rollout_ref.model.use_remove_padding.
    use_remove_padding: bool = yaml_default("actor_rollout_ref.model.use_remove_padding")
    # Token-budget micro-batches: rows grouped so that each micro-batch holds at most this many real tokens
    # (Σ attention_mask); replaces ppo_micro_batch_size_per_device / forward_micro_batch_size_per_device.
    use_dynamic_bsz: bool = yaml_default(_A + "use_dynamic_bsz")
    ppo_max_token_len_per_gpu: int = yaml_default(_A + "ppo_max_token_len_per_gpu")           # update
    forward_max_token_len_per_gpu: int = yaml_default(_A + "forward_max_token_len_per_gpu")   # log-probs, values

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
    """Value update settings (``critic``, docs/method.md §1.10 item 5). Every default is configs/ppo_trainer.yaml's;
    ``rollout_n``, ``world_size`` and ``use_remove_padding`` are set by the trainer."""
    ppo_mini_batch_size: int = yaml_default("critic.ppo_mini_batch_size")
    ppo_micro_batch_size_per_device: int = yaml_default("critic.ppo_micro_batch_size_per_device")
    forward_micro_batch_size_per_device: int = yaml_default("critic.forward_micro_batch_size_per_device")
    rollout_n: int = 1
    world_size: int = 1
    ppo_epochs: int = yaml_default("critic.ppo_epochs")
    shuffle: bool = yaml_default("critic.shuffle")
    seed: int = yaml_default("critic.seed")
    cliprange_value: float = yaml_default("critic.cliprange_value")
    loss_agg_mode: str = yaml_default("critic.loss_agg_mode")
    grad_clip: float | None = yaml_default("critic.grad_clip")
    # False: values and the value loss live on response_mask (generated tokens). True: on the response
    # part of attention_mask, observations included, as the released StepSearch code does.
    value_loss_on_observations: bool = yaml_default("critic.value_loss_on_observations")
    use_bf16_autocast: bool = yaml_default("critic.use_bf16_autocast")
    gradient_checkpointing: bool = yaml_default("critic.gradient_checkpointing")
    # Sequence packing (verl/utils/packing.py); the trainer sets it from actor_rollout_ref.model.use_remove_padding.
    use_remove_padding: bool = yaml_default("actor_rollout_ref.model.use_remove_padding")
    # Token-budget micro-batches: rows grouped so that each micro-batch holds at most this many real tokens
    # (Σ attention_mask); replaces ppo_micro_batch_size_per_device / forward_micro_batch_size_per_device.
    use_dynamic_bsz: bool = yaml_default("critic.use_dynamic_bsz")
    ppo_max_token_len_per_gpu: int = yaml_default("critic.ppo_max_token_len_per_gpu")           # update
    forward_max_token_len_per_gpu: int = yaml_default("critic.forward_max_token_len_per_gpu")   # log-probs, values

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
