"""Sequence packing ("remove padding"): the real tokens of a padded (B, L) batch laid end to end in one row.

Letters: B rows, L = P + T padded width, T response width, N real tokens (Σ attention_mask), K kept outputs.

The model then runs on (1, N) tokens with ``position_ids`` taken from the padded batch (they restart at 0 for every
row) and the row boundaries ``cu_seq_lens`` passed as keyword arguments, so attention never crosses rows and no
FLOP is spent on a pad token. Which attention kernel honours the boundaries:

- ``flash_attention_2`` / ``_3`` (GPU, flash-attn installed): transformers' own varlen path reads
  ``cu_seq_lens_q/k`` and ``max_length_q/k``; the model keeps its implementation.
- ``sdpa`` (CPU, or GPU without flash-attn): the model is switched to ``VARLEN_SDPA`` below, which runs
  ``F.scaled_dot_product_attention(is_causal=True)`` once per row segment (cost Σ l_b², as flash varlen) and is
  plain ``sdpa`` for every call that has no ``cu_seq_lens`` (generation, padded forwards).

Chosen by measurement on the 2-core AVX2 CPU (fp32, 2 threads, forward+backward), against SDPA over the same packed
row with a dense (1, 1, N, N) block-diagonal causal mask (what transformers builds by itself from restarting
position_ids): attention alone, 4 heads × 64, segments of 2000/2500/1800/2300 tokens: per-segment 1.97 s, dense mask
10.3 s; the bench model of bench/packing.py (hidden 256, 2 layers) on 4 Search-R1-like rows (8625 tokens):
11.8-15.2 s against 21.0-21.7 s (load average ~5); bench/results/packing.md repeats the model-level comparison.
The dense mask also costs N² memory (1 GiB at N = 32k). Flex attention was not tried: on CPU it needs an inductor
compile for every new packed length. On GPU without flash-attn the same per-segment loop runs SDPA's flash kernel
per row (not measured here: no GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PackedRows", "pack_rows", "packed_attention_kwargs", "scatter_to_grid", "VARLEN_SDPA",
           "enable_packed_attention", "varlen_sdpa_attention"]

VARLEN_SDPA = "varlen_sdpa"
_NATIVE_VARLEN = ("flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class PackedRows:
    """The real tokens of a padded batch, in row-major order.

    input_ids, position_ids: (1, N) long. token_index: (N,) long, b·L + i of each packed token in the (B, L) grid.
    cu_seqlens: (B + 1,) int32, row b owns packed tokens [cu_seqlens[b], cu_seqlens[b+1]). max_seqlen: max l_b.
    """
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    token_index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    rows: int
    width: int

    @property
    def num_tokens(self) -> int:
        return int(self.token_index.numel())


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> PackedRows:
    """Pack the attention_mask = 1 tokens of (B, L) input_ids / position_ids into one (1, N) row.

    Tokens keep their padded-batch position ids, so a row with pad in the middle is handled like the padded path.
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != position_ids.shape[-2:]:
        raise ValueError(f"pack_rows: input_ids {tuple(input_ids.shape)}, attention_mask "
                         f"{tuple(attention_mask.shape)} and position_ids {tuple(position_ids.shape)} must be (B, L)")
    B, L = input_ids.shape
    real = attention_mask.bool()
    token_index = real.reshape(-1).nonzero().squeeze(-1)  # (N,)
    lengths = real.sum(dim=-1)  # (B,)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return PackedRows(input_ids=input_ids.reshape(-1)[token_index].unsqueeze(0),
                      position_ids=position_ids.reshape(-1)[token_index].unsqueeze(0),
                      token_index=token_index, cu_seqlens=cu_seqlens,
                      max_seqlen=int(lengths.max()) if B else 0, rows=B, width=L)


def packed_attention_kwargs(packed: PackedRows) -> dict:
    """The keyword arguments a transformers model forwards to its attention functions (FlashAttentionKwargs)."""
    cu = packed.cu_seqlens.to(packed.input_ids.device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": packed.max_seqlen,
            "max_length_k": packed.max_seqlen}


def scatter_to_grid(values: torch.Tensor, index: torch.Tensor, numel: int) -> torch.Tensor:
    """A flat zero tensor of `numel` elements with values (K,) written at index (K,); differentiable in values."""
    return values.new_zeros(numel).index_copy(0, index, values)


# ---------------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------------
def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          sliding_window: int | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function: causal SDPA per packed segment, or plain sdpa without cu_seq_lens_q.

    query (1, H, N, D), key/value (1, H_kv, N, D), cu_seq_lens_q (S + 1,). Returns ((1, N, H, D), None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if sliding_window is not None:
        raise NotImplementedError("varlen_sdpa_attention: sliding-window layers are not supported with packing")
    if query.shape[0] != 1:
        raise ValueError(f"varlen_sdpa_attention: packed inputs have batch 1, got {query.shape[0]}")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: repeat the key/value heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bounds = cu_seq_lens_q.tolist()
    outputs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                              dropout_p=dropout, is_causal=True, scale=scaling)
               for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    out = torch.cat(outputs, dim=2) if outputs else query.new_zeros(query.shape)
    return out.transpose(1, 2).contiguous(), None


def _register_varlen_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    def varlen_sdpa_mask(attention_mask: torch.Tensor | None = None, **kwargs):
        # No 2D mask: one causal sequence per row, or the packed stream described by cu_seq_lens (no N x N mask).
        return None if attention_mask is None else sdpa_mask(attention_mask=attention_mask, **kwargs)

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    if VARLEN_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(VARLEN_SDPA, varlen_sdpa_mask)


def enable_packed_attention(module: torch.nn.Module, role: str) -> None:
    """Make `module` (an HF model, a CausalLMWithValueHead, possibly FSDP2-wrapped) accept packed inputs.

    sdpa models are switched to VARLEN_SDPA (identical to sdpa on unpacked calls); flash-attention models are kept.
    """
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in _NATIVE_VARLEN or impl == VARLEN_SDPA:
        return
    if impl != "sdpa":
        raise ValueError(f"[{role}] use_remove_padding needs attn_implementation sdpa or flash_attention_2, "
                         f"got {impl!r} (set model.attn_implementation, or use_remove_padding=false)")
    _register_varlen_sdpa()
    config._attn_implementation = VARLEN_SDPA
