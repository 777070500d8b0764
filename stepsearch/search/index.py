"""Index folder layout, manifest checks and the in-process retrievers (dense FAISS, BM25, hybrid RRF).

An index folder (written by `build_index`) holds:
- `manifest.json`  what was built: methods, encoder settings, dim, metric, corpus identity, number of passages
- `corpus.arrow`   the memory-mapped passage table served back (`corpus.ArrowCorpus`)
- `dense.faiss`    FAISS index (inner product over L2-normalized embeddings = cosine), when method has dense; after
                   `--import_faiss` a symlink to the user's file (manifest `dense_source` records its size/mtime)
- `emb.memmap`     float32 (N, D) embeddings (resumable build; reusable for other index factories)
- `emb.fp16`       float16 (N, D) embeddings of a "+rerank" index (manifest `rerank`; see rerank.py)
- `bm25/`          bm25s index, when method has bm25

Loading reads no corpus file and builds nothing per passage: the corpus table, the FAISS vectors/codes
(IO_FLAG_MMAP_IFC where the type allows), the fp16 re-rank vectors and the BM25 arrays are memory-mapped, so
start-up time and resident memory do not grow with the corpus beyond what an index type must hold in RAM.

Every retriever maps a batch of queries to corpus row numbers and scores, `search(queries, topk) -> (ids, scores)`
with ids (N, k) int64 and scores (N, k) float32; the server turns rows into documents with `ArrowCorpus.rows`.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stepsearch.search.corpus import ArrowCorpus
from stepsearch.search.rerank import (DEFAULT_NPROBE, DEFAULT_RERANK_CANDIDATES, RERANK_EMBEDDINGS, RerankIndex,
                                      open_fp16, read_faiss, set_nprobe)
from verl.utils.fs import file_sha256

MANIFEST = "manifest.json"
CORPUS_TABLE = "corpus.arrow"
DENSE_INDEX = "dense.faiss"
EMBEDDINGS = "emb.memmap"
BM25_DIR = "bm25"
MANIFEST_VERSION = 2  # 2: corpus.mtime_ns replaces corpus.mtime
METHODS = ("dense", "bm25", "hybrid")
# The rule for the text a passage is indexed as (corpus.index_text). Recorded in emb.progress.json and the manifest;
# a build never resumes on embeddings made under another rule (before it: '"Title"\\ntext' rebuilt from the split
# title, which added quotes to wiki-18 rows whose first line had none).
PASSAGE_TEXT = "contents-as-is"
# Encoder settings that define the embedding space; an index must be queried with exactly these. Mirrors
# encoders.IDENTITY_KEYS (kept here so bm25-only serving never imports torch; a test checks they agree).
ENCODER_IDENTITY_KEYS = ("model", "pooling", "query_prefix", "passage_prefix", "max_length", "dim", "normalize")
# Bytes per posix_fadvise(WILLNEED) call of prefetch_exhaustive: Linux's default read-ahead window (128 KiB), the
# most one call reads where the window is that small
PREFETCH_CHUNK = 128 << 10
# Reciprocal-rank fusion constant (Cormack et al. 2009, k = 60).
RRF_K = 60


class IndexLoadError(ValueError):
    """The index folder is missing, incomplete, stale or does not match the requested encoder/corpus."""


def read_manifest(index_dir: str | os.PathLike) -> dict:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise IndexLoadError(f"no index at {index_dir}: {MANIFEST} is missing; build one with "
                          f"`python -m stepsearch.search.build_index --corpus PATH --out {index_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexLoadError(f"{path}: corrupt manifest ({exc}); rebuild the index") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise IndexLoadError(f"{path}: manifest version {manifest.get('version')} != {MANIFEST_VERSION}; "
                             "rebuild the index")
    return manifest


def index_identity(manifest: dict, method: str) -> str:
    """Short stable id of (index build, served method), used in cache keys so two indexes never share entries."""
    import hashlib

    ident = {k: manifest.get(k) for k in ("corpus", "encoder", "index_factory", "methods", "built_at")}
    ident["served_method"] = method
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def check_encoder(manifest: dict, described: dict) -> None:
    """Raise unless the live encoder's identity matches the one the index was built with."""
    built = manifest.get("encoder") or {}
    diffs = [f"{k}: index has {built.get(k)!r}, encoder has {described.get(k)!r}"
             for k in ENCODER_IDENTITY_KEYS if built.get(k) != described.get(k)]
    if diffs:
        raise IndexLoadError("encoder does not match the index manifest (queries would land in a different "
                          "embedding space): " + "; ".join(diffs) + ". Use the encoder the index was built with "
                          "or rebuild the index.")


