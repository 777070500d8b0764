"""Scoring and aggregation of evaluation predictions, re-scoring from a file, and the training-curve plot."""
import json

import pytest

from stepsearch.eval.harness import rescore
from stepsearch.eval.metrics import aggregate, markdown_table, score_prediction, support_recall
from stepsearch.rewards import RewardConfig
from stepsearch.viz.curves import plot_training_curves, read_metrics

G1 = {"id": "w1", "title": "Sugok", "text": "The mother of Sugok is Kiba."}
G2 = {"id": "w2", "title": "Kiba", "text": "The rival of Kiba is Nathi."}
X = {"id": "w3", "title": "Kiba", "text": "The mentor of Kiba is Zel."}


def raw(i, answer, rounds, source="synthetic_world", gold=(G1, G2)):
    traj = "".join(f"<search> {r['query']} </search>\n\n<information> x </information>\n\n" for r in rounds) + answer
    return {"id": f"q{i}", "data_source": source, "question": "Who is the rival of the mother of Sugok?",
            "trajectory": traj, "targets": ["Nathi"], "search_keys": [], "support_docs": list(gold),
            "rounds": rounds, "num_turns": len(rounds) + 1, "num_searches": len(rounds), "num_tokens": 10 * (i + 1),
            "finished": True}


def test_support_recall_by_id_and_by_text():
    assert support_recall([{"docs": [G1, X]}], [G1, G2]) == 0.5
    # a gold doc without id still matches the retrieved corpus row by normalized title + text
    assert support_recall([{"docs": [G1]}], [{"title": "Sugok", "text": "the mother of Sugok is Kiba"}]) == 1.0
    assert support_recall([], []) is None


def test_score_prediction_values():
    p = score_prediction(raw(0, "<answer> Nathi Kiba </answer>", [{"query": "mother of Sugok", "docs": [G1, X]}]),
                         RewardConfig())
    assert p["answer"] == "Nathi Kiba" and p["em"] == 0.0 and p["cover_em"] == 1.0
    assert p["f1"] == pytest.approx(0.6667)            # P = 1/2, R = 1/1 -> 2·0.5·1/1.5 = 0.6667
    assert p["format_ok"] and p["support_recall"] == 0.5
    r = p["rounds"][0]
    assert r["doc_ids"] == ["w1", "w3"] and r["gold_hits"] == [True, False]
    assert r["redundancy"] == 0.0 and 0.0 < r["info_gain"] <= 1.0
    assert r["step_reward"] == pytest.approx(0.6 * (r["info_gain"] - r["redundancy"]), abs=1e-9)
    bad = score_prediction(raw(1, "<answer> Nathi", []), RewardConfig())
    assert not bad["format_ok"] and bad["answer"] == "" and bad["overall"] == -1.0


def test_missing_field_names_the_prediction():
    row = raw(0, "<answer> a </answer>", [])
    del row["targets"]
    with pytest.raises(KeyError, match=r"q0.*targets"):
        score_prediction(row, RewardConfig(), "q0")


def test_aggregate_per_source_and_table():
    preds = [score_prediction(p, RewardConfig()) for p in (
        raw(0, "<answer> Nathi </answer>", [{"query": "a", "docs": [G1]}, {"query": "b", "docs": [G2]}]),
        raw(1, "<answer> Zel </answer>", [{"query": "a", "docs": [G1]}]),
        raw(2, "<answer> Nathi </answer>", [], source="other", gold=()))]
    agg = aggregate(preds)
    assert list(agg) == ["other", "synthetic_world", "all"]
    sw = agg["synthetic_world"]
    assert sw["n"] == 2 and sw["em"] == 0.5 and sw["num_searches"] == 1.5 and sw["num_tokens"] == 15.0
    assert sw["support_recall"] == 0.75                 # (2/2 + 1/2) / 2
    assert agg["other"]["support_recall"] is None       # no gold docs known
    assert agg["all"]["em"] == pytest.approx(0.6667)    # 2 of 3, rounded to 4 decimals
    table = markdown_table(agg)
    assert "| other | 1 | 1.000 |" in table and "| – |" in table


def test_rescore_from_predictions_is_deterministic(tmp_path):
    preds = [score_prediction(raw(0, "<answer> Nathi </answer>", [{"query": "a", "docs": [G1]}]), RewardConfig())]
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "predictions.jsonl", "w") as f:
        f.write(json.dumps(preds[0]) + "\n")
    json.dump({"model_path": "/m", "index_manifest_sha256": "abc", "per_source": {}}, open(src / "summary.json", "w"))
    s1 = rescore(str(src / "predictions.jsonl"), str(tmp_path / "a"))
    s2 = rescore(str(src / "predictions.jsonl"), str(tmp_path / "b"))
    assert s1["model_path"] == "/m" and s1["index_manifest_sha256"] == "abc"
    assert (tmp_path / "a" / "summary.json").read_text().replace("/a/", "/") == \
        (tmp_path / "b" / "summary.json").read_text().replace("/b/", "/")
    assert s1["per_source"]["all"]["em"] == 1.0


def test_training_curves_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward/info_gain/mean": 0.1 * s, "reward/overall/mean": 0.05 * s,
             "response_length/mean": 40 + s, "search/num_searches/mean": 2.0, "val/synthetic_world/em": 0.1 * s}
            for s in range(1, 6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    keys = plot_training_curves(read_metrics(str(path)), str(tmp_path / "c.png"))
    assert set(keys) == {"reward/info_gain/mean", "reward/overall/mean", "response_length/mean",
                         "search/num_searches/mean", "val/synthetic_world/em"}
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(str(path))
