"""The guarded bf16 query path (issue 8): bf16 encode + top-(k+1) search, fp32 re-encode of the queries whose
k-th/(k+1)-th bf16 score gap is below guard_eps. Checked against exact fp32 on real questions over the real
wiki-18 sample, against hand-built near-tie cases, and through the server (flags, /health, /stats).
Correctness only; speed is measured in bench/retrieval.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from stepsearch.search.encoders import (GUARD_EPS, MINILM_NAME, Encoder, calibrate_guard_eps, cpu_has_fast_bf16,
                                        guard_fails, guarded_search)
from stepsearch.search.index import IndexLoadError, LoadOptions, load_index
from stepsearch.search.server import FastLane, ServerConfig, create_app, open_backend

pytestmark = pytest.mark.timeout(600)

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"
QA_FILES = ("hotpotqa_flashrag_dev_200.jsonl", "2wiki_flashrag_dev_200.jsonl", "musique_flashrag_dev_200.jsonl")


def flat_search(index):
    return lambda emb, k: index.search(emb, k)[::-1]  # FAISS returns (scores, ids)


@pytest.fixture(scope="module")
def questions() -> list[str]:
    out = []
    for name in QA_FILES:  # 100 real multi-hop questions from each bundled dev sample
        with open(SAMPLES / name) as f:
            out += [json.loads(line)["question"] for _, line in zip(range(100), f)]
    return list(dict.fromkeys(out))


@pytest.fixture(scope="module")
def guarded() -> Encoder:
    torch.manual_seed(0)
    return Encoder(mode="guarded")


@pytest.fixture(scope="module")
def flat(wiki_index_dir):
    return faiss.read_index(str(Path(wiki_index_dir) / "dense.faiss"))


def test_guard_fails_by_hand():
    scores = np.array([[0.90, 0.80, 0.70, 0.695],   # gap_3 = 0.005 >= 0.004: kept
                       [0.90, 0.80, 0.70, 0.698],   # gap_3 = 0.002 < 0.004: fallback
                       [0.90, 0.899, 0.70, 0.60],   # gap_3 = 0.1 (set guard passes); gap_1 = 0.001 (order fails)
                       [0.90, 0.80, -3.4e38, -3.4e38]], dtype=np.float32)  # fewer than k+1 hits: gap 0
    assert guard_fails(scores, 3, 0.004).tolist() == [False, True, False, True]
    assert guard_fails(scores, 3, 0.004, order=True).tolist() == [False, True, True, True]
    assert guard_fails(scores, 2, 0.004).tolist() == [False] * 4  # gap_2 = 0.1, 0.1, 0.199, 3.4e38
    assert not guard_fails(scores, 3, 0.0).any()  # eps 0: never falls back (unguarded bf16)


def test_fast_resolves_to_guarded_on_bf16_cpus():
    enc = Encoder(mode="fast")
    assert enc.config.mode == ("guarded" if cpu_has_fast_bf16() else "sorted")
    if enc.config.mode == "guarded":
        assert enc.guard_eps == GUARD_EPS[MINILM_NAME] and enc.describe()["guard_eps"] == enc.guard_eps


@pytest.mark.slow  # 20-70 s on a CPU without bf16 instructions (bf16 is emulated there)
def test_guarded_matches_exact_top3_on_real_questions(guarded, flat, questions):
    exact_emb = Encoder(mode="exact").encode_queries(questions)
    exact_scores, exact_ids = flat.search(exact_emb, 3)
    res = guarded_search(guarded, flat_search(flat), questions, 3)
    agree = np.mean([set(a) == set(b) for a, b in zip(res.ids.tolist(), exact_ids.tolist())])
    print(f"guarded vs exact on {len(questions)} real questions: top-3 agreement {agree:.4f}, "
          f"fallback rate {res.fallback.mean():.3f}")
    assert len(questions) == 300 and agree >= 0.99
    # fallback rows are the fp32 path: same ids in the same order, scores within fp32 batching noise
    fb = res.fallback
    assert 0 < fb.sum() < len(questions)
    assert np.array_equal(res.ids[fb], exact_ids[fb])
    np.testing.assert_allclose(res.scores[fb], exact_scores[fb], atol=1e-5)
    # the other rows carry bf16-path scores: |s_bf16 - s_fp32| <= ||q_bf16 - q_fp32|| (unit passages), ~1e-2
    same = ~fb & np.array([list(a) == list(b) for a, b in zip(res.ids.tolist(), exact_ids.tolist())])
    assert np.abs(res.scores[same] - exact_scores[same]).max() < 0.02
    # without the guard (eps 0) bf16 alone disagrees more often: the guard is doing the work
    _, raw_ids = flat.search(guarded.encode_queries_bf16(questions), 3)
    raw_agree = np.mean([set(a) == set(b) for a, b in zip(raw_ids.tolist(), exact_ids.tolist())])
    assert raw_agree < agree


def test_near_tie_takes_the_fp32_fallback(guarded):
    """Hand-built index around one real question: passages 3 and 4 tie within 1e-4 (below guard_eps) for query A;
    query B's 3rd/4th scores are 0.1 apart. Only A is re-encoded in fp32, and both get fp32's top-3 set."""
    qa, qb = "Who directed the film that won the Palme d'Or in 1994?", "Which river flows through Vienna?"
    q32 = Encoder(mode="sorted").encode_queries([qa, qb])  # (2, 384) fp32
    rng = np.random.default_rng(0)

    def around(q, cos):  # a unit vector with cosine `cos` to the unit vector q
        r = rng.standard_normal(q.shape[0]).astype(np.float32)
        r -= (r @ q) * q
        return cos * q + np.sqrt(1 - cos ** 2) * r / np.linalg.norm(r)

    a = [around(q32[0], c) for c in (0.95, 0.9, 0.8)]
    tie = a[2] + 1e-4 * around(q32[0], 0.0)  # 4th passage: score 0.8 +- ~1e-4, far below eps = 0.0040
    b = [around(q32[1], c) for c in (0.95, 0.9, 0.8, 0.7)]  # gap_3 = 0.8 - 0.7 = 0.1
    index = faiss.IndexFlatIP(384)
    index.add(np.stack(a + [tie / np.linalg.norm(tie)] + b).astype(np.float32))  # ids 0-3 (A), 4-7 (B)
    calls = []
    encode = guarded.encode_queries
    guarded.encode_queries = lambda qs, **kw: calls.append(list(qs)) or encode(qs, **kw)  # records, runs the real one
    try:
        res = guarded_search(guarded, flat_search(index), [qa, qb], 3)
    finally:
        del guarded.encode_queries
    assert res.fallback.tolist() == [True, False]
    assert calls == [[qa]]  # only the near-tie query was re-encoded in fp32
    _, want = index.search(q32, 3)
    assert [set(r) for r in res.ids.tolist()] == [set(r) for r in want.tolist()]
    assert set(res.ids[1].tolist()) == {4, 5, 6}


@pytest.mark.slow  # 20-70 s on a CPU without bf16 instructions (bf16 is emulated there)
def test_calibrate_guard_eps_matches_a_slow_loop(guarded, flat, questions):
    passages = flat.reconstruct_n(0, flat.ntotal)  # (1000, 384)
    qs = questions[::5]  # 60 real questions
    cal = calibrate_guard_eps(guarded, passages, qs, topk=3, depth=10, max_disagree=None, quantile=0.5, safety=2.0)
    q16, q32 = guarded.encode_queries_bf16(qs), guarded.encode_queries(qs)
    errs = []
    for i in range(len(qs)):  # slow reference: plain loops over the bf16 ranking
        s16, s32 = passages @ q16[i], passages @ q32[i]
        ranked = sorted(range(len(passages)), key=lambda p: -s16[p])[:10]
        errs.append(max(abs((s16[a] - s16[b]) - (s32[a] - s32[b])) for a in ranked[:3] for b in ranked[3:]))
    assert cal["n_queries"] == 60 and cal["n_passages"] == 1000
    assert cal["eps"] == pytest.approx(float(np.quantile(errs, 0.5)) * 2.0, abs=1e-6)  # fp32 matmul vs mat-vec
    assert cal["pair_err"]["max"] == pytest.approx(max(errs), abs=1e-6)
    # the calibrated eps is below the plain norm bound (the score-difference error is the tighter measure)
    assert cal["pair_err"]["max"] < cal["norm_bound"]["0.5"]
    # the shipped MiniLM value covers the bulk of this sample's errors too
    assert np.mean(np.array(errs) < GUARD_EPS[MINILM_NAME]) >= 0.95


@pytest.mark.slow  # 20-70 s on a CPU without bf16 instructions (bf16 is emulated there)
def test_calibrate_max_disagree_rule_matches_a_slow_loop(guarded, flat, questions):
    """eps = the smallest bf16 gap g (or 0) with share(g <= gap < err) <= max_disagree, err and gap by plain loops."""
    passages = flat.reconstruct_n(0, flat.ntotal)
    qs = questions[::4]  # 75 real questions
    cal = calibrate_guard_eps(guarded, passages, qs, topk=3, depth=10, max_disagree=0.02)
    q16, q32 = guarded.encode_queries_bf16(qs), guarded.encode_queries(qs)
    gaps, errs = [], []
    for i in range(len(qs)):
        s16, s32 = passages @ q16[i], passages @ q32[i]
        ranked = sorted(range(len(passages)), key=lambda p: -s16[p])[:10]
        gaps.append(float(s16[ranked[2]]) - float(s16[ranked[3]]))
        errs.append(max(abs((s16[a] - s16[b]) - (s32[a] - s32[b])) for a in ranked[:3] for b in ranked[3:]))
    share = lambda e: sum(e <= g < r for g, r in zip(gaps, errs)) / len(qs)  # noqa: E731
    want = min(g for g in [0.0] + gaps if share(g) <= 0.02)
    assert cal["rule"] == "max_disagree" and cal["eps"] == pytest.approx(want, abs=1e-6)
    assert cal["could_disagree"] <= 0.02 and cal["fallback_rate"] == pytest.approx(np.mean(np.array(gaps) < want))
    with pytest.raises(ValueError, match="exactly one of max_disagree and quantile"):
        calibrate_guard_eps(guarded, passages, qs[:2], quantile=0.9)


def test_guarded_needs_a_calibrated_eps(tmp_path, guarded):
    folder = tmp_path / "uncalibrated-encoder"
    folder.mkdir()
    for item in Path(guarded.model_path).iterdir():
        os.symlink(item, folder / item.name)
    with pytest.raises(ValueError, match="guard_eps"):
        Encoder(model=str(folder), mode="guarded")
    assert Encoder(model=str(folder), mode="guarded", guard_eps=0.01).guard_eps == 0.01
    assert Encoder(model=str(folder), mode="fast").config.mode in ("sorted",)  # fast never guesses an eps
    with pytest.raises(ValueError, match="guard_eps must be a float >= 0"):
        Encoder(mode="guarded", guard_eps=-1.0)
    with pytest.raises(ValueError, match="needs mode='guarded'"):
        Encoder(mode="sorted").encode_queries_bf16(["x"])


def test_hybrid_keeps_fp32_ranks(wiki_index_dir):
    with pytest.raises(IndexLoadError, match="hybrid fuses dense ranks"):
        load_index(wiki_index_dir, LoadOptions(method="hybrid", encoder_mode="guarded"))
    loaded = load_index(wiki_index_dir, LoadOptions(method="hybrid", encoder_mode="fast"))
    assert loaded.retriever.dense.encoder.config.mode == "sorted"


def test_server_flags_reach_the_guard(wiki_index_dir, questions):
    """--encoder_mode guarded --guard_eps 1.0: every query falls back (cosine gaps are < 1), so the served results
    are fp32's exactly; /health and /stats show the mode, eps and fallback count."""
    cfg = ServerConfig(index_dir=wiki_index_dir, encoder_mode="guarded", guard_eps=1.0, torch_threads=1,
                       warm_up=False)  # the shape warm-up has its own test
    app = create_app(cfg, open_backend(cfg))
    qs = questions[:20]
    with TestClient(FastLane(app)) as client:
        health = client.get("/health").json()
        assert (health["encoder_mode"], health["guard_eps"]) == ("guarded", 1.0)
        got = client.post("/retrieve", json={"queries": qs, "topk": 3, "return_scores": True}).json()["result"]
        guard = client.get("/stats").json()["batch_sizes"]["guard"]
    # the start-up warm-up does not search a Flat index (LocalBackend.warm_up), so only the 20 queries count, all
    # re-encoded in fp32
    assert guard == {"guard_eps": 1.0, "queries": 20, "fp32_fallbacks": 20, "fallback_rate": 1.0}
    exact_emb = Encoder(mode="exact").encode_queries(qs)
    scores, ids = faiss.read_index(str(Path(wiki_index_dir) / "dense.faiss")).search(exact_emb, 3)
    rows = load_index(wiki_index_dir, LoadOptions(method="bm25")).corpus.rows(ids.reshape(-1))
    want_ids = np.array([r["id"] for r in rows]).reshape(ids.shape)
    assert [[h["document"]["id"] for h in hits] for hits in got] == want_ids.tolist()
    np.testing.assert_allclose([[h["score"] for h in hits] for hits in got], scores, atol=1e-5)


