"""Data-parallel placement over the trainer's worker group (real Ray, 2 CPU ranks, each with its own scripted
engine; rank 0 slow): the async loop places each request on the least-busy rank (`RolloutBackend.replicas`),
the slow rank gets fewer requests, and the trajectories equal a single engine's; the equal split carries each
prompt's row seed to its rank."""
from dataclasses import replace

import pytest

from stepsearch.agent.async_loop import run_rollout_async
from stepsearch.agent.agent_config import AgentConfig
from stepsearch.agent.loop import run_rollout
from stepsearch.agent.trajectory import request_seed
from stepsearch.search.client import RetrievalClient
from tests.agent.rank_workers import ScriptedRolloutWorker
from tests.agent.scripted import ScriptedBackend
from tests.agent.test_async_loop import assert_same_rollout
from tests.agent.test_loop_scripted import MAX_TURNS, make_batch, respond
from tests.rollout.models import tag_tokenizer
from verl.trainer.ppo.ray_trainer import WorkerGroupRolloutBackend

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NAMES = ["alpha", "beta", "gamma"] * 4
CFG = AgentConfig(max_turns=MAX_TURNS, topk=3, max_obs_length=2000, max_response_length=3000, max_new_tokens=200,
                  logprobs=True, seed=5)
DELAY_S = 0.3


@pytest.fixture(scope="module")
def tok():
    return tag_tokenizer()


@pytest.fixture(scope="module")
def worker_group():
    ray = pytest.importorskip("ray")
    from verl.single_controller.ray import RayResourcePool, RayWorkerGroup

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = RayResourcePool(2, num_cpus_per_bundle=0.5, num_gpus_per_bundle=0, timeout_s=60)
    wg = RayWorkerGroup(pool, ScriptedRolloutWorker, "rollout", {"slow_rank": 0, "delay_s": DELAY_S},
                        fraction=1.0, timeout_s=60)
    yield wg
    wg.shutdown()
    pool.release()
    ray.shutdown()


def test_least_busy_rank_gets_the_requests(tok, worker_group, retrieval_url):
    client = RetrievalClient(retrieval_url, timeout_s=60)
    backend = WorkerGroupRolloutBackend(worker_group)
    assert [r.rank for r in backend.replicas()] == [0, 1]
    worker_group.reset()
    out = run_rollout_async(make_batch(tok, NAMES), backend, client, tok, replace(CFG, mode="async"))
    single = run_rollout(make_batch(tok, NAMES), ScriptedBackend(tok, respond), client, tok, CFG)
    assert_same_rollout(out, single)  # the same trajectories as one engine's
    served = worker_group.served()
    turns = int(sum(out.non_tensor_batch["num_turns"]))
    assert served[0]["prompts"] + served[1]["prompts"] == turns  # every turn once, on one rank, no padding
    print(f"least-busy placement: {turns} requests, rank 0 (slow, {DELAY_S} s/call) served "
          f"{served[0]['prompts']} in {served[0]['calls']} calls, rank 1 {served[1]['prompts']} in "
          f"{served[1]['calls']} calls; generate_s {backend.generate_s:.2f}, calls {backend.calls}")
    assert served[0]["prompts"] < served[1]["prompts"]  # the slow rank was busy when most requests came
    # each request carried its own (row, turn) seed to whichever rank served it
    seeds = sorted(s for rank in served for call in rank["row_seeds"] for s in call)
    expected = sorted(request_seed(CFG, row, t) for row, n in enumerate(out.non_tensor_batch["num_turns"])
                      for t in range(n))
    assert seeds == expected
    assert backend.calls == served[0]["calls"] + served[1]["calls"] and backend.generated_tokens > 0


def test_equal_split_carries_row_seeds(tok, worker_group, retrieval_url):
    """independent_ranks=False (a collective generate): one call over both ranks, each with its half of the
    prompts and of their row seeds; the sync loop's output is the single engine's."""
    client = RetrievalClient(retrieval_url, timeout_s=60)
    backend = WorkerGroupRolloutBackend(worker_group, independent_ranks=False)
    assert backend.replicas() == [backend]
    worker_group.reset()
    out = run_rollout(make_batch(tok, NAMES), backend, client, tok, CFG)
    assert_same_rollout(out, run_rollout(make_batch(tok, NAMES), ScriptedBackend(tok, respond), client, tok, CFG))
    served = worker_group.served()
    assert served[0]["calls"] == served[1]["calls"] == backend.calls
    turns = list(out.non_tensor_batch["num_turns"])
    for call in range(backend.calls):
        live = [row for row, n in enumerate(turns) if n > call]
        seeds = [request_seed(CFG, row, call) for row in live]
        half = (len(seeds) + 1) // 2  # rank 0: the first half; rank 1: the rest, padded with rank 0's first
        assert served[0]["row_seeds"][call] == tuple(seeds[:half])
        assert served[1]["row_seeds"][call] == tuple(seeds[half:] + seeds[:1] * (2 * half - len(seeds)))
