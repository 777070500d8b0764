"""rollout/logprob_diff_{mean,max}: engine vs actor log-probs over generated tokens only; cast_bucket: the engine
dtype cast of a weight bucket (floating tensors only)."""
import pytest
import torch

from verl.trainer.ppo.ray_trainer import _logprob_diff
from verl.workers.rollout.vllm import cast_bucket


def test_logprob_diff_counts_generated_tokens_only():
    engine = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, 0.0]])
    actor = torch.tensor([[-1.1, -2.0, -2.0], [-0.5, -1.0, -4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # the large gaps sit on observation/pad positions
    out = _logprob_diff(engine, actor, mask)
    assert out["rollout/logprob_diff_mean"] == pytest.approx(0.1 / 3)
    assert out["rollout/logprob_diff_max"] == pytest.approx(0.1)
    assert _logprob_diff(engine, actor, torch.zeros_like(mask)) == {}


def test_cast_bucket_casts_floating_tensors_to_the_engine_dtype():
    w, ids, same = torch.randn(3, 2), torch.arange(4), torch.randn(2, dtype=torch.bfloat16)
    out = dict(cast_bucket([("w", w), ("ids", ids), ("b", same)], torch.bfloat16))
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], w.to(torch.bfloat16))
    assert out["ids"] is ids and out["b"] is same  # nothing to cast: the same tensors
