"""ground_truth.sub_answers: written by the MuSiQue converters and the named-field QA path, carried by the trainer's
dataset to the reward, where the "ow sub-answer" row (reward.ablation=ow_sub_answer) scores r_sub against it."""
import json

import pytest
import torch

from stepsearch.data.conversions import MusiConfig, build_musi
from stepsearch.data.formats import read_rows_parquet, to_row, validate_row
from stepsearch.data.io import DataError, iter_records
from stepsearch.data.musique import convert_musique
from stepsearch.data.qa_sets import FieldMap, convert_qa_file
from stepsearch.rewards import RewardConfig, compute_token_rewards
from verl.protocol import DataProto, to_object_array

# An original MuSiQue record (2 hops); the last step's answer is the question's answer, so that hop also takes
# the question's alias "Gamble".
RECORD = {
    "id": "2hop__1_2", "question": "Who founded the record label of All Things in Time?", "answer": "Kenny Gamble",
    "answer_aliases": ["Gamble"], "answerable": True,
    "paragraphs": [
        {"idx": 0, "title": "All Things in Time", "is_supporting": True,
         "paragraph_text": "All Things in Time is an album by Lou Rawls, released in 1976 on the Philadelphia "
                           "International Records label."},
        {"idx": 1, "title": "Philadelphia International Records", "is_supporting": True,
         "paragraph_text": "Philadelphia International Records was founded in 1971 by Kenny Gamble and Leon Huff."},
    ],
    "question_decomposition": [
        {"id": 1, "question": "All Things in Time >> record label", "answer": "Philadelphia International Records",
         "paragraph_support_idx": 0},
        {"id": 2, "question": "Who founded #1 ?", "answer": "Kenny Gamble", "paragraph_support_idx": 1},
    ],
}
GOLD_HOPS = [["Philadelphia International Records"], ["Kenny Gamble", "Gamble"]]
RESPONSE = ("<sub_question_1>Which label released All Things in Time?</sub_question_1>"
            "<sub_answer_1>Philadelphia Records</sub_answer_1>"
            "<sub_question_2>Who founded it?</sub_question_2><sub_answer_2>Gamble</sub_answer_2>"
            "<answer>Kenny Gamble</answer>")
# r_sub = (1/2) [max_k F1(a_k, hop 1) + max_k F1(a_k, hop 2)]
#   hop 1: "philadelphia records" vs "philadelphia international records": P = 2/2, R = 2/3, F1 = 0.8
#          ("gamble" shares no word: 0)
#   hop 2: "gamble" vs the alias "Gamble": 1.0 (vs "Kenny Gamble" alone it would be 0.6667)
# r_sub = (0.8 + 1.0) / 2 = 0.9; the row pays r_answer (F1 1.0) + 0.618 * 0.9 = 1.5562 and nothing else.
R_SUB, OVERALL = 0.9, 1.0 + 0.618 * 0.9


def test_musique_row_scored_with_ow_sub_answer(tmp_path):
    from stepsearch.data.row_fields import search_row_fields
    from verl.utils.dataset import RLHFDataset
    from verl.utils.tiny_model import build_tokenizer

    src = tmp_path / "musique.jsonl"
    src.write_text(json.dumps(RECORD) + "\n")
    out, _ = build_musi(MusiConfig(local_dir=str(tmp_path), input=str(src), template="sub_answer"))
    row = read_rows_parquet(out)[0]
    assert row["reward_model"]["ground_truth"]["sub_answers"] == GOLD_HOPS
    # the trainer's reader hands ground_truth (sub_answers included) to the reward
    item = RLHFDataset(out, build_tokenizer(), max_prompt_length=1024, batch_size=1, shuffle=False,
                       row_adapter=search_row_fields)[0]
    assert item["ground_truth"]["sub_answers"] == GOLD_HOPS
    data = DataProto.from_dict(tensors={"response_mask": torch.ones(1, 6, dtype=torch.long)}, non_tensors={
        "response_text": [RESPONSE], "rounds": to_object_array([[]]), "search_end_positions": to_object_array([[]]),
        "ground_truth": to_object_array([item["ground_truth"]]),
        "support_docs": to_object_array([item["support_docs"]])})
    scores, _, (score,) = compute_token_rewards(data, RewardConfig.from_mapping({"ablation": "ow_sub_answer"}))
    assert score.sub_answer_reward == pytest.approx(R_SUB, abs=1e-12)
    assert score.overall == pytest.approx(OVERALL, abs=1e-12)
    assert scores[0].tolist() == pytest.approx([0, 0, 0, 0, 0, OVERALL], abs=1e-6)  # outcome at the last token
    # the full StePPO row leaves r_sub out
    _, _, (full,) = compute_token_rewards(data, RewardConfig())
    assert full.sub_answer_reward == 0.0


