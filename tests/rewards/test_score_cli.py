"""The scoring CLI: python -m stepsearch.rewards.score (issue 5 row format, bad rows, --skip-bad)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepsearch.rewards import RewardConfig, format_docs
from stepsearch.rewards.score import BadRowError, score_file

from .reward_cases import wiki_passages

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


def _rows():
    p = wiki_passages()
    g1, g2, x, y = p[100], p[200], p[300], p[400]

    def obs(docs):
        return f"\n\n<information> {format_docs(docs).strip()} </information>\n\n"

    parsed = {   # documents parsed from our <information> format; no ids → title+text identity
        "id": "row-1",
        "response": "<search>q one</search>" + obs([g1, g2, x]) + "<search>q two</search>" + obs([g1, y])
                    + "<answer>Paris</answer>",
        "ground_truth": {"target": ["Paris", "City of Light"], "search_keys": [["q one"], ["q two"]]},
        "support_docs": [{"title": g1["title"], "paragraph_text": g1["text"]}, g2["text"]],
    }
    explicit = {  # explicit rounds with ids; a repeated id is redundant even though its text differs
        "response": "<search>a</search><information>x</information><search>b</search><information>y</information>"
                    "<answer>London</answer>",
        "ground_truth": {"target": ["Paris"]},
        "support_docs": [{"title": "T", "text": g1["text"]}],
        "rounds": [{"query": "a", "docs": [{"id": "7", "title": "T", "text": g1["text"]}]},
                   {"query": "b", "docs": [{"id": "7", "title": "T", "text": "changed"},
                                           {"id": "8", "title": "U", "text": x["text"]}]}],
    }
    return [parsed, explicit]


def _write(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def test_score_file_values(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, _rows(), extra_lines=[""])
    summary = score_file(str(src), str(dst), RewardConfig())
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert summary.num_scored == 2 and summary.bad_lines == []
    a, b = out
    # Row 1: round 1 holds g1 and g2 verbatim → G¹ = 1; round 2 = [g1, y]: g1 seen → P² = 1/2; memory full → G² = 0.
    # Steps: 0.6 · 1 = 0.6 and 0.6 · (0 − 0.5) = −0.3. Answer exact, r_key = (1 + 1)/2 = 1 → 1 + 0.618 = 1.618.
    assert (a["line"], a["id"], a["answer"], a["format_ok"]) == (1, "row-1", "Paris", True)
    assert a["info_gain"] == pytest.approx([1.0, 0.0], abs=1e-9)
    assert a["redundancy"] == pytest.approx([0.0, 0.5])
    assert a["step_rewards"] == pytest.approx([0.6, -0.3], abs=1e-9)
    assert (a["answer_f1"], a["answer_em"], a["key_reward"]) == (1.0, 1.0, 1.0)
    assert a["overall"] == pytest.approx(1.618)
    # Row 2: round 1 doc is the gold text → G¹ = 1; round 2: id 7 repeats → P² = 1/2, G² = 0 → −0.3.
    # Wrong answer, no search_keys → overall 0.
    assert b["info_gain"] == pytest.approx([1.0, 0.0], abs=1e-9)
    assert b["redundancy"] == pytest.approx([0.0, 0.5])
    assert b["step_rewards"] == pytest.approx([0.6, -0.3], abs=1e-9)
    assert b["overall"] == 0.0 and "id" not in b


def test_bad_row_names_the_line_and_writes_nothing(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, _rows(), extra_lines=['{"response": "<answer>x</answer>"}'])
    with pytest.raises(BadRowError, match=r"in\.jsonl:3: field 'ground_truth' must be an object"):
        score_file(str(src), str(dst), RewardConfig())
    assert not dst.exists() and os.listdir(tmp_path) == ["in.jsonl"]     # the temp file is gone too


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stepsearch.rewards.score", *args], capture_output=True,
                          text=True, timeout=100, cwd=REPO, env=env)


def test_cli_stops_on_bad_row_and_skip_bad_goes_on(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, _rows()[:1], extra_lines=["{not json", json.dumps({"response": 3, "ground_truth": {"target": []}}),
                                          json.dumps(_rows()[1])])
    proc = _run_cli("--input", str(src), "--output", str(dst))
    assert proc.returncode == 2
    assert f"{src}:2: not valid JSON" in proc.stderr and not dst.exists()

    proc = _run_cli("--input", str(src), "--output", str(dst), "--skip-bad", "--ablation", "ppo")
    assert proc.returncode == 0, proc.stderr
    assert "bad rows skipped: 2 (lines [2, 3])" in proc.stderr
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["line"] for r in out] == [1, 4]
    # the ppo ablation: no step rewards, outcome = answer F1 only
    assert out[0]["step_rewards"] == [] and out[0]["overall"] == 1.0


def test_cli_paper_format_failure_flag(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [{"response": "<search>q</search>", "ground_truth": {"target": ["x"]}}])
    assert _run_cli("--input", str(src), "--output", str(dst), "--format-fail-score", "0").returncode == 0
    assert json.loads(dst.read_text())["overall"] == 0.0
