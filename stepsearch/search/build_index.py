"""Index builder: `python -m stepsearch.search.build_index --corpus PATH --out DIR [--encoder NAME|PATH]
[--index_factory Flat|HNSW32|IVF4096,PQ64|IVF1024,PQ32+rerank ...] [--method dense|bm25|hybrid]
[--import_faiss FILE|DIR]`.

Steps (each resumable or cheap to redo):
1. stream the corpus into `corpus.arrow` (the served, memory-mapped table) and hash it (sha256);
2. print a memory estimate;
3. dense: encode each passage's text (`corpus.index_text`: a row's `contents` exactly as written, else
   '"Title"\\ntext'; passage prefix added by the encoder) into `emb.memmap` (N, D) float32;
   `emb.progress.json` records the row intervals done, so an interrupted build resumes where it stopped;
   `--devices cuda:0,cuda:1` (or `auto`: every visible GPU) encodes on one process per device, each writing its own
   `emb.progress.w<i>.json`, merged when they finish (or on the next run after an interruption);
4. dense: `faiss.index_factory(D, factory, inner product)`, train if needed, add, write `dense.faiss`; a factory
   ending in "+rerank" also writes `emb.fp16` (N, D) float16 for the exact second stage (rerank.py);
   with --import_faiss, steps 3-4 are replaced by checking and linking the user's FAISS file (faiss_import.py);
5. bm25: bm25s over the same texts into `bm25/`;
6. write `manifest.json` last (atomically): a folder without a manifest is not an index.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stepsearch.data.io import write_json_atomic
from stepsearch.search.corpus import ArrowCorpus, build_arrow_corpus
from stepsearch.search.index import (BM25_DIR, CORPUS_TABLE, DENSE_INDEX, EMBEDDINGS, ENCODER_IDENTITY_KEYS,
                                     MANIFEST, MANIFEST_VERSION, METHODS, PASSAGE_TEXT)
from stepsearch.search.rerank import RERANK_EMBEDDINGS, split_factory, write_fp16
from verl.utils.fs import file_sha256

PROGRESS = "emb.progress.json"
WORKER_PROGRESS = "emb.progress.w{}.json"  # one per --devices process, merged into PROGRESS when it ends
CORPUS_STATE = "corpus.arrow.json"


@dataclass(frozen=True)
class BuildConfig:
    """Validated builder settings (CLI boundary)."""

    corpus: str
    out: str
    method: str = "dense"
    encoder: str = "minilm"
    pooling: str = "mean"
    # None: the encoder's default ("query: "/"passage: " for e5, "" otherwise)
    query_prefix: str | None = None
    passage_prefix: str | None = None
    max_length: int = 256
    index_factory: str = "Flat"
    # passages per encoder forward pass
    batch_size: int = 64
    # passages encoded between two memmap flushes (the resume granularity)
    chunk_size: int = 1024
    # vectors used to train IVF/PQ factories (sampled with `seed`)
    train_size: int = 262144
    device: str = "cpu"
    # data-parallel encoding: "" = `device` alone; "auto" = every visible GPU (`device` when fewer than 2);
    # or a comma list such as "cuda:0,cuda:1" (one process per entry)
    devices: str = ""
    encoder_mode: str = "exact"
    seed: int = 0
    quiet: bool = False
    # an existing FAISS file (or a folder holding one *.index) to serve instead of encoding the corpus
    import_faiss: str | None = None
    # --import_faiss: passages re-encoded to check the stored vectors, and the cosine each must reach
    import_check_rows: int = 64
    import_min_cosine: float = 0.99

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"[build_index] --method must be one of {METHODS}, got {self.method!r}")
        for name in ("batch_size", "chunk_size", "train_size", "max_length", "import_check_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"[build_index] --{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.import_min_cosine <= 1.0:
            raise ValueError(f"[build_index] --import_min_cosine must be in (0, 1], got {self.import_min_cosine}")
        _, rerank = split_factory(self.index_factory)
        if self.import_faiss is not None:
            if "dense" not in self.parts:
                raise ValueError("[build_index] --import_faiss serves a dense index; use --method dense or hybrid, "
                                 f"not {self.method!r}")
            if rerank:
                raise ValueError(f"[build_index] --index_factory {self.index_factory!r} does not apply with "
                                 "--import_faiss: the imported index is served as it is")

    @property
    def parts(self) -> list[str]:
        return ["dense", "bm25"] if self.method == "hybrid" else [self.method]


def log(cfg: BuildConfig, msg: str) -> None:
    if not cfg.quiet:
        print(f"[build_index] {msg}", file=sys.stderr, flush=True)


def corpus_record(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "sha256": file_sha256(path), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}


def prepare_corpus(cfg: BuildConfig, out: Path) -> tuple[dict, ArrowCorpus]:
    """Write (or reuse, if built from the same sha256) corpus.arrow; return the corpus record and the table."""
    rec = corpus_record(Path(cfg.corpus))
    state_path = out / CORPUS_STATE
    if state_path.is_file() and (out / CORPUS_TABLE).is_file():
        state = json.loads(state_path.read_text())
        if state.get("sha256") == rec["sha256"]:
            rec["num_passages"] = state["num_passages"]
            log(cfg, f"reusing {CORPUS_TABLE} ({rec['num_passages']} passages)")
            return rec, ArrowCorpus(out / CORPUS_TABLE)
    with tqdm(desc="corpus rows", unit="row", disable=cfg.quiet) as bar:
        rec["num_passages"] = build_arrow_corpus(cfg.corpus, out / CORPUS_TABLE, progress=bar.update)
    write_json_atomic(state_path, {"sha256": rec["sha256"], "num_passages": rec["num_passages"]})
    return rec, ArrowCorpus(out / CORPUS_TABLE)


def estimate_index_bytes(factory: str, n: int, dim: int) -> int:
    """Rough resident size of a FAISS index's per-passage part: Flat 4·N·D, SQ8 N·D, PQm N·m (PQmxb: m·b/8 B)
    (+8 B id for IVF), HNSWm adds 8·m·N. A "+rerank" factory counts its compressed index only (the fp16
    vectors stay on disk); `estimate_fixed_bytes` adds the part that does not grow with N."""
    spec = split_factory(factory)[0].replace(" ", "")
    per_vec = 4 * dim
    if m := re.search(r"PQ(\d+)(?:x(\d+))?", spec):
        per_vec = -(-int(m.group(1)) * int(m.group(2) or 8) // 8)
    elif "SQ8" in spec:
        per_vec = dim
    elif "SQfp16" in spec or "SQ16" in spec:
        per_vec = 2 * dim
    if "IVF" in spec:
        per_vec += 8
    if m := re.search(r"HNSW(\d+)", spec):
        per_vec += 8 * int(m.group(1))
    return n * per_vec


def estimate_fixed_bytes(factory: str, dim: int) -> int:
    """The part of a FAISS index that does not grow with N: IVF centroids nlist·D·4 B and PQ codebooks
    2^bits·D·4 B (m sub-quantizers of 2^bits centroids of D/m floats)."""
    spec = split_factory(factory)[0].replace(" ", "")
    total = 0
    if m := re.search(r"IVF(\d+)", spec):
        total += int(m.group(1)) * dim * 4
    if m := re.search(r"PQ(\d+)(?:x(\d+))?", spec):
        total += (1 << int(m.group(2) or 8)) * dim * 4
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def print_memory_estimate(cfg: BuildConfig, n: int, dim: int | None, corpus_bytes: int) -> None:
    lines = [f"{n} passages; corpus table {human_bytes(corpus_bytes)} on disk (memory-mapped when serving)"]
    if dim is not None and cfg.import_faiss is not None:
        lines.append(f"FAISS: {cfg.import_faiss} is linked, not copied, and memory-mapped when serving where "
                     "its type allows (start-up reads none of it; searches page it into the OS page cache)")
    elif dim is not None:
        lines.append(f"embeddings memmap {human_bytes(n * dim * 4)} on disk (N={n} x D={dim} x 4 B)")
        ram = estimate_index_bytes(cfg.index_factory, n, dim) + estimate_fixed_bytes(cfg.index_factory, dim)
        lines.append(f"FAISS {cfg.index_factory}: ~{human_bytes(ram)} of RAM to build and to serve")
        if split_factory(cfg.index_factory)[1]:
            lines.append(f"rerank vectors {RERANK_EMBEDDINGS} {human_bytes(n * dim * 2)} on disk (N x D x 2 B fp16), "
                         "memory-mapped when serving")
    if "bm25" in cfg.parts:
        lines.append(f"BM25: tokenizing holds every passage in RAM (~{human_bytes(2 * corpus_bytes)} peak)")
    for line in lines:
        log(cfg, "memory estimate: " + line)


def make_encoder(cfg: BuildConfig):
    from stepsearch.search.encoders import Encoder

    return Encoder(model=cfg.encoder, pooling=cfg.pooling, query_prefix=cfg.query_prefix,
                   passage_prefix=cfg.passage_prefix, max_length=cfg.max_length, device=cfg.device,
                   mode=cfg.encoder_mode, batch_size=cfg.batch_size)


def encoder_identity(described: dict) -> dict:
    return {k: described.get(k) for k in ENCODER_IDENTITY_KEYS}


def progress_identity(sha: str, described: dict, n: int, dim: int) -> dict:
    """What `emb.progress.json` must match for a build to resume on the rows already in `emb.memmap`: corpus,
    encoder identity, shape and the passage-text rule (PASSAGE_TEXT; embeddings of an older rule are redone)."""
    return {"corpus_sha256": sha, "encoder": encoder_identity(described), "shape": [n, dim],
            "passage_text": PASSAGE_TEXT}


def merge_intervals(intervals) -> list[list[int]]:
    """[[start, stop), ...] in any order -> sorted, overlapping or touching ones joined."""
    merged: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def read_done(out: Path, ident: dict) -> list[list[int]]:
    """Row intervals already in emb.memmap: `emb.progress.json` ("done", or an older file's "rows_done" prefix) and
    the per-device files of an interrupted --devices run, each only when its identity matches `ident`."""
    done = []
    if (out / EMBEDDINGS).is_file():
        for path in [out / PROGRESS, *sorted(out.glob(WORKER_PROGRESS.format("*")))]:
            state = json.loads(path.read_text()) if path.is_file() else {}
            if state and {k: state.get(k) for k in ident} == ident:
                done += state.get("done", [[0, state.get("rows_done", 0)]])
    return merge_intervals(done)


def write_done(path: Path, ident: dict, done: list[list[int]], **extra) -> None:
    done = merge_intervals(done)
    prefix = done[0][1] if done and done[0][0] == 0 else 0
    write_json_atomic(path, {**ident, "done": done, "rows_done": prefix, **extra})


def count_rows(intervals) -> int:
    return sum(b - a for a, b in intervals)


def record_done(out: Path, ident: dict, done: list[list[int]]) -> None:
    """`done` into emb.progress.json, then the per-device files it has absorbed removed."""
    write_done(out / PROGRESS, ident, done)
    for path in out.glob(WORKER_PROGRESS.format("*")):
        path.unlink()


def todo_chunks(done: list[list[int]], n: int, chunk: int) -> list[tuple[int, int]]:
    """The rows not in `done`, as [start, stop) pieces of at most `chunk` rows."""
    out, start = [], 0
    for a, b in merge_intervals(done) + [[n, n]]:
        out += [(s, min(s + chunk, a)) for s in range(start, a, chunk)]
        start = max(start, b)
    return out


def encode_devices(cfg: BuildConfig) -> list[str]:
    """The devices to encode on, one process each (BuildConfig.devices)."""
    if cfg.devices == "auto":
        from stepsearch.search.gpu_index import visible_gpus

        gpus = visible_gpus()
        return gpus if len(gpus) > 1 else [cfg.device]
    return [d.strip() for d in cfg.devices.split(",") if d.strip()] or [cfg.device]


def encode_chunks(encoder, corpus: ArrowCorpus, emb: np.ndarray, chunks, progress: Path, ident: dict,
                  done: list[list[int]], bar=None) -> list[list[int]]:
    """Encode each [start, stop) chunk into emb (N, D), flushing and recording it in `progress` after each one (a
    crash loses at most the chunk in flight). Returns `done` with the chunks added."""
    done = list(done)
    for start, stop in chunks:
        emb[start:stop] = encoder.encode_passages(corpus.index_texts(start, stop))
        emb.flush()
        done.append([start, stop])
        write_done(progress, ident, done)
        if bar is not None:
            bar.update(stop - start)
    return merge_intervals(done)


def _device_worker(cfg: BuildConfig, out: str, device: str, worker: int, chunks, ident: dict, cpu_threads: int):
    """One --devices process: its own encoder on `device`, the shared emb.memmap, its own progress file."""
    import dataclasses

    import torch

    if device.startswith("cpu"):
        torch.set_num_threads(cpu_threads)
    out = Path(out)
    encoder = make_encoder(dataclasses.replace(cfg, device=device, devices=""))
    corpus = ArrowCorpus(out / CORPUS_TABLE)
    emb = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="r+", shape=tuple(ident["shape"]))
    t0 = time.perf_counter()
    done = encode_chunks(encoder, corpus, emb, chunks, out / WORKER_PROGRESS.format(worker), ident, [])
    write_done(out / WORKER_PROGRESS.format(worker), ident, done, device=device, rows=count_rows(chunks),
               seconds=time.perf_counter() - t0)


def encode_corpus(cfg: BuildConfig, out: Path, corpus: ArrowCorpus, encoder, sha: str) -> np.ndarray:
    """Fill `emb.memmap` (N, D) float32 with the passages' `index_text`, resuming on the rows `emb.progress.json`
    (and any per-device progress file) records for the same identity (`progress_identity`). With several
    `encode_devices`, the remaining chunks are split into one contiguous share per device, each encoded by its
    own process; passages/s are logged per device and in total."""
    n, dim = len(corpus), encoder.dim
    ident = progress_identity(sha, encoder.describe(), n, dim)
    done = read_done(out, ident)
    if done:
        log(cfg, f"resuming embeddings: {count_rows(done)}/{n} rows done")
    emb = np.memmap(out / EMBEDDINGS, dtype=np.float32, mode="r+" if done else "w+", shape=(n, dim))
    chunks = todo_chunks(done, n, cfg.chunk_size)
    devices = encode_devices(cfg)
    t0 = time.perf_counter()
    if len(devices) == 1 or not chunks:
        with tqdm(total=n, initial=n - count_rows(chunks), desc="encode passages", unit="psg",
                  disable=cfg.quiet) as bar:
            done = encode_chunks(encoder, corpus, emb, chunks, out / PROGRESS, ident, done, bar)
        record_done(out, ident, done)  # also when nothing was left: an interrupted --devices run's files merged
    else:
        import multiprocessing as mp

        share = -(-len(chunks) // len(devices))  # contiguous shares of the remaining chunks, one per device
        cpu_threads = max(1, (os.cpu_count() or 1) // max(1, sum(d.startswith("cpu") for d in devices)))
        procs = [mp.get_context("spawn").Process(
            target=_device_worker, args=(cfg, str(out), device, i, chunks[i * share:(i + 1) * share], ident,
                                         cpu_threads)) for i, device in enumerate(devices)]
        log(cfg, f"encoding {len(chunks)} chunks on {len(devices)} processes: {', '.join(devices)}")
        record_done(out, ident, done)  # an earlier run's per-device files are merged, then replaced
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        for i, device in enumerate(devices):
            path = out / WORKER_PROGRESS.format(i)
            state = json.loads(path.read_text()) if path.is_file() else {}
            if state.get("rows"):
                log(cfg, f"{device}: {state['rows']} passages in {state['seconds']:.1f} s = "
                         f"{state['rows'] / max(state['seconds'], 1e-9):.1f} passages/s")
        record_done(out, ident, read_done(out, ident))  # every device's progress, finished or not
        failed = [f"{d} (exit {p.exitcode})" for d, p in zip(devices, procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"[build_index] encoding failed on {', '.join(failed)}; the rows done are recorded in "
                               f"{out / PROGRESS}: rerun the same command to resume")
    encoded = count_rows(chunks)
    if encoded:
        seconds = time.perf_counter() - t0
        log(cfg, f"encoded {encoded} passages in {seconds:.1f} s = {encoded / seconds:.1f} passages/s "
                 f"({len(devices)} device(s))")
    return emb


def build_faiss(cfg: BuildConfig, emb: np.ndarray, out: Path) -> dict:
    """index_factory(D, factory, METRIC_INNER_PRODUCT) over emb (N, D) float32: cosine on L2-normalized vectors
    (Search-R1's metric). "<factory>+rerank" builds <factory> and writes emb (N, D) as float16 `emb.fp16`.
    Returns the manifest fields of the dense part (`rerank` is None without "+rerank")."""
    import faiss

    n, dim = emb.shape
    base, rerank = split_factory(cfg.index_factory)
    index = faiss.index_factory(dim, base, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(cfg.seed)
        sample = np.sort(rng.choice(n, size=min(n, cfg.train_size), replace=False))
        log(cfg, f"training {cfg.index_factory} on {len(sample)} vectors")
        try:
            index.train(np.ascontiguousarray(emb[sample]))
        except RuntimeError as exc:  # e.g. PQ needs >= 256 points per sub-quantizer, IVFk needs >= k
            raise ValueError(f"[build_index] cannot train --index_factory {base!r} on {len(sample)} "
                             f"vectors ({str(exc).splitlines()[-1]}); use Flat or HNSW32 for a corpus this "
                             "small, or fewer IVF lists / PQ bits") from None
    step = 65536
    for start in tqdm(range(0, n, step), desc="faiss add", unit="chunk", disable=cfg.quiet):
        index.add(np.ascontiguousarray(emb[start:start + step]))
    tmp = out / (DENSE_INDEX + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / DENSE_INDEX)  # also replaces a symlink left by an earlier --import_faiss, not its target
    if rerank:
        log(cfg, f"writing {RERANK_EMBEDDINGS} ({n} x {dim} float16) for the exact re-rank")
        write_fp16(emb, out / RERANK_EMBEDDINGS)
    return {"index_factory": cfg.index_factory,
            "rerank": {"embeddings": RERANK_EMBEDDINGS, "dtype": "float16", "shape": [n, dim]} if rerank else None}


def build_bm25(cfg: BuildConfig, corpus: ArrowCorpus, out: Path) -> None:
    import bm25s

    texts = corpus.index_texts()
    tokens = bm25s.tokenize(texts, stopwords="en", show_progress=not cfg.quiet)
    del texts
    model = bm25s.BM25()
    model.index(tokens, show_progress=not cfg.quiet)
    tmp = out / (BM25_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp), show_progress=False)
    shutil.rmtree(out / BM25_DIR, ignore_errors=True)
    os.replace(tmp, out / BM25_DIR)


def build_index(cfg: BuildConfig) -> Path:
    """Build (or resume building) the index folder `cfg.out`; return its path."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is not a valid index until the new manifest lands
    t0 = time.perf_counter()
    rec, corpus = prepare_corpus(cfg, out)
    imported = None
    if cfg.import_faiss is not None:  # metric and count checked before the encoder is loaded
        from stepsearch.search.faiss_import import open_index

        imported = open_index(cfg.import_faiss, len(corpus), cfg.corpus)
    encoder = make_encoder(cfg) if "dense" in cfg.parts else None
    print_memory_estimate(cfg, len(corpus), encoder.dim if encoder else None, (out / CORPUS_TABLE).stat().st_size)
    manifest = {"version": MANIFEST_VERSION, "methods": cfg.parts, "corpus": rec, "metric": None,
                "encoder": None, "index_factory": None, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_config": asdict(cfg), "passage_text": PASSAGE_TEXT}
    if encoder is not None:
        if imported is not None:
            from stepsearch.search.faiss_import import import_faiss

            manifest.update(import_faiss(*imported, out, corpus, encoder, cfg.import_check_rows,
                                         cfg.import_min_cosine, cfg.seed, log=lambda msg: log(cfg, msg)))
        else:
            emb = encode_corpus(cfg, out, corpus, encoder, rec["sha256"])
            manifest.update(build_faiss(cfg, emb, out))
        described = encoder.describe()
        manifest.update(encoder=described, metric="inner_product",
                        dim=encoder.dim, pooling=described["pooling"], max_length=described["max_length"],
                        query_prefix=described["query_prefix"], passage_prefix=described["passage_prefix"])
    if "bm25" in cfg.parts:
        build_bm25(cfg, corpus, out)
        manifest["bm25"] = {"library": "bm25s", "tokenizer": "bm25s.tokenize(stopwords='en')"}
    manifest["num_passages"] = rec["num_passages"]
    write_json_atomic(out / MANIFEST, manifest, sort_keys=True)
    log(cfg, f"index ready at {out} ({rec['num_passages']} passages, {cfg.method}) in {time.perf_counter() - t0:.1f}s")
    return out


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    d = BuildConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", required=True, help="JSONL or .jsonl.gz corpus (one passage per line)")
    p.add_argument("--out", required=True, help="index folder to create or resume")
    p.add_argument("--method", default="dense", choices=METHODS, help="dense (FAISS), bm25 (bm25s) or hybrid (both)")
    p.add_argument("--encoder", default="minilm", help="minilm (bundled), e5, a local folder or a hub id")
    p.add_argument("--pooling", default="mean", choices=("mean", "cls"))
    p.add_argument("--query_prefix", default=None, help="default: 'query: ' for e5, '' otherwise")
    p.add_argument("--passage_prefix", default=None, help="default: 'passage: ' for e5, '' otherwise")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--index_factory", default=d["index_factory"].default,
                   help="FAISS factory string: Flat, HNSW32, IVF4096,PQ64, ...; append +rerank (IVF1024,PQ32+rerank) "
                        "to re-rank its candidates exactly against fp16 vectors memory-mapped from disk")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--chunk_size", type=int, default=1024, help="passages per memmap flush (resume granularity)")
    p.add_argument("--train_size", type=int, default=262144)
    p.add_argument("--device", default="cpu")
    p.add_argument("--devices", default=d["devices"].default,
                   help="encode on several devices at once, one process each: a comma list (cuda:0,cuda:1) or "
                        "auto (every visible GPU); default: --device alone")
    p.add_argument("--encoder_mode", default="exact", help="encoder speed mode (see encoders.py); exact by default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--import_faiss", default=None,
                   help="serve this existing FAISS file (Search-R1's e5_Flat.index; or a folder holding one *.index, "
                        "FlashRAG) without re-encoding: it is checked against --corpus and --encoder, then linked")
    p.add_argument("--import_check_rows", type=int, default=d["import_check_rows"].default,
                   help="--import_faiss: random passages re-encoded to check the stored vectors")
    p.add_argument("--import_min_cosine", type=float, default=d["import_min_cosine"].default,
                   help="--import_faiss: the cosine every re-encoded passage must reach with its stored vector")
    return BuildConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        build_index(cfg)
    except (ValueError, OSError) as exc:
        print(f"[build_index] error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
