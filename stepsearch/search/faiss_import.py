"""Serve an existing FAISS index (Search-R1's `e5_Flat.index`, FlashRAG's `<method>_<type>.index`) without
re-encoding the corpus: `python -m stepsearch.search.build_index --import_faiss FILE|DIR --corpus CORPUS.jsonl
--encoder e5 --out DIR`.

The index folder gets our served corpus (`corpus.arrow`), a manifest, and `dense.faiss` as a symlink to the user's
file (the vectors are not copied; the server memory-maps them). Before writing the manifest the import checks:
1. the index's metric is inner product and its dimension is the encoder's;
2. `ntotal` equals the corpus row count (vector i must be the passage on line i);
3. the stored vectors match the named encoder, prefix, pooling and text form: `check_rows` passages drawn at
   random are re-encoded (their `contents` as written, as Search-R1/FlashRAG encode them) and compared with the
   vectors read back from the index (`reconstruct`): every cosine must be >= `min_cosine` (0.99 by default; an
   index built by another encoder or with another prefix scores well below it).
Any failure raises ValueError naming the file, the count or the passage that disagrees.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stepsearch.search.corpus import ArrowCorpus
from stepsearch.search.index import DENSE_INDEX
from stepsearch.search.rerank import read_faiss


def find_index_file(path: str | os.PathLike) -> Path:
    """The FAISS file to import: `path` itself, or the one `*.index` file in folder `path` (FlashRAG's layout)."""
    path = Path(path)
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        found = sorted(path.glob("*.index"))
        if len(found) == 1:
            return found[0].resolve()
        raise ValueError(f"--import_faiss {path}: a folder must hold exactly one *.index file, found "
                         f"{[p.name for p in found] or 'none'}; pass the file itself")
    raise FileNotFoundError(f"--import_faiss {path}: no such file or folder")


def source_record(path: Path) -> dict:
    """What the manifest records of the imported file; the server refuses to start when size or mtime changed."""
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def open_index(src_arg: str, n_passages: int, corpus_path: str):
    """Find and open (memory-mapped) the FAISS file to import; check its metric and that it holds one vector per
    corpus passage (before any encoder is loaded). Returns (resolved path, index)."""
    import faiss

    src = find_index_file(src_arg)
    try:
        index = read_faiss(src)  # memory-mapped where the type allows: a 60 GB Flat index is not read
    except RuntimeError as exc:
        raise ValueError(f"--import_faiss {src}: not a FAISS index file ({str(exc).splitlines()[-1]})") from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"--import_faiss {src}: metric {index.metric_type} is not inner product "
                         f"({faiss.METRIC_INNER_PRODUCT}); StepSearch scores by inner product of normalized vectors "
                         "(cosine), as Search-R1 does")
    if index.ntotal != n_passages:
        raise ValueError(f"--import_faiss {src}: the index holds {index.ntotal} vectors but --corpus {corpus_path} "
                         f"has {n_passages} passages; vector i must be the passage on line i of the corpus the "
                         "index was built from")
    return src, index


def stored_vectors(index, rows: np.ndarray, src: Path) -> np.ndarray:
    """Vectors `rows` (k,) read back from the index -> (k, D) float32 (IVF indexes get a direct map first)."""
    import faiss

    try:
        return np.stack([index.reconstruct(int(r)) for r in rows])
    except RuntimeError:
        try:  # IVF: reconstruct needs the id -> list map
            faiss.extract_index_ivf(index).make_direct_map()
            return np.stack([index.reconstruct(int(r)) for r in rows])
        except RuntimeError as exc:
            raise ValueError(f"--import_faiss {src}: cannot read vectors back from a {type(index).__name__} "
                             f"({str(exc).splitlines()[-1]}), so they cannot be checked against the encoder; "
                             "import a Flat, HNSW, IVF or SQ index") from None


def check_vectors(index, corpus: ArrowCorpus, encoder, src: Path, check_rows: int, min_cosine: float,
                  seed: int = 0) -> dict:
    """Re-encode `check_rows` random passages and compare with the stored vectors. Returns the statistics
    recorded in the manifest; raises ValueError naming the worst passage when a cosine is below `min_cosine`."""
    n = len(corpus)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(check_rows, n), replace=False))  # (k,)
    texts = [corpus.index_texts(int(r), int(r) + 1)[0] for r in rows]
    fresh = encoder.encode_passages(texts)  # (k, D), unit rows
    stored = stored_vectors(index, rows, src)  # (k, D)
    norms = np.linalg.norm(stored, axis=1)
    cos = (fresh * stored).sum(axis=1) / np.maximum(norms * np.linalg.norm(fresh, axis=1), 1e-12)  # (k,)
    worst = int(np.argmin(cos))
    stats = {"rows": int(len(rows)), "seed": seed, "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
             "threshold": min_cosine, "stored_norm_mean": float(norms.mean())}
    if cos[worst] < min_cosine:
        d = encoder.describe()
        pid = corpus.column("id", int(rows[worst]), int(rows[worst]) + 1)[0]
        below = int((cos < min_cosine).sum())
        raise ValueError(
            f"--import_faiss {src}: the stored vectors do not match --encoder {d['model']} (passage_prefix "
            f"{d['passage_prefix']!r}, pooling {d['pooling']}, max_length {d['max_length']}): re-encoding {len(rows)} "
            f"random passages gives cosine {stats['min_cosine']:.4f} at corpus row {int(rows[worst])} (id {pid!r}), "
            f"mean {stats['mean_cosine']:.4f}, {below} below --import_min_cosine {min_cosine}. The index was built "
            "with another encoder, prefix, pooling, max_length or passage text, or from another corpus order; pass "
            "the settings it was built with (Search-R1's e5 index: --encoder e5, which adds 'passage: ')")
    return stats


def link_index(src: Path, out: Path) -> None:
    """Point `out/dense.faiss` at `src` (absolute symlink, replaced atomically; nothing is copied)."""
    tmp = out / (DENSE_INDEX + ".link.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(src, tmp)
    os.replace(tmp, out / DENSE_INDEX)


def import_faiss(src: Path, index, out: Path, corpus: ArrowCorpus, encoder, check_rows: int, min_cosine: float,
                 seed: int = 0, log=print) -> dict:
    """Check the FAISS index `index` read from `src` (`open_index`) against the encoder, link it as
    `out/dense.faiss`; return the manifest fields (index_factory, dense_source, import_check)."""
    if index.d != encoder.dim:
        raise ValueError(f"--import_faiss {src}: vectors have {index.d} dimensions, --encoder "
                         f"{encoder.describe()['model']} gives {encoder.dim}; name the encoder the index was built "
                         "with")
    log(f"{src}: {type(index).__name__}, {index.ntotal} x {index.d}; re-encoding {min(check_rows, len(corpus))} "
        "random passages to check the stored vectors")
    stats = check_vectors(index, corpus, encoder, src, check_rows, min_cosine, seed)
    log(f"stored vectors match the encoder: cosine min {stats['min_cosine']:.5f}, mean {stats['mean_cosine']:.5f}")
    record = source_record(src)
    link_index(src, out)
    return {"index_factory": f"imported {type(index).__name__}",
            "dense_source": record, "import_check": stats}
