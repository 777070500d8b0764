"""The rollout loop driven by a scripted model, against the real retrieval server (MiniLM over wiki-18 passages).

The scripted backend writes fixed text, so every expected token, mask and position is known in advance; the
loop, observation encoding and retrieval are the real code under test.
"""
import pytest
import torch

from stepsearch.agent.loop import AgentConfig, run_rollout
from stepsearch.agent.tags import FINAL_TURN_WARNING, INVALID_ACTION_WARNING
from stepsearch.rewards.docs import format_docs
from stepsearch.search.client import RetrievalClient
from tests.agent.scripted import ScriptedBackend
from tests.rollout.models import chat_prompt_ids, left_padded, tag_tokenizer
from verl.protocol import DataProto

pytestmark = pytest.mark.timeout(300)

# What each sample's "model" writes at its n-th turn (n = observations seen so far). Text after the first
# stop string is junk the engine must cut.
SCRIPTS = {
    "alpha": ["<think> plan </think> <search> Evan Morris lobbyist </search> junk <answer> no </answer>",
              "I am confused",
              "<search> Genentech lobbying </search>",
              "<think> done </think> <answer> Roche </answer> trailing"],
    "beta": ["<answer> Paris </answer>"],
    "gamma": ["<search> T. B. Joshua </search>"] * 4,
}
MAX_TURNS = 3


def respond(context: str) -> str:
    # a left-truncated context may have lost the question: only gamma runs with truncation
    name = next((k for k in SCRIPTS if f"Question: {k}" in context), "gamma")
    turn = context.count("<information>") + context.count("<warning> My previous") + context.count("retrieval error")
    return SCRIPTS[name][min(turn, len(SCRIPTS[name]) - 1)]


def make_batch(tok, names):
    prompts = [chat_prompt_ids(tok, f"Question: {n}?") for n in names]
    ids, mask = left_padded(tok, prompts)
    return DataProto.from_dict(tensors={"input_ids": ids, "attention_mask": mask},
                               non_tensors={"id": list(names)}, meta_info={"step": 3})


def cut_at_stop(text):
    ends = [text.index(s) + len(s) for s in ("</search>", "</answer>") if s in text]
    return text[:min(ends)] if ends else text


def runs(mask_row, length):
    """Maximal runs of equal mask values over the first `length` tokens: [(value, start, end)]."""
    out, start = [], 0
    for j in range(1, length + 1):
        if j == length or mask_row[j] != mask_row[start]:
            out.append((int(mask_row[start]), start, j))
            start = j
    return out


@pytest.fixture(scope="module")
def tok():
    return tag_tokenizer()


@pytest.fixture(scope="module")
def rollout(tok, retrieval_url):
    backend = ScriptedBackend(tok, respond)
    cfg = AgentConfig(max_turns=MAX_TURNS, topk=3, max_obs_length=2000, max_response_length=3000,
                      max_new_tokens=200, logprobs=True)
    batch = make_batch(tok, ["alpha", "beta", "gamma"])
    out = run_rollout(batch, backend, RetrievalClient(retrieval_url, timeout_s=60), tok, cfg)
    return batch, backend, out


def expected_turns(client, name):
    """(model texts, observation texts) the loop must produce for one script, built independently."""
    model, obs = [], []
    for turn in range(MAX_TURNS + 1):
        text = cut_at_stop(SCRIPTS[name][min(len(obs), len(SCRIPTS[name]) - 1)])
        model.append(text)
        last = turn == MAX_TURNS - 1
        if "<answer>" in text or turn == MAX_TURNS:
            break
        if "<search>" in text:
            query = text.split("<search>")[1].split("</search>")[0].strip()
            hits = client.retrieve([query], topk=3)[0]
            obs.append("\n\n<information> " + format_docs(hits).strip() + " </information>\n\n"
                       + (FINAL_TURN_WARNING if last else ""))
        else:
            obs.append(INVALID_ACTION_WARNING + (FINAL_TURN_WARNING if last else ""))
    return model, obs


