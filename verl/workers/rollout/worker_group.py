"""Rollout through a worker group's data-parallel ranks, each holding its own engine (the trainer's
`WorkerGroupRolloutBackend` is built from these parts).

- `split_generate(wg, prompts, params)`: one call on every rank, each with a contiguous equal share of the prompts
  (the worker's registered `generate` dispatch, DP_COMPUTE_LIST); per-prompt seeds (`SamplingConfig.row_seeds`)
  travel with their prompts, so prompt i is sampled from its own seed on whichever rank it lands.
- `RankRolloutBackend(wg, rank, clock)`: one rank's engine as a RolloutBackend (`WorkerGroup.call_rank`); a caller
  that places requests by load (the async agent loop's EnginePool) calls the ranks on their own, at the same time.
- `GenerateClock`: the time, tokens and calls of all of them together; `generate_s` is the wall time during which
  at least one call was running (calls on different ranks overlap), safe to update from several threads.
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Callable

from verl.single_controller.base import Dispatch, merge_outputs, split_args
from verl.workers.rollout.base import GenerationOutput, RolloutBackend, SamplingConfig

__all__ = ["GenerateClock", "split_generate", "RankRolloutBackend"]


class GenerateClock:
    """generate_s: wall seconds with at least one generate call running; generated_tokens; calls."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.generate_s = 0.0
            self.generated_tokens = 0
            self.calls = 0
            self._running = 0
            self._since = 0.0

    def timed(self, fn: Callable[[], list[GenerationOutput]]) -> list[GenerationOutput]:
        """Run one generate call `fn()` and count it."""
        with self._lock:
            if self._running == 0:
                self._since = time.perf_counter()
            self._running += 1
        outputs: list[GenerationOutput] = []
        try:
            outputs = fn()
            return outputs
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self.generate_s += time.perf_counter() - self._since
                self.generated_tokens += sum(len(o.token_ids) for o in outputs)
                self.calls += 1


def split_generate(wg, prompt_ids: list[list[int]], params: SamplingConfig) -> list[GenerationOutput]:
    """`generate` on every rank of `wg` with an equal contiguous share of the prompts (the rank's share of
    `params.row_seeds` with it); outputs in prompt order."""
    if params.row_seeds is None:
        return wg.generate(prompt_ids, params)
    if len(params.row_seeds) != len(prompt_ids):
        raise ValueError(f"[rollout] row_seeds has {len(params.row_seeds)} seeds for {len(prompt_ids)} prompts")
    rows = list(zip(prompt_ids, params.row_seeds))
    per_rank, _, pad = split_args(Dispatch.DP_COMPUTE_LIST, wg.world_size, (rows,), {})
    args = [([p for p, _ in share], replace(params, row_seeds=tuple(s for _, s in share)))
            for (share,) in per_rank]
    return merge_outputs(Dispatch.DP_COMPUTE_LIST, wg.call_per_rank("generate", args), pad)


class RankRolloutBackend(RolloutBackend):
    """Rank `rank`'s engine of a worker group: `generate` runs there alone with all the prompts it is given.
    Weights, sleep and wake-up go to every rank through the group (the owner's calls), never to one rank."""

    def __init__(self, wg, rank: int, clock: GenerateClock):
        if not 0 <= rank < wg.world_size:
            raise ValueError(f"[rollout] rank must be in [0, {wg.world_size}), got {rank}")
        self.wg, self.rank, self.clock = wg, rank, clock

    def generate(self, prompt_ids: list[list[int]], params: SamplingConfig) -> list[GenerationOutput]:
        outputs = self.clock.timed(lambda: self.wg.call_rank(self.rank, "generate", prompt_ids, params))
        if len(outputs) != len(prompt_ids):
            raise RuntimeError(f"[rollout] rank {self.rank} returned {len(outputs)} outputs for {len(prompt_ids)} "
                               f"prompts")
        return outputs

    def load_weights(self, state_dict) -> None:
        raise RuntimeError(f"[rollout] rank {self.rank}'s replica takes no weights from the driver; the workers "
                           f"sync their engines themselves")
