#!/usr/bin/env python3
"""End-to-end check of the retrieval server's GPU path over HTTP (run by scripts/gpu_server_check.sh).

    python3 scripts/gpu_server_check.py --out OUT_DIR                            # GPU machine: cuda, 12 layers
    .venv/bin/python scripts/gpu_server_check.py --out DIR --device cpu --layers 1   # quick local run

Steps (all offline; only the repo, torch + transformers and the wheels in .whl/ are needed):
1. an e5-base-v2-shaped BERT with random weights (seed 0; `bench/retrieval_gpu.py` E5_BASE_SHAPE, `--layers` of
   them; `--init bow` zeroes the token-type and position embeddings, see make_encoder) and the uncased WordPiece
   tokenizer from `.whl/e5-tokenizer/`, saved to a folder named `e5-base-sized-*` (so the "query: "/"passage: "
   prefixes apply as for e5);
2. a dense Flat index over the bundled 1,000-passage wiki-18 sample with that encoder
   (`python -m stepsearch.search.build_index ... --device DEVICE`);
3. the real server, `python -m stepsearch.search.server --index_dir DIR --device cuda --encoder_mode fast
   --faiss_gpu --lru_size 0` on 127.0.0.1 (no Redis; the LRU is off so every request is searched, not cached);
   real questions go over HTTP to `/retrieve` (topk 3, return_scores true): one sequential pass in requests of 64,
   then `--clients` concurrent clients x `--per_request` queries per request for `--rounds` rounds (queries/s);
   `/health` and `/stats` are read at the end;
4. in-process references: the same `load_index` options as the server (the GPU fp16 path), searched in the same
   64-query requests (HTTP must return exactly these), and the exact fp32 CPU path (`encoder_mode="exact"`, FAISS
   on CPU), for the top-3 set agreement GPU-vs-exact.

Random weights leave smaller score gaps than a trained encoder, so fp16 rounding can swap near-tied passages at
rank 3/4. The check therefore also reports a tie-tolerant agreement: a query counts when every passage returned has
an exact fp32 score within `--tie_tol` of the exact 3rd-best score (the measured gaps and fp16 score errors are in
the JSON's `ties`). Exit 0 when HTTP equals the in-process path (set agreement >= --min_agreement), the GPU-vs-exact
agreement (strict, or tie-tolerant unless --strict) is >= --min_agreement and no served score is further than
--max_score_err from the exact cosine; 1 when a check fails; 2 on an error (server did not start, HTTP error, ...).
Writes OUT_DIR/gpu_server_check.json, server.log and build_index.log.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = REPO / "data" / "samples" / "wiki18_sample_1000.jsonl"
QA_GLOB = "*_flashrag_dev_200.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TOKENIZER_DIRS = (REPO / ".whl" / "e5-tokenizer", REPO / ".gpu" / "retrieval" / "e5-base-sized")
TOPK = 3


def log(msg: str) -> None:
    print(f"[gpu_server_check] {msg}", flush=True)


class CheckError(RuntimeError):
    """Something did not work (as opposed to a number below its threshold)."""


# ---------------------------------------------------------------- inputs
def load_questions(n: int) -> list[str]:
    """n distinct real questions from the bundled FlashRAG dev samples, shuffled with seed 0."""
    from bench.retrieval import distinct_questions

    out = distinct_questions(sorted((REPO / "data" / "samples").glob(QA_GLOB)))
    if len(out) < n:
        raise CheckError(f"only {len(out)} distinct questions in data/samples/{QA_GLOB}, asked for {n}")
    return out[:n]


def make_encoder(work: Path, layers: int, tokenizer_dir: Path | None, init: str = "bow") -> Path:
    """e5-base-shaped BERT with random weights (seed 0) -> work/e5-base-sized-{layers}l-{init} (reused when present).

    init "plain": transformers' random init. Every token then carries the same token-type embedding and similar
    position embeddings, so all texts embed close together (1,000 passages span ~0.05 in cosine, the 3rd and 4th
    best differ by ~1e-5) and fp16 rounding reorders most top-3 lists. init "bow" (default) zeroes the token-type and
    position embeddings: the same shapes and cost, but the embedding follows the words (a random bag-of-words model),
    so scores spread out (~0.3) the way a trained encoder's do."""
    import torch
    from transformers import AutoConfig, AutoModel

    from bench.retrieval_gpu import E5_BASE_SHAPE

    folder = work / f"e5-base-sized-{layers}l-{init}"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    src = tokenizer_dir or next((d for d in TOKENIZER_DIRS if (d / "tokenizer.json").is_file()), None)
    if src is None:
        raise CheckError(f"no tokenizer files; expected {', '.join(TOKENIZER_FILES)} in one of "
                         f"{[str(d) for d in TOKENIZER_DIRS]}")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(work / f"index-{folder.name}", ignore_errors=True)  # its embeddings came from other weights
    folder.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, folder / name)
    (folder / "config.json").write_text(json.dumps({**E5_BASE_SHAPE, "num_hidden_layers": layers}, indent=1))
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    if init == "bow":
        with torch.no_grad():
            model.embeddings.token_type_embeddings.weight.zero_()
            model.embeddings.position_embeddings.weight.zero_()
    model.save_pretrained(folder)
    return folder


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH")] if p)}


