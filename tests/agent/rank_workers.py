"""A data-parallel rollout worker for the placement tests (importable by Ray worker processes): every rank holds
its own scripted engine (tests/agent/scripted.py); one rank can be made slow."""
from __future__ import annotations

import time

from verl.single_controller.base import Dispatch, register
from verl.single_controller.worker import Worker

from tests.agent.scripted import ScriptedBackend
from tests.agent.test_loop_scripted import respond
from tests.rollout.models import tag_tokenizer


class ScriptedRolloutWorker(Worker):
    """`generate` on this rank's own engine; rank `slow_rank` sleeps `delay_s` per call. `served` reports what each
    rank generated: prompts, calls and the row seeds of each call."""

    def __init__(self, rank: int, world_size: int, slow_rank: int = 0, delay_s: float = 0.0):
        super().__init__(rank, world_size)
        self.backend = ScriptedBackend(tag_tokenizer(), respond)
        self.delay_s = delay_s if rank == slow_rank else 0.0

    @register(Dispatch.DP_COMPUTE_LIST)
    def generate(self, prompt_ids: list[list[int]], params) -> list:
        time.sleep(self.delay_s)
        return self.backend.generate(prompt_ids, params)

    @register(Dispatch.ONE_TO_ALL)
    def served(self) -> dict:
        calls = self.backend.contexts
        return {"rank": self.rank, "prompts": sum(len(c) for c in calls), "calls": len(calls),
                "row_seeds": [p.row_seeds for p in self.backend.params]}

    @register(Dispatch.ONE_TO_ALL)
    def reset(self) -> None:
        self.backend.contexts.clear()
        self.backend.params.clear()
