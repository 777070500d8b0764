"""Warm start for the demo: a tokenizer trained on the world's text, a tiny Qwen2 LM, and a short SFT on the
scripted (noisy) policy's trajectories, collected through the real rollout loop and the real retriever.

    python -m stepsearch.envs.warmstart --world_dir runs/world --retriever_url http://127.0.0.1:8000/retrieve \
        --out runs/sft_model [--sft_steps 300 --copy_correct_prob 0.4]

SFT teaches the tag format and the hop-by-hop procedure; since the scripted policy copies the wrong passage's
name most of the time (`stepsearch.envs.scripted`), the warm-started model is mostly wrong on held-out questions,
and any rise in accuracy afterwards comes from RL.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from verl.protocol import DataProto
from verl.utils.tiny_model import build_tiny_causal_lm, build_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyModelConfig:
    """The demo policy: a tiny Qwen2 with a BPE vocabulary trained on the world's text."""

    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    seed: int = 0


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"[sft] steps ({self.steps}), batch_size ({self.batch_size}) and lr ({self.lr}) "
                             "must be positive")


def build_demo_model(texts: list[str], cfg: TinyModelConfig = TinyModelConfig()):
    """(tokenizer, model) for the world; the tag tokens are single, non-special ids (CONTRACTS.md)."""
    from stepsearch.agent.prompts import TAG_TOKENS

    tokenizer = build_tokenizer(texts, vocab_size=cfg.vocab_size, extra_tokens=list(TAG_TOKENS))
    model = build_tiny_causal_lm(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                                 num_heads=cfg.num_heads, seed=cfg.seed)
    return tokenizer, model


def sft_loss_mask(data: DataProto) -> torch.Tensor:
    """(B, L) float: 1 on model-generated response tokens (response_mask), 0 on prompt, observations and pad."""
    prompts, response_mask = data.batch["prompts"], data.batch["response_mask"]
    B, P = prompts.shape
    return torch.cat([torch.zeros(B, P), response_mask.float()], dim=1)


def sft_step_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                  loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over loss_mask. All arguments are (B, L); returns a scalar."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)                       # (B, L-1, V)
    token_logp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)     # (B, L-1)
    mask = loss_mask[:, 1:]                                                       # token t+1 is predicted at t
    return -(token_logp * mask).sum() / mask.sum().clamp(min=1.0)


def run_sft(model, data: DataProto, cfg: SFTConfig) -> list[float]:
    """Supervised fine-tuning on rollout trajectories (loss on generated tokens only); returns per-step losses."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_mask = sft_loss_mask(data)
    ids, am, pos = data.batch["input_ids"], data.batch["attention_mask"], data.batch["position_ids"]
    n = ids.shape[0]
    losses = []
    model.train()
    for step in range(cfg.steps):
        idx = torch.randperm(n, generator=g)[: cfg.batch_size]
        width = int(am[idx].sum(0).nonzero().max()) + 1                            # drop all-pad right columns
        loss = sft_step_loss(model, ids[idx, :width], am[idx, :width], pos[idx, :width], loss_mask[idx, :width])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss))
        if step % 50 == 0 or step == cfg.steps - 1:
            logger.info("sft step %d/%d loss %.4f", step + 1, cfg.steps, losses[-1])
    model.eval()
    return losses
