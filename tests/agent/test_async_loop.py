"""The async rollout (agent.mode=async) with the scripted model and the real retrieval server: the same tokens,
masks, positions and records as the sync loop whatever order the trajectories finish in; a trajectory whose
retrieval fails gets the error observation after its own retries while the others go on; the concurrency bound;
least-busy placement over several engines; abort mode. (vLLM: tests/agent/test_async_vllm.py.)"""
import asyncio
import random
import threading
import time
from dataclasses import replace

import pytest
import torch

from stepsearch.agent.async_loop import run_rollout_async
from stepsearch.agent.agent_config import AgentConfig
from stepsearch.agent.loop import run_rollout
from stepsearch.agent.tags import RETRIEVAL_ERROR_OBSERVATION
from stepsearch.agent.record import TrajectoryRecord
from stepsearch.agent.trajectory import RolloutAborted
from stepsearch.search.client import RetrievalClient
from stepsearch.search.testing import free_port
from tests.agent.retrieval_proxy import RetrievalProxy
from tests.agent.scripted import ScriptedBackend
from tests.agent.test_loop_scripted import MAX_TURNS, expected_turns, make_batch, respond
from tests.rollout.models import tag_tokenizer
from verl.workers.rollout.async_engine import BatchingEngine, EnginePool, run_sync
from verl.workers.rollout.base import SamplingConfig

pytestmark = pytest.mark.timeout(300)

NAMES = ["alpha", "beta", "gamma", "gamma", "alpha"]
CFG = AgentConfig(max_turns=MAX_TURNS, topk=3, max_obs_length=2000, max_response_length=3000, max_new_tokens=200,
                  logprobs=True)


@pytest.fixture(scope="module")
def tok():
    return tag_tokenizer()


def records(out):
    return [TrajectoryRecord.from_dict(r) for r in out.non_tensor_batch["record"]]


def assert_same_rollout(a, b):
    """Identical tensors, derived non-tensors and records."""
    assert set(a.batch) == set(b.batch)
    for key in a.batch:
        assert torch.equal(a.batch[key], b.batch[key]), key
    for key in ("search_end_positions", "rounds", "response_text", "num_turns", "num_searches", "finished",
                "retrieval_errors", "valid_action_ratio"):
        assert list(a.non_tensor_batch[key]) == list(b.non_tensor_batch[key]), key
    assert records(a) == records(b)


def test_async_equals_sync_whatever_the_finishing_order(tok, retrieval_url):
    client = RetrievalClient(retrieval_url, timeout_s=60)
    sync_out = run_rollout(make_batch(tok, NAMES), ScriptedBackend(tok, respond), client, tok, CFG)
    rng = random.Random(0)
    # a random 0-150 ms per retrieval request: trajectories interleave and finish in a shuffled order
    with RetrievalProxy(retrieval_url, delay_s=lambda q: rng.uniform(0.0, 0.15)) as proxy:
        async_cfg = replace(CFG, mode="async")
        async_out = run_rollout_async(make_batch(tok, NAMES), ScriptedBackend(tok, respond),
                                      RetrievalClient(proxy.url, timeout_s=60), tok, async_cfg)
        assert all(len(q) == 1 for _, q, _ in proxy.requests)  # one query per request, sent when written
    assert_same_rollout(sync_out, async_out)
    # and, independently of the sync loop: the model and observation texts each script owes
    for i, name in enumerate(NAMES):
        model_texts, obs_texts = expected_turns(client, name)
        rec = records(async_out)[i]
        resp = async_out.batch["responses"][i]
        assert [tok.decode(resp[t.start:t.end]) for t in rec.turns] == model_texts
        assert [tok.decode(resp[t.observation.start:t.observation.end]) for t in rec.turns if t.observation] == \
            obs_texts
    meta = async_out.meta_info["rollout_metrics"]
    assert 0.0 < meta["rollout/engine_busy_fraction"] <= 1.0


def failing_script(context: str) -> str:
    """alpha searches a query the proxy fails; beta searches one that works; gamma answers at once."""
    if "<information>" in context or "retrieval error" in context:
        return "<answer> Roche </answer>"
    if "Question: alpha" in context:
        return "<search> Genentech lobbying </search>"
    if "Question: beta" in context:
        return "<search> Evan Morris </search>"
    return "<answer> Paris </answer>"


