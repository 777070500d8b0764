"""Index builder: manifest, FAISS results against brute force, resume, memory estimate, stale/mismatch refusal."""
import json
import shutil

import numpy as np
import pytest

from stepsearch.search.build_index import PROGRESS, BuildConfig, build_index, estimate_index_bytes, main
from stepsearch.search.corpus import format_contents, iter_passages
from stepsearch.search.index import (EMBEDDINGS, IndexLoadError, LoadOptions, check_encoder, load_index,
                                     read_manifest, rrf_fuse, SearchResult)

N_SMALL = 24


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with open("data/samples/wiki18_sample_1000.jsonl") as src:
        path.write_text("".join(next(src) for _ in range(N_SMALL)))
    return path


@pytest.fixture(scope="module")
def small_index(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx")
    build_index(BuildConfig(corpus=str(small_corpus), out=str(out), method="hybrid", chunk_size=8, quiet=True))
    return out


def test_manifest_records_encoder_corpus_and_shape(small_index, small_corpus):
    m = read_manifest(small_index)
    assert m["methods"] == ["dense", "bm25"]
    assert m["num_passages"] == m["corpus"]["num_passages"] == N_SMALL
    assert m["dim"] == 384 and m["metric"] == "inner_product" and m["index_factory"] == "Flat"
    assert m["pooling"] == "mean" and m["max_length"] == 256
    assert m["query_prefix"] == "" and m["passage_prefix"] == ""  # MiniLM takes no prefixes (e5 would)
    assert m["encoder"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    import hashlib
    assert m["corpus"]["sha256"] == hashlib.sha256(small_corpus.read_bytes()).hexdigest()


def test_dense_search_equals_brute_force_cosine(small_index, small_corpus):
    loaded = load_index(small_index, LoadOptions(method="dense"))
    encoder = loaded.retriever.encoder
    passages = [format_contents(p.title, p.text) for p in iter_passages(small_corpus)]
    emb_p = encoder.encode_passages(passages)  # (N, D), unit rows
    emb_stored = np.memmap(small_index / EMBEDDINGS, dtype=np.float32, mode="r", shape=emb_p.shape)
    np.testing.assert_allclose(emb_stored, emb_p, atol=1e-5)
    queries = ["lobbyist for Genentech", "history of trespass law", passages[5][:80]]
    res = loaded.retriever.search(queries, 5)
    scores_ref = encoder.encode_queries(queries) @ emb_p.T  # (Q, N) cosine, the slow oracle
    for q in range(len(queries)):
        ref_order = np.argsort(-scores_ref[q], kind="stable")[:5]
        np.testing.assert_allclose(res.scores[q], scores_ref[q][ref_order], atol=1e-5)
        assert set(res.ids[q].tolist()) == set(ref_order.tolist())
    assert res.ids[2][0] == 5  # a passage's own opening retrieves it


def test_bm25_and_hybrid_find_exact_title(small_index, small_corpus):
    titles = [p.title for p in iter_passages(small_corpus)]
    for method in ("bm25", "hybrid"):
        loaded = load_index(small_index, LoadOptions(method=method))
        res = loaded.retriever.search([titles[3], titles[17 % N_SMALL]], 3)
        assert res.ids.shape == (2, 3)
        assert titles[int(res.ids[0, 0])] == titles[3] and titles[int(res.ids[1, 0])] == titles[17 % N_SMALL]


def test_resume_skips_rows_already_encoded(small_index, small_corpus, tmp_path):
    out = tmp_path / "resume"
    out.mkdir()
    shutil.copyfile(small_index / EMBEDDINGS, out / EMBEDDINGS)
    state = json.loads((small_index / PROGRESS).read_text())
    # pretend the build died after the first chunk of 8 rows, with row 0 holding a recognizable value
    state["done"], state["rows_done"] = [[0, 8]], 8
    (out / PROGRESS).write_text(json.dumps(state))
    emb = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="r+", shape=(N_SMALL, 384))
    reference = np.array(emb)
    emb[0] = 0.5
    emb[8:] = 0.0
    emb.flush()
    build_index(BuildConfig(corpus=str(small_corpus), out=str(out), method="dense", chunk_size=8, quiet=True))
    resumed = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="r", shape=(N_SMALL, 384))
    assert np.all(resumed[0] == 0.5)  # not re-encoded
    np.testing.assert_allclose(resumed[8:], reference[8:], atol=1e-5)  # re-encoded from row 8 on
    assert json.loads((out / PROGRESS).read_text())["rows_done"] == N_SMALL


