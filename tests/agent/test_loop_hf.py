"""The rollout loop with the real HF backend and the real retrieval server.

- A programmed tiny Qwen2 (tests/rollout/models.py) that always writes `<search> Evan Morris </search>`:
  real engine code, deterministic tags.
- A random tiny Qwen2 sampling freely: whatever it writes, the response is exactly its sampled ids
  interleaved with the observations the loop owes it, and the masks say which is which.
"""
import pytest
import torch

from stepsearch.agent.actions import parse_action
from stepsearch.agent.loop import AgentConfig, run_rollout
from stepsearch.agent.tags import FINAL_TURN_WARNING, INVALID_ACTION_WARNING
from stepsearch.rewards.docs import format_docs
from stepsearch.search.client import RetrievalClient
from tests.rollout.models import (chain_transitions, chat_prompt_ids, left_padded, programmed_lm, random_lm,
                                  tag_tokenizer)
from verl.protocol import DataProto
from verl.workers.rollout.base import RolloutBackend
from verl.workers.rollout.hf import HFRolloutBackend

pytestmark = pytest.mark.timeout(300)

QUERY_TEXT = "<search> Evan Morris </search>"


class Recording(RolloutBackend):
    """Delegates to a real backend and keeps what it returned."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, prompt_ids, params):
        outs = self.inner.generate(prompt_ids, params)
        self.calls.append(outs)
        return outs

    def load_weights(self, state_dict):
        self.inner.load_weights(state_dict)


def make_batch(tok, questions):
    ids, mask = left_padded(tok, [chat_prompt_ids(tok, q) for q in questions])
    return DataProto.from_dict(tensors={"input_ids": ids, "attention_mask": mask},
                               non_tensors={"question": list(questions)})


def outputs_of(recording, num_turns, i):
    """The engine outputs of sample i: it took part in the first num_turns[i] calls, at its rank among the
    samples still active in each call."""
    outs = []
    for k, call in enumerate(recording.calls[:num_turns[i]]):
        rank = sum(1 for j in range(i) if num_turns[j] > k)
        outs.append(call[rank])
    return outs


def expected_observations(tok, client, outs, cfg):
    texts = []
    for turn, out in enumerate(outs[:cfg.max_turns]):
        action = parse_action(tok.decode(out.token_ids))
        last = FINAL_TURN_WARNING if turn == cfg.max_turns - 1 else ""
        if action.kind == "answer" or turn == len(outs) - 1 and len(outs) <= cfg.max_turns:
            break
        if action.kind == "search":
            hits = client.retrieve([action.content], topk=cfg.topk)[0]
            texts.append("\n\n<information> " + format_docs(hits).strip() + " </information>\n\n" + last)
        else:
            texts.append(INVALID_ACTION_WARNING + last)
    return texts


def check_layout(tok, out, recording, client, cfg):
    """Model tokens == the engine's sampled ids; observation tokens == the owed observation texts."""
    num_turns = list(out.non_tensor_batch["num_turns"])
    close_id = tok.convert_tokens_to_ids("</search>")
    for i in range(len(num_turns)):
        outs = outputs_of(recording, num_turns, i)
        resp, mask = out.batch["responses"][i], out.batch["response_mask"][i]
        length = int(out.batch["attention_mask"][i, -resp.shape[0]:].sum())
        model_ids = resp[:length][mask[:length] == 1].tolist()
        obs_ids = resp[:length][mask[:length] == 0].tolist()
        assert model_ids == [t for o in outs for t in o.token_ids]
        assert tok.decode(obs_ids) == "".join(expected_observations(tok, client, outs, cfg))
        assert tok.eos_token_id not in model_ids
        for p in out.non_tensor_batch["search_end_positions"][i]:
            assert resp[p] == close_id and mask[p] == 1 and mask[p + 1] == 0


@pytest.fixture(scope="module")
def tok():
    return tag_tokenizer()


def test_programmed_model_searches_every_turn(tok, retrieval_url):
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    model = programmed_lm(tok, chain_transitions(tok, newline, QUERY_TEXT))
    recording = Recording(HFRolloutBackend(model, tok))
    cfg = AgentConfig(max_turns=2, topk=3, max_new_tokens=16, max_response_length=4000, max_obs_length=1500,
                      seed=0)
    client = RetrievalClient(retrieval_url, timeout_s=60)
    out = run_rollout(make_batch(tok, ["Who was Evan Morris?", "Where did he work?"]), recording, client, tok, cfg)
    nt = out.non_tensor_batch
    assert list(nt["num_turns"]) == [3, 3] and list(nt["num_searches"]) == [2, 2]
    assert list(nt["finished"]) == [False, False]  # the forced-turn search is not executed, no answer
    query_ids = tok(QUERY_TEXT, add_special_tokens=False)["input_ids"]
    for call in recording.calls:
        assert all(o.token_ids == query_ids and o.finish_reason == "stop" for o in call)
    for i in range(2):
        assert [r["query"] for r in nt["rounds"][i]] == ["Evan Morris", "Evan Morris"]
        assert len(nt["search_end_positions"][i]) == 2
    check_layout(tok, out, recording, client, cfg)


def test_random_model_layout(tok, retrieval_url):
    torch.manual_seed(0)
    recording = Recording(HFRolloutBackend(random_lm(tok, seed=5), tok))
    cfg = AgentConfig(max_turns=2, topk=3, max_new_tokens=24, max_response_length=4000, max_obs_length=1500,
                      seed=11, logprobs=True)
    client = RetrievalClient(retrieval_url, timeout_s=60)
    out = run_rollout(make_batch(tok, ["Who was Evan Morris?", "Where is Roche?", "Q3?"]), recording, client, tok,
                      cfg)
    check_layout(tok, out, recording, client, cfg)
    assert all(1 <= n <= 3 for n in out.non_tensor_batch["num_turns"])
    lp, mask = out.batch["rollout_log_probs"], out.batch["response_mask"]
    assert (lp[mask == 0] == 0).all() and (lp[mask == 1] < 0).all()