def test_tokens_masks_and_text(tok, rollout, retrieval_url):
    batch, _, out = rollout
    client = RetrievalClient(retrieval_url, timeout_s=60)
    T = 3000
    assert out.batch["responses"].shape == (3, T) and out.batch["response_mask"].shape == (3, T)
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        model_texts, obs_texts = expected_turns(client, name)
        mask = out.batch["response_mask"][i]
        resp = out.batch["responses"][i]
        length = int(out.batch["attention_mask"][i, batch.batch["input_ids"].shape[1]:].sum())
        segments = runs(mask, length)
        # model and observation runs alternate: model turn k, then its observation k
        assert [v for v, _, _ in segments] == [1, 0] * len(obs_texts) + [1] * (len(model_texts) - len(obs_texts))
        model_runs = [resp[s:e].tolist() for v, s, e in segments if v == 1]
        obs_runs = [resp[s:e].tolist() for v, s, e in segments if v == 0]
        # model tokens are exactly the sampled ids (the scripted model's own tokenization), cut after the stop
        assert model_runs == [tok(t, add_special_tokens=False)["input_ids"] for t in model_texts]
        assert [tok.decode(r) for r in obs_runs] == obs_texts
        assert out.non_tensor_batch["response_text"][i] == "".join(
            m + o for m, o in zip(model_texts, obs_texts + [""] * (len(model_texts) - len(obs_texts))))
        assert (resp[length:] == tok.pad_token_id).all() and (mask[length:] == 0).all()
        # rollout_log_probs: the engine's -0.5 on model tokens, 0 on observations and pad
        assert torch.equal(out.batch["rollout_log_probs"][i], -0.5 * mask.float())


def test_records_per_sample(tok, rollout, retrieval_url):
    _, _, out = rollout
    nt = out.non_tensor_batch
    assert list(nt["num_turns"]) == [4, 1, 4]          # alpha: search, invalid, search, forced answer
    assert list(nt["num_searches"]) == [2, 0, 3]       # gamma's forced-turn search is not executed
    assert list(nt["finished"]) == [True, True, False]
    assert list(nt["valid_action_ratio"]) == pytest.approx([3 / 4, 1.0, 1.0])
    assert list(nt["id"]) == ["alpha", "beta", "gamma"] and out.meta_info["step"] == 3
    client = RetrievalClient(retrieval_url, timeout_s=60)
    for i, queries in enumerate([["Evan Morris lobbyist", "Genentech lobbying"], [], ["T. B. Joshua"] * 3]):
        rounds = nt["rounds"][i]
        assert [r["query"] for r in rounds] == queries
        for r in rounds:
            hits = client.retrieve([r["query"]], topk=3)[0]
            assert [d["id"] for d in r["docs"]] == [str(h["document"]["id"]) for h in hits]
            assert all(d["title"] and d["text"] for d in r["docs"])
    metrics = out.meta_info["rollout_metrics"]
    assert metrics["search/num_turns/mean"] == pytest.approx(3.0)
    assert metrics["search/finished/mean"] == pytest.approx(2 / 3)
    assert "search/finish_ratio" not in metrics  # one writer per statistic
    assert metrics["search/num_turns/max"] == 4.0 and metrics["search/num_turns/min"] == 1.0
    assert metrics["search/truncated_contexts"] == 0.0


def test_search_end_positions_land_on_search_close(tok, rollout):
    _, _, out = rollout
    close_id = tok.convert_tokens_to_ids("</search>")
    for i in range(3):
        positions = out.non_tensor_batch["search_end_positions"][i]
        assert len(positions) == out.non_tensor_batch["num_searches"][i]
        for p in positions:
            assert out.batch["responses"][i, p] == close_id
            assert out.batch["response_mask"][i, p] == 1 and out.batch["response_mask"][i, p + 1] == 0
            assert tok.decode(out.batch["responses"][i, p + 1:p + 6]).startswith("\n\n<information>")


def test_sequence_tensors(tok, rollout):
    batch, _, out = rollout
    P = batch.batch["input_ids"].shape[1]
    assert torch.equal(out.batch["prompts"], batch.batch["input_ids"])
    assert torch.equal(out.batch["input_ids"], torch.cat([out.batch["prompts"], out.batch["responses"]], 1))
    lengths = (out.batch["responses"] != tok.pad_token_id).sum(1)  # no pad/eos inside the responses here
    expected_attn = torch.cat([batch.batch["attention_mask"],
                               (torch.arange(3000)[None, :] < lengths[:, None]).long()], 1)
    assert torch.equal(out.batch["attention_mask"], expected_attn)
    for i in range(3):
        pos = out.batch["position_ids"][i]
        start = int((batch.batch["attention_mask"][i] == 0).sum())
        n = int(expected_attn[i].sum())
        assert pos[start:start + n].tolist() == list(range(n))
    assert out.batch["response_mask"].sum(1).tolist() == [
        sum(len(tok(cut_at_stop(t), add_special_tokens=False)["input_ids"]) for t in ts)
        for ts in (SCRIPTS["alpha"], SCRIPTS["beta"][:1], SCRIPTS["gamma"])]