def test_old_progress_file_resumes_from_its_row_count(small_index, small_corpus, tmp_path):
    """A progress file written before row intervals ("rows_done" only) still resumes from that row."""
    out = tmp_path / "old"
    out.mkdir()
    shutil.copyfile(small_index / EMBEDDINGS, out / EMBEDDINGS)
    state = json.loads((small_index / PROGRESS).read_text())
    del state["done"]
    state["rows_done"] = 16
    (out / PROGRESS).write_text(json.dumps(state))
    emb = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="r+", shape=(N_SMALL, 384))
    emb[:16] = 0.25  # kept: recorded as done
    emb.flush()
    build_index(BuildConfig(corpus=str(small_corpus), out=str(out), method="dense", chunk_size=8, quiet=True))
    resumed = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="r", shape=(N_SMALL, 384))
    assert np.all(resumed[:16] == 0.25)
    assert json.loads((out / PROGRESS).read_text())["done"] == [[0, N_SMALL]]


def test_two_device_processes_encode_what_one_does_and_resume_each_others_rows(small_index, small_corpus,
                                                                            tmp_path):
    """--devices cpu,cpu (two real processes, as two GPUs would run): the same embeddings as the one-process build;
    after an interruption, the rows either process recorded (its own progress file) are not encoded again."""
    from stepsearch.search.build_index import WORKER_PROGRESS

    reference = np.array(np.memmap(small_index / EMBEDDINGS, dtype=np.float32, mode="r", shape=(N_SMALL, 384)))
    out = tmp_path / "two"
    build_index(BuildConfig(corpus=str(small_corpus), out=str(out), method="dense", chunk_size=4, devices="cpu,cpu",
                            quiet=True))
    built = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="r", shape=(N_SMALL, 384))
    np.testing.assert_allclose(built, reference, atol=1e-5)
    assert json.loads((out / PROGRESS).read_text())["done"] == [[0, N_SMALL]]
    assert not list(out.glob(WORKER_PROGRESS.format("*")))  # merged into the main file
    # interrupted: the main file has rows 0-8, process 1 had finished rows 12-20 before the crash
    state = json.loads((out / PROGRESS).read_text())
    (out / PROGRESS).write_text(json.dumps({**state, "done": [[0, 8]], "rows_done": 8}))
    (out / WORKER_PROGRESS.format(1)).write_text(json.dumps({**state, "done": [[12, 20]], "rows_done": 0}))
    emb = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="r+", shape=(N_SMALL, 384))
    emb[12:20] = 0.5  # recognisable: must survive the resume
    emb[8:12] = emb[20:] = 0.0
    emb.flush()
    build_index(BuildConfig(corpus=str(small_corpus), out=str(out), method="dense", chunk_size=4, devices="cpu,cpu",
                            quiet=True))
    resumed = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="r", shape=(N_SMALL, 384))
    assert np.all(resumed[12:20] == 0.5)
    np.testing.assert_allclose(resumed[8:12], reference[8:12], atol=1e-5)
    np.testing.assert_allclose(resumed[20:], reference[20:], atol=1e-5)
    assert json.loads((out / PROGRESS).read_text())["done"] == [[0, N_SMALL]]
    # everything done, but half of it recorded only in a per-device file: a one-device rerun keeps that record
    (out / PROGRESS).write_text(json.dumps({**state, "done": [[0, 12]], "rows_done": 12}))
    (out / WORKER_PROGRESS.format(0)).write_text(json.dumps({**state, "done": [[12, N_SMALL]], "rows_done": 0}))
    build_index(BuildConfig(corpus=str(small_corpus), out=str(out), method="dense", chunk_size=4, quiet=True))
    assert json.loads((out / PROGRESS).read_text())["done"] == [[0, N_SMALL]]
    assert not list(out.glob(WORKER_PROGRESS.format("*")))


def test_remaining_chunks_skip_done_intervals():
    from stepsearch.search.build_index import merge_intervals, todo_chunks

    assert merge_intervals([[8, 12], [0, 4], [4, 6], [11, 20], [30, 30]]) == [[0, 6], [8, 20]]
    assert todo_chunks([[0, 6], [8, 20]], 27, 4) == [(6, 8), (20, 24), (24, 27)]
    assert todo_chunks([], 5, 4) == [(0, 4), (4, 5)]
    assert todo_chunks([[0, 5]], 5, 4) == []


