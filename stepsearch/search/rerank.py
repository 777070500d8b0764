"""Two-stage dense search that keeps Flat's answers in a fraction of its RAM, and FAISS loading helpers.

    --index_factory "IVF1024,PQ32+rerank"      (any FAISS factory string, then "+rerank")

Stage 1: the compressed index named before "+rerank" (IVF-PQ, HNSW, SQ8, ...) lives in RAM and returns the
`candidates` best passages by its approximate scores (`nprobe` inverted lists visited when it is an IVF index).
Stage 2: the exact inner products of the query with those candidates' fp16 embeddings, read from `emb.fp16`
(N, D) float16, memory-mapped from disk, so only the rows a query touches are paged in, re-rank them; the top-k by
exact score is returned. Scores are then the cosines of the fp16-stored passage vectors (within ~1e-3 of Flat's).

RAM: the compressed codes (PQm: m bytes per passage, + 8 for the IVF id) plus the IVF centroids (nlist x D x 4 B)
and the PQ codebooks (256 x D x 4 B); disk: N x D x 2 B for the fp16 embeddings. `RerankIndex` has FAISS's
`search(x, k) -> (scores, ids)` so `index.DenseRetriever` searches it like any FAISS index.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from stepsearch.data.io import atomic_path

logger = logging.getLogger(__name__)

RERANK_SUFFIX = "+rerank"
RERANK_EMBEDDINGS = "emb.fp16"  # (N, D) float16, raw C order, no header (np.memmap)
# One source for these defaults (server_config.ServerConfig and index.LoadOptions read them).
# IVF lists visited per query (any IVF index; 0 keeps the value stored in the index file, FAISS's default 1)
DEFAULT_NPROBE = 64
# stage-1 candidates re-ranked exactly per query ("+rerank" indexes); at least topk
DEFAULT_RERANK_CANDIDATES = 256
# queries per stage-2 block (bounds the distinct candidate rows read at once: 64 x 256 x D x 4 B = 50 MB at D = 768)
RERANK_QUERY_BLOCK = 64
# score of a missing hit (id -1), as FAISS reports it for inner-product search
MISSING_SCORE = -np.finfo(np.float32).max


def recall_at_k(ids: np.ndarray, ref: np.ndarray) -> float:
    """Mean over queries of |ids_q ∩ ref_q| / k: how much of a reference top-k (Flat's) a search returns.
    ids, ref (Q, k) int64."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), ref.tolist())]))


def split_factory(factory: str) -> tuple[str, bool]:
    """"IVF1024,PQ32+rerank" -> ("IVF1024,PQ32", True); "Flat" -> ("Flat", False). Raises on an empty base."""
    spec = factory.strip()
    rerank = spec.endswith(RERANK_SUFFIX)
    base = spec[:-len(RERANK_SUFFIX)].strip() if rerank else spec
    if not base:
        raise ValueError(f"[build_index] --index_factory {factory!r}: name the compressed FAISS index before "
                         f"'{RERANK_SUFFIX}', e.g. 'IVF1024,PQ32{RERANK_SUFFIX}'")
    if RERANK_SUFFIX in base:
        raise ValueError(f"[build_index] --index_factory {factory!r}: '{RERANK_SUFFIX}' goes once, at the end")
    return base, rerank


def read_faiss(path: str | os.PathLike, mmap: bool = True):
    """faiss.read_index, memory-mapping the stored vectors/codes where the index type allows (IO_FLAG_MMAP_IFC:
    flat codes, IVF lists; the OS pages them in on demand, so start-up does not read the file). Falls back to a
    plain read (everything in RAM) for types FAISS cannot map."""
    import faiss

    path = str(path)
    if mmap:
        flag = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
        try:
            return faiss.read_index(path, flag)
        except RuntimeError as exc:
            logger.info("FAISS cannot memory-map %s (%s); reading it into RAM", path, str(exc).splitlines()[-1])
    return faiss.read_index(path)


def set_nprobe(index, nprobe: int) -> int | None:
    """Visit `nprobe` inverted lists per query (clamped to nlist) when `index` is (or wraps) an IVF index; 0 keeps
    the value stored in the index file. Returns the nprobe in effect, or None for non-IVF indexes."""
    import faiss

    if nprobe < 0:
        raise ValueError(f"[server] --nprobe must be >= 0, got {nprobe}")
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None
    if nprobe > 0:
        ivf.nprobe = min(nprobe, ivf.nlist)
    return int(ivf.nprobe)


def index_ram_bytes(index) -> int:
    """Bytes of a FAISS index once read into RAM (its serialized size: codes, ids, centroids, codebooks)."""
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def write_fp16(emb: np.ndarray, path: str | os.PathLike, chunk_rows: int = 1 << 16) -> None:
    """Write float32 embeddings emb (N, D) as float16 (N, D) to `path` (atomically, umask respected), converting
    `chunk_rows` rows at a time so a memory-mapped emb is never read whole."""
    n, dim = emb.shape
    with atomic_path(path) as tmp:
        out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(n, dim))
        for start in range(0, n, chunk_rows):
            out[start:start + chunk_rows] = emb[start:start + chunk_rows]
        out.flush()
        del out


