"""Retriever speed, measured side by side in one run (issues 2 and 8).

    .venv/bin/python bench/retrieval.py                  # serving sections, writes bench/results/retrieval.md
    .venv/bin/python bench/retrieval.py --sections index # FAISS index memory/speed/recall table (~14k passages)
    .venv/bin/python bench/retrieval.py --sections calibrate  # guard_eps of the guarded bf16 path (encoders.py)
    .venv/bin/python bench/retrieval.py --sections workers --out bench/results/retrieval_serve_avx2.md
                                                         # --encode_workers 1 vs 0, idle cores and one core busy
    .venv/bin/python bench/retrieval.py --sections pack --out bench/results/retrieval_serve_avx2cap.md
                                                         # packed micro-batches vs --no_pack_tokens

Serving sections, all on the bundled 1000-passage wiki-18 sample, MiniLM, top-3, real questions from
../shared/data/*/qa_pairs (every query is sent once per server, so the cache only helps where it is meant to):
- naive vs ours (issue 8): (1) a Search-R1-style server written here (fp32, no coalescing, no cache: a tiny FastAPI
  app whose sync endpoint FastAPI runs on its thread pool, so concurrent requests encode at once, each with torch's
  default threads, as Search-R1's `retrieve_endpoint` does; its encoder is built through transformers) against
  (2) the real `stepsearch.search.server` (micro-batcher, Redis + LRU cache, `--encoder_mode fast` = guarded bf16
  with fp32 fallback, the default `--encoder_backend auto` = native_bert's encoder): 8 clients x 64 queries/request,
  32 single-query clients, repeated-query (cache-hit) latency, and top-3 agreement of ours with exact fp32 (through
  the server, and in-process on 2,000 more real questions).
- (a) HTTP 8x64 throughput of ours against the same encode+search called in-process (target >= 0.8);
- (b) cache-hit latency p50/p99; (c) 32 single-query clients, coalescing on vs off (target >= 2x).
Phases alternate between servers and repeat (`--reps`), so drifting load from other processes hits both.
Load generator (the same for every server): one OS thread per client, each with its own keep-alive
`http.client.HTTPConnection` (stdlib; far lighter per request than an httpx AsyncClient, which spent more CPU
than the server's cache-hit path on these 2 cores).

Also run internally as the naive server: `bench/retrieval.py --serve_naive --index_dir DIR --port P`.
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = REPO.parent / "shared" / "data"
WIKI_SAMPLE = REPO / "data" / "samples" / "wiki18_sample_1000.jsonl"
QA_GLOBS = ("hotpotqa/qa_pairs/*.jsonl", "2wikimultihopqa/qa_pairs/*.jsonl", "musique/qa_pairs/*.jsonl")
BUNDLED_QA = ("hotpotqa_flashrag_dev_200.jsonl", "2wiki_flashrag_dev_200.jsonl", "musique_flashrag_dev_200.jsonl")
WIKI18_FILES = ("wiki18/multihop_contexts.wiki18fmt.jsonl", "wiki18/wiki18_bamboogle_e5_retrieved_passages.jsonl",
                "wiki18/wiki18_sample_1000.FlashRAG.jsonl")
CACHE = REPO / "data" / "cache" / "bench_retrieval"
TOPK = 3


# ---------------------------------------------------------------- data
def load_questions() -> list[str]:
    """Distinct real questions, shuffled with seed 0 (shared qa_pairs; the bundled dev samples as fallback)."""
    files = sorted(p for g in QA_GLOBS for p in SHARED.glob(g)) or [REPO / "data" / "samples" / n for n in BUNDLED_QA]
    return distinct_questions(files)


def distinct_questions(files: list[Path]) -> list[str]:
    """The distinct non-empty "question" fields of JSONL files, in file order, then shuffled with seed 0."""
    seen, out = set(), []
    for path in files:
        with open(path) as f:
            for line in f:
                q = json.loads(line)["question"].strip()
                if q and q not in seen:
                    seen.add(q)
                    out.append(q)
    rng = np.random.default_rng(0)
    return [out[i] for i in rng.permutation(len(out))]


def read_passages(paths: list[Path]) -> tuple[list[str], list[str]]:
    """(ids, '"Title"\\ntext' strings) from {"id","contents"} JSONL files."""
    ids, texts = [], []
    for path in paths:
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                ids.append(str(row["id"]))
                texts.append(row["contents"])
    return ids, texts


def percentile_ms(latencies_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies_s) * 1000.0, q))


def top3_agreement(ids_a: list[list[str]], ids_b: list[list[str]]) -> float:
    """Fraction of queries whose top-3 id sets are equal (any order)."""
    return float(np.mean([set(a) == set(b) for a, b in zip(ids_a, ids_b)]))


# ---------------------------------------------------------------- the naive Search-R1-style server
class QueryRequest(BaseModel):
    """Search-R1's request schema."""

    queries: list[str]
    topk: int = 3
    return_scores: bool = False


def make_naive_app(index_dir: str):
    """fp32 encoder, no coalescing, no cache; rows from the JSONL in index order."""
    import faiss

    from stepsearch.search.encoders import Encoder

    manifest = json.loads((Path(index_dir) / "manifest.json").read_text())
    index = faiss.read_index(str(Path(index_dir) / "dense.faiss"))
    with open(manifest["corpus"]["path"]) as f:
        rows = [json.loads(line) for line in f]
    # Search-R1's retrieval_server encodes each request in batches of 512 (one batch here) at full fp32
    encoder = Encoder(model=manifest["encoder"]["model"], mode="exact", batch_size=512, backend="transformers")
    return naive_app(encoder, index, rows.__getitem__)


