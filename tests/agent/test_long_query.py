"""An over-long search query is cut to AgentConfig.max_query_chars before it is sent, so it cannot make the
server reject (422) the turn's whole batched request; the other searchers of the turn still get documents."""
import pytest

from stepsearch.agent.loop import AgentConfig, run_rollout
from stepsearch.search.client import DEFAULT_MAX_QUERY_CHARS, RetrievalClient, RetrievalError
from stepsearch.search.server import ServerConfig
from tests.agent.scripted import ScriptedBackend
from tests.agent.test_loop_scripted import make_batch
from tests.rollout.models import tag_tokenizer

pytestmark = pytest.mark.timeout(300)

LONG = ("Genentech lobbying " * 530)[:10000]  # 10,000 characters, ending in "Genent"


def respond(context: str) -> str:
    if "<information>" in context or "retrieval error" in context:
        return "<answer> Roche </answer>"
    if "Question: alpha" in context:
        return "<search> Genentech lobbying </search>"
    return f"<search> {LONG} </search>"


def test_one_overlong_query_does_not_fail_the_turn(retrieval_url):
    assert len(LONG) == 10000 and ServerConfig.max_query_chars == DEFAULT_MAX_QUERY_CHARS == 4096
    tok = tag_tokenizer()
    client = RetrievalClient(retrieval_url, timeout_s=60)
    with pytest.raises(RetrievalError, match="422"):  # what the loop used to send: the server refuses the batch
        client.retrieve(["Genentech lobbying", LONG], topk=3)
    cfg = AgentConfig(max_turns=2, topk=3, max_new_tokens=8000, max_context_length=16000,
                      max_response_length=12000, max_obs_length=400)
    assert cfg.max_query_chars == 4096
    out = run_rollout(make_batch(tok, ["alpha", "beta"]), ScriptedBackend(tok, respond), client, tok, cfg)
    nt = out.non_tensor_batch
    assert list(nt["retrieval_errors"]) == [[], []]
    assert list(nt["num_searches"]) == [1, 1] and all(nt["finished"])
    alpha, beta = nt["rounds"][0][0], nt["rounds"][1][0]
    # a round records the docs the (capped) observation showed; the rest are counted in hidden_docs
    assert alpha["query"] == "Genentech lobbying" and len(alpha["docs"]) + alpha["hidden_docs"] == 3
    assert beta["query"] == LONG[:4096] and len(beta["docs"]) + beta["hidden_docs"] == 3  # the query that was sent
    # The same prefix sent on its own gets the same documents.
    direct = client.retrieve([LONG[:4096]], topk=3)[0]
    assert [d["id"] for d in beta["docs"]] == [str(h["document"]["id"]) for h in direct][:len(beta["docs"])]


def test_max_query_chars_is_configurable_and_checked():
    assert AgentConfig.from_dict({"max_query_chars": 100}).max_query_chars == 100
    with pytest.raises(ValueError, match="max_query_chars"):
        AgentConfig(max_query_chars=0)