def open_fp16(path: str | os.PathLike, n: int, dim: int) -> np.memmap:
    """The stage-2 vectors: (n, dim) float16, memory-mapped read-only; refuses a file of the wrong size."""
    path = Path(path)
    expected = n * dim * 2
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"{path}: {size} bytes, expected {expected} (N={n} x D={dim} x 2 B fp16); rebuild the index")
    return np.memmap(path, dtype=np.float16, mode="r", shape=(n, dim))


class RerankIndex:
    """A compressed FAISS index whose candidates are re-scored exactly against fp16 vectors (N, D) on disk.

    search(x (Q, D) float32, k) -> (scores (Q, k) float32, ids (Q, k) int64), best first, id -1 when fewer than k
    passages exist; the same call as a FAISS index. `candidates` (>= k is enforced per call) per query."""

    def __init__(self, index, vectors: np.ndarray, candidates: int = DEFAULT_RERANK_CANDIDATES):
        if candidates <= 0:
            raise ValueError(f"[server] --rerank_candidates must be positive, got {candidates}")
        if vectors.shape != (index.ntotal, index.d):
            raise ValueError(f"rerank vectors are {vectors.shape}, the index holds ({index.ntotal}, {index.d})")
        self.index, self.vectors, self.candidates = index, vectors, candidates
        self.ntotal, self.d, self.metric_type = index.ntotal, index.d, index.metric_type

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)  # (Q, D)
        _, cand = self.index.search(x, max(k, self.candidates))  # (Q, C) int64, -1 = none
        scores = np.full((x.shape[0], k), MISSING_SCORE, dtype=np.float32)
        ids = np.full((x.shape[0], k), -1, dtype=np.int64)
        for a in range(0, x.shape[0], RERANK_QUERY_BLOCK):
            b = min(a + RERANK_QUERY_BLOCK, x.shape[0])
            scores[a:b], ids[a:b] = self.rerank(x[a:b], cand[a:b], k)
        return scores, ids

    def rerank(self, x: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among the candidates: x (q, D) float32, cand (q, C) int64 (-1 = none) -> (scores (q, k)
        float32, ids (q, k) int64). Each distinct row is read once, in file order; ties go to the lower id."""
        valid = cand >= 0
        rows, inverse = np.unique(cand[valid], return_inverse=True)  # rows (U,) sorted
        vecs = np.asarray(self.vectors[rows], dtype=np.float32)  # (U, D): the only disk reads
        exact = np.full(cand.shape, -np.inf, dtype=np.float32)  # (q, C)
        pos = np.zeros(cand.shape, dtype=np.int64)
        pos[valid] = inverse
        for i in range(cand.shape[0]):
            exact[i, valid[i]] = vecs[pos[i, valid[i]]] @ x[i]
        # best first by (-score, id): sort by id, then a stable sort by score
        by_id = np.argsort(np.where(valid, cand, np.iinfo(np.int64).max), axis=1, kind="stable")
        cand, exact = np.take_along_axis(cand, by_id, 1), np.take_along_axis(exact, by_id, 1)
        top = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # (q, min(k, C))
        ids, scores = np.take_along_axis(cand, top, 1), np.take_along_axis(exact, top, 1)
        out_s = np.full((x.shape[0], k), MISSING_SCORE, np.float32)
        out_i = np.full((x.shape[0], k), -1, np.int64)
        found = ids >= 0
        out_s[:, :top.shape[1]] = np.where(found, scores, MISSING_SCORE)
        out_i[:, :top.shape[1]] = ids
        return out_s, out_i
