"""Server start-up work (issue 16, "start in seconds"): an exhaustive index is read into the page cache in the
background while the encoder loads, the warm-up encodes without scanning a Flat index, and the index is opened with
scikit-learn hidden from transformers (an import the server never needs), without changing any answer."""
import importlib.util
import shutil
import sys
import time

import numpy as np

from stepsearch.search.index import DENSE_INDEX, LoadOptions, is_exhaustive, load_index, prefetch_exhaustive
from stepsearch.search.rerank import read_faiss
from stepsearch.search.server_config import ServerConfig
from stepsearch.search.service import module_hidden, open_backend
from bench.machine import drop_from_page_cache
from tests.search.test_corpus import page_cache_fraction


def test_prefetch_reads_an_exhaustive_index_into_the_page_cache(wiki_index_dir, tmp_path):
    path = tmp_path / DENSE_INDEX
    shutil.copyfile(f"{wiki_index_dir}/{DENSE_INDEX}", path)  # a file of our own to drop from the page cache
    drop_from_page_cache([path])
    before = page_cache_fraction(path)
    index = read_faiss(path)  # memory-mapped: opening reads only the header
    assert is_exhaustive(index)
    thread = prefetch_exhaustive(index, path)
    assert thread is not None
    thread.join(60)
    deadline = time.monotonic() + 30  # the reads it asked for complete asynchronously
    while page_cache_fraction(path) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert before < 0.5 and page_cache_fraction(path) == 1.0
    import faiss

    ivf = faiss.index_factory(index.d, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    assert not is_exhaustive(ivf) and prefetch_exhaustive(ivf, path) is None  # IVF: only the lists probed are read


def test_module_hidden_only_while_open():
    assert "this" not in sys.modules  # a stdlib module nothing imports (importing it prints a poem)
    with module_hidden("this"):
        assert importlib.util.find_spec("this") is None
    assert "this" not in sys.modules and importlib.util.find_spec("this") is not None
    with module_hidden("json"):  # imported already: left alone
        assert importlib.util.find_spec("json") is not None


def test_backend_answers_as_the_index_does_after_warm_up(wiki_index_dir):
    """open_backend (sklearn hidden) + warm_up, then a search: the same ids and scores as load_index in-process."""
    backend = open_backend(ServerConfig(index_dir=wiki_index_dir, method="dense", encoder_mode="exact"))
    backend.warm_up()
    queries = ["who wrote the novel dracula", "capital city of australia"]
    got = backend.search_sync(queries, 3)
    ref = load_index(wiki_index_dir, LoadOptions(method="dense", encoder_mode="exact")).retriever.search(queries, 3)
    assert [[h["document"]["id"] for h in hits] for hits in got] == \
        [[backend.loaded.corpus.rows([i])[0]["id"] for i in row] for row in ref.ids]
    np.testing.assert_allclose([[h["score"] for h in hits] for hits in got], ref.scores, rtol=0, atol=1e-6)


def test_bf16_warm_up_runs_in_the_background_without_changing_answers(wiki_index_dir):
    """Guarded mode: the bf16 kernel warm-up runs on its own thread once the server answers; /health says running,
    then done; searches while it runs return what they return after it (the same weights, only kernels built)."""
    import asyncio

    backend = open_backend(ServerConfig(index_dir=wiki_index_dir, method="dense", encoder_mode="guarded",
                                        torch_threads=1))
    backend.start()
    backend.warm_up()
    assert backend.health()["warm_up"] == "off" and backend.health()["gpu_search"] is None  # CPU search
    backend.start_bf16_warm_up()
    assert backend.health()["warm_up"] == "running"
    queries = ["who wrote the novel dracula", "capital city of australia", "largest moon of saturn"]
    during = backend.search_sync(queries, 3)
    asyncio.run(backend.aclose())  # waits for the warm-up thread before closing the batcher
    assert backend.health()["warm_up"] == "done"
    after = backend.search_sync(queries, 3)
    assert [[h["document"]["id"] for h in hits] for hits in during] == \
        [[h["document"]["id"] for h in hits] for hits in after]
    np.testing.assert_allclose([[h["score"] for h in hits] for hits in during],
                               [[h["score"] for h in hits] for hits in after], rtol=0, atol=1e-6)


def test_no_bf16_warm_up_outside_guarded_mode(wiki_index_dir):
    backend = open_backend(ServerConfig(index_dir=wiki_index_dir, method="dense", encoder_mode="sorted",
                                        torch_threads=1))
    backend.start_bf16_warm_up()
    assert backend.health()["warm_up"] == "off"
