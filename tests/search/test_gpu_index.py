"""The `--faiss_gpu` index (gpu_index.TorchFlatIndex) answers like a FAISS IndexFlatIP. Run on CPU devices here
(the same code path as on GPUs, minus the tensor-core GEMM); the GPU numbers are in bench/results/retrieval.md."""
from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from stepsearch.search.gpu_index import MISSING_SCORE, TorchFlatIndex, grouped_topk

pytestmark = pytest.mark.timeout(300)


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_flat(xb: np.ndarray):
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return index


@pytest.mark.parametrize("rows, devices, chunk_rows", [(1000, ["cpu"], 1 << 20), (1000, ["cpu"], 37),
                                                      (1000, ["cpu", "cpu", "cpu"], 50), (12000, ["cpu"], 1 << 20),
                                                      (12000, ["cpu", "cpu"], 6000)])
def test_fp32_storage_equals_faiss_flat_ip(rows, devices, chunk_rows):
    """Small chunks take plain top-k, large ones (>= 8 groups x 128 x k columns) grouped_topk."""
    xb, xq = unit_rows(rows, 64, 0), unit_rows(40, 64, 1)
    want_s, want_i = faiss_flat(xb).search(xq, 5)
    got_s, got_i = TorchFlatIndex(xb, devices, storage="fp32", chunk_rows=chunk_rows).search(xq, 5)
    np.testing.assert_array_equal(got_i, want_i)  # chunks and shards merge back to the global top-5, best first
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    assert got_s.dtype == np.float32 and got_i.dtype == np.int64


def test_fp16_storage_is_the_fp32_search_of_fp16_rounded_vectors():
    """Independent reference: numpy search over np.float16-rounded passages and queries, fp32 products."""
    xb, xq = unit_rows(500, 32, 2), unit_rows(30, 32, 3)
    xb16, xq16 = xb.astype(np.float16).astype(np.float32), xq.astype(np.float16).astype(np.float32)
    ref = xq16 @ xb16.T  # (30, 500)
    want_i = np.argsort(-ref, axis=1, kind="stable")[:, :4]
    got_s, got_i = TorchFlatIndex(xb, ["cpu", "cpu"], storage="fp16", chunk_rows=64).search(xq, 4)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, np.take_along_axis(ref, want_i, 1), atol=1e-6)
    assert TorchFlatIndex(xb, ["cpu"], storage="fp16").memory_bytes() == 500 * 32 * 2  # half of fp32


@pytest.mark.parametrize("cols, k", [(128 * 24, 3), (128 * 40 + 77, 3), (5000, 10), (100, 3), (3000, 1)])
def test_grouped_topk_equals_topk(cols, k):
    import torch

    g = torch.Generator().manual_seed(cols)
    s = torch.randn((16, cols), generator=g)
    s[0, -1] = 99.0  # the best value sits in the partial tail group
    s[1, :3] = 50.0 + torch.arange(3.0)  # the best three share one group
    want_v, want_i = s.topk(min(k, cols), dim=1)
    got_v, got_i = grouped_topk(s, k)
    torch.testing.assert_close(got_v, want_v)
    torch.testing.assert_close(got_i, want_i)


def test_k_beyond_ntotal_pads_like_faiss():
    xb, xq = unit_rows(3, 8, 4), unit_rows(2, 8, 5)
    want_s, want_i = faiss_flat(xb).search(xq, 5)
    got_s, got_i = TorchFlatIndex(xb, ["cpu", "cpu"], storage="fp32").search(xq, 5)
    np.testing.assert_array_equal(got_i, want_i)  # last two columns: -1
    assert (got_i[:, 3:] == -1).all() and (got_s[:, 3:] == MISSING_SCORE).all()
    np.testing.assert_allclose(got_s[:, :3], want_s[:, :3], atol=1e-6)


@pytest.mark.parametrize("factory", ["Flat", "SQfp16"])
def test_from_faiss_copies_flat_indexes_in_blocks(factory):
    xb, xq = unit_rows(300, 16, 6), unit_rows(20, 16, 7)
    index = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    index.add(xb)
    want_s, want_i = index.search(xq, 3)
    moved = TorchFlatIndex.from_faiss(index, ["cpu", "cpu"], storage="fp32", copy_rows=64)  # 2 shards x 3 blocks
    assert moved.ntotal == 300 and [len(s) for s in moved.shards] == [150, 150]
    got_s, got_i = moved.search(xq, 3)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)


