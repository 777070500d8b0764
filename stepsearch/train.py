"""StepSearch wiring for the veRL-style trainer: the task hooks (``verl.hooks``) named in the config.

    trainer.row_adapter: stepsearch.train.build_row_adapter  # seed rows -> ground_truth, support_docs, question
    trainer.rollout_fn:  stepsearch.train.build_rollout_fn   # the multi-turn search agent (stepsearch.agent)
    trainer.reward_fn:   stepsearch.train.build_reward_fn    # StepSearch token rewards (stepsearch.rewards)

Each factory receives the whole config as a plain dict plus the tokenizer, converts its own sections once into
frozen dataclasses (``AgentConfig``, ``RewardConfig``, ``RetrieverConfig``) and returns the callable the trainer
uses. Validation averages the answer EM/F1 of each row (``RewardResult.score_keys``) per data_source. The reward
callable also carries ``prediction_records(batch, result)``, which the trainer's validation calls to add the
``stepsearch.eval`` row fields (trajectory, record, targets, answer, rounds, ...) to ``predictions/step_N.jsonl``;
``python -m stepsearch.rewards.score`` on that file gives back each row's ``token_rewards`` exactly. Both
callables name their headline metrics for the console line (``console_metrics``).
``python -m stepsearch.train ...`` is the same as ``python -m verl.trainer.main_ppo ...``.
"""
from __future__ import annotations

import dataclasses
import os

from verl.hooks import RewardResult
from verl.protocol import DataProto
from verl.utils.hydra_to_dataclass import RolloutConfig, config_section, to_dataclass_at, yaml_default

__all__ = ["RetrieverConfig", "retriever_config_from", "agent_config_from", "reward_config_from", "build_row_adapter",
           "build_rollout_fn", "build_reward_fn", "check_retriever", "VALIDATION_SCORE_KEYS"]

VALIDATION_SCORE_KEYS = ("em", "f1")
"""Per-sample keys validation averages per data_source (``val/{source}/em``, ``val/{source}/f1``)."""

# Sampling settings live in actor_rollout_ref.rollout (the actor needs the temperature too); the agent takes them.
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens")


@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
    """The ``retriever`` section: how the rollout reaches the retrieval server (stepsearch.search.server)."""
    url: str
    """Base URL, e.g. http://127.0.0.1:8000 (``/retrieve`` is appended)."""
    timeout_s: float = yaml_default("retriever.timeout_s")
    max_retries: int = yaml_default("retriever.max_retries")
    token: str | None = yaml_default("retriever.token")
    """Bearer token of a server started with one; None (unset): read from $STEPSEARCH_RETRIEVAL_TOKEN if set."""

    def __post_init__(self):
        from stepsearch.search.client import TOKEN_ENV

        if not isinstance(self.url, str) or not self.url:
            raise ValueError(f"[retriever] url must be a non-empty string, got {self.url!r}")
        if self.token is None:
            object.__setattr__(self, "token", os.environ.get(TOKEN_ENV) or None)
        object.__setattr__(self, "timeout_s", float(self.timeout_s))
        object.__setattr__(self, "max_retries", int(self.max_retries))

    def client(self):
        from stepsearch.search.client import RetrievalClient

        return RetrievalClient(self.url, timeout_s=self.timeout_s, max_retries=self.max_retries, token=self.token)


def retriever_config_from(config: dict) -> RetrieverConfig:
    """RetrieverConfig from the ``retriever`` section; an unknown key is an error that names it."""
    section = config_section(config, "retriever")
    valid = [f.name for f in dataclasses.fields(RetrieverConfig)]
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise KeyError(f"[retriever] unknown key(s) {unknown}; valid keys: {valid}")
    if "url" not in section:
        raise KeyError("[retriever] url is required (e.g. http://127.0.0.1:8000)")
    return RetrieverConfig(**section)


def agent_config_from(config: dict):
    """AgentConfig from the ``agent`` section plus the sampling keys of ``actor_rollout_ref.rollout``."""
    from stepsearch.agent.agent_config import AgentConfig

    agent = config_section(config, "agent")
    clash = sorted(k for k in _SAMPLING_KEYS if k in agent)
    if clash:
        raise KeyError(f"[agent] {clash} belong in actor_rollout_ref.rollout (the actor uses the same sampling "
                       f"temperature); remove them from the agent section")
    rollout = config_section(config, "actor_rollout_ref.rollout")   # absent keys: AgentConfig's (the YAML's) defaults
    agent.update({k: rollout[k] for k in _SAMPLING_KEYS if k in rollout})
    return AgentConfig.from_dict(agent, where="agent")


def reward_config_from(config: dict):
    from stepsearch.rewards import RewardConfig

    return RewardConfig.from_mapping(config_section(config, "reward"))


def build_row_adapter(config: dict, tokenizer):
    """The row adapter: ``stepsearch.data.row_fields.search_row_fields`` (it needs no settings)."""
    from stepsearch.data.row_fields import search_row_fields

    return search_row_fields


