"""Start-up does not grow with the corpus (issue 16, 2): opening an index reads neither the corpus JSONL nor the
FAISS vectors (memory-mapped) and builds no Python object per passage.

Two hybrid indexes (Flat + BM25) over synthetic corpora of N_SMALL and N_LARGE passages are loaded the way the
server loads them. Between the two, the bytes the process read (`rchar` of /proc/self/io: read() calls, not mmap page
faults) and the Python heap peak (tracemalloc) must not differ by more than a bound far below what the extra
passages would cost: the large corpus's JSONL is ~2 MB larger and its Flat vectors ~29 MB larger, and one Python
object per extra passage (an int is 28 bytes) would exceed the heap bound. The embeddings are random unit vectors
written where the builder resumes from, so nothing is encoded.
"""
import gc
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from stepsearch.search.build_index import PROGRESS, BuildConfig, build_index, progress_identity
from stepsearch.search.index import EMBEDDINGS, LoadOptions, load_index, read_manifest
from verl.utils.fs import file_sha256

N_SMALL, N_LARGE = 500, 20_000
WORDS = ("river mountain city king queen war peace music film album river song novel writer painter bridge "
         "church school island railway station battle treaty empire village").split()  # a fixed vocabulary
HEAP_BOUND = 256 << 10  # bytes; 19,500 extra passages x one 28-byte int = 546,000
READ_BOUND = 512 << 10  # bytes; the JSONL alone differs by ~2 MB, the Flat vectors by ~29 MB


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def synthetic_index(root: Path, n: int, encoder_described: dict) -> Path:
    rng = np.random.default_rng(n)
    corpus = root / f"corpus{n}.jsonl"
    with corpus.open("w") as fh:
        for i in range(n):
            words = " ".join(rng.choice(WORDS, size=12))
            fh.write(json.dumps({"id": str(i), "contents": f'"Passage {i % 50}"\n{words}'}) + "\n")
    out = root / f"index{n}"
    out.mkdir()
    dim = encoder_described["dim"]
    emb = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="w+", shape=(n, dim))
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    emb[:] = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    emb.flush()
    ident = progress_identity(file_sha256(corpus), encoder_described, n, dim)
    (out / PROGRESS).write_text(json.dumps({**ident, "rows_done": n}))
    build_index(BuildConfig(corpus=str(corpus), out=str(out), method="hybrid", quiet=True))
    return out


def measured_load(index_dir: Path) -> tuple[int, int]:
    """(bytes read, Python heap peak) while load_index opens `index_dir` as the server does."""
    gc.collect()
    tracemalloc.start()
    read0 = rchar()
    loaded = load_index(index_dir, LoadOptions(method="hybrid", encoder_mode="exact"))
    read = rchar() - read0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(loaded.corpus) == read_manifest(index_dir)["num_passages"]
    return read, peak


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io (Linux)")
def test_load_does_not_grow_with_the_corpus(wiki_index_dir, tmp_path):
    described = read_manifest(wiki_index_dir)["encoder"]  # the MiniLM identity, without loading the model here
    small, large = synthetic_index(tmp_path, N_SMALL, described), synthetic_index(tmp_path, N_LARGE, described)
    measured_load(small)  # warm: imports, model files, tokenizer caches
    (read_s, heap_s), (read_l, heap_l) = measured_load(small), measured_load(large)
    print(f"load: read {read_s} B / {read_l} B, Python heap peak {heap_s} B / {heap_l} B "
          f"({N_SMALL} / {N_LARGE} passages)")
    assert read_l - read_s < READ_BOUND
    assert heap_l - heap_s < HEAP_BOUND
    # and the memory-mapped large index answers: a stored vector finds its own passage
    loaded = load_index(large, LoadOptions(method="hybrid", encoder_mode="exact"))
    emb = np.memmap(large / EMBEDDINGS, dtype=np.float32, mode="r", shape=(N_LARGE, described["dim"]))
    assert loaded.retriever.dense.search_embeddings(np.array(emb[12345:12346]), 1).ids.tolist() == [[12345]]
