"""Fast query paths return what the exact path returns (issue 8): top-3 agreement with exact fp32 >= 0.99 on real
questions over the 1000-passage wiki-18 sample, and exact equality of the pipelined and sequential paths.
Correctness only; speed is measured in bench/retrieval.py."""
from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from stepsearch.search.encoders import Encoder, configure_threads, pipelined_encode_search

pytestmark = pytest.mark.timeout(600)

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"
QA_FILES = ("hotpotqa_flashrag_dev_200.jsonl", "2wiki_flashrag_dev_200.jsonl", "musique_flashrag_dev_200.jsonl")


def top3_agreement(ids_a: np.ndarray, ids_b: np.ndarray) -> float:
    """Fraction of queries whose top-k id sets are equal (any order). ids_*: (N, k)."""
    return float(np.mean([set(a) == set(b) for a, b in zip(ids_a.tolist(), ids_b.tolist())]))


@pytest.fixture(scope="module")
def questions() -> list[str]:
    out = []
    for name in QA_FILES:  # 100 real multi-hop questions from each data set
        with open(SAMPLES / name) as f:
            out += [json.loads(line)["question"] for _, line in zip(range(100), f)]
    return out


@pytest.fixture(scope="module")
def flat(wiki_index_dir):
    """The Flat inner-product index over exact MiniLM passage embeddings of the wiki-18 sample."""
    manifest = json.loads((Path(wiki_index_dir) / "manifest.json").read_text())
    assert manifest["index_factory"] == "Flat" and manifest["encoder"]["mode"] == "exact"
    index = faiss.read_index(str(Path(wiki_index_dir) / "dense.faiss"))
    assert index.ntotal == 1000
    return index


@pytest.fixture(scope="module")
def exact_run(flat, questions):
    torch.manual_seed(0)
    emb = Encoder(mode="exact").encode_queries(questions)
    scores, ids = flat.search(emb, 3)
    return emb, ids, scores


def test_top3_agreement_by_hand():
    a = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 2, 3]])
    b = np.array([[3, 1, 2], [4, 5, 7], [7, 8, 9], [1, 2, 4]])
    assert top3_agreement(a, b) == 0.5  # rows 0 (same set, other order) and 2 agree: 2/4


@pytest.mark.parametrize("mode, emb_atol", [("sorted", 1e-5), pytest.param("fp16", 5e-3, marks=pytest.mark.slow)])  # fp16: ~20 s
def test_fast_mode_keeps_top3_agreement(mode, emb_atol, flat, questions, exact_run):
    ref_emb, ref_ids, _ = exact_run
    fast = Encoder(mode=mode)
    emb = fast.encode_queries(questions)
    assert emb.dtype == np.float32 and emb.shape == ref_emb.shape
    np.testing.assert_allclose(emb, ref_emb, atol=emb_atol)
    _, ids = flat.search(emb, 3)
    assert top3_agreement(ids, ref_ids) >= 0.99


def test_fast_on_cpu_is_guarded_or_sorted():
    """`fast` on CPU: guarded bf16 where the CPU has native bf16 (tests/search/test_guarded.py), else sorted fp32;
    either way encode_queries itself is the fp32 sorted path."""
    from stepsearch.search.encoders import cpu_has_fast_bf16

    assert Encoder(mode="fast").config.mode == ("guarded" if cpu_has_fast_bf16() else "sorted")


def test_sorted_handles_duplicates_in_input_order(exact_run, questions):
    ref_emb = exact_run[0]
    picks = [5, 0, 5, 17, 0, 5]  # repeats, out of order
    emb = Encoder(mode="sorted").encode_queries([questions[i] for i in picks], batch_size=2)
    np.testing.assert_allclose(emb, ref_emb[picks], atol=1e-5)
    assert np.array_equal(emb[0], emb[2]) and np.array_equal(emb[1], emb[4])  # each distinct text encoded once