def naive_app(encoder, index, row):
    """The naive app's routes over a loaded encoder, FAISS index and `row(i)` -> corpus row dict (i: int); also
    served by bench/retrieval_scale.py over a `datasets` table, as Search-R1 loads its corpus."""
    from fastapi import FastAPI

    app = FastAPI()

    # a sync endpoint, as Search-R1's: FastAPI runs it on its thread pool, so concurrent requests encode and search
    # at once (no lock, no coalescing), each forward with torch's default intra-op threads
    @app.post("/retrieve")
    def retrieve(req: QueryRequest):
        emb = encoder.encode_queries(req.queries)
        scores, idx = index.search(emb, req.topk)
        result = [[{"document": row(i), "score": float(s)} if req.return_scores else row(i)
                   for i, s in zip(r_idx, r_s)] for r_idx, r_s in zip(idx.tolist(), scores.tolist())]
        return {"result": result}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app


def serve_naive(index_dir: str, port: int) -> None:
    import uvicorn

    uvicorn.run(make_naive_app(index_dir), host="127.0.0.1", port=port, log_level="warning")


@dataclass
class NaiveProc:
    proc: subprocess.Popen
    url: str

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start_naive(index_dir: str, timeout_s: float = 180.0) -> NaiveProc:
    from stepsearch.search.testing import free_port, wait_for_health

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve_naive", "--index_dir", index_dir, "--port", str(port)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    np_ = NaiveProc(proc, f"http://127.0.0.1:{port}")
    failure = wait_for_health(proc, np_.url, timeout_s, poll_s=0.2)
    if failure is None:
        return np_
    np_.stop()
    raise RuntimeError(f"naive server {failure}")


# ---------------------------------------------------------------- load generation (loopback, bounded)
class Conn:
    """A keep-alive HTTP/1.1 connection (stdlib http.client) posting /retrieve bodies."""

    def __init__(self, url: str, timeout_s: float = 300.0):
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.http = http.client.HTTPConnection(host, int(port), timeout=timeout_s)

    def post(self, body: bytes) -> bytes:
        self.http.request("POST", "/retrieve", body, {"Content-Type": "application/json"})
        resp = self.http.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"/retrieve answered {resp.status}: {data[:200]!r}")
        return data

    def close(self) -> None:
        self.http.close()


def run_clients(url: str, per_client: list[list[list[str]]]) -> dict:
    """One thread per client; client c sends per_client[c] requests in order over its own keep-alive connection.
    Returns q/s (all queries / wall time from the common start), latencies and the doc ids per query."""
    latencies: list[float] = []
    answers: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(per_client) + 1)

    def client(requests: list[list[str]]):
        conn = Conn(url)
        bodies = [json.dumps({"queries": q, "topk": TOPK, "return_scores": True}).encode() for q in requests]
        try:
            conn.post(b'{"queries": ["connection warm-up"], "topk": 1}')  # connect before the clock starts
            start.wait()
            for queries, body in zip(requests, bodies):
                t0 = time.perf_counter()
                data = conn.post(body)
                latencies.append(time.perf_counter() - t0)
                for q, hits in zip(queries, json.loads(data)["result"]):
                    answers[q] = [str(h["document"]["id"]) for h in hits]
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)
            start.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(reqs,), daemon=True) for reqs in per_client]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"load client failed against {url}: {errors[0]!r}")
    n = sum(len(q) for reqs in per_client for q in reqs)
    return {"qps": n / wall, "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
            "answers": answers, "n": n}


def split_clients(queries: list[str], clients: int, per_request: int) -> list[list[list[str]]]:
    """Deal queries to `clients` clients in requests of `per_request` (len(queries) divisible)."""
    reqs = [queries[i:i + per_request] for i in range(0, len(queries), per_request)]
    return [reqs[c::clients] for c in range(clients)]


def repeated_query_latency(url: str, query: str, n: int) -> dict:
    """Same query sent n times, one at a time (after one warm-up send); client-side round-trip latency."""
    conn = Conn(url, timeout_s=60.0)
    body = json.dumps({"queries": [query], "topk": TOPK, "return_scores": True}).encode()
    lat = []
    try:
        conn.post(body)
        for _ in range(n):
            t0 = time.perf_counter()
            conn.post(body)
            lat.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return {"p50_ms": percentile_ms(lat, 50), "p99_ms": percentile_ms(lat, 99)}


# ---------------------------------------------------------------- in-process reference
_ENCODERS: dict = {}


def in_process(index_dir: str, ids: list[str], queries: list[str], mode: str, per_request: int) -> dict:
    """Encode + FAISS search in this process, `per_request` queries per call, one call at a time (mode guarded:
    `guarded_search`, the server's path; the reference mode exact through transformers, every other mode through
    the server's default encoder backend, auto). Returns q/s, doc ids per query and the fp32 fallback rate."""
    import faiss

    from stepsearch.search.encoders import Encoder, guarded_search

    index = faiss.read_index(str(Path(index_dir) / "dense.faiss"))
    if mode not in _ENCODERS:
        _ENCODERS[mode] = Encoder(mode=mode, batch_size=512, backend="transformers" if mode == "exact" else "auto")
    enc = _ENCODERS[mode]
    search = lambda emb, k: index.search(emb, k)[::-1]  # FAISS returns (scores, ids)
    guarded = enc.config.mode == "guarded"
    if guarded:
        guarded_search(enc, search, queries[:64], TOPK)  # warm-up
    else:
        enc.encode_queries(queries[:8])  # warm-up
    out, fallbacks = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(queries), per_request):
        part = queries[i:i + per_request]
        if guarded:
            res = guarded_search(enc, search, part, TOPK)
            idx, fallbacks = res.ids, fallbacks + int(res.fallback.sum())
        else:
            _, idx = index.search(enc.encode_queries(part), TOPK)
        out += [[ids[j] for j in row] for row in idx.tolist()]
    return {"qps": len(queries) / (time.perf_counter() - t0), "answers": dict(zip(queries, out)),
            "fallback_rate": fallbacks / len(queries), "mode": enc.config.mode}


