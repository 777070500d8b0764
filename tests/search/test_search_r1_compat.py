"""Search-R1 compatibility of the index: `build_index` encodes a `{"id","contents"}` corpus's `contents` as it is
(issue 16, 0b), and `--import_faiss` serves an index built the Search-R1 way without re-encoding (issue 16, 1).

The reference ("the Search-R1 way") is written here from scratch: MiniLM vectors of each row's `contents` string,
L2-normalized, in a `faiss.IndexFlatIP` saved with `faiss.write_index`. The corpus is real wiki-18 rows, half of
them rows whose first line has no quotes (where rebuilding `"Title"\\ntext` used to change the text encoded).
"""
import json
import os
from pathlib import Path

import faiss
import httpx
import numpy as np
import pytest

from stepsearch.search.build_index import PROGRESS, BuildConfig, build_index, main
from stepsearch.search.corpus import ArrowCorpus, format_contents, split_contents
from stepsearch.search.encoders import Encoder
from stepsearch.search.index import (DENSE_INDEX, EMBEDDINGS, PASSAGE_TEXT, IndexLoadError, LoadOptions, load_index,
                                     read_manifest)
from stepsearch.search.testing import start_retrieval_server

WIKI = Path("data/samples/wiki18_sample_1000.jsonl")
QUESTION_FILES = ["data/samples/hotpotqa_flashrag_dev_200.jsonl", "data/samples/2wiki_flashrag_dev_200.jsonl"]
N_UNQUOTED = N_QUOTED = 16
MAX_LENGTH = 128  # both sides use it; keeps the encoding cheap (the texts differ in their first tokens)


def first_line_quoted(contents: str) -> bool:
    return contents.partition("\n")[0].startswith('"')


@pytest.fixture(scope="module")
def corpus_rows() -> list[dict]:
    rows = [json.loads(line) for line in WIKI.open()]
    unquoted = [r for r in rows if not first_line_quoted(r["contents"])][:N_UNQUOTED]
    quoted = [r for r in rows if first_line_quoted(r["contents"])][:N_QUOTED]
    mixed = [row for pair in zip(unquoted, quoted) for row in pair]  # interleaved; written as {"id","contents"}
    assert len(mixed) == N_UNQUOTED + N_QUOTED
    return mixed


@pytest.fixture(scope="module")
def corpus_file(corpus_rows, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sr1") / "wiki-18-sample.jsonl"
    path.write_text("".join(json.dumps({"id": r["id"], "contents": r["contents"]}) + "\n" for r in corpus_rows))
    return path


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder("minilm", max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def reference_vectors(corpus_rows, encoder) -> np.ndarray:
    """(N, 384) float32: `contents` encoded verbatim and normalized, as Search-R1's index builder does."""
    emb = encoder.encode_passages([r["contents"] for r in corpus_rows])
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def reference_index(reference_vectors, tmp_path_factory) -> Path:
    index = faiss.IndexFlatIP(reference_vectors.shape[1])
    index.add(reference_vectors)
    path = tmp_path_factory.mktemp("sr1_index") / "e5_Flat.index"  # Search-R1's file name; MiniLM inside
    faiss.write_index(index, str(path))
    return path


@pytest.fixture(scope="module")
def questions() -> list[str]:
    out = []
    for name in QUESTION_FILES:
        out += [json.loads(line)["question"] for line in open(name)][:40]
    return out


@pytest.fixture(scope="module")
def reference_top3(reference_index, encoder, questions) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.read_index(str(reference_index))
    scores, ids = index.search(encoder.encode_queries(questions), 3)  # (Q, 3) each
    return ids, scores


def test_build_index_encodes_contents_as_is(corpus_file, corpus_rows, encoder, reference_vectors, reference_top3,
                                            questions, tmp_path):
    out = tmp_path / "built"
    build_index(BuildConfig(corpus=str(corpus_file), out=str(out), max_length=MAX_LENGTH, quiet=True))
    n, dim = reference_vectors.shape
    stored = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="r", shape=(n, dim))
    np.testing.assert_allclose(stored, reference_vectors, atol=1e-5)
    # the old rule ('"Title"\ntext' rebuilt from the split title) gives other vectors for unquoted rows: this test
    # fails under it
    unquoted = [i for i, r in enumerate(corpus_rows) if not first_line_quoted(r["contents"])][:4]
    rebuilt = encoder.encode_passages([format_contents(*split_contents(corpus_rows[i]["contents"])) for i in unquoted])
    assert np.abs(rebuilt - reference_vectors[unquoted]).max(axis=1).min() > 1e-3
    manifest = read_manifest(out)
    assert manifest["passage_text"] == PASSAGE_TEXT
    assert json.loads((out / PROGRESS).read_text())["passage_text"] == PASSAGE_TEXT
    loaded = load_index(out, LoadOptions(method="dense", encoder_mode="exact"))
    res = loaded.retriever.search(questions, 3)
    ref_ids, ref_scores = reference_top3
    agreement = np.mean([set(a) == set(b) for a, b in zip(res.ids.tolist(), ref_ids.tolist())])
    print(f"top-3 agreement with the Search-R1-style index: {agreement:.3f} over {len(questions)} real questions")
    assert agreement == 1.0
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-5)
    # served rows keep the corpus' own contents (no quotes added)
    served = loaded.corpus.rows(np.arange(n))
    assert [d["contents"] for d in served] == [r["contents"] for r in corpus_rows]


