"""One trajectory's state and the per-trajectory steps both rollout loops share (sync `loop.py`, async
`async_loop.py`): the rolling context, recording a model turn, planning and appending its observation, finishing
the record. The loops differ only in how they schedule engine and retriever calls.

    traj = Trajectory(prompt=ids)
    action = record_turn(traj, engine_output, tokenizer, cfg, forced)        # sampled ids appended, mask 1
    request = plan_observation(traj, action, encoder, cfg, turn)             # warnings appended here
    if request: observe_information(traj, request, hits, block) or observe_retrieval_error(...)
    record = finish_record(traj, targets)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Sequence

from verl.workers.rollout.base import GenerationOutput, SamplingConfig

from stepsearch.agent.actions import Action, parse_action
from stepsearch.agent.agent_config import AgentConfig
from stepsearch.agent.observations import Observation, ObservationEncoder, hits_to_round
from stepsearch.agent.record import ObservationRecord, PassageRecord, TrajectoryRecord, TurnRecord
from stepsearch.rewards.qa import answer_prediction, answer_scores, as_str_list, extract_answer
from stepsearch.search.client import RetrievalError

__all__ = ["RolloutAborted", "Trajectory", "SearchRequest", "request_seed", "sampling_config", "record_turn",
           "plan_observation", "observe_information", "observe_retrieval_error", "check_retrieval_error",
           "finish_record", "targets_of"]

logger = logging.getLogger(__name__)


class RolloutAborted(RuntimeError):
    """Raised with on_retrieval_error="abort" when the retriever fails after the client's retries."""


@dataclass
class Trajectory:
    """One sample's growing response. `response_mask[j]` is 1 for model tokens, 0 for observations; `turns` is the
    record being built (see stepsearch.agent.record)."""

    prompt: list[int]
    response: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    num_truncated_contexts: int = 0
    finished: bool = False
    done: bool = False
    timing: dict = field(default_factory=lambda: {"generate_s": 0.0, "retrieve_s": 0.0})
    """Seconds this trajectory waited for the engine and the retriever; end_s: when it ended, from the rollout's
    start (the non-tensor ``rollout_timing``; not part of the record, which is deterministic)."""

    def context(self, max_len: int) -> list[int]:
        """The rolling context: the last `max_len` tokens of prompt + response (the oldest are dropped)."""
        ids = self.prompt + self.response
        if len(ids) > max_len:
            self.num_truncated_contexts += 1
        return ids[-max_len:]

    def room(self, cfg: AgentConfig) -> int:
        """Response tokens left in the budget."""
        return cfg.max_response_length - len(self.response)

    def append(self, ids: list[int], is_model: bool, log_probs: list[float] | None = None) -> None:
        self.response.extend(ids)
        self.response_mask.extend([int(is_model)] * len(ids))
        self.log_probs.extend(log_probs if log_probs is not None else [0.0] * len(ids))


@dataclass(frozen=True)
class SearchRequest:
    """A search turn that gets an observation: the query to send (cut to max_query_chars) and the cap of its
    observation in tokens; final_warning: the final-turn warning follows the block (last loop turn)."""

    query: str
    cap: int
    final_warning: bool


def request_seed(cfg: AgentConfig, row: int, turn: int) -> int | None:
    """The sampling seed of turn `turn` of row `row` (both loops): cfg.seed + row·(max_turns + 1) + turn, distinct
    for every (row, turn) of a batch and independent of the other rows. None when cfg.seed is None."""
    return None if cfg.seed is None else cfg.seed + row * (cfg.max_turns + 1) + turn


def sampling_config(cfg: AgentConfig, max_new_tokens: int, seed: int | None,
                    row_seeds: tuple[int, ...] | None = None) -> SamplingConfig:
    """One engine call's settings; seed: the call's seed, row_seeds: one per prompt (SamplingConfig.row_seeds)."""
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k, stop=cfg.stop, greedy=cfg.greedy, logprobs=cfg.logprobs, seed=seed,
                          row_seeds=row_seeds)


def record_turn(traj: Trajectory, out: GenerationOutput, tokenizer, cfg: AgentConfig, forced: bool) -> Action:
    """Append the model's ids (mask 1, cut to the response budget), parse the action they spell and record the
    turn. The trajectory is done after an answer, after the forced turn, or when the budget is full."""
    room = traj.room(cfg)
    ids = out.token_ids[:room]
    start = len(traj.response)
    traj.append(ids, is_model=True, log_probs=None if out.log_probs is None else out.log_probs[:room])
    text = tokenizer.decode(ids, skip_special_tokens=False)
    action = parse_action(text)
    # an answer is the last <answer> span of the turn that holds no other <answer> (qa.extract_answer, the one rule:
    # "<answer> A </think><answer> B </answer>" answers B, so hedging over two names earns nothing)
    written = action.content
    if action.kind == "answer":
        last = extract_answer(text)
        written = action.content if last is None else last
    traj.turns.append(TurnRecord(start=start, end=len(traj.response), action=action.kind, text=written))
    if action.kind == "answer":
        traj.done = traj.finished = True
    elif forced or len(traj.response) >= cfg.max_response_length:
        traj.done = True  # forced turn: searches are not executed; or no budget left for an observation
    return action