def check_corpus(manifest: dict, corpus_path: str | os.PathLike | None) -> None:
    """Raise if `corpus_path` (or, when None, the corpus recorded at build time, if it still exists) has changed.

    A size+mtime match is trusted; otherwise the sha256 decides (hashing wiki-18 takes about a minute).
    """
    rec = manifest["corpus"]
    explicit = corpus_path is not None
    path = Path(corpus_path if explicit else rec["path"])
    if not path.is_file():
        if explicit:
            raise IndexLoadError(f"corpus {path} not found")
        return  # the source moved away; the served table (corpus.arrow) is self-contained
    stat = path.stat()
    if stat.st_size == rec["size"] and stat.st_mtime_ns == rec.get("mtime_ns"):
        return  # same size and nanosecond mtime: trusted without re-hashing
    sha = file_sha256(path)
    if sha != rec["sha256"]:
        raise IndexLoadError(f"index is stale: corpus {path} has sha256 {sha[:12]}..., the index was built from "
                          f"{rec['sha256'][:12]}... ({rec['num_passages']} passages); rebuild the index")


def check_files(index_dir: Path, manifest: dict, method: str) -> None:
    if method not in METHODS:
        raise IndexLoadError(f"unknown method {method!r}; expected one of {METHODS}")
    needed = {"dense": [DENSE_INDEX], "bm25": [BM25_DIR], "hybrid": [DENSE_INDEX, BM25_DIR]}[method]
    if method != "bm25" and manifest.get("rerank"):
        needed.append(manifest["rerank"]["embeddings"])
    built = manifest.get("methods", [])
    source = manifest.get("dense_source")
    if method != "bm25" and source:  # --import_faiss: dense.faiss links to the user's file, which must not change
        path = Path(source["path"])
        if not path.is_file():
            raise IndexLoadError(f"{index_dir}: the imported FAISS file {path} is gone; restore it or re-run "
                                 "build_index --import_faiss")
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) != (source["size"], source["mtime_ns"]):
            raise IndexLoadError(f"{index_dir}: the imported FAISS file {path} changed since the import (size/mtime "
                                 f"{stat.st_size}/{stat.st_mtime_ns}, was {source['size']}/{source['mtime_ns']}); "
                                 "re-run build_index --import_faiss to check it again")
    for part in ("dense", "bm25"):
        if method in (part, "hybrid") and part not in built:
            raise IndexLoadError(f"{index_dir}: method {method!r} needs a {part} index, but this index has {built}; "
                              f"rebuild with --method {method}")
    for name in [CORPUS_TABLE, *needed]:
        if not (index_dir / name).exists():
            raise IndexLoadError(f"{index_dir}: {name} is missing (interrupted build?); rebuild the index")


@dataclass
class SearchResult:
    """ids (N, k) int64 corpus rows (-1 = no hit), scores (N, k) float32."""

    ids: np.ndarray
    scores: np.ndarray