def test_from_faiss_refuses_what_cannot_move():
    xb = unit_rows(200, 16, 8)
    ivf = faiss.index_factory(16, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(xb)
    with pytest.raises(ValueError, match=r"only flat indexes.*IndexIVFFlat.*--index_factory Flat"):
        TorchFlatIndex.from_faiss(ivf, ["cpu"])
    with pytest.raises(ValueError, match="expected inner product"):
        TorchFlatIndex.from_faiss(faiss.IndexFlatL2(16), ["cpu"])


def test_bad_arguments_are_named():
    xb = unit_rows(10, 8, 9)
    with pytest.raises(ValueError, match="storage must be one of"):
        TorchFlatIndex(xb, ["cpu"], storage="int4")
    index = TorchFlatIndex(xb, ["cpu"])
    with pytest.raises(ValueError, match=r"queries must be \(N, 8\), got \(3, 7\)"):
        index.search(np.zeros((3, 7), np.float32), 3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        index.search(xb[:2], 0)


def test_no_gpu_gives_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error is for machines without one")
    with pytest.raises(ValueError, match="no GPU visible.*drop --faiss_gpu"):
        TorchFlatIndex(unit_rows(4, 8, 10))


def test_dense_retriever_on_torch_flat_matches_faiss(wiki_index_dir):
    """The served path: same ids as the FAISS index for real questions; --faiss_gpu without a GPU refuses to load."""
    import torch

    from stepsearch.search.index import DenseRetriever, IndexLoadError, LoadOptions, encoder_from_manifest, load_index

    d = Path(wiki_index_dir)
    manifest = json.loads((d / "manifest.json").read_text())
    retriever = DenseRetriever(d / "dense.faiss", encoder_from_manifest(manifest, mode="sorted"))
    questions = ["who wrote the novel on which the film was based", "what is the capital of the country of origin"]
    want = retriever.search(questions, 3)
    retriever.index = TorchFlatIndex.from_faiss(retriever.index, ["cpu"], storage="fp32")
    got = retriever.search(questions, 3)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(IndexLoadError, match="no GPU visible"):
            load_index(d, LoadOptions(method="dense", encoder_mode="sorted", faiss_gpu=True))


def test_server_cli_takes_search_r1_faiss_gpu_flag():
    from stepsearch.search.server import ServerConfig, parse_args

    cfg, _ = parse_args(["--index_dir", "x", "--faiss_gpu", "--gpu_storage", "fp32"])
    assert cfg.faiss_gpu and cfg.gpu_storage == "fp32"
    assert not parse_args(["--index_dir", "x"])[0].faiss_gpu
    assert parse_args(["--index_dir", "x", "--faiss_gpu", "--faiss_gpu_replicate"])[0].faiss_gpu_replicate
    assert not cfg.faiss_gpu_replicate  # sharded over the GPUs by default, as Search-R1
    with pytest.raises(ValueError, match="--gpu_storage must be"):
        ServerConfig(index_dir="x", gpu_storage="int8")


def test_faiss_gpu_path_is_chosen_only_where_faiss_sees_a_gpu():
    """faiss-cpu (this machine's build) has no GPU cloner: --faiss_gpu goes through torch; FAISS's own GPU path
    refuses a storage it has no equivalent for before touching any GPU."""
    import faiss

    from stepsearch.search.gpu_index import faiss_gpu_count, gpu_search_backend, to_faiss_gpus

    if hasattr(faiss, "GpuMultipleClonerOptions") and faiss.get_num_gpus() > 0:
        pytest.skip("FAISS sees a GPU here; scripts/gpu_checks.sh covers that path")
    assert faiss_gpu_count() == 0 and gpu_search_backend() == "torch"
    with pytest.raises(ValueError, match="--gpu_storage 'bf16' has no FAISS GPU equivalent; use fp16 or fp32"):
        to_faiss_gpus(faiss.IndexFlatIP(8), storage="bf16")
    with pytest.raises(ValueError, match="FAISS sees no GPU"):  # never reaches FAISS's cloner, which would abort
        to_faiss_gpus(faiss.IndexFlatIP(8), storage="fp16")
