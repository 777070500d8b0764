"""The PPO actor as a plain class (no Ray): micro-batched log-probs and the clipped policy update.

Letters: B batch rows on this device, P prompt, T response, L = P + T, V vocab, N real tokens of a micro-batch,
K response tokens of a micro-batch.
`module` is an HF causal LM (or an FSDP2-wrapped one): only ``module(input_ids=..., attention_mask=...,
position_ids=..., use_cache=False, logits_to_keep=...).logits`` and ``module.parameters()`` are used; with
``use_remove_padding`` it also receives the packed-attention keyword arguments of verl/utils/packing.py.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Iterator

import numpy as np
import torch

from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import (agg_denominator, compute_entropy_loss, compute_kl_loss,
                                         compute_policy_loss)
from verl.utils.packing import PackedRows, enable_packed_attention, pack_rows, packed_attention_kwargs, scatter_to_grid
from verl.utils.token_budget import token_budget_groups
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits, response_positions
from verl.workers.worker_config import ActorConfig

__all__ = ["Actor", "model_inputs", "iter_mini_batches", "micro_batches", "restore_row_order", "weighted_micro_batches",
           "update_token_budget", "forward_token_budget", "clip_grad_and_step", "enable_gradient_checkpointing",
           "module_device", "response_token_positions"]

ACTOR_UPDATE_KEYS = ("input_ids", "attention_mask", "responses", "response_mask", "old_log_probs", "advantages")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers shared with the critic
# ---------------------------------------------------------------------------------------------------------------------
def require_keys(data: DataProto, keys, role: str, method: str) -> None:
    missing = [k for k in keys if k not in data.batch]
    if missing:
        raise KeyError(f"[{role}] {method} needs batch key(s) {missing}; the DataProto has {sorted(data.batch)}")


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of the module's (local) parameters; works for FSDP2 DTensor parameters too."""
    param = next(module.parameters())
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.device


def enable_gradient_checkpointing(module: torch.nn.Module, role: str) -> None:
    if not hasattr(module, "gradient_checkpointing_enable"):
        raise TypeError(f"[{role}] gradient_checkpointing=True but {type(module).__name__} has no "
                        f"gradient_checkpointing_enable(); enable it on the HF model before wrapping")
    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def model_inputs(micro: DataProto, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, position_ids (B, L) on `device`; position ids from the mask if absent."""
    attention_mask = micro.batch["attention_mask"].to(device)
    if "position_ids" in micro.batch:
        position_ids = micro.batch["position_ids"].to(device)
    else:  # left padding: the first real token gets position 0
        position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    return {"input_ids": micro.batch["input_ids"].to(device), "attention_mask": attention_mask,
            "position_ids": position_ids}


def response_token_positions(packed: PackedRows, response_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed tokens whose outputs predict a response token, and where those outputs go in the (B, T) grid.

    Grid column i predicts column i + 1, so response token j is predicted at column L − T − 1 + j (as
    response_positions). Returns (keep (K,) positions in the packed row, dest (K,) flat indices b·T + j).
    """
    L, T = packed.width, response_length
    if T >= L:
        raise ValueError(f"response length ({T}) must be shorter than the sequence ({L})")
    row, col = packed.token_index // L, packed.token_index % L
    keep = ((col >= L - T - 1) & (col < L - 1)).nonzero().squeeze(-1)
    return keep, row[keep] * T + (col[keep] - (L - T - 1))


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def iter_mini_batches(data: DataProto, mini_batch_size: int, epochs: int, shuffle: bool,
                      seed: int) -> Iterator[DataProto]:
    """`epochs` passes over `data` in consecutive mini-batches (rows permuted per epoch when shuffle)."""
    for epoch in range(epochs):
        epoch_data = data
        if shuffle:
            rng = np.random.default_rng(seed + epoch)
            epoch_data = data[rng.permutation(len(data))]
        yield from epoch_data.split(mini_batch_size)


def micro_batches(data: DataProto, rows: int, max_tokens: int | None) -> tuple[list[DataProto], list[int] | None]:
    """`data` in consecutive micro-batches of `rows` rows, or, with max_tokens, in groups of at most max_tokens real
    tokens (Σ attention_mask; verl/utils/token_budget.py). Returns the micro-batches and the row order they
    hold (None: the original order)."""
    if max_tokens is None:
        return data.split(rows), None
    groups = token_budget_groups(data.batch["attention_mask"].sum(dim=-1), max_tokens)
    return [data[g] for g in groups], [i for g in groups for i in g]


def restore_row_order(rows: torch.Tensor, order: list[int] | None) -> torch.Tensor:
    """rows (B, ...) in `order` (from micro_batches) back in the original row order."""
    if order is None:
        return rows
    out = torch.empty_like(rows)
    out[torch.as_tensor(order, dtype=torch.long)] = rows
    return out


def weighted_micro_batches(mini: DataProto, micro_batch_size: int, mask_key: str, loss_agg_mode: str,
                           max_tokens: int | None = None) -> list[tuple[DataProto, float]]:
    """Micro-batches (fixed rows, or a token budget: micro_batches) with loss weights den_micro / den_mini, so that
    Σ weight·loss_micro equals the loss agg_loss would give on the whole mini-batch (exact gradient accumulation
    for every agg mode, whatever the sizes of the micro-batches)."""
    total = agg_denominator(mini.batch[mask_key], loss_agg_mode)
    micros, _ = micro_batches(mini, micro_batch_size, max_tokens)
    return [(micro, agg_denominator(micro.batch[mask_key], loss_agg_mode) / total if total > 0 else 0.0)
            for micro in micros]


def update_token_budget(cfg) -> int | None:
    """The update micro-batch token budget of an ActorConfig/CriticConfig (None: fixed rows)."""
    return cfg.ppo_max_token_len_per_gpu if cfg.use_dynamic_bsz else None


def forward_token_budget(cfg) -> int | None:
    """The no-grad forward micro-batch token budget of an ActorConfig/CriticConfig (None: fixed rows)."""
    return cfg.forward_max_token_len_per_gpu if cfg.use_dynamic_bsz else None


def clip_grad_and_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       grad_clip: float | None) -> tuple[float, bool]:
    """Clip the gradient norm and step; skip the step (and drop the grads) if the norm is not finite.

    Returns (grad_norm before clipping, whether the optimizer stepped).
    """
    params = [p for p in module.parameters() if p.grad is not None]
    max_norm = float("inf") if grad_clip is None else grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm) if params else torch.zeros(())
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 DTensor
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    stepped = bool(np.isfinite(grad_norm))
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


