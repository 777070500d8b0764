"""Action parsing, AgentConfig checks and observation encoding (pure functions, no services)."""
import pytest

from stepsearch.agent.actions import Action, parse_action
from stepsearch.agent.agent_config import AgentConfig
from stepsearch.agent.observations import ObservationEncoder, hits_to_round
from stepsearch.agent.tags import FINAL_TURN_WARNING, INFORMATION_CLOSE, INFORMATION_OPEN, INVALID_ACTION_WARNING
from tests.rollout.models import tag_tokenizer

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("text, expected", [
    ("<think> x </think> <search> who wrote Hamlet </search>", Action("search", "who wrote Hamlet")),
    ("<answer>\n Beijing \n</answer>", Action("answer", "Beijing")),
    # the first complete span wins, whichever tag it is
    ("<answer> A </answer> <search> q </search>", Action("answer", "A")),
    ("<search> q1 </search><answer> A </answer>", Action("search", "q1")),
    ("<search> unclosed", Action("invalid", "")),
    ("<search> a </answer>", Action("invalid", "")),  # mismatched closing tag
    ("<search>   </search>", Action("invalid", "")),   # empty query cannot be retrieved
    ("<answer></answer>", Action("answer", "")),
    ("no tags at all", Action("invalid", "")),
])
def test_parse_action(text, expected):
    assert parse_action(text) == expected


def test_agent_config_checks():
    with pytest.raises(ValueError, match="max_turns"):
        AgentConfig(max_turns=0)
    with pytest.raises(ValueError, match="on_retrieval_error"):
        AgentConfig(on_retrieval_error="ignore")
    with pytest.raises(KeyError, match="unknown key.*max_turn"):
        AgentConfig.from_dict({"max_turn": 3})
    assert AgentConfig.from_dict({"stop": ["</search>"]}).stop == ("</search>",)
    with pytest.raises(ValueError, match="temperature"):
        AgentConfig(temperature=0.0)


HITS = [
    {"document": {"id": "7", "title": "Evan Morris", "text": "Evan Morris was a lobbyist.", "contents": "x"},
     "score": 0.9},
    {"document": {"id": "9", "contents": "\"Roche\"\nRoche is a company."}, "score": 0.5},
]


def test_hits_to_round_keeps_ids_titles_texts():
    assert hits_to_round("q", HITS) == {"query": "q", "hidden_docs": 0, "docs": [
        {"id": "7", "title": "Evan Morris", "text": "Evan Morris was a lobbyist.", "truncated": False},
        {"id": "9", "title": "Roche", "text": "Roche is a company.", "truncated": False}]}


def test_information_block_text_and_balanced_cap():
    tok = tag_tokenizer()
    enc = ObservationEncoder(tok)
    [full] = enc.information([HITS], caps=[10_000], final_warning=[False])
    assert tok.decode(full.token_ids) == (
        "\n\n<information> Doc 1<## Title: Evan Morris ##> Evan Morris was a lobbyist.\n"
        "Doc 2<## Title: Roche ##> Roche is a company. </information>\n\n")
    assert not full.truncated and full.is_information
    fixed = len(tok(INFORMATION_OPEN)["input_ids"]) + len(tok(INFORMATION_CLOSE)["input_ids"])
    [cut] = enc.information([HITS], caps=[fixed + 5], final_warning=[False])
    assert len(cut.token_ids) == fixed + 5 and cut.truncated
    text = tok.decode(cut.token_ids)
    assert text.startswith(INFORMATION_OPEN) and text.endswith(INFORMATION_CLOSE)  # tags stay balanced
    assert text.count("<information>") == text.count("</information>") == 1
    [last] = enc.information([HITS], caps=[10_000], final_warning=[True])
    assert tok.decode(last.token_ids).endswith(INFORMATION_CLOSE + FINAL_TURN_WARNING)
    with pytest.raises(ValueError, match="max_obs_length"):
        enc.information([HITS], caps=[fixed], final_warning=[False])


def test_warnings_are_whole_or_dropped():
    tok = tag_tokenizer()
    enc = ObservationEncoder(tok)
    obs = enc.invalid_action(cap=10_000, final_warning=True)
    assert tok.decode(obs.token_ids) == INVALID_ACTION_WARNING + FINAL_TURN_WARNING
    n = len(obs.token_ids)
    assert enc.invalid_action(cap=n - 1, final_warning=True).token_ids == []