def build_index(encoder_dir: Path, index_dir: Path, device: str, out: Path, timeout_s: float) -> float:
    """`python -m stepsearch.search.build_index` (Flat, dense); returns seconds. Resumes a matching earlier build."""
    cmd = [sys.executable, "-m", "stepsearch.search.build_index", "--corpus", str(CORPUS), "--out", str(index_dir),
           "--encoder", str(encoder_dir), "--device", device, "--index_factory", "Flat", "--quiet"]
    t0 = time.perf_counter()
    with open(out / "build_index.log", "wb") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise CheckError(f"build_index took longer than {timeout_s}s (log: {out / 'build_index.log'})") from None
    if proc.returncode != 0:
        tail = (out / "build_index.log").read_text(errors="replace")[-3000:]
        raise CheckError(f"build_index exited with {proc.returncode}:\n{tail}")
    return time.perf_counter() - t0


# ---------------------------------------------------------------- HTTP
async def post_retrieve(client, url: str, queries: list[str]) -> tuple[list[list[str]], list[list[float]], float]:
    """One /retrieve call -> (doc ids per query, scores per query, seconds); raises CheckError on any defect."""
    t0 = time.perf_counter()
    r = await client.post(url + "/retrieve", json={"queries": queries, "topk": TOPK, "return_scores": True})
    secs = time.perf_counter() - t0
    if r.status_code != 200:
        raise CheckError(f"/retrieve answered {r.status_code}: {r.text[:500]}")
    result = r.json().get("result")
    if not isinstance(result, list) or len(result) != len(queries):
        raise CheckError(f"/retrieve returned {type(result).__name__} of {len(result or [])} for {len(queries)} queries")
    ids, scores = [], []
    for i, hits in enumerate(result):
        if len(hits) != TOPK or not all(isinstance(h, dict) and "document" in h and "score" in h for h in hits):
            raise CheckError(f"/retrieve result[{i}] is not {TOPK} scored hits: {str(hits)[:300]}")
        for h in hits:
            doc = h["document"]
            if not all(k in doc for k in ("id", "title", "text", "contents")):
                raise CheckError(f"/retrieve result[{i}] document lacks id/title/text/contents: {str(doc)[:300]}")
        ids.append([h["document"]["id"] for h in hits])
        scores.append([float(h["score"]) for h in hits])
    return ids, scores, secs


def chunks(xs: list, n: int) -> list[list]:
    return [xs[i:i + n] for i in range(0, len(xs), n)]


