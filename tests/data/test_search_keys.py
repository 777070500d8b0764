"""Search-key generation mechanics against a real stand-in OpenAI-compatible server (uvicorn, 127.0.0.1) and real
retrieval sources (bm25s BM25 and a MiniLM + FAISS dense index) over real MuSiQue paragraphs."""
import json
import subprocess
import sys

import httpx
import pytest

from stepsearch.data.training_corpus import build_corpus, load_corpus_pairs
from stepsearch.data.formats import SupportDoc, read_rows_parquet
from stepsearch.data.io import iter_records
from stepsearch.data.musique import convert_musique
from stepsearch.data.search_keys import (BM25Source, DenseSource, KeyGenConfig, SubQuestion, default_min_votes,
                                         generate_keys, is_valid_hit, parse_queries)

from .conftest import REPO, SAMPLES, served_requests
from .openai_standin import NONSENSE

ANS = SAMPLES / "musique_ans_train_100.json"


@pytest.fixture(scope="module")
def world():
    locs = list(iter_records(ANS, show_progress=False))[:4]
    examples, _ = convert_musique(locs, "train")
    passages = list(dict.fromkeys((p["title"], p["paragraph_text"]) for l in locs for p in l.record["paragraphs"]))
    return examples, [BM25Source(passages), DenseSource(passages)]


def _cfg(url, **kw):
    return KeyGenConfig(base_url=url, model=kw.pop("model", "standin"), chunk_rows=2, **kw)


def test_rewrites_are_kept_only_with_enough_source_votes(world, chat_server, tmp_path):
    examples, sources = world
    new, stats = generate_keys(examples, sources, _cfg(chat_server), str(tmp_path / "p.jsonl"))
    # The stand-in proposes [X, X without its question word, NONSENSE, X]; the duplicate is dropped by the parser,
    # NONSENSE retrieves nothing valid from either source, and both real rewrites retrieve the gold paragraph.
    assert new[0].search_keys == (
        ("What company published Journal of Psychotherapy Integration?", "company published Journal of Psychotherapy Integration"),
        ("Who was the first president of American Psychological Association ?",
         "was the first president of American Psychological Association"))
    assert all(NONSENSE not in g for ex in new for g in ex.search_keys)
    assert [len(ex.search_keys) for ex in new] == [len(ex.search_keys) for ex in examples]
    assert stats.sub_questions == 10 and stats.llm_requests == 10  # 2 + 4 + 2 + 2 decomposition steps
    # "Hello Love >> performer" has no question word, so both rewrites are the same string: 2 proposals, not 3.
    assert stats.queries_proposed == 3 * 10 - 2 and stats.queries_kept == 18 and stats.fallback_groups == 0


def test_vote_threshold_is_ceil_half_of_the_sources(world, chat_server, tmp_path):
    examples, sources = world
    assert [default_min_votes(m) for m in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]
    # A third real source over passages that hold none of these answers can never vote for a query.
    unrelated = [(f"Wiki {i}", t) for i, (_, _, t) in enumerate(load_corpus_pairs(str(SAMPLES / "wiki18_sample_1000.jsonl")))][:50]
    three = sources + [BM25Source(unrelated, name="bm25-unrelated")]
    new2, _ = generate_keys(examples[:1], three, _cfg(chat_server), str(tmp_path / "a.jsonl"))  # needs 2 of 3
    assert len(new2[0].search_keys[0]) == 2
    new3, stats = generate_keys(examples[:1], three, _cfg(chat_server, min_votes=3), str(tmp_path / "b.jsonl"))
    assert new3[0].search_keys == examples[0].search_keys  # nothing passes 3 of 3: decomposition keys kept
    assert stats.fallback_groups == 2 and stats.queries_kept == 0
    with pytest.raises(ValueError, match="min_votes \\(4\\) must be in 1..3"):
        generate_keys(examples[:1], three, _cfg(chat_server, min_votes=4), str(tmp_path / "c.jsonl"))


