"""The retrieval server is killed mid-rollout: the client retries, the sample sees an error observation, the
rollout finishes (no crash, no hang); with on_retrieval_error="abort" the batch fails with a clear error."""
import time

import pytest

from stepsearch.agent.loop import AgentConfig, RolloutAborted, run_rollout
from stepsearch.agent.tags import RETRIEVAL_ERROR_OBSERVATION
from stepsearch.search.client import RetrievalClient
from stepsearch.search.testing import free_port, start_retrieval_server
from verl.trainer.ppo.ray_trainer import FAILED_SAMPLES_KEY
from tests.agent.scripted import ScriptedBackend
from tests.agent.test_loop_scripted import make_batch
from tests.rollout.models import tag_tokenizer

pytestmark = pytest.mark.timeout(600)

SCRIPT = ["<search> Evan Morris lobbyist </search>", "<search> Genentech </search>", "<answer> Roche </answer>"]


def respond(context: str) -> str:
    turn = context.count("<information>") + context.count("retrieval error")
    return SCRIPT[min(turn, 2)]


@pytest.mark.slow  # starts its own retrieval server (tens of seconds on a busy 2-core machine)
def test_server_killed_mid_rollout(wiki_index_dir):
    tok = tag_tokenizer()
    server = start_retrieval_server(wiki_index_dir)
    try:
        def kill_before_second_turn(call_index):
            if call_index == 1:
                server.kill()
        backend = ScriptedBackend(tok, respond, on_call=kill_before_second_turn)
        client = RetrievalClient(server.url, timeout_s=2.0, max_retries=2, backoff_s=0.05)
        start = time.perf_counter()
        out = run_rollout(make_batch(tok, ["alpha", "beta"]), backend, client, tok,
                          AgentConfig(max_turns=3, max_response_length=2000))
        elapsed = time.perf_counter() - start
    finally:
        server.kill()
    nt = out.non_tensor_batch
    for i in range(2):
        assert [r["query"] for r in nt["rounds"][i]] == ["Evan Morris lobbyist"]  # the turn before the kill
        assert len(nt["search_end_positions"][i]) == 1
        [err] = nt["retrieval_errors"][i]
        assert "failed after 3 tries" in err and server.url in err  # 1 try + 2 retries, then give up
        assert RETRIEVAL_ERROR_OBSERVATION in nt["response_text"][i]
        assert nt["finished"][i] and nt["num_turns"][i] == 3
    assert out.meta_info["rollout_metrics"]["search/retrieval_errors"] == 2.0
    assert out.meta_info[FAILED_SAMPLES_KEY] == 2  # both trajectories failed once (issue 19)
    assert elapsed < 60  # bounded by the client's timeouts and backoff, not a hang


def test_abort_mode_raises():
    tok = tag_tokenizer()
    client = RetrievalClient(f"http://127.0.0.1:{free_port()}", timeout_s=1.0, max_retries=1, backoff_s=0.01)
    with pytest.raises(RolloutAborted, match="turn 0 for 1 queries.*abort"):
        run_rollout(make_batch(tok, ["alpha"]), ScriptedBackend(tok, respond), client, tok,
                    AgentConfig(max_turns=2, on_retrieval_error="abort"))


def test_failures_are_counted_per_trajectory_and_per_batch():
    """Issue 19: with no server on the port, every search fails after the client's retries; each trajectory lists
    its failures, and the batch reports the number of trajectories with one (the trainer's abort rule reads it)."""
    tok = tag_tokenizer()
    client = RetrievalClient(f"http://127.0.0.1:{free_port()}", timeout_s=1.0, max_retries=1, backoff_s=0.01)

    def search_only_alpha(context: str) -> str:  # alpha searches (and fails) every turn; beta answers at once
        return "<answer> Roche </answer>" if "beta" in context else SCRIPT[0]
    out = run_rollout(make_batch(tok, ["alpha", "beta", "alpha"]), ScriptedBackend(tok, search_only_alpha), client,
                      tok, AgentConfig(max_turns=2, max_response_length=2000))
    errors = out.non_tensor_batch["retrieval_errors"]
    assert [len(e) for e in errors] == [2, 0, 2]  # 2 search turns each for the alphas, none for beta
    assert all("failed after 2 tries" in e for e in errors[0])
    assert out.meta_info[FAILED_SAMPLES_KEY] == 2
    metrics = out.meta_info["rollout_metrics"]
    assert metrics["search/retrieval_errors"] == 4.0 and metrics["search/retrieval_failed_trajectories"] == 2.0