def test_failed_retrieval_delays_only_its_trajectory(tok, retrieval_url):
    backoff, retries = 0.5, 2  # waits 0.5 s, then 1.0 s: a retry budget of 1.5 s plus three quick 503s
    with RetrievalProxy(retrieval_url, fail_words=("Genentech",)) as proxy:
        client = RetrievalClient(proxy.url, timeout_s=10, max_retries=retries, backoff_s=backoff)
        cfg = AgentConfig(max_turns=2, max_response_length=2000, mode="async")
        out = run_rollout_async(make_batch(tok, ["alpha", "beta", "gamma"]), ScriptedBackend(tok, failing_script),
                                client, tok, cfg)
        sync_out = run_rollout(make_batch(tok, ["alpha", "beta", "gamma"]), ScriptedBackend(tok, failing_script),
                               client, tok, cfg)
    alpha, beta, gamma = records(out)
    t_alpha, t_beta, t_gamma = out.non_tensor_batch["rollout_timing"]
    assert [t.observation.kind for t in alpha.turns if t.observation] == ["retrieval_error"]
    assert "failed after 3 tries" in alpha.retrieval_errors()[0] and proxy.url in alpha.retrieval_errors()[0]
    assert RETRIEVAL_ERROR_OBSERVATION in out.non_tensor_batch["response_text"][0]
    assert alpha.finished and alpha.answer == "Roche" and alpha.num_searches == 0
    assert [t.observation.kind for t in beta.turns if t.observation] == ["information"] and beta.answer == "Roche"
    assert gamma.answer == "Paris" and gamma.turns[0].observation is None
    # alpha waited its own retry budget (1.5 s of backoff), and no more than that plus a margin for 3 requests
    assert 1.5 <= t_alpha["retrieve_s"] < 1.5 + 3.0
    # beta and gamma were not held up by it: both were done well before alpha's retrieval gave up
    assert t_beta["end_s"] < t_alpha["end_s"] - 0.75 and t_gamma["end_s"] < t_alpha["end_s"] - 0.75
    assert out.meta_info["rollout_metrics"]["search/retrieval_failed_trajectories"] == 1.0
    # the sync loop sends the turn's queries in one request: the failure takes beta's search down too
    assert [len(e) for e in sync_out.non_tensor_batch["retrieval_errors"]] == [1, 1, 0]


def test_concurrency_bound_and_batching(tok, retrieval_url):
    backend = ScriptedBackend(tok, respond)
    cfg = replace(CFG, mode="async", max_concurrent_trajectories=2)
    out = run_rollout_async(make_batch(tok, NAMES), backend, RetrievalClient(retrieval_url, timeout_s=60), tok, cfg)
    assert max(len(call) for call in backend.contexts) <= 2  # never more than 2 trajectories in flight
    assert sum(len(call) for call in backend.contexts) == sum(out.non_tensor_batch["num_turns"])
    sync_out = run_rollout(make_batch(tok, NAMES), ScriptedBackend(tok, respond),
                           RetrievalClient(retrieval_url, timeout_s=60), tok, CFG)
    assert_same_rollout(sync_out, out)


def test_requests_go_to_the_least_busy_engine(tok):
    """Engine 0 blocks on its first call; meanwhile requests go to engine 1 (0 in flight) until it is as busy."""
    release = threading.Event()
    slow = ScriptedBackend(tok, lambda ctx: "<answer> a </answer>", on_call=lambda i: release.wait(30))
    fast = ScriptedBackend(tok, lambda ctx: "<answer> b </answer>")
    pool = EnginePool([BatchingEngine(slow), BatchingEngine(fast)])
    params = SamplingConfig(max_new_tokens=8, greedy=True)
    prompt = tok("hello", add_special_tokens=False)["input_ids"]

    async def scenario():
        first = asyncio.create_task(pool.agenerate(prompt, params))   # tie: engine 0, which then blocks
        await asyncio.sleep(0.05)
        placed = [pool.pick()]
        second = await pool.agenerate(prompt, params)                 # engine 1 (engine 0 has 1 in flight)
        placed.append(pool.pick())
        third = await pool.agenerate(prompt, params)                  # engine 1 again (0 in flight there)
        release.set()
        return placed, await first, second, third

    placed, first, second, third = run_sync(scenario(), timeout_s=60)
    assert placed == [1, 1] and pool.dispatched == [1, 2]
    assert tok.decode(first.token_ids) == "<answer> a </answer>"
    assert tok.decode(second.token_ids) == tok.decode(third.token_ids) == "<answer> b </answer>"


def test_several_engines_give_the_sync_result(tok, retrieval_url):
    slow = ScriptedBackend(tok, respond, on_call=lambda i: time.sleep(0.2))
    fast = ScriptedBackend(tok, respond)
    cfg = replace(CFG, mode="async")
    client = RetrievalClient(retrieval_url, timeout_s=60)
    out = run_rollout_async(make_batch(tok, NAMES), [slow, fast], client, tok, cfg)
    assert_same_rollout(run_rollout(make_batch(tok, NAMES), ScriptedBackend(tok, respond), client, tok, CFG), out)
    served = [sum(len(c) for c in b.contexts) for b in (slow, fast)]
    assert sum(served) == sum(out.non_tensor_batch["num_turns"]) and served[1] > served[0]


def test_abort_mode_raises_and_stops_the_others(tok):
    client = RetrievalClient(f"http://127.0.0.1:{free_port()}", timeout_s=1.0, max_retries=1, backoff_s=0.01)
    backend = ScriptedBackend(tok, failing_script)
    cfg = AgentConfig(max_turns=2, on_retrieval_error="abort", mode="async")
    with pytest.raises(RolloutAborted, match="turn 0 for query 'Genentech lobbying'.*abort"):
        run_rollout_async(make_batch(tok, ["alpha", "gamma"]), backend, client, tok, cfg)
