"""One structured record per trajectory: what the policy did each turn and what it was shown.

The rollout builds it while it appends tokens, so nothing downstream has to re-parse decoded text to find queries,
documents, answers or reward positions. Rewards, validation metrics, the eval harness, the scoring CLI
(``python -m stepsearch.rewards.score``) and the viewer read it. It travels as a plain dict (``to_dict``; the
non-tensor ``record`` of a rollout batch, the ``record`` field of a saved prediction) and is read back with
``TrajectoryRecord.from_dict``, which names the bad field of a malformed one.

Token spans are ``[start, end)`` indices into the response (the ids after the prompt):

    turn k:  response[start:end]                       the ids the engine sampled (response_mask 1)
             response[observation.start:observation.end]  the observation appended after it (response_mask 0)

This module is a leaf (no stepsearch imports), so ``stepsearch.rewards`` can read records without importing the
agent loop.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping

__all__ = ["ACTION_KINDS", "OBSERVATION_KINDS", "PassageRecord", "ObservationRecord", "TurnRecord",
           "TrajectoryRecord", "RecordError"]

ActionKind = Literal["search", "answer", "invalid"]
ACTION_KINDS = ("search", "answer", "invalid")
ObservationKind = Literal["information", "invalid_action", "retrieval_error"]
OBSERVATION_KINDS = ("information", "invalid_action", "retrieval_error")


class RecordError(ValueError):
    """A record (dict) that does not have the documented shape; the message names the field."""


def _need(d: Any, key: str, types, where: str):
    if not isinstance(d, Mapping):
        raise RecordError(f"{where} must be an object, got {type(d).__name__}")
    if key not in d:
        raise RecordError(f"{where} lacks field '{key}'")
    value = d[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise RecordError(f"{where}.{key} must be {_type_names(types)}, got {value!r}")
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in _as_tuple(types))


def _plain(value):
    """Tuples as lists, recursively (what JSON round-trips to)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _span(d: Mapping, where: str) -> tuple[int, int]:
    start, end = _need(d, "start", int, where), _need(d, "end", int, where)
    if not 0 <= start <= end:
        raise RecordError(f"{where} has span [{start}, {end}); need 0 <= start <= end")
    return start, end


@dataclass(frozen=True)
class PassageRecord:
    """One retrieved document as the observation showed it (its text cut where the observation was cut)."""

    id: str | None
    title: str
    text: str
    truncated: bool = False

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "passage") -> "PassageRecord":
        return cls(id=_need(d, "id", (str, type(None)), where), title=_need(d, "title", str, where),
                   text=_need(d, "text", str, where), truncated=bool(d.get("truncated", False)))


@dataclass(frozen=True)
class ObservationRecord:
    """What the environment appended after a turn (response_mask 0)."""

    kind: ObservationKind
    start: int
    end: int
    """[start, end) in the response; start == end when nothing fitted (a warning over its cap is dropped whole)."""
    final_warning: bool = False
    """The final-turn warning follows it (the last loop turn)."""
    truncated: bool = False
    """Its body was cut to the observation cap (information) or it was dropped for lack of room (warnings)."""
    passages: tuple[PassageRecord, ...] = ()
    """information: the docs shown, in rank order (a doc the cut did not reach is left out)."""
    hidden_passages: int = 0
    """information: retrieved docs the cut left out entirely."""
    error: str | None = None
    """retrieval_error: the client's error message."""

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "observation") -> "ObservationRecord":
        kind = _need(d, "kind", str, where)
        if kind not in OBSERVATION_KINDS:
            raise RecordError(f"{where}.kind must be one of {OBSERVATION_KINDS}, got {kind!r}")
        start, end = _span(d, where)
        passages = d.get("passages") or []
        if not isinstance(passages, (list, tuple)):
            raise RecordError(f"{where}.passages must be a list, got {type(passages).__name__}")
        return cls(kind=kind, start=start, end=end, final_warning=bool(d.get("final_warning", False)),
                   truncated=bool(d.get("truncated", False)),
                   passages=tuple(PassageRecord.from_dict(p, f"{where}.passages[{j}]") for j, p in enumerate(passages)),
                   hidden_passages=int(d.get("hidden_passages", 0)), error=d.get("error"))


