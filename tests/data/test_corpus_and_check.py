"""Corpus builder and consistency checker on the bundled real MuSiQue records."""
import json

import pytest

from stepsearch.data.conversions import MusiConfig, build_musi
from stepsearch.data.check import (EXACT, MISSING, NORMALIZED, CorpusIndex, degenerate_key_problems, main as check_main,
                                   normalize, run_check)
from stepsearch.data.training_corpus import build_corpus, load_corpus_pairs, passage_id
from stepsearch.data.formats import read_rows_parquet, write_rows_parquet
from stepsearch.data.io import iter_records

from .conftest import SAMPLES

ANS = SAMPLES / "musique_ans_train_100.json"
FULL = SAMPLES / "musique_full_train_first100.jsonl"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("musi")
    data, _ = build_musi(MusiConfig(local_dir=str(d), input=str(ANS)))
    full, _ = build_musi(MusiConfig(local_dir=str(d), input=str(FULL), save_name="full"))
    corpus = d / "musi.jsonl"
    stats = build_corpus([str(ANS), str(FULL)], str(corpus))
    return d, data, full, corpus, stats


def test_corpus_contains_every_support_doc_exactly(built):
    _, data, full, corpus, _ = built
    passages = {(t, x) for _, t, x in load_corpus_pairs(str(corpus))}
    docs = [(d["title"], d["text"]) for p in (data, full) for r in read_rows_parquet(p) for d in r["extra_info"]["support_docs"]]
    assert len(docs) == 351  # 237 + 114 supporting paragraphs over the two files
    assert sum(doc in passages for doc in docs) == len(docs)  # 100%


def test_corpus_dedups_title_plus_text_like_a_reference_loop(built):
    _, _, _, corpus, stats = built
    seen, order = set(), []  # slow reference: first-seen unique (title, text) over all paragraphs of both files
    for path in (ANS, FULL):
        for loc in iter_records(path, show_progress=False):
            for p in loc.record["paragraphs"]:
                if (p["title"], p["paragraph_text"]) not in seen:
                    seen.add((p["title"], p["paragraph_text"]))
                    order.append((p["title"], p["paragraph_text"]))
    rows = [json.loads(l) for l in open(corpus)]
    assert [(r["title"], r["text"]) for r in rows] == order
    assert stats.paragraphs_read == 4000 and stats.passages_written == len(order)  # 20 paragraphs x 200 records
    r = rows[0]
    assert set(r) == {"id", "title", "text", "contents"} and r["contents"] == f'"{r["title"]}"\n{r["text"]}'
    assert len({r["id"] for r in rows}) == len(rows)


def test_ids_are_stable_across_runs_and_input_order(tmp_path, built):
    _, _, _, corpus, _ = built
    other = tmp_path / "rev.jsonl"
    build_corpus([str(FULL), str(ANS)], str(other))  # other input order
    a = {r["id"]: (r["title"], r["text"]) for r in map(json.loads, open(corpus))}
    b = {r["id"]: (r["title"], r["text"]) for r in map(json.loads, open(other))}
    assert a == b
    assert passage_id("T", "x") == "musi-" + __import__("hashlib").sha1("T\x1fx".encode()).hexdigest()[:16]


def test_checker_passes_on_consistent_data(built, capsys):
    _, data, _, corpus, _ = built
    assert check_main(["--data", data, "--corpus", str(corpus)]) == 0
    out = capsys.readouterr().out
    assert "| support docs exact | 237 | 1.0000 |" in out and "OK: all checks within thresholds" in out


def test_checker_catches_a_one_character_edit(built, tmp_path, capsys):
    _, data, _, corpus, _ = built
    rows = read_rows_parquet(data)
    doc = rows[5]["extra_info"]["support_docs"][1]
    doc["text"] = doc["text"].replace("a", "e", 1)  # one character
    planted = tmp_path / "planted.parquet"
    write_rows_parquet(rows, str(planted))
    reports, summary, _ = run_check(str(planted), str(corpus))
    assert reports[5].doc_status == [EXACT, MISSING] + [EXACT] * (len(reports[5].doc_status) - 2)
    assert summary.docs[MISSING] == 1 and summary.docs[EXACT] == 236
    assert check_main(["--data", str(planted), "--corpus", str(corpus), "--report", str(tmp_path / "r.json")]) == 1
    captured = capsys.readouterr()
    assert f"row 5 (id {rows[5]['id']}): doc 1: missing" in captured.out
    assert "FAIL: bad_doc_frac = 0.0042 > 0.0" in captured.err  # 1 / 237 = 0.00422
    assert json.load(open(tmp_path / "r.json"))["rows"][5]["doc_status"][1] == MISSING


def test_status_exact_normalized_missing():
    corpus = CorpusIndex([("1", "Rush", "Rush is a Canadian rock band."), ("2", "Toto", "Toto is a band.")])
    assert corpus.status("Rush", "Rush is a Canadian rock band.") == EXACT
    assert corpus.status("", "Toto is a band.") == EXACT
    assert corpus.status("Rush", "rush is a canadian rock band") == NORMALIZED  # case and final period differ
    assert corpus.status("Rush (band)", "Rush is a Canadian rock band.") == NORMALIZED  # title differs
    assert corpus.status("Rush", "Rush is a Canadian pop band.") == MISSING


def test_degenerate_keys_and_missing_answer_are_reported(built, tmp_path):
    assert degenerate_key_problems([], has_docs=True) == ["no search_keys groups"]
    assert degenerate_key_problems([], has_docs=False) == []
    assert degenerate_key_problems([["who founded #1"], [], ["  the ? "], ["A b", "a B"]], True) == [
        "group 0: unresolved reference in 'who founded #1'", "group 1 is empty", "group 2: blank key '  the ? '"]
    assert degenerate_key_problems([["x y"], ["X y."]], True) == ["duplicate groups"]
    _, data, _, corpus, _ = built
    rows = read_rows_parquet(data)[:10]
    rows[2]["reward_model"]["ground_truth"]["target"] = ["Zanzibar Quux"]
    rows[3]["reward_model"]["ground_truth"]["search_keys"][0] = []
    p = tmp_path / "bad.parquet"
    write_rows_parquet(rows, str(p))
    reports, summary, _ = run_check(str(p), str(corpus))
    assert [r.index for r in reports if r.answer_missing] == [2]
    assert [r.index for r in reports if r.key_problems] == [3]
    assert summary.fractions() == {"bad_doc_frac": 0.0, "bad_key_frac": 0.1, "answer_missing_frac": 0.1}
    assert check_main(["--data", str(p), "--corpus", str(corpus), "--max_bad_key_frac", "0.1"]) == 0


def test_normalize_follows_spec_1_3():
    assert normalize("The  U.S. Army, an Example!") == "us army example"


def test_corpus_from_hotpot_and_2wiki_records_holds_their_support_docs(tmp_path):
    from stepsearch.data.conversions import EvalSetConfig, build_test_set

    for name, ds in (("hotpot_dev_distractor_50.jsonl", "hotpotqa"), ("2wiki_dev_50.jsonl", "2wikimultihopqa")):
        data, _ = build_test_set(EvalSetConfig(input=str(SAMPLES / name), dataset=ds, local_dir=str(tmp_path),
                                               keep_evidence=True))
        corpus = tmp_path / f"{ds}.jsonl"
        build_corpus([str(SAMPLES / name)], str(corpus), id_prefix=ds)
        reports, summary, _ = run_check(data, str(corpus))
        assert summary.docs[EXACT] == sum(len(r.doc_status) for r in reports) > 90  # 100%, about 2 docs per question
