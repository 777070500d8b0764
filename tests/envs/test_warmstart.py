"""Warm start: the SFT loss mask and loss (against a slow loop), and, end to end (slow), scripted trajectories
through the real rollout loop and retriever whose loss mask covers exactly the policy's own actions."""
import math
import re

import pytest
import torch

from stepsearch.envs.warmstart import (SFTConfig, copy_accuracy, sft_stop_reason, permute_token_groups, run_sft, sft_loss_mask, sft_step_loss,
                                      single_token_ids)
from verl.protocol import DataProto
from verl.utils.tiny_model import build_tiny_causal_lm, build_tokenizer


def _toy_batch():
    # B=2, P=3 (left-padded), T=4 (right-padded); response_mask marks generated tokens only
    prompts = torch.tensor([[0, 5, 6], [7, 8, 9]])
    responses = torch.tensor([[10, 11, 12, 0], [13, 14, 15, 16]])
    response_mask = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 1]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    return DataProto.from_dict(tensors={
        "prompts": prompts, "responses": responses, "response_mask": response_mask,
        "input_ids": torch.cat([prompts, responses], 1), "attention_mask": attention,
        "position_ids": (attention.cumsum(1) - 1).clamp(min=0)})


def test_loss_mask_is_response_mask_after_the_prompt():
    mask = sft_loss_mask(_toy_batch())
    assert mask.tolist() == [[0, 0, 0, 1, 0, 1, 0], [0, 0, 0, 1, 1, 0, 1]]


def test_permute_token_groups_relabels_each_row_consistently_within_its_group():
    names, relations = torch.tensor([20, 21, 22, 23, 24]), torch.tensor([30, 31, 32])
    # row: names 20, 22, 20 and relation 31, 31 between other tokens (1, 2, 3, 4)
    row = [1, 20, 31, 2, 22, 3, 20, 31, 4]
    ids = torch.tensor([row] * 64)
    out = permute_token_groups(ids, [names, relations], torch.Generator().manual_seed(0))
    assert out.shape == ids.shape
    for r in out.tolist():
        assert [r[i] for i in (0, 3, 5, 8)] == [1, 2, 3, 4]                   # other tokens untouched
        assert r[1] == r[6] and r[1] != r[4]                                    # same name -> same new name
        assert {r[1], r[4]} <= set(names.tolist()) and r[2] == r[7] and r[2] in relations.tolist()
    # rows get their own permutations: over 64 rows the first name takes every value of its group
    assert {r[1] for r in out.tolist()} == set(names.tolist())
    assert {r[2] for r in out.tolist()} == set(relations.tolist())


def test_single_token_ids_keeps_only_words_that_are_one_token_after_a_space():
    tok = build_tokenizer(["the mother of Kiba is Nathi"] * 50, vocab_size=300)
    ids = single_token_ids(tok, ["Kiba", "mother", "Zzqxwv"])                 # Zzqxwv never seen: split in pieces
    assert ids == sorted({tok(" Kiba")["input_ids"][0], tok(" mother")["input_ids"][0]})


def _constant_batch(rows=4):
    # every row: prompt [1, 2, 3] then the response [4, 5, 6, 7]; 5 is an observation token, the rest policy tokens
    prompts, responses = torch.tensor([[1, 2, 3]] * rows), torch.tensor([[4, 5, 6, 7]] * rows)
    ones = torch.ones(rows, 7, dtype=torch.long)
    return DataProto.from_dict(tensors={
        "prompts": prompts, "responses": responses, "response_mask": torch.tensor([[1, 0, 1, 1]] * rows),
        "input_ids": torch.cat([prompts, responses], 1), "attention_mask": ones,
        "position_ids": torch.arange(7).repeat(rows, 1)})


def test_copy_accuracy_matches_a_slow_loop_over_group_tokens():
    tok = build_tokenizer(["a b c d e f g h"], vocab_size=300)
    model = build_tiny_causal_lm(tok, hidden_size=16, num_layers=1, num_heads=2, seed=3)
    b = _toy_batch()
    groups = [torch.tensor([11, 14, 16]), torch.tensor([12, 15]), torch.tensor([99])]
    acc = copy_accuracy(model, b, groups, batch_size=1)
    acc_after = copy_accuracy(model, b, groups, after_observation=[True, True, False])
    logits = model(input_ids=b.batch["input_ids"], attention_mask=b.batch["attention_mask"],
                   position_ids=b.batch["position_ids"]).logits
    mask = sft_loss_mask(b)
    # first observation token (response_mask 0 inside the attended response): row 0 at t=4, row 1 at t=5
    first_observation = [4, 5]
    for after, expected_totals, got in ((False, [2, 1], acc), (True, [1, 1], acc_after)):
        for k, group in enumerate(groups[:2]):
            hits = total = 0
            for i in range(2):
                for t in range(1, 7):
                    token = int(b.batch["input_ids"][i, t])
                    if mask[i, t] and token in group.tolist() and (not after or t > first_observation[i]):
                        total += 1
                        hits += int(logits[i, t - 1].argmax()) == token
            # group 0 occurs at the policy tokens 14 (row 1, t=4) and 16 (row 1, t=6, after the observation at t=5;
            # 11 is itself an observation), group 1 at 12 (row 0, t=5, after that row's observation 11 at t=4; 15
            # is an observation)
            assert total == expected_totals[k]
            assert (math.isnan(got[k]) if total == 0 else got[k] == hits / total)
    assert math.isnan(acc[2])                                                   # never occurs


