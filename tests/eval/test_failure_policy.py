"""Issue 19: evaluation must not report a plausible score when the retriever died. Every output counts the
questions whose rollout had a failed retrieval; past --max_retrieval_failures (default 0) the run fails loudly.

The slow test kills a real retrieval server after the first batch of a real `python -m stepsearch.eval` run (the
tester's case: exit 0 and EM 0.445 with 104 of 200 trajectories holding the error text)."""
import json
import logging
import os

import pytest

from stepsearch.eval.__main__ import main as eval_main
from stepsearch.eval.harness import RetrievalFailuresExceeded, rescore
from stepsearch.eval.metrics import score_prediction
from stepsearch.rewards import RewardConfig
from stepsearch.search.testing import start_retrieval_server
from tests.eval.test_metrics import G1, raw


def _predictions(tmp_path, errors_per_row):
    rows = []
    for i, errors in enumerate(errors_per_row):
        row = raw(i, "<answer> Nathi </answer>", [{"query": "a", "docs": [G1]}], source="s" if i < 2 else "t")
        rows.append({**row, "retrieval_errors": errors})
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(score_prediction(r, RewardConfig())) + "\n" for r in rows))
    return str(path)


def test_rescore_counts_failures_and_fails_past_the_threshold(tmp_path):
    path = _predictions(tmp_path, [[], ["retrieval failed after 4 tries"], [], ["x", "y"]])
    with pytest.raises(RetrievalFailuresExceeded, match=r"2 of 4 questions had a retrieval that failed.*"
                                                        r"--max_retrieval_failures 0"):
        rescore(path, str(tmp_path / "a"))  # the default: any failure fails the run
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())  # the outputs are still written
    assert summary["retrieval_failures"] == 2
    assert [summary["per_source"][k]["retrieval_failures"] for k in ("s", "t", "all")] == [1, 1, 2]
    assert "| all | 4 |" in (tmp_path / "a" / "metrics.md").read_text()
    assert "Questions with a failed retrieval: 2" in (tmp_path / "a" / "metrics.md").read_text()
    assert rescore(path, str(tmp_path / "b"), max_retrieval_failures=2)["retrieval_failures"] == 2
    with pytest.raises(SystemExit, match="2 of 4 questions"):  # the CLI: a non-zero exit with the reason
        eval_main(["--from-predictions", path, "--out", str(tmp_path / "c"), "--max_retrieval_failures", "1"])
    clean = _predictions(tmp_path, [[], []])
    assert eval_main(["--from-predictions", clean, "--out", str(tmp_path / "d")])["retrieval_failures"] == 0


class _KillAfterFirstBatch(logging.Handler):
    """Kills the server when the harness logs that batch 1 is done: a retriever that dies partway through."""

    def __init__(self, server):
        super().__init__()
        self.server = server

    def emit(self, record):
        if "batch 1/" in record.getMessage():
            self.server.kill()


@pytest.mark.slow  # its own retrieval server (MiniLM load: tens of seconds on the shared 2-core machine)
@pytest.mark.timeout(600)
def test_server_killed_mid_eval_fails_the_run(world_stack, tmp_path):
    server = start_retrieval_server(world_stack.index_dir)
    handler = _KillAfterFirstBatch(server)
    harness_log = logging.getLogger("stepsearch.eval.harness")
    old_level = harness_log.level
    harness_log.setLevel(logging.INFO)  # pytest's root logger stays at WARNING
    harness_log.addHandler(handler)
    out = tmp_path / "killed"
    try:
        with pytest.raises(SystemExit) as exc:
            eval_main(["--data", os.path.join(world_stack.world_dir, "test.parquet"), "--model", world_stack.model_dir,
                       "--retriever_url", server.url, "--out", str(out), "--backend", "scripted",
                       "--max_prompt_length", "96", "--max_new_tokens", "16", "--max_response_length", "512",
                       "--batch_size", "4"])
    finally:
        harness_log.removeHandler(handler)
        harness_log.setLevel(old_level)
        server.kill()
    # 12 questions in batches of 4: batch 1 ran against the live server, every question of batch 2 searches at
    # its first turn and fails, 4 > 0 -> generation stops; batch 3 never runs.
    assert "4 of 8 questions had a retrieval that failed" in str(exc.value.code)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["retrieval_failures"] == 4 and summary["num_predictions"] == 8 and summary["stopped_early"]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [bool(p["retrieval_errors"]) for p in preds] == [False] * 4 + [True] * 4
    assert all("failed after" in e and server.url in e for p in preds[4:] for e in p["retrieval_errors"])
    assert "generation stopped early" in (out / "metrics.md").read_text()