async def http_passes(url: str, queries: list[str], clients: int, per_request: int, rounds: int) -> dict:
    """Sequential pass (one request of `per_request` at a time), then concurrent rounds; results and timings."""
    import httpx

    requests = chunks(queries, per_request)
    async with httpx.AsyncClient(timeout=180.0, limits=httpx.Limits(max_connections=clients + 2)) as client:
        seq_ids, seq_scores, seq_lat = [], [], []
        t0 = time.perf_counter()
        for req in requests:
            ids, scores, secs = await post_retrieve(client, url, req)
            seq_ids += ids
            seq_scores += scores
            seq_lat.append(secs)
        seq_s = time.perf_counter() - t0

        async def round_(collect: bool):
            todo = list(range(len(requests)))
            got: dict[int, tuple] = {}
            lat: list[float] = []

            async def worker():
                while todo:
                    i = todo.pop(0)
                    ids, scores, secs = await post_retrieve(client, url, requests[i])
                    lat.append(secs)
                    if collect:
                        got[i] = (ids, scores)

            await asyncio.gather(*[worker() for _ in range(clients)])
            return got, lat

        await round_(False)  # warm-up: CUDA kernels for the coalesced batch shapes
        lat_all: list[float] = []
        t0 = time.perf_counter()
        got = {}
        for r in range(rounds):
            got, lat = await round_(r == rounds - 1)
            lat_all += lat
        conc_s = time.perf_counter() - t0
        conc_ids = [x for i in range(len(requests)) for x in got[i][0]]
        conc_scores = [x for i in range(len(requests)) for x in got[i][1]]
        health = (await client.get(url + "/health")).json()
        stats = (await client.get(url + "/stats")).json()
    n = len(queries)
    return {
        "sequential": {"ids": seq_ids, "scores": seq_scores, "requests": len(requests), "seconds": seq_s,
                       "qps": n / seq_s, "latency_ms_p50": 1e3 * float(np.median(seq_lat))},
        "concurrent": {"ids": conc_ids, "scores": conc_scores, "clients": clients, "per_request": per_request,
                       "rounds": rounds, "queries": n * rounds, "seconds": conc_s, "qps": n * rounds / conc_s,
                       "latency_ms_p50": 1e3 * float(np.median(lat_all)),
                       "latency_ms_p99": 1e3 * float(np.percentile(lat_all, 99))},
        "health": health, "stats": stats}


# ---------------------------------------------------------------- comparisons
def set_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([set(x) == set(y) for x, y in zip(a.tolist(), b.tolist())]))


def same_order(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a == b).all(axis=1)))


def tie_tolerant(ids: np.ndarray, exact_scores: np.ndarray, tol: float) -> float:
    """Share of queries whose returned passages all have an exact score >= exact 3rd-best score - tol."""
    kth = np.sort(exact_scores, axis=1)[:, -TOPK]  # (N,)
    got = np.take_along_axis(exact_scores, ids, axis=1)  # (N, k) exact scores of the returned passages
    return float(np.mean((got >= kth[:, None] - tol).all(axis=1)))


