"""MuSiQue -> parquet on the bundled real records (data/samples)."""
import json
import re

import pytest

from stepsearch.data.conversions import MusiConfig, build_musi
from stepsearch.data.formats import read_rows_parquet
from stepsearch.data.io import DataError, iter_records
from stepsearch.data.musique import convert_musique

from .conftest import SAMPLES

ANS = SAMPLES / "musique_ans_train_100.json"
FULL = SAMPLES / "musique_full_train_first100.jsonl"


def _examples(path):
    return convert_musique(iter_records(path, show_progress=False), "train")


def test_two_three_four_hop_keys_have_every_reference_resolved():
    examples, stats = _examples(ANS)
    raw = {r.record["id"]: r.record for r in iter_records(ANS, show_progress=False)}
    hops = {}
    for ex in examples:
        steps = raw[ex.id]["question_decomposition"]
        hops[len(steps)] = hops.get(len(steps), 0) + 1
        assert len(ex.search_keys) == len(steps)          # one group per decomposition step
        for s, (group, step) in enumerate(zip(ex.search_keys, steps)):
            for key in group:
                assert not re.search(r"#\d", key), (ex.id, key)
            for k in map(int, re.findall(r"#(\d+)", step["question"])):
                assert steps[k - 1]["answer"] in group[0]  # the reference became sub-answer k
    assert hops == {2: 68, 3: 27, 4: 5}                    # counted in SOURCES/the file: 68 + 27 + 5 = 100


def test_known_rows_hand_checked():
    examples = {e.id: e for e in _examples(ANS)[0]}
    e = examples["2hop__150763_14904"]
    # "Who was the first president of #1 ?" with #1 = "American Psychological Association"
    assert e.search_keys == (("What company published Journal of Psychotherapy Integration?",),
                             ("Who was the first president of American Psychological Association ?",))
    assert [d.title for d in e.support_docs] == ["Journal of Psychotherapy Integration", "Adolescence"]
    assert e.answers == ("G. Stanley Hall", "Stanley Hall")
    e = examples["3hop2__130734_798404_834843"]
    # "Midway (near Pleasant Plains), #2 , #1 >> country" with #2 = White County, #1 = Arkansas, plus the plain form
    assert e.search_keys[2] == ("Midway (near Pleasant Plains), White County , Arkansas >> country",
                                "Midway (near Pleasant Plains), White County , Arkansas country")


def test_support_docs_are_the_supporting_paragraphs_with_title_and_text():
    examples = {e.id: e for e in _examples(ANS)[0]}
    for loc in iter_records(ANS, show_progress=False):
        sup = {(p["title"], p["paragraph_text"]) for p in loc.record["paragraphs"] if p["is_supporting"]}
        assert {(d.title, d.text) for d in examples[loc.record["id"]].support_docs} == sup


def test_unanswerable_rows_are_skipped_and_counted():
    examples, stats = _examples(FULL)
    assert (stats.read, stats.skipped_unanswerable, stats.kept) == (100, 50, 50)  # SOURCES.md: 50 unanswerable
    assert all("__" in e.id for e in examples)


def test_parquet_rows_have_exactly_the_seed_format_and_default_names(tmp_path):
    out, stats = build_musi(MusiConfig(local_dir=str(tmp_path), input=str(ANS)))
    assert out == str(tmp_path / "musi_answerable_train.parquet")
    rows = read_rows_parquet(out)
    assert len(rows) == 100
    r = rows[0]
    assert set(r) == {"data_source", "prompt", "ability", "reward_model", "extra_info", "id"}
    assert r["data_source"] == "musi" and r["ability"] == "fact-reasoning"
    assert r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"].endswith(
        "Question:Who was the first president of the association which published Journal of Psychotherapy Integration?\n")
    assert r["reward_model"]["style"] == "rule"
    assert set(r["reward_model"]["ground_truth"]) == {"target", "search_keys", "sub_answers"}
    # one list per decomposition step; the last step answers the question, so it also holds the alias
    assert r["reward_model"]["ground_truth"]["sub_answers"] == [["American Psychological Association"],
                                                                ["G. Stanley Hall", "Stanley Hall"]]
    assert set(r["extra_info"]) == {"split", "index", "support_docs"}
    assert [row["extra_info"]["index"] for row in rows] == list(range(100))
    assert set(r["extra_info"]["support_docs"][0]) == {"title", "text"}
    out_test, _ = build_musi(MusiConfig(local_dir=str(tmp_path), input=str(ANS), test=True))
    assert out_test.endswith("musi_answerable_test.parquet")
    t = read_rows_parquet(out_test)[0]
    assert t["extra_info"]["split"] == "test" and t["reward_model"]["ground_truth"]["search_keys"]  # kept
    out_drop, _ = build_musi(MusiConfig(local_dir=str(tmp_path), input=str(ANS), test=True, drop_evidence=True,
                                        save_name="dropped"))
    d = read_rows_parquet(out_drop)[0]
    assert d["reward_model"]["ground_truth"]["search_keys"] == [] and d["extra_info"]["support_docs"] == []
    assert d["reward_model"]["ground_truth"]["target"] == t["reward_model"]["ground_truth"]["target"]


