"""The StepSearch agent: the multi-turn search rollout, sync (`stepsearch.agent.loop.run_rollout`) or async
(`stepsearch.agent.async_loop.run_rollout_async`), and its per-trajectory record (`stepsearch.agent.record`).

Light on import: `TAG_TOKENS` is importable without torch, and so is the record module (the rewards read it);
import the loops from their modules.
"""
from stepsearch.agent.tags import TAG_TOKENS

__all__ = ["TAG_TOKENS"]
