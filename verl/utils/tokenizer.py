"""Loading the tokenizer of a model folder for training and rollout."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def load_tokenizer(path: str):
    """`AutoTokenizer.from_pretrained(path)` with a pad token.

    Llama-3 tokenizers ship without a pad token; padding is always masked here (left-padded prompts,
    right-padded responses), so such a tokenizer pads with its EOS token. Raises when it has neither.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"[tokenizer] the tokenizer in {path} has neither a pad nor an eos token; "
                             f"set pad_token in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
        logger.warning("[tokenizer] %s has no pad token: padding with its eos token %r", path, tokenizer.eos_token)
    return tokenizer
