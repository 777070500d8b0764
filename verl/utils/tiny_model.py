"""Tiny causal LMs built from a config, with a locally trained tokenizer (no model hub needed).

Used by tests, the CPU demo and the GPU smoke script. The tokenizer is byte-level BPE with a ChatML
chat template, so chat-formatted prompts look like Qwen2.5's.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML, as Qwen2.5 uses it (without Qwen's default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog. Who is the father of the director of the film?",
    "Question: where was the author born? Answer: in the city of Paris, France, in 1901.",
]


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1024,
                    extra_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (about 0.05 s for a few hundred KB).

    `extra_tokens` are added as ordinary (non-special) tokens: they stay single ids and survive
    `decode(skip_special_tokens=True)`, which a task's action tags (e.g. `<tool>`) need.
    """
    texts = list(texts) if texts is not None else list(_DEFAULT_TEXTS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts + list(extra_tokens), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=[IM_START, IM_END])
    if extra_tokens:
        fast.add_tokens(list(extra_tokens), special_tokens=False)
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny_causal_lm(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2,
                         num_heads: int = 4, seed: int = 0, max_position_embeddings: int = 4096) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM whose vocabulary matches `tokenizer`."""
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_model(out_dir: str, texts: Iterable[str] | None = None, vocab_size: int = 1024,
                    extra_tokens: Sequence[str] = (), **model_kw) -> str:
    """Build a tokenizer and a tiny model and save both in HF format under `out_dir`; return `out_dir`."""
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size, extra_tokens=extra_tokens)
    model = build_tiny_causal_lm(tokenizer, **model_kw)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
