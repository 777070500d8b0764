"""Evaluation sets from the bundled FlashRAG-format and original-format samples."""
import hashlib

import pytest

from stepsearch.data.conversions import EvalSetConfig, build_test_set
from stepsearch.data.formats import read_rows_parquet
from stepsearch.data.io import DataError
from stepsearch.data.qa_sets import convert_qa_file, join_sentences, sentence_separator

from .conftest import SAMPLES


@pytest.mark.parametrize("name, dataset, n, first_id, first_target", [
    ("hotpotqa_flashrag_dev_200.jsonl", "hotpotqa", 200, "dev_0", ["yes"]),
    ("2wiki_flashrag_dev_200.jsonl", "2wikimultihopqa", 200, "dev_0", ["Małgorzata Braunek"]),
    ("musique_flashrag_dev_200.jsonl", "musique", 200, "dev_0", ["Miquette Giraudy"]),
    ("bamboogle_test.jsonl", "bamboogle", 125, "test_0", ["james madison"]),
    ("hotpot_dev_distractor_50.jsonl", "hotpotqa", 50, "5a7f6fd75542992e7d278cfa", ["Rush"]),
    ("2wiki_dev_50.jsonl", "2wikimultihopqa", 50, "b088d3ca08e211ebbda4ac1f6bf848b6", ["Free Guy"]),
    ("musique_full_train_first100.jsonl", "musique", 50, None, None),  # 50 unanswerable skipped
])
def test_each_set_converts_with_its_data_source(tmp_path, name, dataset, n, first_id, first_target):
    out, stats = build_test_set(EvalSetConfig(input=str(SAMPLES / name), dataset=dataset, local_dir=str(tmp_path)))
    rows = read_rows_parquet(out)
    assert out.endswith(f"{dataset}_test.parquet") and len(rows) == n == stats.kept
    assert {r["data_source"] for r in rows} == {dataset}
    assert all(r["extra_info"]["split"] == "test" and r["extra_info"]["support_docs"] == [] for r in rows)
    assert all(r["reward_model"]["ground_truth"]["search_keys"] == [] for r in rows)
    if first_id:
        assert rows[0]["id"] == first_id and rows[0]["reward_model"]["ground_truth"]["target"] == first_target


def test_output_is_deterministic(tmp_path):
    digests = []
    for sub in ("a", "b"):
        out, _ = build_test_set(EvalSetConfig(input=str(SAMPLES / "hotpotqa_flashrag_dev_200.jsonl"), dataset="hotpotqa",
                                              local_dir=str(tmp_path / sub)))
        digests.append(hashlib.sha256(open(out, "rb").read()).hexdigest())
    assert digests[0] == digests[1]


def test_original_formats_give_supporting_paragraphs():
    examples, _ = convert_qa_file(str(SAMPLES / "hotpot_dev_distractor_50.jsonl"))
    e = examples[0]  # supporting_facts [["Nobody's Hero", 0], ["Neil Peart", 1]]
    assert [d.title for d in e.support_docs] == ["Nobody's Hero", "Neil Peart"]
    assert "  " not in e.support_docs[1].text and e.support_docs[1].text.startswith("Neil Ellwood Peart")
    w, _ = convert_qa_file(str(SAMPLES / "2wiki_dev_50.jsonl"))
    assert [d.title for d in w[0].support_docs] == ["Forbidden Ground", "Free Guy", "Pál Gábor", "Shawn Levy"]
    assert w[0].support_docs[2].text.startswith("Pál Gábor (2 November 1932 – 21 October 1987) was a Hungarian film "
                                                "director and screenwriter. He directed 20 films")


def test_sentence_joining_follows_each_dataset():
    hotpot = [["T", ["A b.", " C \"", 'D" e.']]]  # a sentence without a leading space continues the previous one
    assert sentence_separator(hotpot) == "" and join_sentences(hotpot[0][1], "") == 'A b. C "D" e.'
    two_wiki = [["T", ["A b.", "C d."]]]
    assert sentence_separator(two_wiki) == " " and join_sentences(two_wiki[0][1], " ") == "A b. C d."


def test_bamboogle_csv_and_unknown_format(tmp_path):
    p = tmp_path / "bamboogle.csv"
    p.write_text('Question,Answer\n"Who was president when Citibank was founded?",James Madison\n')
    examples, _ = convert_qa_file(str(p))
    assert (examples[0].id, examples[0].answers) == ("test_0", ("James Madison",))
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"id": "1", "question": "q", "golden_answers": ["a"]}\n{"q": 1}\n')
    with pytest.raises(DataError, match="x.jsonl:2: unknown QA format"):
        convert_qa_file(str(bad))
    bad.write_text('{"id": "1", "question": "q", "golden_answers": "a"}\n')
    with pytest.raises(DataError, match="x.jsonl:1: field 'golden_answers' must be list"):
        convert_qa_file(str(bad))


def test_plain_question_answer_records(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text('{"question": "Who is the spouse of the Green performer?", "answer": ["Miquette Giraudy", "M. G."]}\n'
                 '{"idx": 7, "question": "q2", "answer": "a2"}\n')
    examples, _ = convert_qa_file(str(p))
    assert [(e.id, e.answers) for e in examples] == [("0", ("Miquette Giraudy", "M. G.")), ("7", ("a2",))]
