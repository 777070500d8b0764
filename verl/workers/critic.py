"""The PPO critic as a plain class (no Ray): micro-batched values and the clipped value update.

`module` maps (input_ids, attention_mask, position_ids) (B, L) to values (B, L), e.g.
verl.models.value_model.CausalLMWithValueHead, possibly FSDP2-wrapped. With use_remove_padding it gets packed
(1, N) input_ids / position_ids, attention_mask=None and the packed-attention keyword arguments of
verl/utils/packing.py, and returns (1, N) values.
"""
from __future__ import annotations

import torch

from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import compute_value_loss
from verl.utils.packing import enable_packed_attention, pack_rows, packed_attention_kwargs, scatter_to_grid
from verl.utils.torch_functional import masked_mean, response_positions
from verl.workers.actor import (autocast, enable_gradient_checkpointing, forward_token_budget, micro_batches,
                                model_inputs, module_device, require_keys, restore_row_order, run_ppo_updates)
from verl.workers.worker_config import CriticConfig

__all__ = ["Critic", "value_mask"]

CRITIC_UPDATE_KEYS = ("input_ids", "attention_mask", "responses", "response_mask", "values", "returns")
_VALUE_MASK = "_value_mask"


def value_mask(data: DataProto, on_observations: bool) -> torch.Tensor:
    """(B, T) mask of the positions that carry values and value loss.

    response_mask (generated tokens), or with on_observations the response part of attention_mask
    (generated + observation tokens, no padding), as the released StepSearch code does.
    """
    if not on_observations:
        return data.batch["response_mask"].float()
    response_length = data.batch["responses"].shape[1]
    return data.batch["attention_mask"][:, -response_length:].float()


class Critic:
    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, config: CriticConfig,
                 lr_scheduler=None):
        if not isinstance(config, CriticConfig):
            raise TypeError(f"[critic] config must be a CriticConfig, got {type(config).__name__}")
        self.module, self.optimizer, self.config, self.lr_scheduler = module, optimizer, config, lr_scheduler
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(module, "critic")
        if config.use_remove_padding:
            enable_packed_attention(module, "critic")
        self._num_updates = 0

    @property
    def device(self) -> torch.device:
        return module_device(self.module)

    def _forward_micro_batch(self, micro: DataProto) -> torch.Tensor:
        """V(s_t) before each response token, (b, T) float32, zero outside the value mask."""
        device = self.device
        response_length = micro.batch["responses"].shape[1]
        inputs = model_inputs(micro, device)
        with autocast(device, self.config.use_bf16_autocast):
            if self.config.use_remove_padding:
                packed = pack_rows(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])
                packed_values = self.module(input_ids=packed.input_ids, attention_mask=None,
                                            position_ids=packed.position_ids, **packed_attention_kwargs(packed))
                values = scatter_to_grid(packed_values[0].float(), packed.token_index,
                                         packed.rows * packed.width).view(packed.rows, packed.width)  # (b, L)
            else:
                values = self.module(**inputs)  # (b, L)
        values = response_positions(values.float(), response_length)  # (b, T)
        return values * micro.batch[_VALUE_MASK].to(device)

    def _with_value_mask(self, data: DataProto) -> DataProto:
        mask = value_mask(data, self.config.value_loss_on_observations)
        return data.union(DataProto(batch={_VALUE_MASK: mask}))

    @torch.no_grad()
    def compute_values(self, data: DataProto) -> torch.Tensor:
        """Values (B, T) float32 on CPU; needs input_ids, attention_mask, responses, response_mask."""
        require_keys(data, ("input_ids", "attention_mask", "responses", "response_mask"), "critic", "compute_values")
        self.module.eval()
        data = self._with_value_mask(data)
        micros, order = micro_batches(data, self.config.forward_micro_batch_size_per_device,
                                      forward_token_budget(self.config))
        return restore_row_order(torch.cat([self._forward_micro_batch(micro).cpu() for micro in micros]), order)

    def _micro_batch_loss(self, micro: DataProto) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.device
        mask = micro.batch[_VALUE_MASK].to(device)
        vpreds = self._forward_micro_batch(micro)
        returns = micro.batch["returns"].to(device).float()
        loss, metrics = compute_value_loss(vpreds=vpreds, values=micro.batch["values"].to(device).float(),
                                           returns=returns, response_mask=mask,
                                           cliprange_value=self.config.cliprange_value,
                                           loss_agg_mode=self.config.loss_agg_mode)
        metrics["critic/vf_loss"] = float(loss.detach())
        metrics["critic/vf_error"] = float(masked_mean((vpreds.detach() - returns) ** 2, mask))
        return loss, metrics

    def update_critic(self, data: DataProto) -> dict[str, float]:
        """Clipped value regression towards `returns`; same mini/micro-batch scheme as the actor."""
        cfg = self.config
        require_keys(data, CRITIC_UPDATE_KEYS, "critic", "update_critic")
        cfg.check_train_batch("critic", len(data))
        self.module.train()
        keys = [k for k in CRITIC_UPDATE_KEYS + ("position_ids",) if k in data.batch]
        data = self._with_value_mask(data.select(batch_keys=keys))
        return run_ppo_updates(self, data, _VALUE_MASK, self._micro_batch_loss, "critic")
