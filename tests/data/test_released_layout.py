"""Issue 14 defects 7 and 8: released-layout support docs ({title, paragraph_text}) are accepted everywhere, a
refused row gets a one-line file:row message, and duplicate support docs are kept (they are n in G^t)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepsearch.data.check import main as check_main
from stepsearch.data.formats import ROW_SCHEMA, read_rows_parquet, validate_row, write_rows_parquet
from stepsearch.data.io import DataError, iter_records
from stepsearch.data.musique import convert_musique
from stepsearch.data.search_keys import row_to_example

DOC = {"title": "X", "text": "X was released on PIR."}


def _row(docs):
    return {"data_source": "musi", "prompt": [{"role": "user", "content": "Q?"}], "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": ["PIR"], "search_keys": [["label of X"]]}},
            "extra_info": {"split": "train", "index": 0, "support_docs": docs}, "id": "r0"}


def _released_parquet(path, docs):
    """A parquet whose support docs are stored as the released {title, paragraph_text} structs."""
    released_doc = pa.struct([("title", pa.string()), ("paragraph_text", pa.string())])
    fields = [f if f.name != "extra_info" else pa.field("extra_info", pa.struct([
        ("split", pa.string()), ("index", pa.int64()), ("support_docs", pa.list_(released_doc))]))
        for f in ROW_SCHEMA]
    pq.write_table(pa.Table.from_pylist([_row(docs)], schema=pa.schema(fields)), path)


def test_validate_row_accepts_both_layouts_and_names_a_bad_doc():
    validate_row(_row([DOC]), "f:row 0")
    validate_row(_row([{"title": "X", "paragraph_text": DOC["text"]}]), "f:row 0")
    validate_row(_row([{"title": "X", "text": None, "paragraph_text": DOC["text"]}]), "f:row 0")  # merged schema
    with pytest.raises(DataError, match=r"^f:row 3: extra_info.support_docs\[1\] must be a str"):
        validate_row(_row([DOC, {"title": "X", "body": "?"}]), "f:row 3")


def test_check_and_gen_search_keys_read_a_released_parquet(tmp_path, capsys):
    data, corpus = tmp_path / "released.parquet", tmp_path / "corpus.jsonl"
    _released_parquet(data, [{"title": "X", "paragraph_text": DOC["text"]}])
    corpus.write_text(json.dumps({"id": "1", "contents": f'"X"\n{DOC["text"]}'}) + "\n")
    rows = read_rows_parquet(str(data))
    assert row_to_example(rows[0], "r").support_docs[0].text == DOC["text"]
    assert check_main(["--data", str(data), "--corpus", str(corpus)]) == 0
    assert "| support docs exact | 1 | 1.0000 |" in capsys.readouterr().out


def test_a_refused_row_is_one_line_not_a_traceback(tmp_path, capsys):
    data, corpus = tmp_path / "bad.parquet", tmp_path / "corpus.jsonl"
    _released_parquet(data, [{"title": "X", "paragraph_text": None}])
    corpus.write_text(json.dumps({"id": "1", "contents": '"X"\ny'}) + "\n")
    assert check_main(["--data", str(data), "--corpus", str(corpus)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}:row 0: extra_info.support_docs[0]")


def test_duplicate_support_docs_are_kept(tmp_path):
    rec = {"id": "r1", "question": "Who founded the label of X", "final_answer": "Kenny Gamble",
           "sub_searchs": [["label of X"], ["founder of PIR"]],
           "sub_support_docs": [{"title": "X", "paragraph_text": DOC["text"]},
                                {"title": "X", "paragraph_text": DOC["text"]}]}
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    [ex], _ = convert_musique(iter_records(str(p), show_progress=False), "train")
    assert len(ex.support_docs) == 2          # n = 2 in G^t, as in the released data
    out = tmp_path / "rows.parquet"
    from stepsearch.data.formats import to_row
    write_rows_parquet([to_row(ex, "musi", "train", 0)], str(out))
    assert len(read_rows_parquet(str(out))[0]["extra_info"]["support_docs"]) == 2


def test_sub_answer_template_is_table_5_style():
    from stepsearch.data.prompts import make_prompt

    p = make_prompt("Where was the director of Titanic born", template="sub_answer")
    assert "<sub_question_k>" in p and "<sub_answer_k>" in p and "<search>" in p and "<answer>" in p
    assert p.endswith("Question:Where was the director of Titanic born?\n")
