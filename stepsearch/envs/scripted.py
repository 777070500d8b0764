"""A scripted warm-start search policy for the synthetic world, as a real `RolloutBackend`.

It produces the warm-start (SFT) trajectories. Running it through `stepsearch.agent.loop.run_rollout` means the
warm-start data has exactly the token layout, observation format and masks that RL rollouts will have.

The policy knows the *format* and the *procedure* (search the innermost relation first, one hop per search,
copy the name out of the last `<information>` block into the next query or the answer), with two configurable
flaws:

- `premature_answer_prob` (the demo's flaw): after each hop's `<information>` block except the last hop's, it
  stops searching with this probability and answers at once with the name it just read, an intermediate entity,
  i.e. a wrong answer. A model cloned from it answers prematurely under greedy decoding (low EM), while sampling
  still runs the full chain often enough for RL to find it. The choice "`<search>` vs `<answer>` after an
  `<information>` block" is a single early decision that both the answer F1 and the information gain of the next
  hop's gold passage reward.
- `copy_correct_prob`: whenever it copies a name it takes the object of the top-ranked passage with this
  probability, and otherwise the object of the second-ranked passage (a distractor about the same person). The
  demo uses 1.0 (always correct); 0.4 is the earlier design, which a 0.2M-parameter model did not unlearn by RL.
- `premature_from_hop`: the first hop after whose `<information>` block a premature answer may come (1, the demo:
  after every hop but the last). With 2 on 3-4-hop questions the flaw sits mid-chain: the first two hops are always
  searched, and the wrong stop can come after hop 2 or hop 3, several decisions away from the answer
  (bench/credit_assignment.py's hard setting).

Every turn opens with a short plan, `<think> N left </think>`, the number of hops still to search (read off the
question at the first turn, then counted down; a premature answer keeps the true count, so the stop decision is
the token after the plan). Without it a 0.2M-parameter model never learned when to stop: the count of searches
so far against the count of relations in the question was beyond it in the SFT budget, so it searched until the
turn limit and never answered.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from verl.workers.rollout.base import GenerationOutput, RolloutBackend, SamplingConfig

from stepsearch.envs.world import hop_query

_QUESTION_RE = re.compile(r"Question:\s*Who is (.+?) of ([A-Z][a-z]+)\?")
_RELATION_RE = re.compile(r"the (\w+)")
_DOC_RE = re.compile(r"The (\w+) of ([A-Z][a-z]+) is ([A-Z][a-z]+)\.")
_INFO_RE = re.compile(r"<information>(.*?)</information>", re.S)


@dataclass(frozen=True)
class ScriptedPolicyConfig:
    # probability of copying the name from the top-ranked passage (else the second-ranked one)
    copy_correct_prob: float = 1.0
    # probability of answering with the name just read instead of searching the next hop, after every hop but
    # the last (0: always search the full chain)
    premature_answer_prob: float = 0.0
    # the premature answer may come after the <information> block of this hop and of every later hop but the last
    premature_from_hop: int = 1
    seed: int = 0

    def __post_init__(self):
        for name in ("copy_correct_prob", "premature_answer_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"[scripted] {name} ({getattr(self, name)}) must lie in [0, 1]")
        if not isinstance(self.premature_from_hop, int) or self.premature_from_hop < 1:
            raise ValueError(f"[scripted] premature_from_hop ({self.premature_from_hop!r}) must be an int >= 1")


def parse_question(context: str) -> tuple[str, list[str]]:
    """(start entity, relations innermost first) from the prompt text of a world question."""
    m = _QUESTION_RE.search(context)
    if m is None:
        raise ValueError(f"context has no world question 'Question: Who is the R of ... of Name?': {context[:200]!r}")
    relations_outer_first = _RELATION_RE.findall(m.group(1))
    return m.group(2), list(reversed(relations_outer_first))


def parse_objects(information: str) -> list[str]:
    """Objects of the passages in one `<information>` block, in rank order."""
    return [obj for _, _, obj in _DOC_RE.findall(information)]


class ScriptedSearchBackend(RolloutBackend):
    """Emits the scripted policy's next action for each context; deterministic given (seed, context)."""

    def __init__(self, tokenizer, cfg: ScriptedPolicyConfig = ScriptedPolicyConfig()):
        self.tokenizer = tokenizer
        self.cfg = cfg

    def generate(self, prompt_ids: list[list[int]], params: SamplingConfig) -> list[GenerationOutput]:
        outs = []
        for ids in prompt_ids:
            text = self.next_action(self.tokenizer.decode(ids, skip_special_tokens=False))
            token_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: params.max_new_tokens]
            outs.append(GenerationOutput(token_ids=token_ids, log_probs=None, finish_reason="stop"))
        return outs

    def load_weights(self, state_dict) -> None:
        """A script has no weights; nothing to load."""

    def next_action(self, context: str) -> str:
        """The text of the next turn: a search for the next hop, or the final answer."""
        start, relations = parse_question(context)
        blocks = _INFO_RE.findall(context.split("assistant", 1)[-1])
        rng = random.Random(int(hashlib.sha256(f"{self.cfg.seed}|{context}".encode()).hexdigest()[:12], 16))
        subject = start if not blocks else self._copy_name(blocks[-1], rng)
        left = max(len(relations) - len(blocks), 0)
        if subject is None:   # the retriever returned nothing parseable: give up with an answer
            return "<think> 0 left </think><answer> unknown </answer>"
        if left > 0 and len(blocks) >= self.cfg.premature_from_hop and rng.random() < self.cfg.premature_answer_prob:
            return f"<think> {left} left </think><answer> {subject} </answer>"   # stops too early: wrong answer
        if left > 0:
            return f"<think> {left} left </think><search> {hop_query(relations[len(blocks)], subject)} </search>"
        return f"<think> 0 left </think><answer> {subject} </answer>"

    def _copy_name(self, information: str, rng: random.Random) -> str | None:
        objects = parse_objects(information)
        if not objects:
            return None
        if len(objects) == 1 or rng.random() < self.cfg.copy_correct_prob:
            return objects[0]
        return objects[1]