def test_pipelined_equals_sequential(flat, questions, exact_run):
    enc = Encoder(mode="sorted", query_batch_size=16)
    search = lambda emb, k: flat.search(emb, k)[::-1]  # FAISS returns (scores, ids)
    part = questions[::3]  # 100 questions, a third of each data set
    ids, scores = pipelined_encode_search(enc, search, part, 3, micro_batch=16)
    seq_scores, seq_ids = flat.search(enc.encode_queries(part, batch_size=16), 3)
    assert np.array_equal(ids, seq_ids)
    np.testing.assert_allclose(scores, seq_scores, atol=1e-6)
    assert top3_agreement(ids, exact_run[1][::3]) >= 0.99
    empty_ids, empty_scores = pipelined_encode_search(enc, search, [], 3)
    assert empty_ids.shape == (0, 3) and empty_scores.shape == (0, 3)


def test_configure_threads_sets_torch_and_faiss():
    before = torch.get_num_threads()
    try:
        configure_threads(1)
        assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
        with pytest.raises(ValueError, match="num_threads"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)
        faiss.omp_set_num_threads(before)


def test_onednn_isa_cap_hides_native_bf16(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 (how an AVX2-only CPU is emulated on a bf16 CPU) turns `fast` into `sorted`."""
    from stepsearch.search.encoders import cpu_has_fast_bf16, onednn_allows_bf16

    assert [onednn_allows_bf16(v) for v in (None, "", "avx2", "AVX512_CORE", "AVX512_CORE_VNNI")] == \
        [True, True, False, False, False]
    assert [onednn_allows_bf16(v) for v in ("AVX512_CORE_BF16", "avx512_core_amx", "ALL", "DEFAULT")] == [True] * 4
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_has_fast_bf16() is False


def test_parallel_sorted_backend_returns_exact_results(wiki_index_dir, questions, exact_run, monkeypatch):
    """--encode_workers 2 (sorted mode on CPU, two encode threads of 1 torch thread each): 30 concurrent requests
    of real questions get exact fp32's top-3 ids and scores; /health reports the workers; the default is one owner
    thread, and the thread budget decides the automatic count (--encode_workers 0; an explicit --torch_threads 1
    keeps one owner thread, hybrid keeps one)."""
    from concurrent.futures import ThreadPoolExecutor

    from stepsearch.search.batcher import GuardedPipelineBatcher
    from stepsearch.search.server import ServerConfig, open_backend
    from stepsearch.search.service import encode_workers

    before = torch.get_num_threads()
    backend = open_backend(ServerConfig(index_dir=wiki_index_dir, method="dense", encoder_mode="sorted",
                                        encode_workers=2, max_wait_ms=3.0))
    backend.start()
    try:
        assert isinstance(backend.batcher, GuardedPipelineBatcher) and torch.get_num_threads() == 1
        health = backend.health()
        assert health["encode_workers"] == 2 and health["encoder_mode"] == "sorted"
        assert health["encoder_backend"] in ("native", "transformers")
        reqs = [questions[i:i + 10] for i in range(0, 300, 10)]
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda q: backend.batcher.submit_future(q, 3).result(timeout=300), reqs))
    finally:
        backend.batcher.close()
        torch.set_num_threads(before)
    _, want_ids, want_scores = exact_run
    ids, scores = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
    assert top3_agreement(ids, want_ids) == 1.0
    np.testing.assert_allclose(np.sort(scores, axis=1), np.sort(want_scores, axis=1), atol=1e-5)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert encode_workers(ServerConfig(index_dir="x"), "sorted", "dense") == 1  # the default: one owner thread
    cfg = ServerConfig(index_dir="x", encode_workers=0)
    assert encode_workers(cfg, "sorted", "dense") == 3  # auto: one per usable core
    assert encode_workers(ServerConfig(index_dir="x", torch_threads=1, encode_workers=0), "sorted", "dense") == 1
    assert encode_workers(cfg, "sorted", "hybrid") == 1 and encode_workers(cfg, "exact", "dense") == 1
    assert encode_workers(ServerConfig(index_dir="x", device="cuda", encode_workers=0), "sorted", "dense") == 1