def test_rows_without_the_field_read_as_no_sub_answers(tmp_path):
    from stepsearch.data.row_fields import search_row_fields
    from verl.utils.dataset import RLHFDataset
    from verl.utils.tiny_model import build_tokenizer

    # a row written before the field existed (null in the parquet) reaches the reward as [] (r_sub = 0)
    src = tmp_path / "musique.jsonl"
    src.write_text(json.dumps(RECORD) + "\n")
    out, _ = build_musi(MusiConfig(local_dir=str(tmp_path), input=str(src)))
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = pq.read_table(out).to_pylist()
    del rows[0]["reward_model"]["ground_truth"]["sub_answers"]
    pq.write_table(pa.Table.from_pylist(rows), out)
    validate_row(read_rows_parquet(out)[0], "old")
    item = RLHFDataset(out, build_tokenizer(), max_prompt_length=1024, batch_size=1, shuffle=False,
                       row_adapter=search_row_fields)[0]
    assert item["ground_truth"]["sub_answers"] == []


def test_unknown_or_dropped_sub_answers_are_an_empty_list(tmp_path):
    rec = dict(RECORD, question_decomposition=[dict(RECORD["question_decomposition"][0], answer=" "),
                                               RECORD["question_decomposition"][1]])
    src = tmp_path / "m.jsonl"
    src.write_text(json.dumps(RECORD) + "\n" + json.dumps(dict(rec, id="2hop__3_4")) + "\n")
    (full, partial), _ = convert_musique(iter_records(str(src), show_progress=False), "train")
    # one hop without an answer: the whole list is unknown (a hop with no gold would cap r_sub below 1)
    assert to_row(partial, "musi", "train", 1)["reward_model"]["ground_truth"]["sub_answers"] == []
    # test rows built without evidence carry no sub-answers either
    assert to_row(full, "musi", "test", 0, keep_evidence=False)["reward_model"]["ground_truth"]["sub_answers"] == []
    with pytest.raises(DataError, match=r"^r: reward_model.ground_truth.sub_answers must be a list of lists"):
        row = to_row(full, "musi", "train", 0)
        row["reward_model"]["ground_truth"]["sub_answers"] = ["Kenny Gamble"]
        validate_row(row, "r")


def test_released_layout_and_named_fields_write_sub_answers(tmp_path):
    released = {"id": "r1", "question": "Who founded the label of X", "final_answer": "Kenny Gamble",
                "sub_searchs": [["label of X"], ["founder of PIR"]], "sub_answers": ["PIR", ["Kenny Gamble", "Gamble"]]}
    (tmp_path / "musi_answerable_train.jsonl").write_text(json.dumps(released) + "\n")
    out, _ = build_musi(MusiConfig(local_dir=str(tmp_path)))
    assert read_rows_parquet(out)[0]["reward_model"]["ground_truth"]["sub_answers"] == [["PIR"],
                                                                                           ["Kenny Gamble", "Gamble"]]
    bad = tmp_path / "bad" / "musi_answerable_train.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps(dict(released, sub_answers="PIR")) + "\n")
    with pytest.raises(DataError, match=r"bad/musi_answerable_train.jsonl:1: field 'sub_answers' must be a list"):
        build_musi(MusiConfig(local_dir=str(bad.parent)))
    named = tmp_path / "named.jsonl"
    named.write_text(json.dumps({"q": "Who founded the label of X?", "a": ["Kenny Gamble", "Gamble"], "steps": [
        {"Question": "label of X", "Answer": "PIR"}, {"Question": "Who founded #1?", "Answer": "Kenny Gamble"}]})
        + "\n" + json.dumps({"q": "Capital of France?", "a": "Paris", "steps": ["capital of France"]}) + "\n")
    (answered, unanswered), _ = convert_qa_file(str(named), FieldMap(question="q", answer="a", decomposition=("steps",)))
    assert answered.search_keys == (("label of X",), ("Who founded PIR?",))
    assert to_row(answered, "x", "test", 0)["reward_model"]["ground_truth"]["sub_answers"] == [
        ["PIR"], ["Kenny Gamble", "Gamble"]]
    assert to_row(unanswered, "x", "test", 1)["reward_model"]["ground_truth"]["sub_answers"] == []
