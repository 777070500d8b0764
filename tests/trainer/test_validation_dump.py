"""The trainer's validation dump (predictions/step_N.jsonl) through the real StepSearch hooks: its rows carry the
stepsearch.eval schema, so `python -m stepsearch.eval --from-predictions` and the stepsearch.viz report read them.

Real parts: RayPPOTrainer.validate, RLHFDataset, stepsearch.train's rollout and reward hooks, the retrieval server
(`retrieval_url`), an in-process worker group. The "model" is the scripted backend of tests/agent (fixed text).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepsearch.search.client import RetrievalClient
from tests.agent.scripted import ScriptedBackend
from tests.rollout.models import tag_tokenizer
from verl.single_controller.base import Dispatch, LocalWorkerGroup, register
from verl.single_controller.worker import Worker

pytestmark = pytest.mark.timeout(300)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def respond(context: str) -> str:
    if "Question: beta" in context:
        return "<answer> Paris </answer>"
    if "<information>" in context:
        return "<answer> Roche </answer>"
    return "<search> Genentech lobbying </search>"


class ScriptedRolloutWorker(Worker):
    """An actor-rollout worker whose engine is the scripted backend (only ``generate`` is needed to validate)."""

    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.backend = ScriptedBackend(tag_tokenizer(), respond)

    @register(Dispatch.DP_COMPUTE_LIST)
    def generate(self, prompt_ids, params):
        return self.backend.generate(prompt_ids, params)


def _row(i: int, name: str, target: str, support_docs: list) -> dict:
    return {"data_source": "toy", "prompt": [{"role": "user", "content": f"Question: {name}?"}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": [target], "search_keys": [["Genentech"]]}},
            "extra_info": {"split": "test", "index": i, "support_docs": support_docs}, "id": f"toy_{name}"}


def test_validation_dump_rows_are_eval_and_viz_rows(retrieval_url, tmp_path):
    from stepsearch.train import build_reward_fn, build_rollout_fn
    from stepsearch.viz.report import render_html
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer, TrainerSpec
    from verl.utils.hydra_to_dataclass import AlgorithmConfig, TrainerConfig
    from stepsearch.data.row_fields import search_row_fields
    from verl.utils.dataset import RLHFDataset

    tok = tag_tokenizer()
    first = RetrievalClient(retrieval_url, timeout_s=60).retrieve(["Genentech lobbying"], topk=3)[0][0]["document"]
    gold = {"title": first["title"], "text": first["text"]}  # alpha's first retrieved doc is its gold doc
    val = tmp_path / "val.parquet"
    pq.write_table(pa.Table.from_pylist([_row(0, "alpha", "Roche", [gold]), _row(1, "beta", "London", [])]), val)
    config = {"actor_rollout_ref": {"rollout": {"temperature": 1.0, "max_new_tokens": 64, "seed": 0}},
              "agent": {"max_turns": 2, "topk": 3, "max_response_length": 1500, "max_obs_length": 600},
              "retriever": {"url": retrieval_url, "timeout_s": 60}, "reward": {}}
    spec = TrainerSpec(trainer=TrainerConfig(default_local_dir=str(tmp_path / "run"), total_training_steps=1),
                       algorithm=AlgorithmConfig(adv_estimator="grpo"), rollout_n=2)
    trainer = RayPPOTrainer(spec, tok, None, RLHFDataset(str(val), tok, 64, 2, shuffle=False, drop_last=False,
                                                             row_adapter=search_row_fields),
                            LocalWorkerGroup(ScriptedRolloutWorker, "actor"), None, build_rollout_fn(config, tok),
                            build_reward_fn(config, tok), tracker=None)
    metrics = trainer.validate()
    assert metrics["val/toy/em"] == pytest.approx(0.5) and metrics["val/all/n"] == 2.0
    dump = tmp_path / "run" / "predictions" / "step_0.jsonl"
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    alpha, beta = rows
    # The trainer's fields stay ...
    assert (alpha["id"], alpha["ground_truth"], alpha["prediction"], alpha["em"]) == (
        "toy_alpha", ["Roche"], "Roche", 1.0)
    assert alpha["question"].count("Question: alpha?") == 1  # the prompt text, as before
    # ... and the eval schema's are there, consistent with them.
    assert alpha["trajectory"] == alpha["response"] and alpha["targets"] == ["Roche"] and alpha["answer"] == "Roche"
    assert [r["query"] for r in alpha["rounds"]] == ["Genentech lobbying"] and len(alpha["rounds"][0]["docs"]) == 3
    assert alpha["rounds"][0]["gold_hits"] == [True, False, False] and alpha["support_recall"] == 1.0
    assert (alpha["num_searches"], alpha["num_turns"], alpha["finished"]) == (1, 2, True)
    assert (beta["answer"], beta["targets"], beta["rounds"], beta["em"]) == ("Paris", ["London"], [], 0.0)
    assert beta["support_recall"] is None  # no gold docs

    out = tmp_path / "rescored"
    proc = subprocess.run([sys.executable, "-m", "stepsearch.eval", "--from-predictions", str(dump), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_source"]["all"]["n"] == 2 and summary["per_source"]["all"]["em"] == 0.5
    assert summary["per_source"]["toy"]["support_recall"] == 1.0 and summary["per_source"]["all"]["num_searches"] == 0.5

    page = render_html(rows)
    data = json.loads(page.split("<script type='application/json' id='data'>")[1].split("</script>")[0]
                      .replace("<\\/", "</"))
    assert [(d["id"], d["answer"], d["targets"], len(d["rounds"])) for d in data] == [
        ("toy_alpha", "Roche", ["Roche"], 1), ("toy_beta", "Paris", ["London"], 0)]
    assert data[0]["rounds"][0]["query"] == "Genentech lobbying" and data[0]["rounds"][0]["gold_hits"][0] is True
    viz = subprocess.run([sys.executable, "-m", "stepsearch.viz", "--predictions", str(dump), "--out",
                          str(tmp_path / "report.html")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert viz.returncode == 0 and "2 questions" in viz.stdout, viz.stderr