class DenseRetriever:
    """FAISS inner-product search over L2-normalized embeddings (score = cosine, as Search-R1).

    The index is memory-mapped where its type allows (rerank.read_faiss); `nprobe` applies to IVF indexes (0: the
    value stored in the file); `rerank_vectors` (N, D) float16 turns it into a two-stage `rerank.RerankIndex`."""

    def __init__(self, index_path: Path, encoder, gpu: bool = False, gpu_storage: str = "fp16",
                 nprobe: int = DEFAULT_NPROBE, rerank_vectors: Path | None = None,
                 rerank_candidates: int = DEFAULT_RERANK_CANDIDATES, index=None, gpu_shard: bool = True):
        self.index = read_faiss(index_path) if index is None else index  # `index`: read_faiss(index_path) already
        self.encoder = encoder
        if self.index.d != encoder.dim:
            raise IndexLoadError(f"{index_path}: index dim {self.index.d} != encoder dim {encoder.dim}")
        self.nprobe = set_nprobe(self.index, nprobe)  # None: not an IVF index
        self.rerank_candidates = None
        # --faiss_gpu: "faiss" (FAISS's GPU build: any type it clones) or "torch" (flat indexes only); None on CPU
        self.gpu_search = None
        if gpu:
            from stepsearch.search.gpu_index import gpu_search_backend

            self.gpu_search = gpu_search_backend()
        if rerank_vectors is not None:
            if self.gpu_search == "torch":
                raise IndexLoadError(f"{index_path}: --faiss_gpu without FAISS's GPU build serves flat indexes only; "
                                     "install faiss-gpu-cu12 (its first stage then runs on the GPU), serve this "
                                     "'+rerank' index on CPU (its compressed stage is small) or build a Flat/SQfp16 "
                                     "one for the GPU")
            try:
                vectors = open_fp16(rerank_vectors, self.index.ntotal, self.index.d)
                first = self._to_gpu(self.index, gpu_storage, gpu_shard, index_path) if self.gpu_search else self.index
                self.index = RerankIndex(first, vectors, rerank_candidates)  # the re-rank stays on CPU
            except ValueError as exc:
                raise IndexLoadError(str(exc)) from None
            self.rerank_candidates = rerank_candidates
        elif self.gpu_search:
            self.index = self._to_gpu(self.index, gpu_storage, gpu_shard, index_path)
        self.guard_queries = self.guard_fallbacks = 0  # mode="guarded": queries seen / re-encoded in fp32
        self._stats_lock = threading.Lock()  # search_first runs on several bf16 worker threads in the server

    def _to_gpu(self, index, storage: str, shard: bool, index_path: Path):
        """The index on the GPUs: FAISS's GPU build (gpu_index.to_faiss_gpus), else torch for flat indexes
        (gpu_index.TorchFlatIndex, the same search API); IndexLoadError naming the fix where neither can."""
        from stepsearch.search.gpu_index import TorchFlatIndex, to_faiss_gpus

        try:
            if self.gpu_search == "faiss":
                return to_faiss_gpus(index, storage=storage, shard=shard)
            return TorchFlatIndex.from_faiss(index, storage=storage)
        except ValueError as exc:
            raise IndexLoadError(f"{index_path}: {exc}") from None

    def search(self, queries: list[str], topk: int) -> SearchResult:
        if self.encoder.config.mode == "guarded":  # bf16 pass + fp32 fallback (encoders.guarded_search)
            first = self.search_first(queries, topk)
            return self.search_fallback(queries, topk, first) if first.fallback.any() else \
                SearchResult(first.ids, first.scores)
        return self.search_exact(queries, topk)

    def search_first(self, queries: list[str], topk: int):
        """mode="guarded": the bf16 pass (encoders.guarded_first_pass) -> GuardedResult with its fallback mask."""
        from stepsearch.search.encoders import guarded_first_pass

        first = guarded_first_pass(self.encoder, self._search_arrays, queries, topk)
        with self._stats_lock:
            self.guard_queries += len(queries)
            self.guard_fallbacks += int(first.fallback.sum())
        return first

    def search_fallback(self, queries: list[str], topk: int, first) -> SearchResult:
        """mode="guarded": the fp32 pass over the queries `first.fallback` marks (encoders.guarded_fallback_pass)."""
        from stepsearch.search.encoders import guarded_fallback_pass

        res = guarded_fallback_pass(self.encoder, self._search_arrays, queries, topk, first)
        return SearchResult(res.ids, res.scores)

    def search_exact(self, queries: list[str], topk: int) -> SearchResult:
        """Encode (`encode_queries`: fp32, or fp16 in mode fp16) and search; in mode="guarded" the fallback pass."""
        return self.search_embeddings(self.encoder.encode_queries(queries), topk)  # emb (N, D) float32

    def search_embeddings(self, emb: np.ndarray, topk: int) -> SearchResult:
        scores, ids = self.index.search(np.ascontiguousarray(emb, dtype=np.float32), topk)  # (N, k) each
        return SearchResult(ids.astype(np.int64), scores.astype(np.float32))

    def _search_arrays(self, emb: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
        res = self.search_embeddings(emb, topk)
        return res.ids, res.scores

    def guard_stats(self) -> dict | None:
        """mode="guarded" only: how many queries took the fp32 fallback (None in other modes)."""
        if self.encoder.config.mode != "guarded":
            return None
        rate = self.guard_fallbacks / self.guard_queries if self.guard_queries else 0.0
        return {"guard_eps": self.encoder.guard_eps, "queries": self.guard_queries,
                "fp32_fallbacks": self.guard_fallbacks, "fallback_rate": rate}


class BM25Retriever:
    """bm25s (Lucene-style BM25) over `"Title"\\ntext`; score = BM25."""

    def __init__(self, bm25_dir: Path, num_passages: int):
        import bm25s

        self.model = bm25s.BM25.load(str(bm25_dir), mmap=True, show_progress=False)  # arrays memory-mapped
        self.num_passages = num_passages

    def search(self, queries: list[str], topk: int) -> SearchResult:
        import bm25s

        k = min(topk, self.num_passages)
        tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
        ids, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=1)  # (N, k) each
        return pad_result(SearchResult(np.asarray(ids, np.int64), np.asarray(scores, np.float32)), topk)


