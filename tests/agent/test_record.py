"""The trajectory record: its views agree with the rollout tensors, it survives JSON, a malformed one is refused
with the field named, and `python -m stepsearch.rewards.score` on the trainer's saved validation predictions gives
back the trainer's token rewards exactly (sync and async loop).

Real parts: stepsearch.train's hooks, RayPPOTrainer.validate with an in-process worker group, RLHFDataset, the
retrieval server; the "model" is the scripted backend (fixed text per question).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stepsearch.agent.loop import run_rollout
from stepsearch.agent.record import RecordError, TrajectoryRecord
from stepsearch.rewards.qa import exact_match, f1_score
from stepsearch.search.client import RetrievalClient
from tests.agent.scripted import ScriptedBackend
from tests.agent.test_loop_scripted import MAX_TURNS, make_batch, respond
from tests.rollout.models import tag_tokenizer
from verl.single_controller.base import Dispatch, LocalWorkerGroup, register
from verl.single_controller.worker import Worker

pytestmark = pytest.mark.timeout(300)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tok():
    return tag_tokenizer()


def test_record_views_match_the_tensors_and_survive_json(tok, retrieval_url):
    from stepsearch.agent.agent_config import AgentConfig

    cfg = AgentConfig(max_turns=MAX_TURNS, topk=3, max_obs_length=2000, max_response_length=3000, max_new_tokens=200)
    out = run_rollout(make_batch(tok, ["alpha", "beta", "gamma"]), ScriptedBackend(tok, respond),
                      RetrievalClient(retrieval_url, timeout_s=60), tok, cfg)
    nt = out.non_tensor_batch
    for i in range(3):
        record = TrajectoryRecord.from_dict(nt["record"][i])
        assert TrajectoryRecord.from_dict(json.loads(json.dumps(nt["record"][i]))) == record
        length = record.response_length
        assert length == int(out.batch["attention_mask"][i, -3000:].sum())
        assert record.model_mask() == out.batch["response_mask"][i, :length].tolist()
        assert record.search_end_positions() == nt["search_end_positions"][i]
        assert record.rounds() == nt["rounds"][i]
        assert record.last_model_position() == max(j for j, m in enumerate(record.model_mask()) if m == 1)
    alpha, beta, gamma = (TrajectoryRecord.from_dict(r) for r in nt["record"])
    assert [t.action for t in alpha.turns] == ["search", "invalid", "search", "answer"]
    assert [t.observation.kind if t.observation else None for t in alpha.turns] == [
        "information", "invalid_action", "information", None]
    assert alpha.turns[2].observation.final_warning and alpha.answer == alpha.prediction == "Roche"
    assert (beta.answer, beta.finished, len(beta.turns)) == ("Paris", True, 1)
    # gamma's forced-turn search is recorded as written and never sent
    assert gamma.turns[-1].action == "search" and gamma.turns[-1].query_sent is None and not gamma.finished
    assert alpha.answer_em is None  # this batch has no ground_truth: nothing to score against


def test_hedged_answer_is_the_last_span(tok):
    """"<answer> A </think><answer> B </answer>" answers B (qa.extract_answer's rule), not both names."""
    from stepsearch.agent.agent_config import AgentConfig

    backend = ScriptedBackend(tok, lambda ctx: "<answer> Bivix </think><answer> Zorai </answer>")
    out = run_rollout(make_batch(tok, ["beta"]), backend, RetrievalClient("http://127.0.0.1:9"), tok,
                      AgentConfig(max_turns=1))
    record = TrajectoryRecord.from_dict(out.non_tensor_batch["record"][0])
    assert (record.answer, record.prediction, record.finished) == ("Zorai", "Zorai", True)


def test_malformed_record_names_the_field():
    good = {"turns": [{"start": 0, "end": 3, "action": "answer", "text": "x"}], "response_length": 3,
            "finished": True}
    assert TrajectoryRecord.from_dict(good).answer is None
    with pytest.raises(RecordError, match=r"rec.turns\[0\].action must be one of"):
        TrajectoryRecord.from_dict({**good, "turns": [{**good["turns"][0], "action": "jump"}]}, "rec")
    with pytest.raises(RecordError, match=r"rec lacks field 'finished'"):
        TrajectoryRecord.from_dict({"turns": [], "response_length": 0}, "rec")
    with pytest.raises(RecordError, match=r"turns\[0\] turn span \[0, 3\) .* response_length 2"):
        TrajectoryRecord.from_dict({**good, "response_length": 2}, "rec")


class ScriptedRolloutWorker(Worker):
    """An actor-rollout worker whose engine is the scripted backend (validation needs only ``generate``)."""

    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.backend = ScriptedBackend(tag_tokenizer(), respond)

    @register(Dispatch.DP_COMPUTE_LIST)
    def generate(self, prompt_ids, params):
        return self.backend.generate(prompt_ids, params)


def _row(i: int, name: str, target: str, keys: list, support_docs: list) -> dict:
    return {"data_source": "toy", "prompt": [{"role": "user", "content": f"Question: {name}?"}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": [target], "search_keys": keys}},
            "extra_info": {"split": "test", "index": i, "support_docs": support_docs}, "id": f"toy_{name}"}


def _dense(pairs, width: int) -> torch.Tensor:
    out = torch.zeros(width, dtype=torch.float32)
    for pos, value in pairs:
        out[pos] = value
    return out


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_score_cli_reproduces_the_trainers_token_rewards(tok, retrieval_url, tmp_path, mode):
    from stepsearch.data.row_fields import search_row_fields
    from stepsearch.train import build_reward_fn, build_rollout_fn
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer, TrainerSpec
    from verl.utils.hydra_to_dataclass import AlgorithmConfig, TrainerConfig
    from verl.utils.dataset import RLHFDataset

    client = RetrievalClient(retrieval_url, timeout_s=60)
    docs = [h["document"] for q in ("Evan Morris lobbyist", "T. B. Joshua") for h in client.retrieve([q], topk=2)[0]]
    gold = [{"title": d["title"], "text": d["text"]} for d in docs]  # so that G^t and P^t are not all zero
    val = tmp_path / "val.parquet"
    pq.write_table(pa.Table.from_pylist([
        _row(0, "alpha", "Roche", [["Evan Morris"], ["Genentech lobbying"]], gold[:2]),
        _row(1, "beta", "the Paris", [["capital of France"]], []),
        _row(2, "gamma", "T. B. Joshua", [["Joshua"]], gold[2:])]), val)
    config = {"actor_rollout_ref": {"rollout": {"temperature": 1.0, "max_new_tokens": 200, "seed": 0}},
              "agent": {"max_turns": MAX_TURNS, "topk": 3, "max_response_length": 3000, "max_obs_length": 2000,
                        "mode": mode},
              "retriever": {"url": retrieval_url, "timeout_s": 60}, "reward": {"step_rewards_on_format_fail": True}}
    spec = TrainerSpec(trainer=TrainerConfig(default_local_dir=str(tmp_path / "run"), total_training_steps=1),
                       algorithm=AlgorithmConfig(adv_estimator="grpo"))
    trainer = RayPPOTrainer(spec, tok, None, RLHFDataset(str(val), tok, 64, 3, shuffle=False, drop_last=False,
                                                             row_adapter=search_row_fields),
                            LocalWorkerGroup(ScriptedRolloutWorker, "actor"), None, build_rollout_fn(config, tok),
                            build_reward_fn(config, tok), tracker=None)
    metrics = trainer.validate()
    dump = tmp_path / "run" / "predictions" / "step_0.jsonl"
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["toy_alpha", "toy_beta", "toy_gamma"]

    scored = tmp_path / "scored.jsonl"
    proc = subprocess.run([sys.executable, "-m", "stepsearch.rewards.score", "--input", str(dump), "--output",
                           str(scored), "--step-rewards-on-format-fail"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rescored = [json.loads(line) for line in scored.read_text().splitlines()]
    width = 3000
    max_delta = max(float((_dense(r["token_rewards"], width) - _dense(s["token_rewards"], width)).abs().max())
                    for r, s in zip(rows, rescored))
    assert max_delta == 0.0
    # not a vacuous check: step rewards on </search> tokens and outcome rewards on the last tokens
    records = [TrajectoryRecord.from_dict(r["record"]) for r in rows]
    positions = [{p for p, _ in r["token_rewards"]} for r in rows]
    assert set(records[0].search_end_positions()) <= positions[0] and len(records[0].search_end_positions()) == 2
    assert any(v != 0 and p in records[0].search_end_positions() for p, v in rows[0]["token_rewards"])
    assert all(r.last_model_position() in p for r, p in zip(records, positions))
    # answer EM/F1: computed once by the rollout, and that is what validation and the CLI report
    for row, record, out in zip(rows, records, rescored):
        answer, targets = record.prediction, row["targets"]
        assert (record.answer_em, record.answer_f1) == (exact_match(answer, targets), f1_score(answer, targets))
        assert row["em"] == out["answer_em"] == record.answer_em and row["f1"] == out["answer_f1"] == record.answer_f1
    assert (records[0].prediction, records[0].answer_em) == ("Roche", 1.0)
    assert (records[1].prediction, records[1].answer_em) == ("Paris", 1.0)  # "the" is dropped by normalization
    assert records[2].prediction is None and records[2].answer_f1 == 0.0
    assert metrics["val/toy/em"] == pytest.approx(2 / 3)
