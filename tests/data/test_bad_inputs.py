"""Issue 19.6: bad data files. An empty input is an error naming the file (no 0-row parquet, no empty output);
a binary file gives file:line, not a traceback; `--skip-bad` with nothing good left fails and says how many rows
it skipped. The CLIs run in-process (main(argv) is what `sys.exit(main())` exits with), one as a subprocess."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepsearch.data.check import main as check_main
from stepsearch.data.formats import ROW_SCHEMA
from stepsearch.rewards.score import main as score_main

from .conftest import REPO, SAMPLES

SCRIPTS = REPO / "scripts" / "data_process"
BINARY = bytes(range(128, 256)) * 8  # no newline; 0x80..0xff are never valid UTF-8 on their own


def _script_main(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_musi_search_empty_input_fails_naming_the_file(tmp_path):
    """The tester's case, as a real process: it used to exit 0 and write a 0-row parquet."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "musi_search.py"), "--local_dir", str(tmp_path), "--input",
                           str(empty)], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and f"{empty}: no records" in proc.stderr
    assert not (tmp_path / "musi_answerable_train.parquet").exists()


@pytest.mark.parametrize("content, message", [
    (b"[]", "no records"),
    (b"", "no records"),
    (json.dumps({"id": "x", "question": "q?", "answer": "a", "answerable": False, "paragraphs": [],
                 "question_decomposition": [{"question": "q", "answer": "a"}]}).encode() + b"\n",
     "no usable questions"),
    (b'{"question": "q?", "final_answer": "a"}\n' + BINARY, ":2: not UTF-8 text (byte 0x80 at column 1)"),
    (b'[{"question": "q?",\n "final_answer": "a' + BINARY, ":2: not UTF-8 text (byte 0x80 at column 20)"),  # 19 chars precede it
])
def test_musi_search_rejects_empty_unanswerable_and_binary_inputs(tmp_path, capsys, content, message):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    assert _script_main("musi_search")(["--local_dir", str(tmp_path), "--input", str(src)]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and message in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.parquet"))


def test_corpus_and_test_set_tools_reject_empty_inputs(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _script_main("build_corpus")(["--input", str(empty), "--output", str(tmp_path / "c.jsonl")]) == 2
    assert f"{empty}: no records" in capsys.readouterr().err and not (tmp_path / "c.jsonl").exists()
    assert _script_main("qa_test_sets")(["--local_dir", str(tmp_path), "--input", f"hotpotqa:{empty}"]) == 2
    assert f"{empty}: no records" in capsys.readouterr().err and not list(tmp_path.glob("*.parquet"))


def test_check_rejects_empty_and_binary_files(tmp_path, capsys):
    corpus = SAMPLES / "wiki18_bamboogle_passages.jsonl"
    empty_parquet = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=ROW_SCHEMA), empty_parquet)
    assert check_main(["--data", str(empty_parquet), "--corpus", str(corpus)]) == 2
    assert f"{empty_parquet}: no rows" in capsys.readouterr().err
    binary = tmp_path / "binary.parquet"
    binary.write_bytes(BINARY)
    assert check_main(["--data", str(binary), "--corpus", str(corpus)]) == 2
    assert f"{binary}: not a readable parquet file" in capsys.readouterr().err
    assert _script_main("musi_search")(["--local_dir", str(tmp_path), "--input",
                                        str(SAMPLES / "musique_ans_train_100.json"), "--save_name", "d"]) == 0
    data = tmp_path / "d_train.parquet"
    empty_corpus = tmp_path / "corpus.jsonl"
    empty_corpus.write_text("")
    assert check_main(["--data", str(data), "--corpus", str(empty_corpus)]) == 2
    assert f"{empty_corpus}: no records" in capsys.readouterr().err


def test_score_empty_binary_and_all_bad_inputs(tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert score_main(["--input", str(empty), "--output", str(out)]) == 2
    assert f"{empty}: no rows" in capsys.readouterr().err and not out.exists()
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(BINARY)
    assert score_main(["--input", str(binary), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{binary}:1: not UTF-8 text" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"response": 1}\nnot json\n' + BINARY)  # three bad rows, no good one
    assert score_main(["--input", str(bad), "--output", str(out), "--skip-bad"]) == 2
    assert "all 3 rows were bad and skipped (--skip-bad)" in capsys.readouterr().err and not out.exists()
    good = {"response": "<answer> Paris </answer>", "ground_truth": {"target": ["Paris"]}}
    bad.write_bytes(json.dumps(good).encode() + b"\n" + BINARY)
    assert score_main(["--input", str(bad), "--output", str(out), "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "scored 1 rows" in err and "bad rows skipped: 1 (lines [2])" in err
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [1]