def test_bf16_batches_pad_to_a_multiple_and_warm_up(guarded, questions):
    """bf16 micro-batches are padded to a multiple of 8 tokens (fewer oneDNN kernel shapes); the padding is masked,
    so embeddings match the unpadded bf16 pass up to bf16 rounding; warm_up_bf16 runs one batch per (B, T)."""
    assert guarded.config.bf16_pad_multiple == 8
    batch = guarded.pad([[101, 7, 8, 102], [101, 9, 102]], multiple=8)  # longest 4 tokens -> T = 8
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].sum(dim=1).tolist() == [4, 3]
    texts = questions[:16]
    padded = guarded.encode_queries_bf16(texts)
    plain = guarded.encode_sorted(texts, 32, model=guarded.fast_model, pad_multiple=1)
    np.testing.assert_allclose(padded, plain, atol=2e-2)  # bf16 kernels differ by shape; both ~1e-2 from fp32
    assert guarded.warm_up_bf16(lengths=(8, 16), max_batch=3) == 6  # (B, T) for B in 1..3, T in (8, 16)
    assert Encoder(mode="sorted").warm_up_bf16() == 0  # nothing to warm outside guarded mode


@pytest.mark.slow  # 20-70 s on a CPU without bf16 instructions (bf16 is emulated there)
def test_pipelined_server_backend_returns_guarded_search_results(wiki_index_dir, questions):
    """The server's two-thread guarded pipeline (bf16 pass | fp32 fallback pass) answers 24 concurrent requests of
    real questions with exactly what the one-thread guarded search returns, fallback rows included."""
    from concurrent.futures import ThreadPoolExecutor

    from stepsearch.search.batcher import GuardedPipelineBatcher
    from stepsearch.search.server import ServerConfig, open_backend

    backend = open_backend(ServerConfig(index_dir=wiki_index_dir, method="dense", encoder_mode="guarded",
                                        max_wait_ms=3.0))
    backend.start()
    try:
        assert isinstance(backend.batcher, GuardedPipelineBatcher)
        reqs = [questions[i:i + 5] for i in range(0, 120, 5)]  # 24 requests of 5 questions
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda q: backend.batcher.submit_future(q, 3).result(timeout=300), reqs))
        stats = backend.batch_stats()
        want = backend.loaded.retriever.search(questions[:120], 3)  # one thread, one call
    finally:
        backend.batcher.close()
    ids = np.concatenate([g[0] for g in got])
    assert stats["pipeline"]["fallback_queries"] > 0  # some questions did take the fp32 pass
    for i in range(120):  # same top-3 set per question (fp32 rows are exact; bf16 rows keep the fp32 set)
        assert set(ids[i]) == set(want.ids[i]), questions[i]
