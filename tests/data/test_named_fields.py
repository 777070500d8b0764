"""qa_test_sets.py with named fields: plain JSON / JSONL / CSV sets, decompositions as search keys, clear errors.

The Bamboogle-like records are written here in the layout of Bamboogle with its authors' decompositions (a JSON
list with `Question` / `Answer` fields plus the sub-questions); the questions are our own, not copied.
"""
import importlib.util
import json

import pytest

from stepsearch.data.formats import read_rows_parquet
from stepsearch.data.io import DataError
from stepsearch.data.qa_sets import FieldMap, convert_qa_file

from .conftest import REPO

BAMBOOGLE_LIKE = [
    {"Question": "Who was the US president in the year the Erie Canal opened?", "Answer": "John Quincy Adams",
     "Decomposition": [{"Question": "When did the Erie Canal open?", "Answer": "1825"},
                       {"Question": "Who was the US president in #1?", "Answer": "John Quincy Adams"}]},
    {"Question": "What is the capital of the country where the Eiffel Tower stands?",
     "Answer": ["Paris", "Paris, France", "Paris"],
     "Decomposition": ["In which country is the Eiffel Tower?", "What is the capital of France?"]},
]


def qa_test_sets(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("qa_test_sets", REPO / "scripts/data_process/qa_test_sets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.fixture()
def bamboogle_json(tmp_path):
    path = tmp_path / "bamboogle_decomposed.json"
    path.write_text(json.dumps(BAMBOOGLE_LIKE, indent=1))
    return path


def assert_bamboogle_rows(rows):
    assert [r["id"] for r in rows] == ["0", "1"] and {r["data_source"] for r in rows} == {"bamboogle"}
    truth = [r["reward_model"]["ground_truth"] for r in rows]
    assert truth[0]["target"] == ["John Quincy Adams"]
    assert truth[1]["target"] == ["Paris", "Paris, France"]  # a list answer, duplicates dropped, order kept
    # One key group per step; "#1" replaced by step 1's answer, as for MuSiQue's decompositions.
    assert truth[0]["search_keys"] == [["When did the Erie Canal open?"], ["Who was the US president in 1825?"]]
    assert truth[1]["search_keys"] == [["In which country is the Eiffel Tower?"], ["What is the capital of France?"]]
    assert "Erie Canal" in rows[0]["prompt"][0]["content"]


def test_per_input_mapping_turns_decompositions_into_search_keys(tmp_path, bamboogle_json):
    spec = f"bamboogle:{bamboogle_json}:question=Question,answer=Answer,decomposition=Decomposition"
    assert qa_test_sets(["--local_dir", str(tmp_path / "out"), "--input", spec]) == 0
    assert_bamboogle_rows(read_rows_parquet(tmp_path / "out" / "bamboogle_test.parquet"))


def test_global_field_flags_read_jsonl_too(tmp_path):
    src = tmp_path / "bamboogle.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in BAMBOOGLE_LIKE))
    assert qa_test_sets(["--local_dir", str(tmp_path / "out"), "--input", f"bamboogle:{src}",
                         "--question_field", "Question", "--answer_field", "Answer",
                         "--decomposition_field", "Decomposition"]) == 0
    assert_bamboogle_rows(read_rows_parquet(tmp_path / "out" / "bamboogle_test.parquet"))


def test_csv_with_named_columns_and_one_column_per_hop(tmp_path):
    src = tmp_path / "my_set.csv"
    src.write_text('qid,Prompt,Gold,Hop 1,Hop 2\n'
                   'a1,"Where was the author of ""Dracula"" born?",Dublin,"Who wrote ""Dracula""?",'
                   'Where was Bram Stoker born?\n'
                   'a2,What is 2 + 2?,4,,\n')
    examples, stats = convert_qa_file(str(src), FieldMap.parse("question=Prompt,answer=Gold,id=qid,"
                                                               "decomposition=Hop 1+Hop 2", "test"))
    assert stats.read == stats.kept == 2
    first, second = examples
    assert (first.id, first.question, first.answers) == ("a1", 'Where was the author of "Dracula" born?', ("Dublin",))
    assert first.search_keys == (('Who wrote "Dracula"?',), ("Where was Bram Stoker born?",))
    assert first.where == f"{src}:2" and second.where == f"{src}:3"
    assert (second.id, second.answers, second.search_keys) == ("a2", ("4",), ())  # empty hop cells: no steps


def test_missing_named_field_names_file_line_and_field(tmp_path, bamboogle_json, capsys):
    records = json.loads(bamboogle_json.read_text())
    del records[1]["Answer"]
    bamboogle_json.write_text(json.dumps(records))
    assert qa_test_sets(["--local_dir", str(tmp_path / "out"), "--input", f"bamboogle:{bamboogle_json}",
                         "--question_field", "Question", "--answer_field", "Answer"]) == 2
    err = capsys.readouterr().err
    assert f"{bamboogle_json}:2: missing field 'Answer'" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "bamboogle_test.parquet").exists()


def test_missing_csv_column_names_the_header_line(tmp_path):
    src = tmp_path / "set.csv"
    src.write_text("Question,Answer\nWho?,Me\n")
    with pytest.raises(DataError, match=r"set\.csv:1: the header has no column 'Gold' \(the answer field\)"):
        convert_qa_file(str(src), FieldMap(question="Question", answer="Gold"))


def test_reference_to_a_step_without_answer_is_refused(tmp_path):
    src = tmp_path / "set.jsonl"
    src.write_text(json.dumps({"q": "Who?", "a": "Me", "steps": ["Who is X?", "Where was #1 born?"]}) + "\n")
    with pytest.raises(DataError, match=r"set\.jsonl:1: field 'steps\[1\]'.*refers to #1, but step #1 has no answer"):
        convert_qa_file(str(src), FieldMap(question="q", answer="a", decomposition=("steps",)))


@pytest.mark.parametrize("spec, message", [
    ("bamboogle:x.json:question=Q,answr=A", "bad field mapping 'answr=A'"),
    ("bamboogle:x.json:question=", "bad field mapping 'question='"),
])
def test_bad_mapping_is_refused_naming_the_input(tmp_path, spec, message):
    with pytest.raises(SystemExit, match=message):
        qa_test_sets(["--local_dir", str(tmp_path), "--input", spec])
