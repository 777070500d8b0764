"""The StepSearch agent: the multi-turn search rollout (`stepsearch.agent.loop.run_rollout`).

Light on import: `TAG_TOKENS` is importable without torch; import the loop from `stepsearch.agent.loop`.
"""
from stepsearch.agent.prompts import TAG_TOKENS

__all__ = ["TAG_TOKENS"]