class HybridRetriever:
    """Dense + BM25 fused with reciprocal-rank fusion: score(d) = sum_r 1 / (RRF_K + rank_r(d)), rank from 1."""

    def __init__(self, dense: DenseRetriever, bm25: BM25Retriever, depth: int = 50):
        self.dense, self.bm25, self.depth = dense, bm25, depth

    def search(self, queries: list[str], topk: int) -> SearchResult:
        depth = max(self.depth, topk)
        return rrf_fuse([self.dense.search(queries, depth), self.bm25.search(queries, depth)], topk)


def rrf_fuse(results: list[SearchResult], topk: int, k: int = RRF_K) -> SearchResult:
    """Fuse ranked lists per query; ties broken by the first list's order. Returns (N, topk)."""
    n = results[0].ids.shape[0]
    ids = np.full((n, topk), -1, np.int64)
    scores = np.zeros((n, topk), np.float32)
    for q in range(n):
        fused: dict[int, float] = {}
        for res in results:
            for rank, doc in enumerate(res.ids[q], start=1):
                if doc >= 0:
                    fused[int(doc)] = fused.get(int(doc), 0.0) + 1.0 / (k + rank)
        best = sorted(fused.items(), key=lambda kv: -kv[1])[:topk]  # stable: insertion order breaks ties
        for j, (doc, s) in enumerate(best):
            ids[q, j], scores[q, j] = doc, s
    return SearchResult(ids, scores)


def pad_result(res: SearchResult, topk: int) -> SearchResult:
    """Pad (N, k<topk) results with id -1 / score 0 so every retriever returns (N, topk)."""
    n, k = res.ids.shape
    if k >= topk:
        return res
    ids = np.full((n, topk), -1, np.int64)
    scores = np.zeros((n, topk), np.float32)
    ids[:, :k], scores[:, :k] = res.ids, res.scores
    return SearchResult(ids, scores)