@dataclass(frozen=True)
class TurnRecord:
    """One model turn: its sampled span, the action it spelled and the observation that followed (if any)."""

    start: int
    end: int
    """[start, end) of the sampled ids in the response (response_mask 1)."""
    action: ActionKind
    text: str
    """search: the query as the policy wrote it; answer: the answer text; invalid: ""."""
    query_sent: str | None = None
    """search: the query sent to the retriever (``text`` cut to ``max_query_chars``); None when none was sent."""
    observation: ObservationRecord | None = None

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "turn") -> "TurnRecord":
        start, end = _span(d, where)
        action = _need(d, "action", str, where)
        if action not in ACTION_KINDS:
            raise RecordError(f"{where}.action must be one of {ACTION_KINDS}, got {action!r}")
        obs = d.get("observation")
        return cls(start=start, end=end, action=action, text=_need(d, "text", str, where),
                   query_sent=d.get("query_sent"),
                   observation=None if obs is None else ObservationRecord.from_dict(obs, f"{where}.observation"))


@dataclass(frozen=True)
class TrajectoryRecord:
    """A whole trajectory. ``answer_em``/``answer_f1`` are computed once, by the rollout, when it knows the targets."""

    turns: tuple[TurnRecord, ...]
    response_length: int
    """Tokens in the response (model turns + observations), before padding."""
    finished: bool
    """The policy gave an answer."""
    answer: str | None = None
    """The text of the trajectory's answer action (stripped), None without one."""
    prediction: str | None = None
    """The scored prediction: ``answer`` with the "{...}" rule of ``stepsearch.rewards.qa.answer_prediction``."""
    answer_em: float | None = None
    answer_f1: float | None = None
    """EM and 4-decimal F1 of ``prediction`` against the row's targets; None when the rollout had no targets."""
    truncated_contexts: int = 0
    """Turns whose rolling context lost its oldest tokens to ``max_context_length``."""

    # ---- derived views ----------------------------------------------------------------------------------------
    def information_turns(self) -> list[TurnRecord]:
        """The search turns that produced an <information> block, in order (the search rounds)."""
        return [t for t in self.turns if t.observation is not None and t.observation.kind == "information"]

    def rounds(self) -> list[dict]:
        """``[{"query", "docs": [{"id", "title", "text", "truncated"}], "hidden_docs"}]`` per search round, the
        query as sent and the docs as shown (the reward's and the eval's ``rounds``)."""
        return [{"query": t.query_sent, "docs": [asdict(p) for p in t.observation.passages],
                 "hidden_docs": t.observation.hidden_passages} for t in self.information_turns()]

    def search_end_positions(self) -> list[int]:
        """Index of the last sampled token (its ``</search>``) of every search round: where step rewards go."""
        return [t.end - 1 for t in self.information_turns()]

    def last_model_position(self) -> int | None:
        """Index of the last sampled token of the response (where the outcome reward goes); None without one."""
        spans = [t for t in self.turns if t.end > t.start]
        return spans[-1].end - 1 if spans else None

    def model_mask(self) -> list[int]:
        """response_mask over the response: 1 on sampled ids, 0 on observations. Length ``response_length``."""
        mask = [0] * self.response_length
        for t in self.turns:
            mask[t.start:t.end] = [1] * (t.end - t.start)
        return mask

    def retrieval_errors(self) -> list[str]:
        return [t.observation.error or "" for t in self.turns
                if t.observation is not None and t.observation.kind == "retrieval_error"]

    @property
    def num_searches(self) -> int:
        return len(self.information_turns())

    @property
    def num_valid_actions(self) -> int:
        return sum(1 for t in self.turns if t.action != "invalid")

    # ---- (de)serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "record") -> "TrajectoryRecord":
        if isinstance(d, TrajectoryRecord):
            return d
        turns = _need(d, "turns", (list, tuple), where)
        record = cls(turns=tuple(TurnRecord.from_dict(t, f"{where}.turns[{k}]") for k, t in enumerate(turns)),
                     response_length=_need(d, "response_length", int, where),
                     finished=_need(d, "finished", bool, where),
                     answer=d.get("answer"), prediction=d.get("prediction"),
                     answer_em=d.get("answer_em"), answer_f1=d.get("answer_f1"),
                     truncated_contexts=int(d.get("truncated_contexts", 0)))
        record.check(where)
        return record

    def check(self, where: str = "record") -> None:
        """Spans in order, inside the response and not overlapping; raises RecordError naming the turn."""
        pos = 0
        for k, t in enumerate(self.turns):
            spans = [("turn", t.start, t.end)]
            if t.observation is not None:
                spans.append(("observation", t.observation.start, t.observation.end))
            for name, s, e in spans:
                if s < pos or e > self.response_length:
                    raise RecordError(f"{where}.turns[{k}] {name} span [{s}, {e}) overlaps the previous span or "
                                      f"passes response_length {self.response_length}")
                pos = e