def test_released_jsonl_converts(tmp_path):
    rec = {"id": "r1", "question": "Who founded the label of X ", "final_answer": "Kenny Gamble",
           "answer_aliases": ["Gamble"], "sub_searchs": [["label of X", "X record label"], ["founder of PIR"]],
           "sub_support_docs": [{"title": "X", "paragraph_text": "X was released on PIR."}]}
    p = tmp_path / "musi_answerable_train.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    out, _ = build_musi(MusiConfig(local_dir=str(tmp_path), template="released"))
    row = read_rows_parquet(out)[0]
    assert row["reward_model"]["ground_truth"] == {"target": ["Kenny Gamble", "Gamble"],
                                                   "search_keys": [["label of X", "X record label"], ["founder of PIR"]],
                                                   "sub_answers": []}  # the record has no 'sub_answers' field
    assert row["extra_info"]["support_docs"] == [{"title": "X", "text": "X was released on PIR."}]
    assert row["prompt"][0]["content"].endswith("Question: Who founded the label of X?\n")


def test_sampling_is_seeded_and_named(tmp_path):
    a, _ = build_musi(MusiConfig(local_dir=str(tmp_path / "a"), input=str(ANS), sample_num=10, seed=7))
    b, _ = build_musi(MusiConfig(local_dir=str(tmp_path / "b"), input=str(ANS), sample_num=10, seed=7))
    c, _ = build_musi(MusiConfig(local_dir=str(tmp_path / "c"), input=str(ANS), sample_num=10, seed=8))
    assert a.endswith("musi_answerable_train_10.parquet")
    ids = lambda p: [r["id"] for r in read_rows_parquet(p)]
    assert ids(a) == ids(b) and len(ids(a)) == 10 and ids(a) != ids(c)


@pytest.mark.parametrize("line3, message", [
    ('{"id": "x", "question": ', "bad.jsonl:3: malformed JSON"),
    ('{"id": "x", "question": "q?", "final_answer": "a", "sub_searchs": "nope"}', "bad.jsonl:3: field 'sub_searchs'"),
    ('{"id": "x", "question": 5, "final_answer": "a"}', "bad.jsonl:3: field 'question' must be str"),
    ('{"id": "x", "final_answer": "a"}', "bad.jsonl:3: missing field 'question'"),
    ('{"id": "a1", "question": "q?", "final_answer": "a"}', "bad.jsonl:3: duplicate id 'a1' \\(first seen at .*bad.jsonl:1\\)"),
    ('{"id": "x", "question": "q?", "question_decomposition": [{"question": "who is #2", "answer": "b"}], '
     '"paragraphs": [], "answer": "a"}', "bad.jsonl:3: question_decomposition\\[0\\].question .* refers to #2"),
])
def test_bad_input_names_file_line_and_field(tmp_path, line3, message):
    good = '{"id": "a1", "question": "q?", "final_answer": "a"}'
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join([good, '{"id": "a2", "question": "r?", "final_answer": "b"}', line3]) + "\n")
    with pytest.raises(DataError, match=message):
        build_musi(MusiConfig(local_dir=str(tmp_path), input=str(p)))
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".*tmp"))  # nothing partial written


def test_renumber_ids_like_the_released_script(tmp_path):
    p = tmp_path / "dup.jsonl"
    p.write_text('{"id": "a", "question": "q?", "final_answer": "x"}\n{"id": "a", "question": "r?", "final_answer": "y"}\n')
    with pytest.raises(DataError, match="dup.jsonl:2: duplicate id 'a'.*--renumber_ids"):
        build_musi(MusiConfig(local_dir=str(tmp_path), input=str(p)))
    out, _ = build_musi(MusiConfig(local_dir=str(tmp_path), input=str(p), renumber_ids=True))
    assert [r["id"] for r in read_rows_parquet(out)] == ["musi_train_0", "musi_train_1"]