def encoder_from_manifest(manifest: dict, model: str | None = None, mode: str = "exact", device: str = "cpu",
                          batch_size: int = 64, guard_eps: float | None = None, guard_order: bool = False,
                          backend: str = "transformers", pack_tokens: bool = True):
    """Build the query encoder the index was built with (or `model`, which must match it) and check identity.
    `backend`: who runs the model (encoders.BACKENDS); `pack_tokens`: EncoderConfig.pack_tokens; the embedding
    space is the same."""
    from stepsearch.search.encoders import Encoder

    built = manifest["encoder"]
    encoder = Encoder(model=model or built["model"], pooling=built["pooling"], query_prefix=built["query_prefix"],
                      passage_prefix=built["passage_prefix"], max_length=built["max_length"], device=device,
                      mode=mode, batch_size=batch_size, normalize=built.get("normalize", True),
                      guard_eps=guard_eps, guard_order=guard_order, backend=backend, pack_tokens=pack_tokens)
    check_encoder(manifest, encoder.describe())
    return encoder


def is_exhaustive(index) -> bool:
    """True for FAISS index types whose every search reads all stored codes (Flat, SQ, PQ without IVF)."""
    import faiss

    flat_codes = getattr(faiss, "IndexFlatCodes", faiss.IndexFlat)
    return isinstance(index, faiss.Index) and isinstance(faiss.downcast_index(index), flat_codes)