def mean_metrics(records: dict[str, list[float]]) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in records.items() if v}

def run_ppo_updates(worker, data: DataProto, mask_key: str, micro_batch_loss, role: str) -> dict[str, float]:
    """The update loop shared by the actor and the critic: PPO epochs over mini-batches, each one optimizer step.

    Each mini-batch's loss is accumulated over micro-batches weighted so that the sum equals the mini-batch loss
    under `loss_agg_mode` (`weighted_micro_batches`, tokens counted on `mask_key`); a non-finite grad norm skips
    the step. `worker` has module, optimizer, lr_scheduler, config and _num_updates (which seeds the shuffle).
    `micro_batch_loss(micro) -> (loss, metrics)`. Returns metrics averaged over mini-batches plus
    `{role}/grad_norm`, `{role}/skipped_steps` (a count) and `{role}/lr`.
    """
    cfg = worker.config
    records: dict[str, list[float]] = defaultdict(list)
    worker.optimizer.zero_grad(set_to_none=True)
    for mini in iter_mini_batches(data, cfg.ppo_mini_batch_size_per_device, cfg.ppo_epochs, cfg.shuffle,
                                  cfg.seed + 1000 * worker._num_updates):
        mini_metrics: dict[str, float] = defaultdict(float)
        for micro, weight in weighted_micro_batches(mini, cfg.ppo_micro_batch_size_per_device, mask_key,
                                                    cfg.loss_agg_mode, update_token_budget(cfg)):
            loss, metrics = micro_batch_loss(micro)
            (loss * weight).backward()
            for k, v in metrics.items():
                mini_metrics[k] += weight * v
        grad_norm, stepped = clip_grad_and_step(worker.module, worker.optimizer, cfg.grad_clip)
        for k, v in mini_metrics.items():
            records[k].append(v)
        records[f"{role}/grad_norm"].append(grad_norm)
        records[f"{role}/skipped_steps"].append(0.0 if stepped else 1.0)
    worker._num_updates += 1
    if worker.lr_scheduler is not None:
        worker.lr_scheduler.step()
    result = mean_metrics(records)
    result[f"{role}/skipped_steps"] = float(sum(records[f"{role}/skipped_steps"]))
    result[f"{role}/lr"] = float(worker.optimizer.param_groups[0]["lr"])
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Actor
# ---------------------------------------------------------------------------------------------------------------------
class Actor:
    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, config: ActorConfig,
                 lr_scheduler=None):
        if not isinstance(config, ActorConfig):
            raise TypeError(f"[actor] config must be an ActorConfig, got {type(config).__name__}")
        self.module, self.optimizer, self.config, self.lr_scheduler = module, optimizer, config, lr_scheduler
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(module, "actor")
        if config.use_remove_padding:
            enable_packed_attention(module, "actor")
        self._num_updates = 0

    @property
    def device(self) -> torch.device:
        return module_device(self.module)

    def _temperature(self, data: DataProto) -> float:
        return float(data.meta_info["temperature"]) if "temperature" in data.meta_info else self.config.temperature

    def _response_logits(self, micro: DataProto, temperature: float
                         ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Tempered float32 logits of the outputs that predict response tokens, their labels, and `to_grid`,
        which lays a per-output tensor out as (b, T).

        Padded: logits (b, T, V), labels (b, T), to_grid the identity. Packed (use_remove_padding): logits (K, V)
        and labels (K,) for the K real response tokens only; to_grid scatters (K,) into (b, T), 0 elsewhere.
        """
        device = self.device
        responses = micro.batch["responses"].to(device)  # (b, T)
        b, T = responses.shape
        inputs = model_inputs(micro, device)
        if not self.config.use_remove_padding:
            with autocast(device, self.config.use_bf16_autocast):
                logits = self.module(**inputs, use_cache=False, logits_to_keep=T + 1).logits  # (b, T + 1, V)
            return response_positions(logits, T).float() / temperature, responses, lambda x: x
        packed = pack_rows(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])
        keep, dest = response_token_positions(packed, T)
        with autocast(device, self.config.use_bf16_autocast):
            logits = self.module(input_ids=packed.input_ids, attention_mask=None, position_ids=packed.position_ids,
                                 use_cache=False, logits_to_keep=keep, **packed_attention_kwargs(packed)).logits
        labels = responses.reshape(-1)[dest]  # (K,)
        return logits[0].float() / temperature, labels, lambda x: scatter_to_grid(x, dest, b * T).view(b, T)

    def _forward_micro_batch(self, micro: DataProto, temperature: float, entropy_mode: str
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log π(responses) (b, T) and the entropy (b, T): entropy_mode 'none' | 'no_grad' | 'grad'."""
        logits, labels, to_grid = self._response_logits(micro, temperature)
        log_probs = to_grid(logprobs_from_logits(logits, labels))
        if entropy_mode == "none":
            return log_probs, None
        if entropy_mode == "no_grad":
            with torch.no_grad():
                return log_probs, to_grid(entropy_from_logits(logits.detach()))
        return log_probs, to_grid(entropy_from_logits(logits))

    @torch.no_grad()
    def compute_log_prob(self, data: DataProto, calculate_entropy: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log π_θ of each response token, (B, T) float32 on CPU, and optionally the entropy (B, T).

        Needs input_ids, attention_mask, responses (position_ids optional). Values on pad positions are arbitrary
        (0 where no real token predicts them, with use_remove_padding) — multiply by response_mask where it matters.
        """
        require_keys(data, ("input_ids", "attention_mask", "responses"), "actor", "compute_log_prob")
        self.module.eval()
        temperature = self._temperature(data)
        log_probs, entropies = [], []
        micros, order = micro_batches(data, self.config.forward_micro_batch_size_per_device,
                                      forward_token_budget(self.config))
        for micro in micros:
            lp, ent = self._forward_micro_batch(micro, temperature, "no_grad" if calculate_entropy else "none")
            log_probs.append(lp.cpu())
            if ent is not None:
                entropies.append(ent.cpu())
        log_probs = restore_row_order(torch.cat(log_probs), order)
        return log_probs, (restore_row_order(torch.cat(entropies), order) if calculate_entropy else None)

    def _micro_batch_loss(self, micro: DataProto, temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Policy loss − entropy_coeff·entropy + kl_loss_coef·KL for one micro-batch, and its metrics."""
        cfg, device = self.config, self.device
        mask = micro.batch["response_mask"].to(device).float()
        entropy_mode = "grad" if cfg.entropy_coeff != 0 else "no_grad"
        log_probs, entropy = self._forward_micro_batch(micro, temperature, entropy_mode)
        pg_loss, metrics = compute_policy_loss(
            old_log_probs=micro.batch["old_log_probs"].to(device).float(), log_probs=log_probs,
            advantages=micro.batch["advantages"].to(device).float(), response_mask=mask,
            clip_ratio_low=cfg.clip_ratio_low, clip_ratio_high=cfg.clip_ratio_high,
            clip_ratio_c=cfg.clip_ratio_c, loss_agg_mode=cfg.loss_agg_mode)
        entropy_loss = compute_entropy_loss(entropy, mask, cfg.loss_agg_mode)
        loss = pg_loss - cfg.entropy_coeff * entropy_loss
        metrics.update({"actor/pg_loss": float(pg_loss.detach()), "actor/entropy_loss": float(entropy_loss.detach())})
        if cfg.use_kl_loss:
            kl_loss = compute_kl_loss(log_probs, micro.batch["ref_log_probs"].to(device).float(), mask,
                                      cfg.kl_loss_type, cfg.loss_agg_mode)
            loss = loss + cfg.kl_loss_coef * kl_loss
            metrics["actor/kl_loss"] = float(kl_loss.detach())
        return loss, metrics

    def update_policy(self, data: DataProto) -> dict[str, float]:
        """PPO epochs over mini-batches; each mini-batch is one optimizer step built from micro-batches.

        Needs input_ids, attention_mask, responses, response_mask, old_log_probs, advantages
        (+ ref_log_probs with use_kl_loss). Returns metrics averaged over mini-batches.
        """
        cfg = self.config
        keys = ACTOR_UPDATE_KEYS + (("ref_log_probs",) if cfg.use_kl_loss else ())
        require_keys(data, keys, "actor", "update_policy")
        cfg.check_train_batch("actor", len(data))
        self.module.train()
        temperature = self._temperature(data)
        data = data.select(batch_keys=[k for k in keys + ("position_ids",) if k in data.batch])
        return run_ppo_updates(self, data, "response_mask", lambda micro: self._micro_batch_loss(micro, temperature),
                               "actor")