def test_resume_redoes_embeddings_made_under_the_old_text_rule(corpus_file, reference_vectors, tmp_path):
    """An emb.memmap whose progress file predates PASSAGE_TEXT is re-encoded, not mixed with new rows."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(corpus_file.read_text().splitlines(keepends=True)[:6]))
    out = tmp_path / "resume"
    build_index(BuildConfig(corpus=str(small), out=str(out), max_length=MAX_LENGTH, quiet=True))
    state = json.loads((out / PROGRESS).read_text())
    emb = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="r+", shape=(6, reference_vectors.shape[1]))
    emb[:] = 0.5  # what an old build left behind
    emb.flush()
    del state["passage_text"]
    (out / PROGRESS).write_text(json.dumps(state))
    build_index(BuildConfig(corpus=str(small), out=str(out), max_length=MAX_LENGTH, quiet=True))
    redone = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="r", shape=(6, reference_vectors.shape[1]))
    np.testing.assert_allclose(redone, reference_vectors[:6], atol=1e-5)


def import_cfg(corpus_file, src, out, **kw) -> BuildConfig:
    return BuildConfig(corpus=str(corpus_file), out=str(out), max_length=MAX_LENGTH, import_faiss=str(src),
                       import_check_rows=16, quiet=True, **kw)


def test_import_serves_the_same_top3_over_http(corpus_file, corpus_rows, reference_index, reference_top3, questions,
                                               tmp_path):
    out = tmp_path / "imported"
    build_index(import_cfg(corpus_file, reference_index.parent, out))  # the folder: FlashRAG's layout
    link = out / DENSE_INDEX
    assert link.is_symlink() and Path(os.readlink(link)) == reference_index.resolve()  # vectors not copied
    assert not (out / EMBEDDINGS).exists()
    manifest = read_manifest(out)
    assert manifest["index_factory"] == "imported IndexFlatIP" and manifest["passage_text"] == PASSAGE_TEXT
    assert manifest["dense_source"]["path"] == str(reference_index.resolve())
    check = manifest["import_check"]
    assert check["rows"] == 16 and check["min_cosine"] >= 0.9999 and check["threshold"] == 0.99
    server = start_retrieval_server(out, extra_args=["--encoder_mode", "exact", "--torch_threads", "0"])
    try:
        health = httpx.get(server.url + "/health").json()
        from stepsearch.search.server_config import ServerConfig
        from stepsearch.search.service import torch_threads

        # 0a: auto (0, the default) uses every core this process may run on (or $OMP_NUM_THREADS), not one thread
        assert health["torch_threads"] == torch_threads(ServerConfig(index_dir=str(out)), "exact")
        assert health["index_factory"] == "imported IndexFlatIP" and health["num_passages"] == len(corpus_rows)
        resp = httpx.post(server.url + "/retrieve", json={"queries": questions, "topk": 3, "return_scores": True},
                          timeout=300)
        assert resp.status_code == 200, resp.text
        result = resp.json()["result"]
    finally:
        server.stop()
    ref_ids, ref_scores = reference_top3
    ids = [str(corpus_rows[i]["id"]) for i in ref_ids.reshape(-1)]
    assert [h["document"]["id"] for hits in result for h in hits] == ids  # same passages, same order
    np.testing.assert_allclose([h["score"] for hits in result for h in hits], ref_scores.reshape(-1), atol=1e-5)
    assert [h["document"]["contents"] for h in result[0]] == [corpus_rows[i]["contents"] for i in ref_ids[0]]


def test_import_refuses_vectors_of_another_prefix(corpus_file, reference_index, tmp_path, capsys):
    """The stored vectors are MiniLM of `contents`; claiming they were encoded with a 'passage: ' prefix fails."""
    rc = main(["--corpus", str(corpus_file), "--out", str(tmp_path / "o"), "--import_faiss", str(reference_index),
               "--passage_prefix", "passage: ", "--max_length", str(MAX_LENGTH), "--import_check_rows", "8",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--import_faiss {reference_index.resolve()}: the stored vectors do not match" in err
    assert "passage_prefix 'passage: '" in err and "--import_min_cosine 0.99" in err
    assert not (tmp_path / "o" / "manifest.json").exists() and not (tmp_path / "o" / DENSE_INDEX).exists()


def test_import_refuses_random_vectors(corpus_file, reference_vectors, encoder, tmp_path):
    from stepsearch.search.faiss_import import import_faiss, open_index

    rng = np.random.default_rng(0)
    noise = rng.standard_normal(reference_vectors.shape).astype(np.float32)
    index = faiss.IndexFlatIP(noise.shape[1])
    index.add(noise / np.linalg.norm(noise, axis=1, keepdims=True))
    path = tmp_path / "random.index"
    faiss.write_index(index, str(path))
    out = tmp_path / "o"
    out.mkdir()
    from stepsearch.search.corpus import build_arrow_corpus

    build_arrow_corpus(corpus_file, out / "corpus.arrow")
    corpus = ArrowCorpus(out / "corpus.arrow")
    src, opened = open_index(str(path), len(corpus), str(corpus_file))
    with pytest.raises(ValueError, match=r"random.index: the stored vectors do not match --encoder "
                                         r"sentence-transformers/all-MiniLM-L6-v2.*at corpus row \d+ \(id '\d+'\)"):
        import_faiss(src, opened, out, corpus, encoder, check_rows=8, min_cosine=0.99)
    assert not (out / DENSE_INDEX).exists()


def test_import_refuses_a_count_mismatch_before_loading_the_encoder(corpus_file, reference_vectors, tmp_path,
                                                                    capsys):
    index = faiss.IndexFlatIP(reference_vectors.shape[1])
    index.add(reference_vectors[:-1])  # one vector short
    path = tmp_path / "short.index"
    faiss.write_index(index, str(path))
    rc = main(["--corpus", str(corpus_file), "--out", str(tmp_path / "o"), "--import_faiss", str(path), "--quiet"])
    err = capsys.readouterr().err
    n = len(reference_vectors)
    assert rc == 2 and f"the index holds {n - 1} vectors but --corpus {corpus_file} has {n} passages" in err


def test_import_refuses_l2_metric_and_bad_paths(corpus_file, reference_vectors, tmp_path, capsys):
    index = faiss.IndexFlatL2(reference_vectors.shape[1])
    index.add(reference_vectors)
    faiss.write_index(index, str(tmp_path / "l2.index"))
    assert main(["--corpus", str(corpus_file), "--out", str(tmp_path / "o"), "--import_faiss",
                 str(tmp_path / "l2.index"), "--quiet"]) == 2
    assert "is not inner product" in capsys.readouterr().err
    (tmp_path / "two").mkdir()
    for name in ("a.index", "b.index"):
        faiss.write_index(index, str(tmp_path / "two" / name))
    assert main(["--corpus", str(corpus_file), "--out", str(tmp_path / "o"), "--import_faiss",
                 str(tmp_path / "two"), "--quiet"]) == 2
    assert "exactly one *.index file, found ['a.index', 'b.index']" in capsys.readouterr().err
    assert main(["--corpus", str(corpus_file), "--out", str(tmp_path / "o"), "--import_faiss",
                 str(tmp_path / "nothing.index"), "--quiet"]) == 2
    assert "nothing.index: no such file or folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--import_faiss serves a dense index"):
        BuildConfig(corpus="c", out="o", method="bm25", import_faiss="x.index")
    with pytest.raises(ValueError, match="does not apply with --import_faiss"):
        BuildConfig(corpus="c", out="o", import_faiss="x.index", index_factory="IVF8,PQ8+rerank")


def test_imported_index_refuses_to_start_when_its_file_changed(corpus_file, reference_index, tmp_path):
    src = tmp_path / "copy.index"
    src.write_bytes(reference_index.read_bytes())
    out = tmp_path / "imported"
    build_index(import_cfg(corpus_file, src, out))
    stat = src.stat()
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten since the import
    with pytest.raises(IndexLoadError, match=r"copy.index changed since the import.*--import_faiss"):
        load_index(out, LoadOptions(method="dense", encoder_mode="exact"))
    src.unlink()
    with pytest.raises(IndexLoadError, match=r"copy.index is gone"):
        load_index(out, LoadOptions(method="dense", encoder_mode="exact"))
