"""Small tensor helpers shared by the RL core: masked statistics and log-probs/entropy from logits.

Letters: B batch, T response length, V vocab.
"""
from __future__ import annotations

import torch

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten", "logprobs_from_logits",
           "entropy_from_logits", "response_positions"]


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ values·mask over `dim` (all elements when None). values, mask: same shape, e.g. (B, T)."""
    prod = values * mask
    return prod.sum() if dim is None else prod.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ values·mask / Σ mask over `dim`; 0 where the mask is empty (no NaN).

    values, mask: (B, T) or any equal shapes. Returns a scalar (dim=None) or the reduced tensor.
    """
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked elements (scalar). Unbiased (÷ (n−1)) by default, as torch.var.

    Raises ValueError when an unbiased variance has fewer than 2 elements to work with.
    """
    n = mask.sum()
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        if n < 2:
            raise ValueError(f"masked_var: the mask selects {int(n.item())} element(s); an unbiased variance "
                             f"needs at least 2 (use unbiased=False or a larger batch)")
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) with the mean and unbiased variance over the masked elements.

    values, mask: (B, T). With shift_mean=False the mean is added back (only the scale changes).
    Elements outside the mask are transformed too; callers zero them when they need to.
    A mask with a single element has no variance: it is only centred (scale 1).
    """
    mean = masked_mean(values, mask)
    if mask.sum() < 2:
        whitened = values - mean
    else:
        whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    return whitened if shift_mean else whitened + mean


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label], computed in float32.

    logits: (B, T, V) any float dtype; labels: (B, T) long. Returns (B, T) float32.
    """
    logits = logits.float()
    picked = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) − Σ_v softmax(z)_v·z_v, the entropy of the categorical over the last dim.

    logits: (B, T, V). Returns (B, T) float32.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def response_positions(output_per_position: torch.Tensor, response_length: int) -> torch.Tensor:
    """The outputs that predict the response tokens: positions [L−T−1, L−1) of (B, L, ...) -> (B, T, ...).

    The output at position i is the prediction for token i+1, so response token j (at L−T+j) is
    predicted at L−T−1+j.
    """
    seq_len = output_per_position.shape[1]
    if response_length >= seq_len:
        raise ValueError(f"response length ({response_length}) must be shorter than the sequence ({seq_len}): "
                         f"input_ids must hold the prompt followed by the responses")
    return output_per_position[:, -response_length - 1:-1]