def test_resume_and_cache_skip_finished_work(world, chat_server, tmp_path):
    examples, sources = world
    progress, cache = str(tmp_path / "p.jsonl"), str(tmp_path / "cache.jsonl")
    before = served_requests(chat_server)
    first, _ = generate_keys(examples[:2], sources, _cfg(chat_server), progress, cache)   # rows 0-1: 2 + 4 steps
    assert served_requests(chat_server) - before == 6
    full, stats = generate_keys(examples, sources, _cfg(chat_server), progress, cache)    # resumes: rows 2-3 only
    assert stats.resumed_rows == 2 and served_requests(chat_server) - before == 6 + 4
    assert full[:2] == first
    again, stats = generate_keys(examples, sources, _cfg(chat_server), str(tmp_path / "q.jsonl"), cache)  # cache only
    assert stats.llm_requests == 0 and served_requests(chat_server) - before == 10 and again == full
    with open(progress, "a") as f:
        f.write('{"id": "torn')  # a run killed mid-write leaves a torn last line: it is ignored
    assert generate_keys(examples, sources, _cfg(chat_server), progress, cache)[0] == full
    lines = open(progress).read().splitlines()
    assert lines[-1] == '{"id": "torn' and len(lines) == 5  # 4 rows + the torn line, which the next append skips


def test_transient_server_errors_are_retried(world, chat_server, tmp_path):
    examples, sources = world
    before = served_requests(chat_server)
    new, stats = generate_keys(examples[:1], sources, _cfg(chat_server, model="flaky"), str(tmp_path / "p.jsonl"))
    assert served_requests(chat_server) - before == 4 and stats.llm_requests == 4  # 2 sub-questions x (503 + retry)
    assert len(new[0].search_keys[0]) == 2


def test_unreachable_endpoint_raises(world, tmp_path):
    examples, sources = world
    cfg = KeyGenConfig(base_url="http://127.0.0.1:9/v1", model="m", max_retries=2, timeout_s=2)
    with pytest.raises(httpx.ConnectError):
        generate_keys(examples[:1], sources, cfg, str(tmp_path / "p.jsonl"))


def test_hit_validity_and_query_parsing():
    sub = SubQuestion(0, 0, "q", "U.S.", (SupportDoc("Midway", "Midway is a town."),))
    assert is_valid_hit(("Army", "The U.S. Army is old."), sub)        # normalized "us" as a whole word
    assert not is_valid_hit(("Bus", "A bus is a vehicle."), sub)       # "us" inside "bus" does not count
    assert is_valid_hit(("Other title", "Midway is a town."), sub)     # the support doc itself
    assert not is_valid_hit(("x", "y"), SubQuestion(0, 0, "q", None, ()))
    assert parse_queries('1. "Alpha beta"\n- alpha BETA\n\n2) Gamma\n* delta\nQ3: eps', 3) == ["Alpha beta", "Gamma", "delta"]


def test_cli_end_to_end_with_bm25(chat_server, tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([l.record for l in list(iter_records(ANS, show_progress=False))[:3]]))
    corpus = tmp_path / "musi.jsonl"
    build_corpus([str(src)], str(corpus))
    out = tmp_path / "keys.parquet"
    cmd = [sys.executable, "scripts/data_process/gen_search_keys.py", "--input", str(src), "--output", str(out),
           "--corpus", str(corpus), "--source", "bm25", "--base_url", chat_server, "--model", "standin"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["rows"] == 3
    rows = read_rows_parquet(str(out))
    assert rows[0]["reward_model"]["ground_truth"]["search_keys"][0] == [
        "What company published Journal of Psychotherapy Integration?", "company published Journal of Psychotherapy Integration"]
    chk = subprocess.run([sys.executable, "-m", "stepsearch.data.check", "--data", str(out), "--corpus", str(corpus)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert chk.returncode == 0, chk.stdout + chk.stderr


def test_concurrency_limit_is_respected(world, chat_server, tmp_path):
    examples, sources = world
    cfg = _cfg(chat_server, model="slow", concurrency=2)
    cfg = KeyGenConfig(**{**cfg.__dict__, "chunk_rows": 4})  # all 10 sub-questions in one round
    generate_keys(examples, sources, cfg, str(tmp_path / "p.jsonl"))
    stats = httpx.get(chat_server.removesuffix("/v1") + "/stats", timeout=5).json()
    assert stats["max_in_flight"]["slow"] == 2  # 10 requests of 0.3 s, never more than 2 at once
