"""AgentConfig: the rollout loop's settings, a frozen dataclass built once at the trainer/eval boundary.

Defaults come from configs/ppo_trainer.yaml (``agent``; the sampling fields from ``actor_rollout_ref.rollout``),
the one source of defaults (docs/configuration.md); ``greedy``, ``seed`` and ``stop`` exist only here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stepsearch.agent.tags import STOP_STRINGS
from verl.utils.hydra_to_dataclass import yaml_default


@dataclass(frozen=True)
class AgentConfig:
    max_turns: int = yaml_default("agent.max_turns")
    """Loop turns that may search (train.sh: 5); a forced final turn without retrieval follows."""
    topk: int = yaml_default("agent.topk")
    """Documents per search."""
    max_context_length: int = yaml_default("agent.max_context_length")
    """Rolling context fed to the engine each turn, left-truncated to its last this-many tokens."""
    max_new_tokens: int = yaml_default("actor_rollout_ref.rollout.max_new_tokens")
    """New tokens per turn (the released `max_response_length`, vLLM `max_tokens`)."""
    max_response_length: int = yaml_default("agent.max_response_length")
    """Total response tokens (model turns + observations); also T, the width of `responses`."""
    max_obs_length: int = yaml_default("agent.max_obs_length")
    """Tokens per observation; a cut keeps `</information>` (the tags stay balanced)."""
    temperature: float = yaml_default("actor_rollout_ref.rollout.temperature")
    top_p: float = yaml_default("actor_rollout_ref.rollout.top_p")
    """Paper: 1.0; released yaml default: 0.95."""
    top_k: int = yaml_default("actor_rollout_ref.rollout.top_k")
    greedy: bool = False
    """Validation/evaluation decoding."""
    seed: int | None = None
    """Base seed of the sampling. Both loops: turn s of row i uses seed + i·(max_turns + 1) + s
    (`trajectory.request_seed`), its own request seed on a per-request engine (vLLM), whatever else is in the call
    or in flight; an engine with one RNG per call (HF, sync loop) seeds turn s's call with seed + s. None: the
    engine's own RNG."""
    logprobs: bool = yaml_default("agent.logprobs")
    """Return `rollout_log_probs` from the engine."""
    stop: tuple[str, ...] = STOP_STRINGS
    max_query_chars: int = yaml_default("agent.max_query_chars")
    """A search query is cut to its first this-many characters before it is sent (and recorded in `rounds`): the
    server rejects a longer one with a 422 for the turn's whole batched request. The YAML default equals the server's
    default `--max_query_chars`; keep it <= the server's setting."""
    on_retrieval_error: Literal["observe", "abort"] = yaml_default("agent.on_retrieval_error")
    """observe: the sample sees a retrieval-error observation and goes on; abort: raise, failing the batch."""
    mode: Literal["sync", "async"] = yaml_default("agent.mode")
    """sync: turn by turn for the whole batch (stepsearch.agent.loop); async: every trajectory runs its own turns,
    its searches sent as soon as it writes them (stepsearch.agent.async_loop)."""
    max_concurrent_trajectories: int = yaml_default("agent.max_concurrent_trajectories")
    """async: trajectories in flight at once (the others wait to start); bounds engine and retriever load."""

    def __post_init__(self):
        for name in ("max_turns", "topk", "max_context_length", "max_new_tokens", "max_response_length",
                     "max_obs_length", "max_query_chars", "max_concurrent_trajectories"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"[agent] {name} must be an int >= 1, got {value!r}")
        if self.mode not in ("sync", "async"):
            raise ValueError(f"[agent] mode must be 'sync' or 'async', got {self.mode!r}")
        if self.on_retrieval_error not in ("observe", "abort"):
            raise ValueError(f"[agent] on_retrieval_error must be 'observe' or 'abort', "
                             f"got {self.on_retrieval_error!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise TypeError(f"[agent] stop must be a tuple of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))  # a YAML list becomes the tuple it stands for
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"[agent] temperature must be > 0 unless greedy=True, got {self.temperature}")

    @classmethod
    def from_dict(cls, values: dict, where: str = "agent") -> "AgentConfig":
        """Build from a plain dict (a YAML section); unknown keys are an error that lists the valid ones."""
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - valid)
        if unknown:
            raise KeyError(f"[{where}] unknown key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**values)