def padding_fraction(queries: list[str], per_request: int) -> float:
    """Share of token slots that are padding when each request is padded to its longest query (exact path)."""
    from stepsearch.search.encoders import Encoder

    lengths = np.array([len(x) for x in Encoder().token_ids(queries)])
    slots = sum(lengths[i:i + per_request].max() * len(lengths[i:i + per_request])
                for i in range(0, len(lengths), per_request))
    return 1.0 - lengths.sum() / slots


# ---------------------------------------------------------------- the serving run
def scratch_dir(prefix: str) -> Path:
    """A fresh temporary folder for this run's indexes, removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def build_sample_index(tmp: Path) -> str:
    from stepsearch.search.testing import build_test_index

    return str(build_test_index(WIKI_SAMPLE, tmp / "wiki18_index", method="dense"))


def serving_sections(args) -> dict:
    from stepsearch.search.testing import start_redis, start_retrieval_server

    questions = load_questions()
    n8 = 8 * 64  # one 8x64 round
    need = args.reps * (n8 + 32 * args.single_per_client) + 1
    if len(questions) < need:
        raise ValueError(f"need {need} distinct questions, found {len(questions)} under {SHARED}")
    tmp = scratch_dir("bench_retrieval_")
    index_dir = build_sample_index(tmp)
    ids, _ = read_passages([WIKI_SAMPLE])
    # 0 (default): no thread variables, so our server picks its own thread count, as users run it
    thread_env = {"OMP_NUM_THREADS": str(args.ours_threads), "MKL_NUM_THREADS": str(args.ours_threads)} \
        if args.ours_threads > 0 else {}
    ours_args = ["--encoder_mode", args.ours_mode, "--log_level", "warning", "--torch_threads",
                 str(max(args.ours_threads, 0))]  # 0: the server's own default (start_retrieval_server's is 1)
    redis = start_redis()
    servers = {}
    try:
        servers["naive"] = start_naive(index_dir)
        servers["ours"] = start_retrieval_server(index_dir, redis.url.rsplit("/", 1)[0] + "/0",
                                                 extra_args=ours_args, env=thread_env)
        servers["ours_nocoalesce"] = start_retrieval_server(index_dir, redis.url.rsplit("/", 1)[0] + "/1",
                                                            extra_args=ours_args + ["--no_coalesce"], env=thread_env)
        return run_phases(args, questions, ids, index_dir, {k: s.url for k, s in servers.items()})
    finally:
        for s in servers.values():
            s.stop()
        redis.stop()


def set_ours_threads(args) -> None:
    """In-process runs: --ours_threads torch threads when > 0, else torch's default (every core), as the server's
    auto setting gives outside the guarded pipeline."""
    import torch

    if args.ours_threads > 0:
        torch.set_num_threads(args.ours_threads)


MODE_LABEL = {
    "guarded": "bf16 encode + top-4 search, fp32 re-encode of the queries whose 3rd-4th bf16 score gap is below "
               "guard_eps; the bf16 pass on 2 worker threads in chunks of 64, the fp32 fallback on its own thread",
    "sorted": "fp32, length-sorted micro-batches of 32 on one owner thread (the default --encode_workers 1)",
}


def threads_label(args) -> str:
    if args.ours_threads > 0:
        return f"{args.ours_threads} torch thread(s) per thread (OMP_NUM_THREADS)"
    return "the server's default threads (--torch_threads 0: every core, 1 per thread in the guarded pipeline)"


def run_phases(args, questions: list[str], ids: list[str], index_dir: str, urls: dict) -> dict:
    import torch

    res: dict = {"8x64": {k: [] for k in ("naive", "ours", "inproc_exact", "inproc_fast")},
                 "single": {k: [] for k in ("naive", "ours", "ours_nocoalesce")}, "agreement": [],
                 "agreement_naive": [], "padding": None, "inproc_fast_fallback": []}
    pos = 0
    for rep in range(args.reps):
        batch = questions[pos:pos + 512]
        pos += 512
        set_ours_threads(args)
        exact = in_process(index_dir, ids, batch, "exact", 64)
        fast = in_process(index_dir, ids, batch, args.ours_mode, 64)
        res["inproc_fast_mode"] = fast["mode"]
        res["8x64"]["inproc_exact"].append(exact["qps"])
        res["8x64"]["inproc_fast"].append(fast["qps"])
        res["inproc_fast_fallback"].append(fast["fallback_rate"])
        for name in ("naive", "ours"):
            r = run_clients(urls[name], split_clients(batch, 8, 64))
            res["8x64"][name].append(r["qps"])
            if name == "ours":
                res["agreement"].append(top3_agreement([r["answers"][q] for q in batch],
                                                       [exact["answers"][q] for q in batch]))
            else:
                res["agreement_naive"].append(top3_agreement([r["answers"][q] for q in batch],
                                                             [exact["answers"][q] for q in batch]))
        singles = questions[pos:pos + 32 * args.single_per_client]
        pos += len(singles)
        for name in ("naive", "ours", "ours_nocoalesce"):
            r = run_clients(urls[name], split_clients(singles, 32, 1))
            res["single"][name].append({k: r[k] for k in ("qps", "p50_ms", "p99_ms")})
        print(f"[bench] rep {rep}: {json.dumps({k: v for k, v in res.items() if k != 'padding'}, default=str)}",
              flush=True)
    res["padding"] = padding_fraction(questions[:512], 64)
    import httpx

    res["ours_batch_sizes"] = httpx.get(urls["ours"] + "/stats", timeout=30.0).json().get("batch_sizes")
    hit_q = questions[pos]
    pos += 1
    res["cache_hit"] = {"ours": repeated_query_latency(urls["ours"], hit_q, args.hit_repeats),
                        "naive": repeated_query_latency(urls["naive"], hit_q, max(20, args.hit_repeats // 10))}
    # top-3 agreement of the fast path with exact fp32 on more real questions (in-process, the server's code path)
    more = questions[pos:pos + args.agreement_queries]
    exact = in_process(index_dir, ids, more, "exact", 64)
    fast = in_process(index_dir, ids, more, args.ours_mode, 64)
    res["agreement_more"] = {"n": len(more), "mode": fast["mode"], "fallback_rate": fast["fallback_rate"],
                             "agreement": top3_agreement([fast["answers"][q] for q in more],
                                                         [exact["answers"][q] for q in more]),
                             "order_agreement": float(np.mean([fast["answers"][q] == exact["answers"][q]
                                                               for q in more]))}
    return res


# ---------------------------------------------------------------- index memory/speed/recall (docs/retrieval_speed.md)
def cached_embeddings(texts: list[str], what: str, mode: str = "fast") -> np.ndarray:
    """Embeddings of `texts` (MiniLM, `mode`), cached under data/cache/bench_retrieval/ by content hash."""
    from stepsearch.search.encoders import Encoder

    key = hashlib.sha256(json.dumps([texts, mode]).encode()).hexdigest()[:20]
    path = CACHE / f"{what}-{key}.npy"
    if path.is_file():
        return np.load(path)
    enc = Encoder(mode=mode)
    from tqdm import tqdm

    chunks = [enc.encode_passages(texts[i:i + 512]) if what == "passages" else enc.encode_queries(texts[i:i + 512])
              for i in tqdm(range(0, len(texts), 512), desc=f"encode {what}")]
    emb = np.concatenate(chunks) if chunks else np.zeros((0, enc.dim), np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    from stepsearch.data.io import atomic_path

    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, emb)
    return emb


# "+rerank": the two-stage index of stepsearch.search.rerank over the base index built just before it (no new
# training), served with the server's defaults (nprobe DEFAULT_NPROBE, DEFAULT_RERANK_CANDIDATES candidates)
INDEX_FACTORIES = ("Flat", "SQfp16", "SQ8", "HNSW32", "HNSW32,SQ8", "IVF128,Flat", "IVF128,SQ8", "IVF128,PQ48",
                   "IVF128,PQ48+rerank")


def index_section(args) -> list[dict]:
    """Build each factory over the largest real passage set here; RAM (and disk for '+rerank'), build time, q/s and
    recall@3 vs Flat."""
    import faiss

    from stepsearch.search.rerank import (DEFAULT_NPROBE, DEFAULT_RERANK_CANDIDATES, RerankIndex, index_ram_bytes,
                                          open_fp16, recall_at_k, set_nprobe, split_factory, write_fp16)

    faiss.omp_set_num_threads(1)
    paths = [SHARED / f for f in WIKI18_FILES if (SHARED / f).is_file()]
    _, texts = read_passages(paths)
    xb = cached_embeddings(texts, "passages")
    xq = cached_embeddings(load_questions()[:args.index_queries], "queries")
    rows, flat_ids, built, tmp = [], None, {}, scratch_dir("bench_index_")
    for factory in INDEX_FACTORIES:
        base, rerank = split_factory(factory)
        t0 = time.perf_counter()
        if rerank:  # stage 1 = the base index as built above; stage 2 = fp16 vectors memory-mapped from disk
            write_fp16(xb, tmp / "emb.fp16")  # per row, so each row's build time includes writing its fp16 file
            first = built[base]["index"]
            set_nprobe(first, DEFAULT_NPROBE)
            index = RerankIndex(first, open_fp16(tmp / "emb.fp16", *xb.shape), DEFAULT_RERANK_CANDIDATES)
            build_s = built[base]["build_s"] + time.perf_counter() - t0
        else:
            index = faiss.index_factory(xb.shape[1], base, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                index.train(xb)
            index.add(xb)
            build_s = time.perf_counter() - t0
            built[base] = {"index": index, "build_s": build_s}
            if "IVF" in factory:
                faiss.extract_index_ivf(index).nprobe = args.nprobe
            if "HNSW" in factory:
                faiss.downcast_index(index).hnsw.efSearch = args.ef_search
        t0 = time.perf_counter()
        _, idx = index.search(xq, TOPK)
        qps = len(xq) / (time.perf_counter() - t0)
        flat_ids = idx if flat_ids is None else flat_ids
        recall = recall_at_k(idx, flat_ids)
        size = index_ram_bytes(index.index if rerank else index)
        row = {"factory": factory, "bytes": size, "bytes_per_vec": size / len(xb), "build_s": build_s, "qps": qps,
               "recall3": recall, "n": len(xb), "d": xb.shape[1], "disk_bytes": xb.size * 2 if rerank else 0}
        if rerank:  # the first stage alone at the same nprobe, for comparison
            _, first_ids = index.index.search(xq, TOPK)
            row.update(nprobe=DEFAULT_NPROBE, candidates=DEFAULT_RERANK_CANDIDATES,
                       first_stage_recall3=recall_at_k(first_ids, flat_ids))
        rows.append(row)
        print(f"[bench] {rows[-1]}", flush=True)
    return rows


# ---------------------------------------------------------------- guard_eps calibration (encoders.GUARD_EPS)
def calibrate_section(args) -> dict:
    """calibrate_guard_eps on the LAST `calibrate_queries` shuffled real questions (the serving sections use the
    first ones), against the exact passage embeddings of the 1000-passage wiki-18 sample; then the fallback rate and
    top-3 agreement of that eps on `agreement_queries` held-out questions."""
    import faiss
    import torch

    from stepsearch.search.encoders import (GUARD_MAX_DISAGREE, GUARD_QUANTILE, GUARD_SAFETY, Encoder,
                                            calibrate_guard_eps, guard_fails)

    set_ours_threads(args)
    questions = load_questions()
    cal_q, eval_q = questions[-args.calibrate_queries:], questions[:args.agreement_queries]
    tmp = scratch_dir("bench_retrieval_cal_")
    index = faiss.read_index(str(Path(build_sample_index(tmp)) / "dense.faiss"))
    passages = index.reconstruct_n(0, index.ntotal)  # (1000, 384) exact fp32 passage embeddings
    enc = Encoder(mode="guarded", guard_eps=0.0)  # eps is what we measure here
    cal = calibrate_guard_eps(enc, passages, cal_q, TOPK, max_disagree=GUARD_MAX_DISAGREE, safety=GUARD_SAFETY)
    old_rule = cal["pair_err"][str(GUARD_QUANTILE)] * GUARD_SAFETY  # the earlier rule: the err quantile
    _, ids32 = index.search(enc.encode_queries(eval_q), TOPK)
    s16, ids16 = index.search(enc.encode_queries_bf16(eval_q), TOPK + 1)
    rows = []
    # the last row: the plain bound |Delta s| <= ||q_bf16 - q_fp32|| applied to both scores of the gap (2 x norm)
    for eps in sorted({0.0, 0.001, 0.002, 0.003, round(cal["eps"], 5), round(old_rule, 5),
                       2 * cal["norm_bound"]["0.999"]}):
        fb = guard_fails(s16, TOPK, eps)
        agree = np.mean([fb[i] or set(ids16[i, :TOPK]) == set(ids32[i]) for i in range(len(eval_q))])
        rows.append({"eps": eps, "fallback": float(fb.mean()), "agreement": float(agree)})
    return {"calibration": cal, "quantile_rule_eps": old_rule, "held_out": rows, "n_eval": len(eval_q)}


def calibrate_markdown(res: dict, cmd: str) -> str:
    from stepsearch.search.encoders import GUARD_QUANTILE

    cal = res["calibration"]
    lines = ["## guard_eps calibration (bench/retrieval.py --sections calibrate)", "", f"Command: `{cmd}`", "",
             f"Machine: {machine_line()}.", "",
             f"MiniLM, bf16 weights vs fp32, {cal['n_queries']:,} real questions (the last of the shuffled "
             f"qa_pairs list) against the {cal['n_passages']:,} exact passage embeddings of the wiki-18 sample. "
             f"Per query, err = max |(s_i - s_j)_bf16 - (s_i - s_j)_fp32| over i in the bf16 top-{cal['topk']} and "
             f"j in bf16 ranks {cal['topk'] + 1}..{cal['depth']}, and gap = the bf16 score gap between ranks "
             f"{cal['topk']} and {cal['topk'] + 1}. A query that skips the fallback (gap >= eps) can disagree with "
             f"fp32 only if gap < err. eps = the smallest value with mean(eps <= gap < err) <= "
             f"{cal['max_disagree']}, x {cal['safety']} = **{cal['eps']:.5f}** (encoders.GUARD_EPS; on these "
             f"questions: could-disagree share {cal['could_disagree']:.4f}, fallback rate "
             f"{cal['fallback_rate']:.3f}). The earlier rule, the {GUARD_QUANTILE}-quantile of err, gives "
             f"{res['quantile_rule_eps']:.5f}.", "",
             "| quantile | 0.5 | 0.9 | 0.99 | 0.999 | max |", "|---|---|---|---|---|---|",
             "| err (score difference) | " + " | ".join(f"{cal['pair_err'][k]:.5f}"
                                                    for k in ("0.5", "0.9", "0.99", "0.999", "max")) + " |",
             "| norm bound: L2 norm of q_bf16 - q_fp32 | " + " | ".join(f"{cal['norm_bound'][k]:.5f}"
                                                          for k in ("0.5", "0.9", "0.99", "0.999", "max")) + " |",
             "", f"Held out ({res['n_eval']:,} other real questions): fp32 fallback rate and top-3 set agreement "
                 f"with fp32 by guard_eps (0 = unguarded bf16; the largest = 2 x the 0.999-quantile norm bound, "
                 f"the guard a per-score norm bound would need).", "",
             "| guard_eps | fallback rate | top-3 agreement |", "|---|---|---|"]
    lines += [f"| {r['eps']:.4f} | {r['fallback']:.3f} | {r['agreement']:.4f} |" for r in res["held_out"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- report
def machine_line() -> str:
    load = os.getloadavg()
    from bench.machine import cpu_description

    return (f"{cpu_description()}, {os.cpu_count()} CPU cores, Python "
            f"{platform.python_version()}, load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} "
            f"(1/5/15 min; other engineers share the machine)")


def med(xs) -> float:
    return float(np.median(xs))


def serving_markdown(res: dict, args, cmd: str, load_start: tuple) -> str:
    e = res["8x64"]
    s = {k: {m: med([x[m] for x in v]) for m in ("qps", "p50_ms", "p99_ms")} for k, v in res["single"].items()}
    r8 = med(np.array(e["ours"]) / np.array(e["naive"]))
    r1 = med([o["qps"] / n["qps"] for o, n in zip(res["single"]["ours"], res["single"]["naive"])])
    rc = med([o["qps"] / n["qps"] for o, n in zip(res["single"]["ours"], res["single"]["ours_nocoalesce"])])
    ra = med(np.array(e["ours"]) / np.array(e["inproc_fast"]))
    hit = res["cache_hit"]
    more = res["agreement_more"]
    agree = min(min(res["agreement"]), more["agreement"])
    ok = lambda c: "yes" if c else "**no**"
    raw = {k: v for k, v in res.items() if k not in ("padding", "ours_batch_sizes", "agreement_more")}
    lines = [
        "## Retrieval speed (bench/retrieval.py)", "",
        f"Command: `{cmd}`", "",
        f"Machine: {machine_line()}; load average at the start {load_start[0]:.1f}/{load_start[1]:.1f}/"
        f"{load_start[2]:.1f}. MiniLM "
        f"(all-MiniLM-L6-v2, bundled), Flat inner-product index over the 1,000-passage wiki-18 sample, top-3, "
        f"distinct real questions from ../shared/data/*/qa_pairs. Medians over {args.reps} interleaved repetitions; "
        f"ratios are taken per repetition (the two sides ran back to back), then the median. Ours: "
        f"`stepsearch.search.server --encoder_mode {args.ours_mode}` (resolved to `{res.get('inproc_fast_mode')}`: "
        f"{MODE_LABEL.get(res.get('inproc_fast_mode'), '')}), "
        f"micro-batcher on, Redis + LRU cache, fast lane, "
        f"{threads_label(args)}. Naive: fp32, torch default threads, no coalescing, no cache, concurrent requests "
        f"encoded at once on FastAPI's thread pool (a sync endpoint in the Search-R1 mould). Load: one thread per "
        f"client with a keep-alive stdlib "
        f"`http.client` connection, the same for every server.", "",
        "### Issue 8: naive Search-R1-style server vs ours", "",
        "| metric | naive | ours | ratio / value | target | met |", "|---|---|---|---|---|---|",
        f"| 8 clients x 64 queries/request, queries/s | {med(e['naive']):.0f} | {med(e['ours']):.0f} | {r8:.2f}x "
        f"| >= 2.0 | {ok(r8 >= 2.0)} |",
        f"| 32 single-query clients, queries/s | {s['naive']['qps']:.0f} | {s['ours']['qps']:.0f} | {r1:.2f}x "
        f"| >= 3.0 | {ok(r1 >= 3.0)} |",
        f"| 32 single-query clients, p99 ms | {s['naive']['p99_ms']:.0f} | {s['ours']['p99_ms']:.0f} | | | |",
        f"| repeated query p50 ms (ours: cache hit) | {hit['naive']['p50_ms']:.1f} | {hit['ours']['p50_ms']:.2f} "
        f"| | <= 1.5 ms | {ok(hit['ours']['p50_ms'] <= 1.5)} |",
        f"| top-3 agreement with exact fp32 (min of: through the server, {len(res['agreement'])} x 512 "
        f"queries; in-process on {more['n']} more) | {min(res['agreement_naive']):.4f} | {agree:.4f} | "
        f"| >= 0.99 | {ok(agree >= 0.99)} |", "",
        f"Fast path detail: in-process on {more['n']} more real questions, top-3 set agreement "
        f"{more['agreement']:.4f}, same order {more['order_agreement']:.4f}, fp32 fallback rate "
        f"{more['fallback_rate']:.3f}; in the 8x64 in-process runs fallback "
        f"{', '.join(f'{x:.3f}' for x in res['inproc_fast_fallback'])}; server /stats: "
        f"`{json.dumps((res.get('ours_batch_sizes') or {}).get('guard'))}`.", "",
        "### Issue 2: (a), (b), (c)", "",
        "| metric | value | target | met |", "|---|---|---|---|",
        f"| (a) 8x64 through HTTP (ours) / same encode+search in-process ({res.get('inproc_fast_mode')}, 64 per call): "
        f"{med(e['ours']):.0f} / {med(e['inproc_fast']):.0f} q/s | {ra:.2f} | >= 0.8 | {ok(ra >= 0.8)} |",
        f"| (b) cache-hit latency p50 / p99 | {hit['ours']['p50_ms']:.2f} / {hit['ours']['p99_ms']:.2f} ms | | |",
        f"| (c) 32 single-query clients, coalescing on / off: {s['ours']['qps']:.0f} / "
        f"{s['ours_nocoalesce']['qps']:.0f} q/s (p99 {s['ours']['p99_ms']:.0f} / {s['ours_nocoalesce']['p99_ms']:.0f}"
        f" ms) | {rc:.2f}x | >= 2x | {ok(rc >= 2.0)} |", "",
        "### In-process encode + search (same queries, one call of 64 at a time)", "",
        f"- exact fp32, each call padded to its longest query: {med(e['inproc_exact']):.0f} q/s; "
        f"{res.get('inproc_fast_mode')} (length-sorted micro-batches of 32): {med(e['inproc_fast']):.0f} q/s "
        f"({med(np.array(e['inproc_fast']) / np.array(e['inproc_exact'])):.2f}x).",
        f"- {res['padding'] * 100:.0f}% of the token slots of a 64-question request are padding on the exact path.",
        f"- Our server's coalesced batch sizes over the run (its /stats): `{json.dumps(res.get('ours_batch_sizes'))}`",
        f"- Raw per-repetition numbers: `{json.dumps(raw, default=float)}`",
        ""]
    return "\n".join(lines)


def index_markdown(rows: list[dict], args, cmd: str) -> str:
    n, d = rows[0]["n"], rows[0]["d"]
    lines = ["## FAISS index options (bench/retrieval.py --sections index)", "", f"Command: `{cmd}`", "",
             f"Machine: {machine_line()}.", "",
             f"{n:,} real wiki-18 passages (all of ../shared/data/wiki18/*.jsonl), MiniLM D={d}, "
             f"{args.index_queries} real questions, top-3, 1 thread. Recall@3 = |top-3 ∩ Flat top-3| / 3. "
             f"IVF nprobe={args.nprobe}, HNSW efSearch={args.ef_search}. RAM = serialized index bytes; "
             f"`+rerank` (the two-stage index, stepsearch/search/rerank.py): the base index above proposes "
             f"candidates, re-ranked by exact inner products over fp16 vectors memory-mapped from disk (in the page "
             f"cache here), at the server's defaults.", "",
             "| index_factory | RAM (MiB) | bytes/passage in RAM | + on disk (MiB) | build s | queries/s | "
             "recall@3 vs Flat |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['factory']}` | {r['bytes'] / 2**20:.1f} | {r['bytes_per_vec']:.0f} | "
                     f"{r.get('disk_bytes', 0) / 2**20:.1f} | {r['build_s']:.2f} | {r['qps']:.0f} | "
                     f"{r['recall3']:.3f} |")
    flat = next(r for r in rows if r["factory"] == "Flat")
    for r in rows:
        if r.get("candidates"):
            lines += ["", f"`{r['factory']}`: nprobe {r['nprobe']}, {r['candidates']} candidates re-ranked; RAM "
                          f"1/{flat['bytes'] / r['bytes']:.1f} of Flat's; its first stage alone at the same nprobe: "
                          f"recall@3 {r['first_stage_recall3']:.3f}."]
    return "\n".join(lines) + "\n"


def write_section(path: Path, name: str, text: str) -> None:
    """Replace section `name` (between HTML comment markers) in the results file, or append it; atomic write."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.is_file() else ""
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end):].lstrip("\n")
    else:
        new = old + ("\n" if old else "") + block
    from stepsearch.data.io import write_text_atomic

    write_text_atomic(path, new)


