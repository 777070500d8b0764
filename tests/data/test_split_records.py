"""scripts/data_process/split_records.py: seeded, disjoint train/val/test splits of the bundled MuSiQue samples."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "data_process"))
import split_records  # noqa: E402

SAMPLES = [str(REPO / "data" / "samples" / "musique_ans_train_100.json"),
           str(REPO / "data" / "samples" / "musique_full_train_first100.jsonl")]


def answerable_ids() -> set[str]:
    ids = {r["id"] for r in json.load(open(SAMPLES[0]))}
    ids |= {json.loads(line)["id"] for line in open(SAMPLES[1]) if json.loads(line)["answerable"]}
    return ids


def test_splits_are_disjoint_answerable_and_seeded(tmp_path):
    assert split_records.main(["--input", SAMPLES[0], "--input", SAMPLES[1], "--out", str(tmp_path / "a"),
                               "--sizes", "100,20,30", "--seed", "0"]) == 0
    splits = {name: [json.loads(line) for line in open(tmp_path / "a" / f"{name}.jsonl")]
              for name in split_records.SPLITS}
    assert [len(rows) for rows in splits.values()] == [100, 20, 30]
    ids = [r["id"] for rows in splits.values() for r in rows]
    # the two files hold 100 + 50 answerable questions, no id in common: all 150 are used, each once
    assert len(set(ids)) == 150 and set(ids) == answerable_ids()
    assert all(r.get("answerable", True) for rows in splits.values() for r in rows)
    same = split_records.split_records(SAMPLES, (100, 20, 30), seed=0)
    assert [r["id"] for r in same["test"]] == [r["id"] for r in splits["test"]]
    other = split_records.split_records(SAMPLES, (100, 20, 30), seed=1)
    assert [r["id"] for r in other["test"]] != [r["id"] for r in splits["test"]]


def test_too_few_records_and_bad_sizes_are_errors(tmp_path, capsys):
    assert split_records.main(["--input", SAMPLES[0], "--out", str(tmp_path), "--sizes", "90,10,1"]) == 2
    err = capsys.readouterr().err
    assert "musique_ans_train_100.json: 100 answerable records" in err and "101" in err
    assert split_records.main(["--input", SAMPLES[0], "--out", str(tmp_path), "--sizes", "90,10"]) == 2
    assert "--sizes '90,10'" in capsys.readouterr().err
    no_id = tmp_path / "no_id.jsonl"
    no_id.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(split_records.DataError, match=r"no_id.jsonl:1: record without an 'id'"):
        split_records.split_records([str(no_id)], (1, 1, 1), seed=0)
