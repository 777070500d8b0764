"""`run_agent`: the rollout that `AgentConfig.mode` selects (sync: `loop.run_rollout`, async:
`async_loop.run_rollout_async`), for callers that take the mode from a config (trainer hook, eval harness)."""
from __future__ import annotations

from verl.protocol import DataProto
from verl.workers.rollout.base import RolloutBackend

from stepsearch.agent.agent_config import AgentConfig
from stepsearch.search.client import RetrievalClient

__all__ = ["run_agent"]


def run_agent(batch: DataProto, engine, client: RetrievalClient, tokenizer, cfg: AgentConfig) -> DataProto:
    """sync: `engine` must be a batch RolloutBackend; async: an AsyncRolloutEngine, a RolloutBackend (batched by
    BatchingEngine) or a list of them (least-busy placement)."""
    if cfg.mode == "async":
        from stepsearch.agent.async_loop import run_rollout_async

        return run_rollout_async(batch, engine, client, tokenizer, cfg)
    if not isinstance(engine, RolloutBackend):
        raise TypeError(f"[agent] mode 'sync' needs one batch RolloutBackend, got {type(engine).__name__}; "
                        f"set agent.mode=async for per-request engines or several engines")
    from stepsearch.agent.loop import run_rollout

    return run_rollout(batch, engine, client, tokenizer, cfg)