def compare(name: str, ids: np.ndarray, ref: np.ndarray, exact_scores: np.ndarray | None = None,
            tol: float = 0.0) -> dict:
    out = {"top3_set_agreement": set_agreement(ids, ref), "same_order": same_order(ids, ref)}
    if exact_scores is not None:
        out["tie_tolerant_agreement"] = tie_tolerant(ids, exact_scores, tol)
    log(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return out


def in_process(index_dir: Path, queries: list[str], per_request: int, device: str, mode: str,
               faiss_gpu: bool) -> dict:
    """The server's own search path (same LoadOptions) in-process, and the exact fp32 CPU path."""
    import torch

    from stepsearch.search.index import LoadOptions, load_index

    dev = load_index(index_dir, LoadOptions(encoder_mode=mode, device=device, faiss_gpu=faiss_gpu))
    res_chunks = [dev.retriever.search(c, TOPK) for c in chunks(queries, per_request)]  # the HTTP requests' batches
    dev_ids = np.concatenate([r.ids for r in res_chunks])
    dev_scores = np.concatenate([r.scores for r in res_chunks])
    dev_all = dev.retriever.search(queries, TOPK)  # one call, as a trainer process would
    doc_ids = dev.corpus.column("id")
    index_type = type(dev.retriever.index).__name__
    resolved_mode = dev.retriever.encoder.config.mode
    del dev
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    exact = load_index(index_dir, LoadOptions(encoder_mode="exact", device="cpu"))
    emb = exact.retriever.encoder.encode_queries(queries)  # (N, D) fp32
    ex = exact.retriever.search_embeddings(emb, TOPK)
    passages = exact.retriever.index.reconstruct_n(0, exact.retriever.index.ntotal)  # (M, D) fp32
    exact_scores = emb @ passages.T  # (N, M) exact cosine of every query-passage pair
    exact_s = time.perf_counter() - t0
    srt = np.sort(exact_scores, axis=1)
    return {"dev_ids": dev_ids, "dev_scores": dev_scores, "dev_all_ids": dev_all.ids, "exact_ids": ex.ids,
            "exact_scores": exact_scores, "doc_ids": doc_ids, "index_type": index_type, "mode": resolved_mode,
            "exact_seconds": exact_s, "gap34": srt[:, -TOPK] - srt[:, -TOPK - 1],
            "spread": srt[:, -1] - srt[:, 0]}


# ---------------------------------------------------------------- main
def run(a: argparse.Namespace, res: dict) -> int:
    """Fill `res` (partially, when something raises); 0 pass, 1 a check failed."""
    import torch

    from stepsearch.search.testing import start_retrieval_server

    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    faiss_gpu = device.startswith("cuda") if a.faiss_gpu is None else a.faiss_gpu
    rounds = a.rounds or (10 if device.startswith("cuda") else 1)
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "layers": a.layers, "init": a.init, "encoder_mode": a.encoder_mode, "faiss_gpu": faiss_gpu, "topk": TOPK}
    import transformers
    info["transformers"] = transformers.__version__
    log(f"{info}")
    res.update(info=info, ok=False)
    t_start = time.perf_counter()
    queries = load_questions(a.queries)

    t0 = time.perf_counter()
    encoder_dir = make_encoder(work, a.layers, Path(a.tokenizer_dir) if a.tokenizer_dir else None, a.init)
    res["encoder_s"] = time.perf_counter() - t0
    index_dir = work / f"index-{encoder_dir.name}"
    res["build_index_s"] = build_index(encoder_dir, index_dir, device, out, a.build_timeout_s)
    log(f"encoder {encoder_dir.name} ready in {res['encoder_s']:.1f}s; index built in {res['build_index_s']:.1f}s")

    server_args = ["--device", device, "--encoder_mode", a.encoder_mode, "--lru_size", "0", "--log_level", "info"]
    server_args += ["--faiss_gpu"] if faiss_gpu else []
    res["server_cmd"] = "python -m stepsearch.search.server --index_dir INDEX " + " ".join(server_args)
    t0 = time.perf_counter()
    server = None
    try:
        try:
            server = start_retrieval_server(index_dir, None, extra_args=server_args, timeout_s=a.server_timeout_s)
        except RuntimeError as exc:
            (out / "server.log").write_text(str(exc))
            raise CheckError(f"the server did not start: {str(exc)[-3000:]}") from None
        res["server_start_s"] = time.perf_counter() - t0
        log(f"server up at {server.url} in {res['server_start_s']:.1f}s: {' '.join(server_args)}")
        http = asyncio.run(http_passes(server.url, queries, a.clients, a.per_request, rounds))
    finally:
        if server is not None:
            server.stop()
            (out / "server.log").write_text(server.output())
            server.log_path.unlink(missing_ok=True)
    seq, conc = http["sequential"], http["concurrent"]
    log(f"/health: {json.dumps(http['health'])}")
    log(f"HTTP sequential ({seq['requests']} requests of {a.per_request}): {seq['qps']:.0f} q/s; concurrent "
        f"({a.clients} clients x {a.per_request} queries/request, {rounds} rounds of {len(queries)}): "
        f"{conc['qps']:.0f} q/s, latency p50 {conc['latency_ms_p50']:.1f} ms p99 {conc['latency_ms_p99']:.1f} ms")

    ref = in_process(index_dir, queries, a.per_request, device, a.encoder_mode, faiss_gpu)
    row = {d: i for i, d in enumerate(ref["doc_ids"])}
    try:
        seq_ids = np.array([[row[d] for d in q] for q in seq["ids"]], np.int64)
        conc_ids = np.array([[row[d] for d in q] for q in conc["ids"]], np.int64)
    except KeyError as exc:
        raise CheckError(f"/retrieve returned a document id {exc} that is not in the corpus") from None
    seq_scores = np.asarray(seq["scores"], np.float32)
    es = ref["exact_scores"]
    tol = a.tie_tol
    cmp = {
        "http_seq_vs_inprocess_same_batches": compare("HTTP (sequential) vs in-process, same batches",
                                                      seq_ids, ref["dev_ids"]),
        "http_concurrent_vs_inprocess": compare("HTTP (concurrent) vs in-process", conc_ids, ref["dev_ids"]),
        "http_seq_vs_exact": compare("HTTP (sequential) vs exact fp32", seq_ids, ref["exact_ids"], es, tol),
        "http_concurrent_vs_exact": compare("HTTP (concurrent) vs exact fp32", conc_ids, ref["exact_ids"], es, tol),
        "inprocess_vs_exact": compare("in-process server path (one call) vs exact fp32", ref["dev_all_ids"],
                                      ref["exact_ids"], es, tol),
    }
    cmp["http_seq_vs_inprocess_same_batches"]["max_abs_score_diff"] = float(np.abs(seq_scores - ref["dev_scores"]).max())
    # how far the served scores are from the exact fp32 cosine of the same passages (fp16 rounding on the GPU)
    exact_of_served = np.take_along_axis(es, seq_ids, axis=1)
    score_err = np.abs(seq_scores - exact_of_served)
    ties = {"tie_tol": tol, "gap_rank3_rank4_exact_median": float(np.median(ref["gap34"])),
            "gap_rank3_rank4_exact_p01": float(np.percentile(ref["gap34"], 1)),
            "share_gap_below_tie_tol": float(np.mean(ref["gap34"] < tol)),
            "score_spread_per_query_median": float(np.median(ref["spread"])),
            "served_vs_exact_score_abs_err_max": float(score_err.max()),
            "served_vs_exact_score_abs_err_p99": float(np.percentile(score_err, 99))}
    # the same at other margins, so a borderline result can be judged without another GPU run
    ties["tie_tolerant_agreement_by_tol"] = {
        f"{t:g}": min(tie_tolerant(seq_ids, es, t), tie_tolerant(conc_ids, es, t)) for t in (5e-4, 1e-3, 2e-3, 5e-3, 1e-2)}
    log(f"ties: {ties}")

    strict = min(cmp["http_seq_vs_exact"]["top3_set_agreement"], cmp["http_concurrent_vs_exact"]["top3_set_agreement"])
    tolerant = min(cmp["http_seq_vs_exact"]["tie_tolerant_agreement"],
                   cmp["http_concurrent_vs_exact"]["tie_tolerant_agreement"])
    same = cmp["http_seq_vs_inprocess_same_batches"]["top3_set_agreement"]
    failures = []
    if same < a.min_agreement:
        failures.append(f"HTTP results differ from the in-process path on the same batches (set agreement "
                        f"{same:.4f} < {a.min_agreement})")
    if strict < a.min_agreement and (a.strict or tolerant < a.min_agreement):
        failures.append(f"GPU-vs-exact top-3 set agreement {strict:.4f} (tie-tolerant {tolerant:.4f}) < "
                        f"{a.min_agreement}")
    if ties["served_vs_exact_score_abs_err_max"] > a.max_score_err:
        failures.append(f"served scores differ from the exact fp32 cosine of the same passages by up to "
                        f"{ties['served_vs_exact_score_abs_err_max']:.2e} > {a.max_score_err}")
    verdict = "pass" if not failures else "FAIL"
    if not failures and strict < a.min_agreement:
        verdict = (f"pass (strict agreement {strict:.4f} < {a.min_agreement}: near-tied scores of the random-weight "
                   f"encoder; tie-tolerant {tolerant:.4f}, HTTP == in-process {same:.4f})")
    for d in (seq, conc):
        d.pop("ids"), d.pop("scores")
    res.update(ok=not failures, verdict=verdict, failures=failures, queries=len(queries),
               index_type_in_process=ref["index_type"], encoder_mode_resolved=ref["mode"],
               exact_reference_s=ref["exact_seconds"], http=http, agreement=cmp, ties=ties,
               wall_s=time.perf_counter() - t_start)
    log(f"summary: {verdict}; {conc['qps']:.0f} q/s over HTTP ({a.clients} clients x {a.per_request} queries per "
        f"request); top-3 set agreement with exact fp32 {strict:.4f} (tie-tolerant {tolerant:.4f}); HTTP vs "
        f"in-process {same:.4f} (max score diff "
        f"{cmp['http_seq_vs_inprocess_same_batches']['max_abs_score_diff']:.1e}); index {ref['index_type']}, "
        f"encoder mode {ref['mode']}; total {res['wall_s']:.0f}s")
    for f in failures:
        log(f"failure: {f}")
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_server_check.json and the logs")
    p.add_argument("--work", default="/tmp/gpu_server_check", help="scratch folder (encoder, index)")
    p.add_argument("--device", default=None, help="cuda (default when a GPU is visible) or cpu")
    p.add_argument("--faiss_gpu", dest="faiss_gpu", action="store_true", default=None,
                   help="serve with --faiss_gpu (default on cuda)")
    p.add_argument("--no_faiss_gpu", dest="faiss_gpu", action="store_false")
    p.add_argument("--encoder_mode", default="fast", help="server --encoder_mode (fast: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--layers", type=int, default=12, help="encoder layers (e5-base: 12; 1 for a quick CPU run)")
    p.add_argument("--init", default="bow", choices=("bow", "plain"),
                   help="random weights: bow (token-type/position embeddings zeroed: spread-out scores) or plain")
    p.add_argument("--tokenizer_dir", default=None, help="default: .whl/e5-tokenizer, else .gpu/retrieval/e5-base-sized")
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per_request", type=int, default=64)
    p.add_argument("--rounds", type=int, default=0, help="timed concurrent rounds over all queries (0: 10 on cuda, 1 on cpu)")
    p.add_argument("--min_agreement", type=float, default=0.99)
    p.add_argument("--tie_tol", type=float, default=2e-3, help="exact-score margin of the tie-tolerant agreement")
    p.add_argument("--max_score_err", type=float, default=0.02,
                   help="fail when a served score is further than this from the exact fp32 cosine")
    p.add_argument("--strict", action="store_true", help="require the strict GPU-vs-exact agreement")
    p.add_argument("--build_timeout_s", type=float, default=150)
    p.add_argument("--server_timeout_s", type=float, default=120)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # `timeout` sends SIGTERM: unwind through the `finally` blocks so the server subprocess is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res: dict = {"ok": False}
    try:
        code = run(a, res)
    except Exception as exc:  # noqa: BLE001 - any failure is reported in the JSON and by the exit code
        traceback.print_exc()
        code = 2
        res.update(ok=False, verdict="ERROR", error=f"{type(exc).__name__}: {exc}")
        log(f"summary: ERROR {type(exc).__name__}: {str(exc)[:2000]}")
    except SystemExit:  # SIGTERM (the shell script's `timeout`): the server was stopped on the way out
        code = 124
        res.update(ok=False, verdict="ERROR", error="terminated by SIGTERM (timeout?)")
        log("summary: ERROR terminated by SIGTERM (timeout?)")
    (out / "gpu_server_check.json").write_text(json.dumps(res, indent=1, default=str))
    log(f"wrote {out / 'gpu_server_check.json'}; exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