def test_sft_stops_once_held_out_copy_accuracy_is_reached():
    tok = build_tokenizer(["a b c d e f g h"], vocab_size=300)
    model = build_tiny_causal_lm(tok, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    data = _constant_batch()
    history = []
    cfg = SFTConfig(steps=400, batch_size=4, lr=1e-2, permute_names=False, stop_copy_acc=1.0, min_steps=10,
                    eval_every=10)
    losses = run_sft(model, data, cfg, permute_groups=[[6, 7]], val_data=data, history=history)
    assert [h["step"] for h in history] == list(range(10, len(losses) + 1, 10))
    assert history[-1]["copy_acc"] == [1.0] and all(h["copy_acc"] != [1.0] for h in history[:-1])
    assert len(losses) < 400 and len(losses) == history[-1]["step"]            # stopped at the first check that passed
    with pytest.raises(ValueError, match="stop_copy_acc"):
        SFTConfig(stop_copy_acc=1.5)


def test_sft_stop_rule_target_and_plateau():
    def checks(*weakest_names):                     # names (nan-free) then relations at 1.0
        return [{"step": 100 * (i + 1), "copy_acc": [a, 1.0]} for i, a in enumerate(weakest_names)]

    target = SFTConfig(stop_copy_acc=0.9)
    assert sft_stop_reason(checks(0.5, 0.89), target) is None
    assert "0.900 >= 0.9" in sft_stop_reason(checks(0.5, 0.9), target)
    assert sft_stop_reason([{"step": 100, "copy_acc": [float("nan"), 0.95]}], target).startswith("copy accuracy 0.950")
    plateau = SFTConfig(stop_copy_acc=0.9, plateau_checks=3, plateau_delta=0.01, plateau_min_acc=0.8)
    # best before the last 3 checks: 0.85; best of all: 0.858 -> gain 0.008 <= 0.01: plateau
    assert "plateaued at 0.858" in sft_stop_reason(checks(0.6, 0.85, 0.84, 0.858, 0.85), plateau)
    # a gain of 0.02 in the last 3 checks: still learning
    assert sft_stop_reason(checks(0.6, 0.85, 0.84, 0.87, 0.85), plateau) is None
    # flat, but below plateau_min_acc: go on (the copy circuit may not have formed yet)
    assert sft_stop_reason(checks(0.0, 0.0, 0.0, 0.0, 0.0), plateau) is None
    # not enough checks yet to judge a plateau of 3
    assert sft_stop_reason(checks(0.85, 0.85, 0.85), plateau) is None
    with pytest.raises(ValueError, match="plateau"):
        SFTConfig(plateau_checks=-1)


def test_sft_loss_matches_a_slow_loop():
    torch.manual_seed(0)
    tok = build_tokenizer(["a b c d e f g h"], vocab_size=300)
    model = build_tiny_causal_lm(tok, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    b = _toy_batch()
    mask = sft_loss_mask(b)
    loss = sft_step_loss(model, b.batch["input_ids"], b.batch["attention_mask"], b.batch["position_ids"], mask)
    logits = model(input_ids=b.batch["input_ids"], attention_mask=b.batch["attention_mask"],
                   position_ids=b.batch["position_ids"]).logits
    total, count = 0.0, 0
    for i in range(2):
        for t in range(1, 7):                     # token t is predicted from position t-1
            if mask[i, t] == 1:
                total -= torch.log_softmax(logits[i, t - 1], -1)[b.batch["input_ids"][i, t]].item()
                count += 1
    assert count == 5 and math.isclose(loss.item(), total / count, rel_tol=1e-5)


def test_sft_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        SFTConfig(steps=0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scripted_trajectories_and_sft_through_the_real_loop(world_stack):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepsearch.agent.agent_config import AgentConfig
    from stepsearch.envs.scripted import ScriptedPolicyConfig
    from stepsearch.envs.warmstart import collect_scripted_rollouts
    from stepsearch.search.client import RetrievalClient

    tok = AutoTokenizer.from_pretrained(world_stack.model_dir)
    agent = AgentConfig(max_turns=5, topk=3, max_context_length=1024, max_new_tokens=32, max_response_length=512,
                        max_obs_length=256, greedy=True)
    data = collect_scripted_rollouts(f"{world_stack.world_dir}/train.parquet", tok, world_stack.url, agent,
                                     ScriptedPolicyConfig(copy_correct_prob=1.0), 96, batch_size=16, max_samples=16)
    assert len(data) == 16
    client = RetrievalClient(world_stack.url)
    for i, q in enumerate(world_stack.world.train[:16]):
        generated = tok.decode(data.batch["responses"][i][data.batch["response_mask"][i].bool()])
        entity, expected = q.start, ""
        for k, r in enumerate(q.relations):        # reference: follow the retriever's top-1 passage at every hop
            expected += f"<think> {len(q.relations) - k} left </think><search> {r} of {entity} </search>"
            text = client.retrieve([f"{r} of {entity}"], topk=3)[0][0]["document"]["text"]
            entity = re.fullmatch(r"The \w+ of \w+ is (\w+)\.", text).group(1)
        assert generated == expected + f"<think> 0 left </think><answer> {entity} </answer>"   # only actions trained
        assert data.non_tensor_batch["response_text"][i].count("<information>") == len(q.relations)
    model = AutoModelForCausalLM.from_pretrained(world_stack.model_dir)
    torch.manual_seed(0)
    losses = run_sft(model, data, SFTConfig(steps=30, batch_size=8, lr=3e-3))
    assert losses[-1] < 0.5 * losses[0]