def mem_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (bytes), or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def prefetch_exhaustive(index, path: Path) -> threading.Thread | None:
    """For an exhaustive (memory-mapped) index, whose first query reads the whole file anyway, ask the kernel on a
    daemon thread to read the file into the page cache now (posix_fadvise WILLNEED, chunk by chunk; asynchronous
    reads at the disk's sequential rate, where the first search's page faults would read it in small pieces), so a
    cold start overlaps the disk read with the encoder load. Skipped (None) for other index types, where Linux has
    no posix_fadvise, or when the file is larger than MemAvailable (it could not stay cached)."""
    path = Path(os.path.realpath(path))
    available = mem_available_bytes()
    if not hasattr(os, "posix_fadvise") or available is None or path.stat().st_size > available \
            or not is_exhaustive(index):
        return None

    def advise() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:  # one call per chunk: Linux reads at most one read-ahead window per call (pages cached: ~no cost)
            for offset in range(0, os.fstat(fd).st_size, PREFETCH_CHUNK):
                os.posix_fadvise(fd, offset, PREFETCH_CHUNK, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    thread = threading.Thread(target=advise, name="prefetch-index", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class LoadOptions:
    """How to open an index folder for serving."""

    method: str | None = None  # None: dense if built, else bm25
    encoder: str | None = None  # override the manifest's model (must describe the same embedding space)
    encoder_mode: str = "exact"
    device: str = "cpu"
    corpus: str | None = None  # if given, must match the manifest's corpus sha256
    guard_eps: float | None = None  # encoder_mode guarded/fast: None = the model's calibrated value
    guard_order: bool = False  # guarded: keep the fp32 top-k order too, not only the set
    faiss_gpu: bool = False  # dense index on every visible GPU (Search-R1's --faiss_gpu; gpu_index.py)
    gpu_storage: str = "fp16"  # faiss_gpu: vector storage on the GPU (fp16 | bf16 | fp32; bf16: torch path only)
    gpu_shard: bool = True  # faiss_gpu through FAISS's GPU build: split rows over the GPUs (False: replicate)
    nprobe: int = DEFAULT_NPROBE  # IVF indexes: inverted lists visited per query (0: the value in the index file)
    rerank_candidates: int = DEFAULT_RERANK_CANDIDATES  # "+rerank" indexes: candidates re-scored exactly
    encoder_backend: str = "transformers"  # who runs the query encoder: transformers | native | auto (encoders.py)
    pack_tokens: bool = True  # native encoder, modes but exact: skip the padding's FLOPs (EncoderConfig.pack_tokens)


@dataclass
class LoadedIndex:
    manifest: dict
    method: str
    corpus: ArrowCorpus
    retriever: object  # DenseRetriever | BM25Retriever | HybridRetriever
    identity: str


def load_index(index_dir: str | os.PathLike, opts: LoadOptions = LoadOptions()) -> LoadedIndex:
    """Open an index folder, refusing on a missing/stale/mismatched index (IndexLoadError with the fix)."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    method = opts.method or ("dense" if "dense" in manifest["methods"] else "bm25")
    check_files(index_dir, manifest, method)
    check_corpus(manifest, opts.corpus)
    corpus = ArrowCorpus(index_dir / CORPUS_TABLE, random_access=True)  # reads only the rows served
    if len(corpus) != manifest["corpus"]["num_passages"]:
        raise IndexLoadError(f"{index_dir}: corpus table has {len(corpus)} rows, manifest says "
                          f"{manifest['corpus']['num_passages']}; rebuild the index")
    dense = bm25 = None
    mode = opts.encoder_mode
    if method == "hybrid" and mode in ("fast", "guarded"):
        # RRF fuses the dense *ranks* down to depth 50, which the guarded top-k set check does not protect
        if mode == "guarded":
            raise IndexLoadError("encoder_mode 'guarded' keeps the top-k set, but hybrid fuses dense ranks to depth "
                                 "50; use encoder_mode 'fast' (sorted fp32 on CPU for hybrid) or 'sorted'")
        mode = "sorted" if opts.device == "cpu" else "fp16"
    if method in ("dense", "hybrid"):
        # the FAISS file first (memory-mapped: instant), so an exhaustive index is read from disk in the background
        # while the encoder loads (seconds of imports) rather than during the first query
        faiss_index = read_faiss(index_dir / DENSE_INDEX)
        if not opts.faiss_gpu:
            prefetch_exhaustive(faiss_index, index_dir / DENSE_INDEX)
        encoder = encoder_from_manifest(manifest, opts.encoder, mode, opts.device, guard_eps=opts.guard_eps,
                                        guard_order=opts.guard_order, backend=opts.encoder_backend,
                                        pack_tokens=opts.pack_tokens)
        rerank = manifest.get("rerank")
        dense = DenseRetriever(index_dir / DENSE_INDEX, encoder, gpu=opts.faiss_gpu, gpu_storage=opts.gpu_storage,
                               gpu_shard=opts.gpu_shard,
                               nprobe=opts.nprobe, rerank_candidates=opts.rerank_candidates,
                               rerank_vectors=index_dir / rerank["embeddings"] if rerank else None, index=faiss_index)
        if dense.index.ntotal != len(corpus):
            raise IndexLoadError(f"{index_dir}: FAISS index holds {dense.index.ntotal} vectors for {len(corpus)} "
                              "passages; rebuild the index")
    if method in ("bm25", "hybrid"):
        bm25 = BM25Retriever(index_dir / BM25_DIR, len(corpus))
    retriever = {"dense": dense, "bm25": bm25, "hybrid": None}[method] or HybridRetriever(dense, bm25)
    # guarded results carry bf16-path scores (ids: fp32's set), so they never share cache entries with fp32 ones
    served = f"{method}:guarded" if dense is not None and dense.encoder.config.mode == "guarded" else method
    if dense is not None and dense.nprobe is not None:  # IVF and re-rank settings change results: own cache entries
        served += f":nprobe={dense.nprobe}"
    if dense is not None and dense.rerank_candidates is not None:
        served += f":rerank={dense.rerank_candidates}"
    return LoadedIndex(manifest, method, corpus, retriever, index_identity(manifest, served))
