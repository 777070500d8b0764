"""The critic: a causal-LM backbone (no LM head) with a scalar value head.

values[b, i] = w · h_i + c, where h_i is the last hidden state at position i. The critic's value of the
state before response token j is read at position L − T − 1 + j (see torch_functional.response_positions).
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from verl.utils.fs import atomic_path, follow_umask

__all__ = ["CausalLMWithValueHead"]

VALUE_HEAD_FILE = "value_head.safetensors"


class CausalLMWithValueHead(nn.Module):
    """backbone: a transformers base model (e.g. Qwen2Model) returning last_hidden_state (B, L, H)."""

    def __init__(self, backbone: PreTrainedModel):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        # Zero init: V ≡ 0 at the start, so the first advantages are plain reward-to-go and the
        # first critic steps cannot inject noise into the policy gradient.
        self.value_head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_causal_lm(cls, model: PreTrainedModel) -> "CausalLMWithValueHead":
        """Reuse the backbone of an in-memory causal LM (its LM head is dropped)."""
        backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        return cls(backbone)

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: torch.dtype = torch.float32,
                        attn_implementation: str = "sdpa") -> "CausalLMWithValueHead":
        """Load a backbone from a causal-LM (or saved critic) folder; a saved value head is restored."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"CausalLMWithValueHead.from_pretrained: {path} is not a model folder")
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
        critic = cls.from_causal_lm(lm)
        head_path = os.path.join(path, VALUE_HEAD_FILE)
        if os.path.exists(head_path):
            critic.value_head.load_state_dict(load_file(head_path))
        return critic.to(torch_dtype)

    def save_pretrained(self, out_dir: str) -> None:
        """Backbone in HF format plus value_head.safetensors (written atomically); every file follows the umask
        (mkstemp and safetensors' writer both create files 0600)."""
        os.makedirs(out_dir, exist_ok=True)
        self.backbone.save_pretrained(out_dir, safe_serialization=True)
        with atomic_path(os.path.join(out_dir, VALUE_HEAD_FILE)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}, tmp)
        follow_umask(out_dir)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """input_ids, attention_mask, position_ids: (B, L). Returns values (B, L) float32.

        Packed rows (verl/utils/packing.py): input_ids, position_ids (1, N), attention_mask None and the packing
        keyword arguments in `kwargs` (passed on to the backbone's attention); returns (1, N).
        """
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False, **kwargs).last_hidden_state  # (B, L, H)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
