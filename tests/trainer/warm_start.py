"""A short supervised warm start that makes a tiny random policy emit searches (trainer tests, bench, smoke).

A randomly initialised tiny model almost never writes ``<search> … </search>``, so its rollouts would have no
search rounds and the step rewards would all be zero. Instead of faking rollouts, we fine-tune the tiny model
for a few dozen steps on well-formed trajectories built from the training parquet itself:

    prompt  ->  "<search> {a gold search key} </search>"  ->  <information> block (loss-masked)  ->
            "<answer> {gold answer} </answer>"

After this the policy *samples* (temperature 1) well-formed search turns most of the time; everything after
that - retrieval, rewards, PPO - is the real pipeline. Deterministic: the tokenizer, init and batches are seeded.
"""
from __future__ import annotations

import os
import random

import pyarrow.parquet as pq
import torch

TAGS = ["<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>", "<think>", "</think>"]


def _rows(parquet: str) -> list[dict]:
    return pq.read_table(parquet).to_pylist()


def _target_text(row: dict) -> tuple[str, str, str]:
    """(model turn 1, observation, model turn 2) for one dataset row."""
    gt = row["reward_model"]["ground_truth"]
    keys = [k for group in gt.get("search_keys") or [] for k in group] or [gt["target"][0]]
    docs = row["extra_info"].get("support_docs") or []
    body = "".join(f"Doc {i}<## Title: {d['title']} ##> {d['text'][:200]}\n" for i, d in enumerate(docs[:2], 1))
    return (f"<search> {keys[0]} </search>", f"\n\n<information> {body.strip()} </information>\n\n",
            f"<answer> {gt['target'][0]} </answer>")


def _example(tokenizer, row: dict, max_obs_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, loss mask) of one prompt + trajectory; the observation is masked out of the loss."""
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    turn1, obs, turn2 = _target_text(row)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    p, t1, o, t2 = enc(prompt), enc(turn1), enc(obs)[:max_obs_tokens], enc(turn2) + [tokenizer.eos_token_id]
    return p + t1 + o + t2, [0] * len(p) + [1] * len(t1) + [0] * len(o) + [1] * len(t2)


def _collate(examples, pad_id: int):
    L = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), L))
    attn = torch.zeros((len(examples), L), dtype=torch.long)
    for i, (x, m) in enumerate(examples):  # right padding is fine for teacher forcing
        ids[i, :len(x)] = torch.tensor(x)
        loss_mask[i, :len(m)] = torch.tensor(m, dtype=torch.float32)
        attn[i, :len(x)] = 1
    return ids, attn, loss_mask


def build_warm_policy(out_dir: str, parquet: str, steps: int = 100, batch_size: int = 8, lr: float = 5e-3,
                      hidden_size: int = 64, num_layers: int = 2, seed: int = 0, max_obs_tokens: int = 48,
                      num_heads: int = 4) -> str:
    """Train a tokenizer on the prompts, build a tiny Qwen2, fine-tune it on gold trajectories; save to out_dir.

    vLLM's CPU attention needs head_dim >= 32: pass num_heads=2 with hidden_size=64 for the vLLM backend."""
    from verl.utils.tiny_model import build_tiny_causal_lm, build_tokenizer

    rows = _rows(parquet)
    texts = [m["content"] for r in rows for m in r["prompt"]] + ["".join(_target_text(r)) for r in rows]
    tokenizer = build_tokenizer(texts, vocab_size=1024, extra_tokens=TAGS)
    model = build_tiny_causal_lm(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                 seed=seed)
    examples = [_example(tokenizer, r, max_obs_tokens) for r in rows]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        ids, attn, loss_mask = _collate(rng.sample(examples, batch_size), tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # (B, L-1, V) predicts ids[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
