"""Tiny Qwen2 policies for the rollout tests and bench (real weights, run by any engine, vLLM included).

- `tag_biased_lm(tokenizer, seed)`: `random_lm` with the lm_head rows of `<search>`, `</search>`, `<answer>`,
  `</answer>` scaled up, so that greedy decoding writes those tags now and then, depending on the whole context:
  turns end at different lengths, some search (with a nonsense query, which the retriever still answers), some
  answer, some are invalid. Diverse, deterministic under greedy decoding, and not a bigram machine.
- `branching_lm(tokenizer, start_token)`: a stochastic bigram machine (attention and MLP outputs zeroed, as
  `tests.rollout.models.programmed_lm`) that samples a search agent with a known turn structure: the first turn
  always searches; every later turn thinks for a geometric number of tokens and then searches (probability
  `p_search`) or answers. Queries are random runs of `query_words`. So the number of searches per trajectory is
  1 + Geometric, capped by max_turns, and turn lengths vary: the workload of bench/rollout.py's async section.
"""
from __future__ import annotations

import math

import torch
from transformers import Qwen2ForCausalLM

from tests.rollout.models import _new_lm, random_lm, tiny_config

TAGS = ("<search>", "</search>", "<answer>", "</answer>")
QUERY_WORDS = (" city", " film", " United", " year", " game", " first", " after", " from", " which", " his",
               " their", " who")


def tag_biased_lm(tokenizer, seed: int = 3, scale: float = 2.0) -> Qwen2ForCausalLM:
    """A random tiny Qwen2 (head_dim 32) whose four action tags have `scale`-times larger output rows."""
    model = random_lm(tokenizer, seed=seed)
    with torch.no_grad():
        for tag in TAGS:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(tag)] *= scale
    return model


def single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens ({ids}); the bigram machine needs single-token words")
    return ids[0]


def branching_transitions(tokenizer, start_token: int, p_search: float = 0.6, p_stop_think: float = 0.08,
                          p_end_query: float = 0.35, query_words=QUERY_WORDS) -> dict[int, dict[int, float]]:
    """{token: {next token: probability}} of the search agent described in the module doc.

    start_token: the last prompt token (must differ from "\\n", the last token of every observation).
    """
    tid = tokenizer.convert_tokens_to_ids
    newline, think, end_think = single_token(tokenizer, "\n"), tid("<think>"), tid("</think>")
    search, end_search, answer, end_answer = (tid(t) for t in TAGS)
    loop_a, loop_b, answer_word = (single_token(tokenizer, w) for w in (" I", " more", " American"))
    words = [single_token(tokenizer, w) for w in query_words]
    if start_token in (newline, *words, loop_a, loop_b, answer_word):
        raise ValueError(f"start_token {start_token} is already a state of the machine")
    per_word = (1.0 - p_end_query) / len(words)
    table = {start_token: {search: 1.0}, newline: {think: 1.0}, think: {loop_a: 1.0},
             loop_a: {loop_b: 1.0 - p_stop_think, end_think: p_stop_think}, loop_b: {loop_a: 1.0},
             end_think: {search: p_search, answer: 1.0 - p_search},
             search: {w: 1.0 / len(words) for w in words},
             answer: {answer_word: 1.0}, answer_word: {end_answer: 1.0}}
    for w in words:
        table[w] = {**{v: per_word for v in words}, end_search: p_end_query}
    return table


def branching_lm(tokenizer, start_token: int, hidden_size: int = 64, **probabilities) -> Qwen2ForCausalLM:
    """The stochastic bigram machine of `branching_transitions` as Qwen2 weights (sample it at temperature 1).

    The residual stream is the last token's one-hot embedding, which the final RMSNorm scales to sqrt(H); the
    lm_head row of each successor d of token s holds (40 + ln P(d|s)) / sqrt(H) at s's coordinate, so the logits
    are 40 + ln P(d|s) for the successors and 0 for every other token (a probability below e^-40).
    """
    table = branching_transitions(tokenizer, start_token, **probabilities)
    states = sorted(set(table) | {d for nxt in table.values() for d in nxt})
    if len(states) > hidden_size:
        raise ValueError(f"{len(states)} machine tokens need hidden_size >= {len(states)}")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_config(tokenizer, hidden_size=hidden_size)) if hidden_size != 64 \
        else _new_lm(tokenizer, seed=0)
    scale = math.sqrt(hidden_size)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        basis = {tok: k for k, tok in enumerate(states)}
        model.model.embed_tokens.weight[states] = 0.0
        model.lm_head.weight.zero_()
        for tok, k in basis.items():
            model.model.embed_tokens.weight[tok, k] = 1.0
        for src, successors in table.items():
            for dst, prob in successors.items():
                model.lm_head.weight[dst, basis[src]] = (40.0 + math.log(prob)) / scale
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()
