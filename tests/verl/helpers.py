"""Batch builders shared by the worker tests, the learning test and the benchmark."""
from __future__ import annotations

import torch

from verl.protocol import DataProto


def build_batch(prompts: list[list[int]], responses: list[list[int]], response_masks: list[list[int]],
                pad_id: int, prompt_length: int | None = None, response_length: int | None = None) -> DataProto:
    """Left-padded prompts + right-padded responses, as the rollout returns them (CONTRACTS.md)."""
    P = prompt_length or max(len(p) for p in prompts)
    T = response_length or max(len(r) for r in responses)
    B = len(prompts)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_attn = torch.zeros(B, P, dtype=torch.long)
    resp_ids = torch.full((B, T), pad_id, dtype=torch.long)
    resp_attn = torch.zeros(B, T, dtype=torch.long)
    resp_mask = torch.zeros(B, T, dtype=torch.float32)
    for b, (p, r, m) in enumerate(zip(prompts, responses, response_masks)):
        prompt_ids[b, P - len(p):] = torch.tensor(p)
        prompt_attn[b, P - len(p):] = 1
        resp_ids[b, :len(r)] = torch.tensor(r)
        resp_attn[b, :len(r)] = 1
        resp_mask[b, :len(m)] = torch.tensor(m, dtype=torch.float32)
    attention_mask = torch.cat([prompt_attn, resp_attn], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return DataProto.from_dict(tensors={
        "prompts": prompt_ids, "responses": resp_ids, "input_ids": torch.cat([prompt_ids, resp_ids], dim=1),
        "attention_mask": attention_mask, "position_ids": position_ids, "response_mask": resp_mask})


def random_batch(B: int, P: int, T: int, vocab: int, pad_id: int, seed: int) -> DataProto:
    """Random prompts/responses of random lengths with an observation block inside some responses."""
    gen = torch.Generator().manual_seed(seed)
    prompts, responses, masks = [], [], []
    for _ in range(B):
        p_len = int(torch.randint(2, P + 1, (1,), generator=gen))
        r_len = int(torch.randint(3, T + 1, (1,), generator=gen))
        prompts.append(torch.randint(3, vocab, (p_len,), generator=gen).tolist())
        responses.append(torch.randint(3, vocab, (r_len,), generator=gen).tolist())
        mask = [1] * r_len
        if r_len >= 5:
            mask[1:3] = [0, 0]  # two observation tokens
        masks.append(mask)
    return build_batch(prompts, responses, masks, pad_id, P, T)