def test_memory_estimate_formula():
    assert estimate_index_bytes("Flat", 1000, 384) == 1000 * 384 * 4  # 1,536,000 B
    assert estimate_index_bytes("IVF4096,PQ64", 1000, 768) == 1000 * (64 + 8)  # PQ codes + stored id
    assert estimate_index_bytes("HNSW32", 1000, 384) == 1000 * (384 * 4 + 8 * 32)  # vectors + 2*M int32 links
    assert estimate_index_bytes("IVF256,SQ8", 10, 100) == 10 * (100 + 8)


def test_stale_corpus_and_encoder_mismatch_refuse(small_index, small_corpus, tmp_path):
    changed = tmp_path / "changed.jsonl"
    changed.write_text(small_corpus.read_text().replace("Evan", "Ivan", 1))
    with pytest.raises(IndexLoadError, match="stale"):
        load_index(small_index, LoadOptions(method="bm25", corpus=str(changed)))
    m = read_manifest(small_index)
    with pytest.raises(IndexLoadError, match="query_prefix"):
        check_encoder(m, {**m["encoder"], "query_prefix": "query: "})
    with pytest.raises(IndexLoadError, match="manifest.json is missing"):
        load_index(tmp_path / "nowhere")
    with pytest.raises(IndexLoadError, match="needs a dense index"):
        bm25_only = tmp_path / "bm25only"
        build_index(BuildConfig(corpus=str(small_corpus), out=str(bm25_only), method="bm25", quiet=True))
        load_index(bm25_only, LoadOptions(method="dense"))


def test_cli_bad_corpus_exits_2_with_file_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "contents": "\\"T\\"\\nx"}\n{"id": "2"}\n')
    assert main(["--corpus", str(bad), "--out", str(tmp_path / "o"), "--method", "bm25", "--quiet"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


def test_rrf_fusion_hand_computed():
    # list A ranks docs [1, 2, 3], list B ranks [3, 1, 4]; with k = 60:
    # doc1 = 1/61 + 1/62 = 0.032522; doc3 = 1/63 + 1/61 = 0.032266; doc2 = 1/62 = 0.016129; doc4 = 1/63 = 0.015873
    a = SearchResult(np.array([[1, 2, 3]]), np.zeros((1, 3), np.float32))
    b = SearchResult(np.array([[3, 1, 4]]), np.zeros((1, 3), np.float32))
    fused = rrf_fuse([a, b], topk=4)
    assert fused.ids.tolist() == [[1, 3, 2, 4]]
    np.testing.assert_allclose(fused.scores[0], [1 / 61 + 1 / 62, 1 / 63 + 1 / 61, 1 / 62, 1 / 63], rtol=1e-6)


def test_identity_keys_mirror_the_encoder_module():
    from stepsearch.search.encoders import IDENTITY_KEYS
    from stepsearch.search.index import ENCODER_IDENTITY_KEYS

    assert tuple(ENCODER_IDENTITY_KEYS) == tuple(IDENTITY_KEYS)


@pytest.mark.parametrize("factory", ["HNSW8", "IVF2,Flat"])
def test_other_index_factories_train_add_and_search(small_index, tmp_path, factory):
    import faiss

    from stepsearch.search.build_index import build_faiss
    from stepsearch.search.index import DENSE_INDEX

    emb = np.array(np.memmap(small_index / EMBEDDINGS, dtype=np.float32, mode="r", shape=(N_SMALL, 384)))
    build_faiss(BuildConfig(corpus="unused", out=str(tmp_path), index_factory=factory, quiet=True), emb, tmp_path)
    index = faiss.read_index(str(tmp_path / DENSE_INDEX))
    assert index.ntotal == N_SMALL and index.metric_type == faiss.METRIC_INNER_PRODUCT
    if "IVF" in factory:
        faiss.extract_index_ivf(index).nprobe = 2  # visit both lists: exact over the stored vectors
    _, ids = index.search(emb[:6], 1)  # (6, 1): each passage's own vector finds itself
    assert ids[:, 0].tolist() == list(range(6))


def test_untrainable_factory_is_a_clear_error(small_index, tmp_path):
    from stepsearch.search.build_index import build_faiss

    emb = np.array(np.memmap(small_index / EMBEDDINGS, dtype=np.float32, mode="r", shape=(N_SMALL, 384)))
    cfg = BuildConfig(corpus="unused", out=str(tmp_path), index_factory="IVF2,PQ8", quiet=True)
    with pytest.raises(ValueError, match=r"cannot train --index_factory 'IVF2,PQ8' on 24 vectors.*use Flat"):
        build_faiss(cfg, emb, tmp_path)  # 8-bit PQ needs >= 256 training points
