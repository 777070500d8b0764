"""A scripted RolloutBackend for loop tests: a deterministic "model" that writes given text.

`respond(context_text) -> str` says what the model writes next, given the decoded rolling context. The backend
tokenizes that text once (this is the scripted model's sampling, not a re-tokenization of engine output), then
behaves like a real engine: cut after the first stop string, drop EOS, honour `max_new_tokens`. It records
every context it was given so tests can check the left truncation.
"""
from __future__ import annotations

from typing import Callable

from verl.workers.rollout.base import GenerationOutput, RolloutBackend, SamplingConfig, StopCutter, check_prompts


class ScriptedBackend(RolloutBackend):
    def __init__(self, tokenizer, respond: Callable[[str], str], on_call: Callable[[int], None] | None = None):
        self.tokenizer = tokenizer
        self.respond = respond
        self.on_call = on_call
        self.cutter = StopCutter(tokenizer, [tokenizer.eos_token_id])
        self.contexts: list[list[list[int]]] = []  # per call, the prompts it received
        self.params: list[SamplingConfig] = []

    def generate(self, prompt_ids, params: SamplingConfig):
        check_prompts(prompt_ids)
        if self.on_call is not None:
            self.on_call(len(self.contexts))
        self.contexts.append([list(p) for p in prompt_ids])
        self.params.append(params)
        outs = []
        for ids in prompt_ids:
            text = self.respond(self.tokenizer.decode(ids, skip_special_tokens=False))
            sampled = self.tokenizer(text, add_special_tokens=False)["input_ids"][:params.max_new_tokens]
            kept, finish = self.cutter.cut(sampled, params.stop)
            lps = [-0.5] * len(kept) if params.logprobs else None
            outs.append(GenerationOutput(kept, lps, finish))
        return outs

    def load_weights(self, state_dict) -> None:
        return None