def _set_last_turn(traj: Trajectory, **changes) -> None:
    traj.turns[-1] = replace(traj.turns[-1], **changes)


def _append_observation(traj: Trajectory, obs: Observation, kind: str, final_warning: bool, cfg: AgentConfig,
                        **fields) -> None:
    """Append one observation (mask 0), record it on the last turn; the episode ends once the budget is full."""
    start = len(traj.response)
    traj.append(obs.token_ids, is_model=False)
    _set_last_turn(traj, observation=ObservationRecord(kind=kind, start=start, end=len(traj.response),
                                                       final_warning=final_warning, truncated=obs.truncated,
                                                       **fields))
    if len(traj.response) >= cfg.max_response_length:
        traj.done = True


def plan_observation(traj: Trajectory, action: Action, encoder: ObservationEncoder, cfg: AgentConfig,
                     turn: int) -> SearchRequest | None:
    """After a (non-forced) turn: append the invalid-action warning, end a search that has no room for an
    <information> block, or return the search to run. None when nothing is to be retrieved."""
    if traj.done:
        return None
    last = turn == cfg.max_turns - 1  # the final warning follows a search or an invalid action
    cap = min(cfg.max_obs_length, traj.room(cfg))
    if action.kind == "invalid":
        _append_observation(traj, encoder.invalid_action(cap, final_warning=last), "invalid_action", last, cfg)
        return None
    if action.kind != "search":
        return None
    if cap < encoder.information_overhead(final_warning=last) + 1:
        traj.done = True  # no room left for an <information> block: the episode ends unfinished
        return None
    # One over-long query would get a batched request a 422: cut it to the server's cap. The content is stripped
    # and non-empty, so a cut query is never blank.
    query = action.content if len(action.content) <= cfg.max_query_chars \
        else action.content[:cfg.max_query_chars].rstrip()
    _set_last_turn(traj, query_sent=query)
    return SearchRequest(query=query, cap=cap, final_warning=last)


def observe_information(traj: Trajectory, request: SearchRequest, hits: Sequence[dict], block: Observation,
                        cfg: AgentConfig) -> None:
    """Append the <information> block of a search (built by ObservationEncoder.information for this request) and
    record the docs as shown."""
    shown = hits_to_round(request.query, hits, block.shown_chars)
    passages = tuple(PassageRecord(**d) for d in shown["docs"])
    _append_observation(traj, block, "information", request.final_warning, cfg, passages=passages,
                        hidden_passages=shown["hidden_docs"])


def observe_retrieval_error(traj: Trajectory, request: SearchRequest, error: RetrievalError,
                            encoder: ObservationEncoder, cfg: AgentConfig) -> None:
    """Append the retrieval-error observation (a warning, not an <information> block: no round, no step reward)."""
    _append_observation(traj, encoder.retrieval_error(request.cap, final_warning=request.final_warning),
                        "retrieval_error", request.final_warning, cfg, error=str(error))


def check_retrieval_error(error: RetrievalError, cfg: AgentConfig, where: str) -> None:
    """With on_retrieval_error="abort" raise RolloutAborted; else log and let the caller observe the error."""
    if cfg.on_retrieval_error == "abort":
        raise RolloutAborted(f"[agent] retrieval failed {where} and on_retrieval_error='abort': {error}") from error
    logger.warning("[agent] retrieval failed %s; error observations: %s", where, error)


def targets_of(ground_truth, where: str) -> list[str] | None:
    """The gold answers of a row's ``ground_truth`` (a dict with ``target``); None when the row has none."""
    if not isinstance(ground_truth, dict) or ground_truth.get("target") is None:
        return None
    return as_str_list(ground_truth["target"], f"{where}.ground_truth.target")


def finish_record(traj: Trajectory, targets: list[str] | None) -> TrajectoryRecord:
    """The trajectory's record; answer EM/F1 are computed here, once, when the targets are known."""
    answer = next((t.text for t in reversed(traj.turns) if t.action == "answer"), None)
    prediction = answer_prediction(answer)
    em, f1 = answer_scores(prediction, targets) if targets is not None else (None, None)
    return TrajectoryRecord(turns=tuple(traj.turns), response_length=len(traj.response), finished=traj.finished,
                            answer=answer, prediction=prediction, answer_em=em, answer_f1=f1,
                            truncated_contexts=traj.num_truncated_contexts)