def ab_servers(args, variants: dict[str, list[str]], busy_modes: tuple[bool, ...], tag: str) -> dict:
    """Our server once per variant (its extra flags) on the sample index (in-process LRU only; every query distinct),
    `args.reps + 1` rounds of 32 single-query clients x 8 and 8 clients x 64, the variants' order alternating per
    round; on idle cores, and for busy_modes True with one core kept busy by another process (a Python busy loop:
    the trainer or rollout engine on a shared node). Returns {"rounds", "runs": [{busy_core, variant, round,
    single_qps, batch_qps, load_1m}], "cpu"}."""
    questions = load_questions()
    index_dir = build_sample_index(scratch_dir(f"bench_{tag}_"))
    base = ["--encoder_mode", args.ours_mode, "--log_level", "warning", "--torch_threads", "0"]
    from stepsearch.search.testing import start_retrieval_server

    servers = {v: start_retrieval_server(index_dir, None, extra_args=base + flags) for v, flags in variants.items()}
    res = {"rounds": args.reps + 1, "runs": []}
    pos = 0
    try:
        for busy in busy_modes:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                for rnd in range(args.reps + 1):
                    for v in (list(variants) if rnd % 2 == 0 else list(variants)[::-1]):
                        single = run_clients(servers[v].url, split_clients(questions[pos:pos + 256], 32, 1))
                        batch = run_clients(servers[v].url, split_clients(questions[pos + 256:pos + 768], 8, 64))
                        pos += 768
                        res["runs"].append({"busy_core": busy, "variant": v, "round": rnd,
                                            "single_qps": single["qps"], "batch_qps": batch["qps"],
                                            "load_1m": os.getloadavg()[0]})
                        print(f"[{tag}] {res['runs'][-1]}", flush=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    finally:
        for srv in servers.values():
            srv.stop()
    res["cpu"] = machine_line()
    return res


def ab_markdown(res: dict, title: str, cmd: str, what: str, column: str) -> str:
    """ab_servers' runs as one row per (cores, variant): q/s per round for 32 x 1 and 8 x 64."""
    lines = [title, "", f"Command: `{cmd}`", "", res["cpu"] + ".", "",
             f"{what}; {res['rounds']} interleaved rounds of 32 single-query clients x 8 questions and 8 clients x 64 "
             f"questions, all distinct.", "",
             f"| cores | {column} | 32 x 1, q/s per round | 8 x 64, q/s per round |", "|---|---|---|---|"]
    variants = list(dict.fromkeys(r["variant"] for r in res["runs"]))
    for busy in dict.fromkeys(r["busy_core"] for r in res["runs"]):
        for v in variants:
            runs = [r for r in res["runs"] if r["busy_core"] == busy and r["variant"] == v]
            lines.append(f"| {'one core busy' if busy else 'idle'} | {v} | "
                         + " / ".join(f"{r['single_qps']:.1f}" for r in runs) + " | "
                         + " / ".join(f"{r['batch_qps']:.1f}" for r in runs) + " |")
    return "\n".join(lines) + "\n"


def workers_markdown(res: dict, cmd: str) -> str:
    return ab_markdown(
        res, "## Parallel encode threads in sorted mode (bench/retrieval.py --sections workers)", cmd,
        "Two of our servers on the 1,000-passage sample (`--encoder_mode fast`, resolved to sorted on a CPU without "
        "native bf16; `--torch_threads 0`), `--encode_workers 1` (the default: one owner thread, every core as torch "
        "threads) and `--encode_workers 0` (one encode thread per core, 1 torch thread each), first on idle cores, "
        "then with one core kept busy by a Python busy loop", "--encode_workers")


PACK_CALL_SIZES = (1, 8, 16, 32, 64, 256)


def pack_in_process(args) -> dict:
    """MiniLM fp32 `sorted` on the native encoder, packed vs padded (pack_tokens), in-process: 512 real questions
    encoded in calls of B (PACK_CALL_SIZES), the two encoders alternating, `args.reps` repetitions on fresh
    questions each. Returns {"qps": {B: {"packed": [...], "padded": [...]}}, "max_abs_diff"}."""
    from stepsearch.search.encoders import Encoder

    set_ours_threads(args)
    questions = load_questions()
    encoders = {name: Encoder("minilm", mode="sorted", backend="native", pack_tokens=name == "packed")
                for name in ("packed", "padded")}
    probe = questions[:512]
    res = {"qps": {b: {name: [] for name in encoders} for b in PACK_CALL_SIZES},
           "max_abs_diff": float(np.abs(encoders["packed"].encode_queries(probe)
                                        - encoders["padded"].encode_queries(probe)).max())}
    for rep in range(args.reps):
        qs = questions[512 * (rep + 1):512 * (rep + 2)]
        for b in PACK_CALL_SIZES:
            for name in (("packed", "padded") if rep % 2 == 0 else ("padded", "packed")):
                t0 = time.perf_counter()
                for start in range(0, len(qs), b):
                    encoders[name].encode_queries(qs[start:start + b])
                res["qps"][b][name].append(len(qs) / (time.perf_counter() - t0))
        print(f"[pack] in-process rep {rep}: {res['qps']}", flush=True)
    return res


def pack_markdown(res: dict, inproc: dict, cmd: str) -> str:
    lines = ["", "In-process (the same encoder without the server; MiniLM fp32 `sorted`, native encoder, 512 real "
             f"questions per repetition encoded in calls of B, {len(inproc['qps'][1]['packed'])} repetitions "
             f"alternating the two; embeddings packed vs padded within {inproc['max_abs_diff']:.1e}):", "",
             "| calls of B questions | padded q/s | packed q/s | packed / padded (median) |", "|---|---|---|---|"]
    for b, runs in inproc["qps"].items():
        ratio = med([p / q for p, q in zip(runs["packed"], runs["padded"])])
        lines.append(f"| {b} | " + " / ".join(f"{x:.0f}" for x in runs["padded"]) + " | "
                     + " / ".join(f"{x:.0f}" for x in runs["packed"]) + f" | {ratio:.2f}x |")
    return ab_markdown(
        res, "## Packed micro-batches (bench/retrieval.py --sections pack)", cmd,
        "Two of our servers on the 1,000-passage sample (`--encoder_mode fast`; the native encoder, `--torch_threads "
        "0`), at their defaults (`packed`: each micro-batch runs over its real tokens only) and with "
        "`--no_pack_tokens` (`padded`: each micro-batch padded to its longest question, as before), idle cores",
        "encoder") + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="serve", help="comma list of: serve, index, calibrate, workers, pack")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions of the serving phases")
    p.add_argument("--single_per_client", type=int, default=8, help="requests per single-query client")
    p.add_argument("--hit_repeats", type=int, default=300)
    p.add_argument("--ours_threads", type=int, default=0,
                   help="torch threads of our server (as OMP_NUM_THREADS) and in-process runs; 0 (default): the "
                        "server's own default (--torch_threads 0: every core, 1 for the guarded pipeline)")
    p.add_argument("--ours_mode", default="fast", help="--encoder_mode of our server (and in-process fast runs)")
    p.add_argument("--agreement_queries", type=int, default=2000, help="extra real questions for agreement")
    p.add_argument("--calibrate_queries", type=int, default=3000, help="real questions for guard_eps calibration")
    p.add_argument("--index_queries", type=int, default=1000)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--ef_search", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "retrieval.md"))
    p.add_argument("--serve_naive", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--index_dir", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_naive:
        serve_naive(args.index_dir, args.port)
        return 0
    from bench.machine import isa_caps

    cmd = " ".join(filter(None, ["HF_HUB_OFFLINE=1", isa_caps(), ".venv/bin/python bench/retrieval.py"] +
                          (argv if argv is not None else sys.argv[1:])))
    sections = set(args.sections.split(","))
    if "calibrate" in sections:
        text = calibrate_markdown(calibrate_section(args), cmd.strip())
        write_section(Path(args.out), "calibrate", text)
        print(text)
    if "index" in sections:
        write_section(Path(args.out), "index", index_markdown(index_section(args), args, cmd.strip()))
    if "workers" in sections:
        res = ab_servers(args, {w: ["--encode_workers", w] for w in ("1", "0")}, (False, True), "workers")
        text = workers_markdown(res, cmd.strip())
        write_section(Path(args.out), "workers", text)
        print(text)
    if "pack" in sections:
        res = ab_servers(args, {"packed": [], "padded": ["--no_pack_tokens"]}, (False,), "pack")
        text = pack_markdown(res, pack_in_process(args), cmd.strip())
        write_section(Path(args.out), "pack", text)
        print(text)
    if "serve" in sections:
        load_start = os.getloadavg()
        res = serving_sections(args)
        text = serving_markdown(res, args, cmd.strip(), load_start)
        write_section(Path(args.out), "serve", text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
