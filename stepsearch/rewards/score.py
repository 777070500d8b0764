"""Re-score saved rollouts: ``python -m stepsearch.rewards.score --input IN.jsonl --output OUT.jsonl [--skip-bad]``.

Input row, either shape:
  - {"response": str, "ground_truth": {"target": [...], "search_keys": [[...], ...], "sub_answers"?},
     "support_docs": [str | {"paragraph_text"|"text", "title"?}, ...],
     "record": {...} (optional: the rollout's trajectory record), "rounds": [{"query", "docs"}] (optional)}
  - a saved prediction (``predictions.jsonl`` of ``python -m stepsearch.eval``, ``predictions/step_N.jsonl`` of the
    trainer): {"trajectory": str, "targets": [...], "search_keys", "sub_answers", "support_docs", "record"}.
With a ``record`` the rounds, the answer scores and the reward positions come from it (never from the text), and
the output carries ``token_rewards``, the trainer's token rewards of that row (values before the trainer's float32
cast). Without one, ``rounds`` (else the ``<information>`` blocks of the text) are scored and no positions exist.
Output row: {"line", "id" (when the input has one), "answer", "answer_f1", "answer_em", "format_ok", "key_reward",
             "info_gain": [...], "redundancy": [...], "step_rewards": [...], "overall",
             "token_rewards": [[response index, value], ...] (rows with a record)}
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from stepsearch.data.io import DataError, atomic_path, decode_utf8

from stepsearch.agent.record import TrajectoryRecord

from .reward_config import ABLATIONS, FORMAT_CHECKS, FORMAT_GATES, RewardConfig
from .trajectory_score import TrajectoryScore, reward_metrics, score_record, score_trajectory, sparse_token_rewards

__all__ = ["BadRowError", "ScoreSummary", "ScoreInput", "parse_row", "score_row", "score_file", "main"]


class BadRowError(ValueError):
    """A row of the input file that cannot be scored; the message starts with FILE:LINE."""


@dataclass
class ScoreSummary:
    num_scored: int = 0
    bad_lines: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def _check_rounds(rounds: Any) -> list[dict]:
    if not isinstance(rounds, list):
        raise ValueError(f"'rounds' must be a list of {{'query', 'docs'}} objects, got {type(rounds).__name__}")
    for t, rnd in enumerate(rounds):
        if not isinstance(rnd, Mapping) or not isinstance(rnd.get("docs"), list):
            raise ValueError(f"rounds[{t}] must be an object with a 'docs' list, got {rnd!r}")
    return rounds


@dataclass(frozen=True)
class ScoreInput:
    """The fields of one input row that scoring reads."""
    response: str
    ground_truth: Mapping
    support_docs: list
    rounds: list[dict] | None = None
    record: TrajectoryRecord | None = None


def _ground_truth(row: Mapping) -> Mapping:
    """``ground_truth`` as a dict with ``target``: the row's own dict, else built from a prediction's ``targets``,
    ``search_keys`` and ``sub_answers`` (the trainer's prediction rows hold ``ground_truth`` as the target list)."""
    ground_truth = row.get("ground_truth")
    if isinstance(ground_truth, Mapping) and "target" in ground_truth:
        return ground_truth
    if isinstance(row.get("targets"), list):
        return {"target": row["targets"], "search_keys": row.get("search_keys") or [],
                "sub_answers": row.get("sub_answers") or []}
    raise ValueError(f"field 'ground_truth' must be an object with 'target' (a list of answers), or the row needs "
                     f"'targets' (a saved prediction); got ground_truth={ground_truth!r}")


def parse_row(row: Any) -> ScoreInput:
    """The scoring fields of one input row (either shape of the module doc); ValueError names the bad field."""
    if not isinstance(row, Mapping):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    response = row.get("response") if isinstance(row.get("response"), str) else row.get("trajectory")
    if not isinstance(response, str):
        raise ValueError(f"field 'response' (or a prediction's 'trajectory') must be a string, got "
                         f"{row.get('response', row.get('trajectory'))!r}")
    support_docs = row.get("support_docs", [])
    if not isinstance(support_docs, list):
        raise ValueError(f"field 'support_docs' must be a list, got {type(support_docs).__name__}")
    record = TrajectoryRecord.from_dict(row["record"], "field 'record'") if row.get("record") is not None else None
    rounds = _check_rounds(row["rounds"]) if row.get("rounds") is not None else None
    return ScoreInput(response, _ground_truth(row), support_docs, rounds, record)


def score_row(parsed: ScoreInput, cfg: RewardConfig) -> tuple[TrajectoryScore, dict]:
    """(score, output fields) of one parsed row; with a record the output adds ``token_rewards``."""
    if parsed.record is None:
        score = score_trajectory(parsed.response, parsed.rounds, parsed.ground_truth, parsed.support_docs, cfg)
        return score, score.to_dict()
    record = parsed.record
    score = score_record(record, parsed.response, parsed.ground_truth, parsed.support_docs, cfg)
    sparse = sparse_token_rewards(score.step_rewards, record.search_end_positions(), record.last_model_position(),
                                  score.overall)
    return score, {**score.to_dict(), "token_rewards": [[pos, sparse[pos]] for pos in sorted(sparse)]}


def _score_line(text: str, where: str, cfg: RewardConfig) -> tuple[TrajectoryScore, dict, Mapping]:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRowError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    try:
        return (*score_row(parse_row(row), cfg), row)
    except (KeyError, TypeError, ValueError) as err:
        raise BadRowError(f"{where}: {err}") from None


def score_file(input_path: str, output_path: str, cfg: RewardConfig, skip_bad: bool = False) -> ScoreSummary:
    """Score every non-blank line of ``input_path`` into ``output_path`` (written atomically).

    A bad row (also one that is not UTF-8) raises :class:`BadRowError` naming FILE:LINE (nothing is written), or
    with ``skip_bad`` is counted in ``ScoreSummary.bad_lines`` and left out of the output. An input with no rows,
    or with ``skip_bad`` no good row, raises BadRowError too (an empty output is never a success).
    """
    summary, scores, rows_seen = ScoreSummary(), [], 0
    with atomic_path(output_path, suffix=".jsonl") as tmp_path, open(input_path, "rb") as fin, \
            open(tmp_path, "w", encoding="utf-8") as fout:
        for line_no, raw in enumerate(fin, start=1):
            if not raw.strip():
                continue
            rows_seen += 1
            try:
                try:
                    text = decode_utf8(raw, input_path, line_no)
                except DataError as err:  # a binary or otherwise non-UTF-8 line: a bad row with file:line
                    raise BadRowError(str(err)) from None
                score, out, row = _score_line(text, f"{input_path}:{line_no}", cfg)
            except BadRowError:
                if not skip_bad:
                    raise
                summary.bad_lines.append(line_no)
                continue
            out = {"line": line_no, **({"id": row["id"]} if "id" in row else {}), **out}
            fout.write(json.dumps(out, ensure_ascii=False) + "\n")
            scores.append(score)
        if not rows_seen:
            raise BadRowError(f"{input_path}: no rows (the file is empty or holds only blank lines)")
        if not scores:  # only with skip_bad: every row was bad
            raise BadRowError(f"{input_path}: all {len(summary.bad_lines)} rows were bad and skipped (--skip-bad); "
                              f"nothing left to score (lines {summary.bad_lines[:20]})")
    summary.num_scored = len(scores)
    summary.metrics = reward_metrics(scores)
    return summary


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stepsearch.rewards.score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL file of saved rollouts")
    p.add_argument("--output", required=True, help="JSONL file to write (atomically)")
    p.add_argument("--skip-bad", action="store_true", help="count bad rows and go on instead of stopping")
    p.add_argument("--ablation", default="full", choices=sorted(ABLATIONS), help="paper setting (docs/rewards.md)")
    p.add_argument("--format-check", choices=list(FORMAT_CHECKS), help="released (default) or paper")
    p.add_argument("--format-gate", choices=list(FORMAT_GATES),
                   help="released (default: outcome = --format-fail-score) or paper (only r_answer is 0)")
    p.add_argument("--format-fail-score", type=float, help="outcome on a format failure, released gate (default -1)")
    p.add_argument("--answer-metric", choices=["f1", "em"])
    p.add_argument("--key-reward-mode", choices=["max", "latest"])
    p.add_argument("--search-key-coef", type=float, help="gamma_key (default 0.618)")
    p.add_argument("--step-reward-scale", type=float, help="default 0.6")
    p.add_argument("--step-rewards-on-format-fail", action="store_true", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("input", "output", "skip_bad", "ablation") and v is not None}
    cfg = RewardConfig.for_ablation(args.ablation, **overrides)
    try:
        summary = score_file(args.input, args.output, cfg, skip_bad=args.skip_bad)
    except (BadRowError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"scored {summary.num_scored} rows into {args.output}; bad rows skipped: {len(summary.bad_lines)}"
          + (f" (lines {summary.bad_lines[:20]})" if summary.bad_lines else ""), file=sys.stderr)
    print(json.dumps(summary.metrics, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