def test_forced_final_turn_context_and_calls(tok, rollout):
    _, backend, _ = rollout
    assert [len(c) for c in backend.contexts] == [3, 2, 2, 2]  # beta answers at turn 0
    assert all(p.max_new_tokens == 200 and p.stop == ("</search>", "</answer>") for p in backend.params)
    forced_contexts = [tok.decode(c) for c in backend.contexts[-1]]
    assert all(c.endswith(FINAL_TURN_WARNING) for c in forced_contexts)


def test_left_truncated_context_and_budgets(tok, retrieval_url):
    backend = ScriptedBackend(tok, respond)
    cfg = AgentConfig(max_turns=2, topk=3, max_context_length=64, max_obs_length=40, max_response_length=150,
                      max_new_tokens=200)
    batch = make_batch(tok, ["gamma"])
    out = run_rollout(batch, backend, RetrievalClient(retrieval_url, timeout_s=60), tok, cfg)
    prompt = batch.batch["input_ids"][0][batch.batch["attention_mask"][0].bool()].tolist()
    resp, mask = out.batch["responses"][0], out.batch["response_mask"][0]
    length = len(prompt) + int(out.batch["attention_mask"][0, -150:].sum())
    full = prompt + resp.tolist()
    for call in backend.contexts:
        ctx = call[0]
        assert len(ctx) <= 64
        # each context is the tail of prompt + response at that time
        n = next(k for k in range(len(prompt), length + 1) if full[max(0, k - 64):k] == ctx)
        assert n - len(prompt) == 0 or mask[n - len(prompt) - 1] == 0  # it ends after an observation
    # observations capped at 40 tokens with balanced tags; the whole response within 150
    for v, s, e in runs(mask, length - len(prompt)):
        if v == 0:
            text = tok.decode(resp[s:e])
            assert e - s <= 40
            if "<information>" in text:
                assert text.count("</information>") == 1 and text.split("</information>")[1].strip() in (
                    "", FINAL_TURN_WARNING.strip())
    assert length - len(prompt) <= 150
    assert out.meta_info["rollout_metrics"]["search/truncated_contexts"] == sum(
        1 for call in backend.contexts if len(call[0]) == 64)
    assert out.meta_info["rollout_metrics"]["search/truncated_contexts"] >= 1


def test_response_budget_ends_episode(tok, retrieval_url):
    # 20 tokens total: the first search turn fits, its information block does not -> unfinished, no round
    backend = ScriptedBackend(tok, respond)
    cfg = AgentConfig(max_turns=3, max_response_length=20, max_obs_length=800, max_new_tokens=200)
    out = run_rollout(make_batch(tok, ["gamma"]), backend, RetrievalClient(retrieval_url, timeout_s=60), tok, cfg)
    assert out.batch["responses"].shape == (1, 20)
    n_model = len(tok(cut_at_stop(SCRIPTS["gamma"][0]), add_special_tokens=False)["input_ids"])
    assert int(out.batch["response_mask"].sum()) == n_model
    assert list(out.non_tensor_batch["num_searches"]) == [0] and not out.non_tensor_batch["finished"][0]
    assert len(backend.contexts) == 1


def test_per_turn_token_limit(tok, retrieval_url):
    # max_new_tokens=3: every turn is cut to 3 tokens, no action completes, warnings follow
    backend = ScriptedBackend(tok, respond)
    cfg = AgentConfig(max_turns=2, max_new_tokens=3, max_response_length=400)
    out = run_rollout(make_batch(tok, ["alpha"]), backend, RetrievalClient(retrieval_url, timeout_s=60), tok, cfg)
    assert all(p.max_new_tokens == 3 for p in backend.params)
    assert list(out.non_tensor_batch["num_turns"]) == [3]
    assert list(out.non_tensor_batch["valid_action_ratio"]) == [0.0]
    assert int(out.batch["response_mask"].sum()) == 9
    assert out.non_tensor_batch["response_text"][0].count("<warning> My previous action is invalid.") == 2