def build_rollout_fn(config: dict, tokenizer):
    """rollout(batch, backend, validate) -> DataProto: the search agent; greedy (seeded) when validating.

    ``agent.mode`` picks the loop: sync (turn by turn for the whole batch) or async (one turn loop per trajectory;
    the trainer's batch backend then runs behind a BatchingEngine, see stepsearch.agent.async_loop)."""
    from stepsearch.agent.dispatch import run_agent

    train_cfg = agent_config_from(config)
    val_cfg = dataclasses.replace(train_cfg, greedy=True,
                                  seed=to_dataclass_at(RolloutConfig, config, "actor_rollout_ref.rollout").seed)
    client = retriever_config_from(config).client()

    def rollout(batch: DataProto, backend, validate: bool) -> DataProto:
        return run_agent(batch, backend, client, tokenizer, val_cfg if validate else train_cfg)
    rollout.console_metrics = ("search/num_searches/mean",)
    return rollout


def _per_sample(batch: DataProto, i: int, score, token_scores) -> dict:
    """Evaluation fields of trajectory ``i``: its question, response text and gold targets, the record's prediction
    and answer EM/F1 (docs/method.md §6.1, computed once by the rollout), the reward terms, and ``token_rewards``,
    the non-zero entries of this row's token rewards as placed for the trainer ([[response index, value], ...];
    token_scores: (T,) float32)."""
    nt = batch.non_tensor_batch
    gt = nt["ground_truth"][i]
    nonzero = token_scores.nonzero().flatten().tolist()
    return {"question": str(nt["question"][i]), "response": str(nt["response_text"][i]),
            "ground_truth": list(gt.get("target", [])) if isinstance(gt, dict) else gt,
            "prediction": score.answer or "", "em": float(score.answer_em), "f1": float(score.answer_f1),
            "format_ok": bool(score.format_ok), "reward": float(score.overall), "key_reward": float(score.key_reward),
            "info_gain": list(score.info_gain), "redundancy": list(score.redundancy),
            "token_rewards": [[p, float(token_scores[p])] for p in nonzero]}


def build_reward_fn(config: dict, tokenizer):
    """reward(batch) -> RewardResult: StepSearch token rewards (docs/method.md §1) with the ablation flags of ``reward``."""
    from stepsearch.rewards import compute_token_rewards

    cfg = reward_config_from(config)
    last = {"batch": None, "scores": None}  # the scores of the last batch, for its prediction rows

    def reward(batch: DataProto) -> RewardResult:
        scores, metrics, per = compute_token_rewards(batch, cfg)
        last.update(batch=batch, scores=per)
        samples = [_per_sample(batch, i, s, scores[i]) for i, s in enumerate(per)]
        return RewardResult(token_level_scores=scores, metrics=metrics, per_sample=samples,
                            score_keys=VALIDATION_SCORE_KEYS)

    def prediction_records(batch: DataProto, result: RewardResult) -> list[dict]:
        """The ``stepsearch.eval`` rows of a validation batch; the scores of ``reward(batch)`` are reused."""
        return eval_prediction_rows(batch, cfg, last["scores"] if last["batch"] is batch else None)

    reward.prediction_records = prediction_records
    reward.console_metrics = ("reward/overall/mean",)
    return reward


def eval_prediction_rows(batch: DataProto, cfg, scores=None) -> list[dict]:
    """One scored ``stepsearch.eval`` prediction per rollout row (the schema that ``python -m stepsearch.eval
    --from-predictions``, ``python -m stepsearch.rewards.score`` and ``stepsearch.viz`` read, the trajectory
    record included): ``raw_predictions`` + ``score_prediction``. scores: the rows' TrajectoryScores when the
    caller has them (nothing is scored twice), else None."""
    from stepsearch.eval.harness import raw_predictions
    from stepsearch.eval.metrics import score_prediction

    raws = raw_predictions(batch)
    return [score_prediction(raw, cfg, f"validation row {i}", None if scores is None else scores[i])
            for i, raw in enumerate(raws)]


def check_retriever(url: str, timeout_s: float = 10.0, token: str | None = None) -> None:
    """Fail fast with a clear message when the retrieval server does not answer a one-query request.

    token: the server's bearer token; None reads $STEPSEARCH_RETRIEVAL_TOKEN (as ``retriever.token`` does)."""
    from stepsearch.search.client import RetrievalError

    client = RetrieverConfig(url, timeout_s=timeout_s, max_retries=1, token=token).client()
    try:
        hits = client.retrieve(["health check"], topk=1)
    except RetrievalError as exc:
        raise SystemExit(f"[retriever] no answer from {url}: {exc}\nStart it first, e.g. "
                         f"`python -m stepsearch.search.server --index_dir DIR --port 8000`, or set retriever.url")
    if not hits or not hits[0]:
        raise SystemExit(f"[retriever] {url} answered but returned no documents; check its index")


if __name__ == "__main__":
    import sys

    from verl.trainer.main_ppo import main

    if "--check-retriever" in sys.argv:
        check_retriever(sys.argv[sys.argv.index("--check-retriever") + 1])
        print("retriever ok")
    else:
        main()
