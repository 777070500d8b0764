"""Retrieval at scale on this machine (issue 16: "Scale run on this machine" and "Low-memory index").

    OMP_NUM_THREADS=1 .venv/bin/python bench/retrieval_scale.py --n 200000    # validation size
    .venv/bin/python bench/retrieval_scale.py                                  # 5,000,000 passages (the scale run)

Writes bench/results/retrieval_scale.md (section `retrieval_scale`; `retrieval_scale_n<N>` for another --n) and the
raw numbers to bench/results/retrieval_scale.json (keyed by N). Scratch data goes to --data_dir (/work/scale_data).

1. Synthetic corpus (cached under <data_dir>/n<N>_k<K>_s<seed>/; a rerun with the same flags skips it):
   - corpus.jsonl: N passages in Search-R1's {"id","contents"} form ('"Title"\\ntext', 60-100 words drawn from the
     vocabulary of the real wiki-18 passages under ../shared/data/wiki18/), generated in chunks;
   - flat.index: a FAISS IndexFlatIP of dimension 384 (MiniLM's), written with faiss.write_index. Its rows are random
     unit vectors, except K planted rows whose texts are real wiki-18 passages and whose vectors are their real MiniLM
     passage encodings (stepsearch.search.encoders.Encoder). The planted rows sit at the rows `build_index
     --import_faiss` re-encodes to check the vectors (`--import_check_rows K --seed S` draws them as
     faiss_import.check_vectors does), so the import's encoder check runs on real vectors: random rows would fail any
     such check. A planted query is the passage's title plus its first sentence, encoded on the query side; planted
     passages are kept only when that query's cosine with its own vector is >= PLANTED_MIN_COS (far above the
     ~sqrt(2 ln N / 384) = 0.28 that the best of 5M random unit vectors reaches) and it beats the other planted
     passages by a margin, so the correct top-1 is the planted row.
   - vectors.f32: the same N x 384 float32 vectors, raw; linked as emb.memmap into the "+rerank" build (step 3).
   D = 384, not e5's 768: 5M x 768 x 4 B = 15.4 GB of Flat vectors would not fit this 24 GiB machine next to the
   Search-R1-style server's copy being read into RAM and the working sets; 5M x 384 x 4 B = 7.7 GB does.
2. Start-up, one server at a time, each started "cold" and "warm" in alternating order:
   (a) Search-R1-style: `datasets.load_dataset('json', data_files=corpus, split='train')`, `faiss.read_index` (the
       whole index read into RAM), the MiniLM fp32 encoder, and bench/retrieval.py's naive FastAPI /retrieve
       (`naive_app`); its `datasets` cache is a folder of its own (HF_DATASETS_CACHE), deleted before a cold start;
   (b) ours: `python -m stepsearch.search.build_index --import_faiss flat.index` once (timed, not part of start-up),
       then `python -m stepsearch.search.server --index_dir ...` (corpus table and FAISS vectors memory-mapped; the
       query encoder is native_bert's plain-torch BERT, no transformers import);
       `--ours_variants ours,ours_transformers` also starts it with `--encoder_backend transformers` (the encoder
       built through transformers, as before issue 16's native encoder), after ours in each round.
   Cold = the index file, corpus.jsonl and our corpus.arrow dropped from the page cache first (posix_fadvise
   DONTNEED, no root needed; `fincore` confirms) and, for (a), its datasets cache deleted; warm = whatever the run
   before left cached. Measured from the Popen to the first /retrieve answer whose top-1 is the planted row (polled
   every 0.5 s): time, peak RSS (VmHWM of /proc/PID/status at the end; psutil samples as a cross-check) and the
   anonymous/file-backed split, and the top-1 of every planted query. Before the starts, what bounds them is measured
   apart: the disk's sequential read rate of the index file, and one exhaustive search of the Flat index in page cache.
3. Low-memory two-stage index: `build_index --index_factory IVF4096,PQ32+rerank` over the same vectors (trained on
   build_index's sample of 262,144; IVF65536's k-means over 5M points would take hours on 2 cores), served by our
   server next to the imported Flat one (one at a time): RSS, queries/s with 8 clients x 64 queries per request and
   32 single-query clients (bench/retrieval.py's load generator, real questions), the planted queries' top-1, and
   recall@3 vs Flat of random unit-vector queries (in-process; random data has no cluster structure, IVF's worst case).

Stages (--stages): `startup` (2), `rerank` (3); a stage not run keeps its results stored in the JSON, so they can run
at different times; `prepare` only generates, imports and builds (no measurement). `--rerender` rewrites the markdown
and targets from the stored JSON. Before each big allocation (the Flat index add, a server start) the bench waits
until /proc/meminfo's MemAvailable covers it (the machine is shared). Run with OMP_NUM_THREADS=1 while the machine is
shared; the servers then run 1 torch/FAISS thread each.
Also run internally as the Search-R1-style server (`--serve_sr1 --corpus F --index F --port P`).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.machine import drop_from_page_cache  # noqa: E402
from bench.retrieval import (TOPK, Conn, load_questions, machine_line, naive_app, run_clients,  # noqa: E402
                             split_clients, top3_agreement, write_section)

DIM = 384  # MiniLM (all-MiniLM-L6-v2)
SHARED_WIKI = REPO.parent / "shared" / "data" / "wiki18"
PLANTED_SOURCES = (SHARED_WIKI / "multihop_contexts.wiki18fmt.jsonl", SHARED_WIKI / "wiki18_sample_1000.FlashRAG.jsonl",
                   REPO / "data" / "samples" / "wiki18_sample_1000.jsonl")
PLANTED_MIN_COS = 0.45  # a planted query's cosine with its own vector (random rows reach ~0.28 at N = 5M)
PLANTED_MARGIN = 0.05  # ... and with every other planted vector, at least this much lower
CHUNK = 1 << 17  # rows generated per chunk
WORD_STREAM = 1 << 21  # words in the shared random word stream passages are cut from
GIB = 1 << 30
RESULTS = REPO / "bench" / "results"
FLAT, CORPUS, VECTORS, PLANTED, GEN_DONE = "flat.index", "corpus.jsonl", "vectors.f32", "planted.json", "gen.json"


def log(msg: str) -> None:
    print(f"[scale] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- 1. synthetic corpus + Flat index
def planted_rows(n: int, k: int, seed: int) -> np.ndarray:
    """The rows `build_index --import_faiss --import_check_rows k --seed seed` re-encodes (faiss_import.check_vectors
    draws them with this call); the planted passages go there."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))


def wiki_rows() -> list[dict]:
    rows, seen = [], set()
    for path in PLANTED_SOURCES:
        if path.is_file():
            with open(path) as f:
                for line in f:
                    row = json.loads(line)
                    if row["contents"] not in seen:
                        seen.add(row["contents"])
                        rows.append({"contents": row["contents"]})
    if not rows:
        raise FileNotFoundError(f"no wiki-18 passages in {[str(p) for p in PLANTED_SOURCES]}")
    return rows


def vocabulary(rows: list[dict]) -> np.ndarray:
    """Lower-case alphabetic words (3-14 letters) of the real passages, with repeats: sampling it uniformly samples
    words by their corpus frequency."""
    words = [w for r in rows for w in re.findall(r"[A-Za-z]{3,14}", r["contents"].partition("\n")[2])]
    return np.array([w.lower() for w in words])


def planted_query(contents: str) -> str:
    """Title + first sentence of a '"Title"\\ntext' passage: the query that must find it."""
    from stepsearch.search.corpus import split_contents

    title, text = split_contents(contents)
    first = re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]
    return f"{title} {first}"


def choose_planted(k: int, seed: int, rows: list[dict]) -> dict:
    """K real passages with distinct titles whose planted query finds them clearly (PLANTED_MIN_COS, PLANTED_MARGIN):
    candidates drawn at random are encoded (passage and query side) in small batches and kept greedily."""
    from stepsearch.search.corpus import split_contents
    from stepsearch.search.encoders import Encoder

    enc = Encoder("minilm", mode="exact")
    rng = np.random.default_rng(seed + 1)
    cands = [rows[i] for i in rng.permutation(len(rows))
             if 40 <= len(split_contents(rows[i]["contents"])[1].split()) <= 200]
    texts, queries, P, Q, titles = [], [], np.zeros((0, DIM), np.float32), np.zeros((0, DIM), np.float32), set()
    pos, rejected = 0, 0
    while len(texts) < k:
        if pos >= len(cands):
            raise RuntimeError(f"only {len(texts)} of {k} planted passages pass the query check")
        batch = []
        while len(batch) < k - len(texts) + 4 and pos < len(cands):
            title = split_contents(cands[pos]["contents"])[0]
            if title not in titles:
                batch.append(cands[pos]["contents"])
                titles.add(title)
            pos += 1
        bp = enc.encode_passages(batch)
        bq = enc.encode_queries([planted_query(t) for t in batch])
        for t, p, q in zip(batch, bp, bq):
            own = float(q @ p)
            ok = own >= PLANTED_MIN_COS and len(texts) < k
            if ok and len(texts):
                # the new query must beat the kept passages, and the kept queries must still find their own
                ok = (P @ q).max() <= own - PLANTED_MARGIN and \
                     ((Q @ p) <= np.einsum("ij,ij->i", Q, P) - PLANTED_MARGIN).all()
            if ok:
                texts.append(t)
                queries.append(planted_query(t))
                P, Q = np.vstack([P, p[None]]), np.vstack([Q, q[None]])
            else:
                rejected += 1
    own = np.einsum("ij,ij->i", Q, P)
    return {"texts": texts, "queries": queries, "vectors": P, "own_cosine": own, "rejected": rejected}


def word_stream(vocab: np.ndarray, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """A long string of random vocabulary words and the char offset of each word start (+ the end): passages are
    slices of it, so a passage costs one string slice instead of a per-word join."""
    words = vocab[rng.integers(0, len(vocab), WORD_STREAM)]
    offsets = np.zeros(len(words) + 1, np.int64)
    np.cumsum(np.char.str_len(words) + 1, out=offsets[1:])
    return " ".join(words.tolist()), offsets


def mem_available() -> int:
    """MemAvailable in bytes (`stepsearch.search.index.mem_available_bytes`, which the server's prefetch reads too)."""
    from stepsearch.search.index import mem_available_bytes

    available = mem_available_bytes()
    if available is None:
        raise RuntimeError("no MemAvailable in /proc/meminfo")
    return available


def wait_for_memory(need: int, what: str, timeout_s: float = 4 * 3600) -> float:
    """Block until MemAvailable >= `need` bytes (the machine is shared: never push it into the OOM killer). Returns
    the seconds waited."""
    t0 = time.monotonic()
    while mem_available() < need:
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"{what}: {need / GIB:.1f} GiB never became available within {timeout_s:.0f}s")
        if time.monotonic() - t0 < 1 or int(time.monotonic() - t0) % 300 < 15:
            log(f"{what}: waiting for {need / GIB:.1f} GiB of available memory (now {mem_available() / GIB:.1f})")
        time.sleep(15)
    return time.monotonic() - t0


def load_planted(art: Path, k: int, seed: int, params: dict) -> dict:
    """The planted passages (choose_planted), cached in planted.json + planted.npy under `art`."""
    from stepsearch.data.io import atomic_path, write_json_atomic

    path = art / PLANTED
    if path.is_file() and json.loads(path.read_text()).get("params") == params:
        saved = json.loads(path.read_text())
        return {**saved, "vectors": np.load(art / "planted.npy")}
    t0 = time.perf_counter()
    planted = choose_planted(k, seed, wiki_rows())
    with atomic_path(art / "planted.npy", suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, planted["vectors"])
    saved = {"params": params, "rows": planted_rows(params["n"], k, seed).tolist(), "queries": planted["queries"],
             "own_cosine": planted["own_cosine"].tolist(), "texts": planted["texts"],
             "rejected_candidates": planted["rejected"], "seconds": time.perf_counter() - t0}
    write_json_atomic(path, saved)
    log(f"{k} planted passages encoded in {saved['seconds']:.0f}s (own cosine min {min(saved['own_cosine']):.3f})")
    return {**saved, "vectors": planted["vectors"]}


def write_corpus_and_vectors(art: Path, n: int, seed: int, planted: dict) -> None:
    """corpus.jsonl and vectors.f32 (N x DIM float32), chunk by chunk (each chunk from its own seeded generator)."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(wiki_rows())
    stream, offsets = word_stream(vocab, rng)
    title_words = np.unique(vocab)
    title_words = np.char.capitalize(title_words[np.char.str_len(title_words) >= 4]).tolist()
    where = np.asarray(planted["rows"])
    slot = {int(r): j for j, r in enumerate(where)}
    tmp_corpus, tmp_vec = art / (CORPUS + ".tmp"), art / (VECTORS + ".tmp")
    vec = np.memmap(tmp_vec, dtype=np.float32, mode="w+", shape=(n, DIM))
    with open(tmp_corpus, "w", encoding="utf-8") as f:
        for c, start in enumerate(range(0, n, CHUNK)):
            stop = min(start + CHUNK, n)
            m = stop - start
            crng = np.random.default_rng([seed, c])
            w0 = crng.integers(0, len(offsets) - 102, m)
            a, b = offsets[w0], offsets[w0 + crng.integers(60, 101, m)] - 1
            t1, t2 = crng.integers(0, len(title_words), m), crng.integers(0, len(title_words), m)
            lines = [f'{{"id": "{i}", "contents": "\\"{title_words[x]} {title_words[y]}\\"\\n{stream[s:e]}"}}\n'
                     for i, x, y, s, e in zip(range(start, stop), t1.tolist(), t2.tolist(), a.tolist(), b.tolist())]
            x = crng.standard_normal((m, DIM), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            for r in where[(where >= start) & (where < stop)].tolist():
                lines[r - start] = json.dumps({"id": str(r), "contents": planted["texts"][slot[r]]}) + "\n"
                x[r - start] = planted["vectors"][slot[r]]
            f.write("".join(lines))
            vec[start:stop] = x
            if c % 8 == 0:
                log(f"  generated {stop:,}/{n:,} rows")
    vec.flush()
    del vec
    os.replace(tmp_corpus, art / CORPUS)
    os.replace(tmp_vec, art / VECTORS)


def generate(art: Path, n: int, k: int, seed: int) -> dict:
    """Write planted.json, corpus.jsonl, vectors.f32 and flat.index under `art`. Each step is skipped when its
    output exists for the same parameters (gen.json is written last)."""
    import faiss

    from stepsearch.data.io import write_json_atomic

    params = {"n": n, "k": k, "seed": seed, "dim": DIM, "min_cos": PLANTED_MIN_COS, "margin": PLANTED_MARGIN,
              "version": 1}
    done = art / GEN_DONE
    if done.is_file() and json.loads(done.read_text()).get("params") == params:
        log(f"reusing generated corpus and index in {art}")
        return json.loads(done.read_text())
    art.mkdir(parents=True, exist_ok=True)
    planted = load_planted(art, k, seed, params)
    data_done = art / "data.json"
    if data_done.is_file() and json.loads(data_done.read_text()).get("params") == params:
        t_gen = json.loads(data_done.read_text())["seconds"]
    else:
        log(f"generating {n:,} passages and vectors")
        t0 = time.perf_counter()
        write_corpus_and_vectors(art, n, seed, planted)
        t_gen = time.perf_counter() - t0
        write_json_atomic(data_done, {"params": params, "seconds": t_gen})
    # One add() of the whole memory-mapped array: the index's code vector is sized once (N x D x 4 B). Adding in
    # chunks grows it geometrically, and each growth copies it, which can hold ~2-3x the index at once.
    waited = wait_for_memory(n * DIM * 4 + 2 * GIB, "IndexFlatIP.add")
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(DIM)
    index.add(np.memmap(art / VECTORS, dtype=np.float32, mode="r", shape=(n, DIM)))
    tmp_index = art / (FLAT + ".tmp")
    faiss.write_index(index, str(tmp_index))
    del index
    os.replace(tmp_index, art / FLAT)
    t_index = time.perf_counter() - t0
    info = {"params": params, "seconds": {"planted_encode": planted["seconds"], "corpus_and_vectors": t_gen,
                                          "flat_index_add_write": t_index, "memory_wait": waited},
            "bytes": {name: (art / name).stat().st_size for name in (CORPUS, VECTORS, FLAT)}}
    info["seconds"]["total"] = planted["seconds"] + t_gen + t_index
    write_json_atomic(done, info)
    log(f"generated in {info['seconds']['total']:.0f}s: {json.dumps(info['bytes'])}")
    return info


# ---------------------------------------------------------------- page cache, processes, RSS
def page_cache_bytes(path: Path) -> int | None:
    """Bytes of `path` resident in the OS page cache (util-linux `fincore`), None when it cannot be read."""
    if not shutil.which("fincore"):
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        return int(out.split()[0])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def proc_status(pid: int) -> dict:
    """VmHWM / VmRSS / RssAnon / RssFile of a live process, bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(val.split()[0]) * 1024
    return out


def rss_by_file(pid: int, root: Path) -> dict:
    """Resident bytes of each memory-mapped file under `root` in process `pid` (/proc/PID/smaps), keyed by the path
    relative to `root` (the datasets cache's arrow files grouped as one entry)."""
    out: dict[str, int] = {}
    cur = None
    prefix = str(root.resolve()) + os.sep
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
            path = head[5] if len(head) > 5 else ""
            cur = path[len(prefix):] if path.startswith(prefix) else None
            if cur and cur.startswith("hf_datasets_cache"):
                cur = "hf_datasets_cache (datasets' arrow copy of the corpus)"
        elif cur and line.startswith("Rss:"):
            out[cur] = out.get(cur, 0) + int(head[1]) * 1024
    return out


class RssSampler:
    """psutil RSS of a process tree (the process and its children), sampled every `period_s` in a thread."""

    def __init__(self, pid: int, period_s: float = 0.2):
        import psutil

        self.proc, self.period_s, self.peak = psutil.Process(pid), period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            self._stop.wait(self.period_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def server_env(threads: int, extra: dict | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return {**env, **(extra or {})}


class ServerExited(RuntimeError):
    """The server process ended before answering (e.g. its start-up failed)."""


class Server:
    """A server subprocess started now (t0 = just before Popen), its log, and its RSS sampler."""

    def __init__(self, name: str, args: list[str], env: dict, log_path: Path, port: int, root: Path):
        self.name, self.url, self.log_path, self.root = name, f"http://127.0.0.1:{port}", log_path, root
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
        self.sampler = RssSampler(self.proc.pid)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def first_answer(self, query: str, expect_id: str, timeout_s: float) -> dict:
        """Post `query` every 0.5 s (a request in flight is waited for) until the top-1 id is `expect_id`. Returns
        the seconds from Popen to that answer, to the first answer of any kind, and the wrong answers seen."""
        body = json.dumps({"queries": [query], "topk": TOPK}).encode()
        first_any, wrong = None, []
        deadline = self.t0 + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerExited(f"{self.name} exited with {self.proc.returncode} after "
                                   f"{time.monotonic() - self.t0:.0f}s:\n{self.output()}")
            conn = Conn(self.url, timeout_s=max(1.0, deadline - time.monotonic()))
            try:
                hits = json.loads(conn.post(body))["result"][0]
            except (OSError, http.client.HTTPException, RuntimeError):  # not listening yet / not ready (non-200)
                hits = None
            finally:
                conn.close()
            if hits is not None:
                now = time.monotonic() - self.t0
                first_any = first_any if first_any is not None else now
                if hits and str(hits[0]["id"]) == expect_id:
                    return {"first_correct_s": now, "first_answer_s": first_any, "wrong_answers": wrong}
                wrong.append([str(h["id"]) for h in hits])
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}: no correct answer within {timeout_s}s (wrong: {wrong[:3]})\n{self.output()}")

    def top1(self, queries: list[str]) -> list[str]:
        conn = Conn(self.url, timeout_s=3600)
        try:
            res = json.loads(conn.post(json.dumps({"queries": queries, "topk": 1}).encode()))["result"]
        finally:
            conn.close()
        return [str(hits[0]["id"]) if hits else "" for hits in res]

    def memory(self) -> dict:
        return {**proc_status(self.proc.pid), "psutil_peak": self.sampler.peak,
                "resident_files": rss_by_file(self.proc.pid, self.root)}

    def stop(self) -> None:
        self.sampler.stop()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


# memory a server may take beyond these files, for wait_for_memory (measured: ~1.2 GiB at 200k passages)
SERVER_OVERHEAD = 3 * GIB // 2
# our server variants (--ours_variants) and the flags each adds to `python -m stepsearch.search.server`
OURS_VARIANTS = {"ours": [], "ours_transformers": ["--encoder_backend", "transformers"]}


def start_sr1(art: Path, hf_cache: Path, threads: int, logs: Path) -> Server:
    from stepsearch.search.testing import free_port

    wait_for_memory((art / FLAT).stat().st_size + SERVER_OVERHEAD, "Search-R1-style server (reads the index)")
    port = free_port()
    args = [sys.executable, str(Path(__file__).resolve()), "--serve_sr1", "--corpus", str(art / CORPUS),
            "--index", str(art / FLAT), "--port", str(port), "--threads", str(threads)]
    return Server("search_r1_style", args, server_env(threads, {"HF_DATASETS_CACHE": str(hf_cache)}),
                  logs / f"sr1-{port}.log", port, art)


def start_ours(index_dir: Path, threads: int, logs: Path, name: str = "ours", extra: list[str] = ()) -> Server:
    """`python -m stepsearch.search.server` over `index_dir`, as a user starts it (plus a long request timeout and
    `extra` flags)."""
    from stepsearch.search.testing import free_port

    # it maps the whole index: its pages must fit in RAM beside the server, as the Search-R1-style server's copy must
    wait_for_memory(os.path.getsize(os.path.realpath(index_dir / "dense.faiss")) + SERVER_OVERHEAD, f"{name} server")
    port = free_port()
    # --request_timeout_s: a 5M Flat batch queued behind others can take minutes on 2 cores; the bench measures
    # throughput, not the server's 504 guard (the Search-R1-style server has none)
    args = [sys.executable, "-m", "stepsearch.search.server", "--index_dir", str(index_dir), "--host", "127.0.0.1",
            "--port", str(port), "--log_level", "warning", "--torch_threads", str(threads), "--request_timeout_s",
            "3600", *extra]
    return Server(name, args, server_env(threads), logs / f"{name}-{port}.log", port, index_dir.parent)


def serve_sr1(corpus: str, index_path: str, port: int, threads: int) -> None:
    """What Search-R1's retrieval_server does at start-up: the corpus through `datasets`, the FAISS file read into
    RAM, the encoder at fp32; then bench/retrieval.py's naive /retrieve over them."""
    import datasets
    import faiss
    import torch
    import uvicorn

    from stepsearch.search.encoders import Encoder

    if threads > 0:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    table = datasets.load_dataset("json", data_files=corpus, split="train")
    index = faiss.read_index(index_path)
    encoder = Encoder(model="minilm", mode="exact", batch_size=512, backend="transformers")
    uvicorn.run(naive_app(encoder, index, table.__getitem__), host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------- build steps of ours (subprocesses, timed)
def run_build(args: list[str], threads: int, log_path: Path) -> float:
    t0 = time.perf_counter()
    with open(log_path, "wb") as f:
        rc = subprocess.run([sys.executable, "-m", "stepsearch.search.build_index", *args], cwd=REPO,
                            env=server_env(threads), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"build_index {' '.join(args)} failed ({rc}):\n{log_path.read_text()[-3000:]}")
    return time.perf_counter() - t0


def import_ours(art: Path, k: int, seed: int, threads: int) -> dict:
    """build_index --import_faiss flat.index (once; its time is kept in import_time.json)."""
    out = art / "ours_flat"
    stamp = out / "import_time.json"
    src = (art / FLAT).stat()
    key = {"size": src.st_size, "mtime_ns": src.st_mtime_ns}
    if stamp.is_file() and (out / "manifest.json").is_file() and json.loads(stamp.read_text())["source"] == key:
        log(f"reusing {out}")
        return json.loads(stamp.read_text())
    log("build_index --import_faiss ...")
    seconds = run_build(["--corpus", str(art / CORPUS), "--out", str(out), "--import_faiss", str(art / FLAT),
                         "--import_check_rows", str(k), "--seed", str(seed)], threads, art / "import.log")
    manifest = json.loads((out / "manifest.json").read_text())
    info = {"seconds": seconds, "source": key, "import_check": manifest["import_check"],
            "corpus_arrow_bytes": (out / "corpus.arrow").stat().st_size}
    from stepsearch.data.io import write_json_atomic

    write_json_atomic(stamp, info)
    log(f"imported in {seconds:.0f}s (check: {json.dumps(manifest['import_check'])})")
    return info


def auto_factory(n: int) -> str:
    """IVF4096 from 2M passages (IVF65536 k-means would take hours on 2 cores), fewer lists for small runs."""
    nlist = 4096 if n >= 2_000_000 else 1024 if n >= 100_000 else 64
    return f"IVF{nlist},PQ32+rerank"


def build_rerank(art: Path, n: int, factory: str, threads: int) -> dict:
    """The "+rerank" index over the same vectors: corpus.arrow (+ its state) hard-linked from the import, vectors.f32
    linked as emb.memmap with a progress file saying every row is done, so build_index encodes nothing and goes
    straight to training, adding and writing emb.fp16."""
    from stepsearch.data.io import write_json_atomic
    from stepsearch.search.build_index import CORPUS_STATE, PROGRESS, progress_identity
    from stepsearch.search.index import CORPUS_TABLE, EMBEDDINGS

    flat_dir = art / "ours_flat"
    out = art / ("ours_" + re.sub(r"[^A-Za-z0-9]+", "_", factory).strip("_"))
    stamp = out / "build_time.json"
    if stamp.is_file() and (out / "manifest.json").is_file():
        log(f"reusing {out}")
        return {**json.loads(stamp.read_text()), "dir": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    for name in (CORPUS_TABLE, CORPUS_STATE):
        (out / name).unlink(missing_ok=True)
        os.link(flat_dir / name, out / name)
    (out / EMBEDDINGS).unlink(missing_ok=True)
    os.link(art / VECTORS, out / EMBEDDINGS)  # read only by the builder (it resumes past the last row)
    manifest = json.loads((flat_dir / "manifest.json").read_text())
    ident = progress_identity(manifest["corpus"]["sha256"], manifest["encoder"], n, DIM)
    write_json_atomic(out / PROGRESS, {**ident, "rows_done": n})
    log(f"build_index --index_factory {factory} ...")
    seconds = run_build(["--corpus", str(art / CORPUS), "--out", str(out), "--index_factory", factory],
                        threads, art / "rerank_build.log")
    info = {"seconds": seconds, "factory": factory}
    write_json_atomic(stamp, info)
    log(f"built {factory} in {seconds:.0f}s")
    return {**info, "dir": str(out)}


# ---------------------------------------------------------------- 2. start-up: Search-R1-style vs ours
def one_start(which: str, state: str, art: Path, planted: dict, args, logs: Path) -> dict:
    hf_cache = art / "hf_datasets_cache"
    flat_dir = art / "ours_flat"
    if state == "cold":
        if which == "search_r1_style":
            shutil.rmtree(hf_cache, ignore_errors=True)
        drop_from_page_cache([art / FLAT, art / CORPUS, flat_dir / "corpus.arrow", hf_cache])
    cached = page_cache_bytes(art / FLAT)
    log(f"start {which} ({state}; index file in page cache: {cached})")
    srv = start_sr1(art, hf_cache, args.threads, logs) if which == "search_r1_style" else \
        start_ours(flat_dir, args.threads, logs, name=which, extra=OURS_VARIANTS[which])
    base = {"server": which, "state": state, "index_in_page_cache_bytes": cached, "load_avg_1m": os.getloadavg()[0]}
    try:
        t = srv.first_answer(planted["queries"][0], str(planted["rows"][0]), args.start_timeout_s)
        mem_first = srv.memory()
        t0 = time.monotonic()
        top1 = srv.top1(planted["queries"])
        t["all_planted_s"] = time.monotonic() - t0
        mem = srv.memory()
    except ServerExited as exc:
        log(f"  {which} {state}: FAILED: {failure_line(str(exc))}")
        return {**base, "failed": failure_line(str(exc)), "output_tail": str(exc)[-3000:]}
    finally:
        srv.stop()
    expect = [str(r) for r in planted["rows"]]
    res = {**base, **t, "memory_at_first_answer": mem_first, "memory": mem, "peak_rss": mem["VmHWM"],
           "planted_top1": top1, "planted_hit_rate": float(np.mean([a == b for a, b in zip(top1, expect)]))}
    log(f"  {which} {state}: first correct answer {t['first_correct_s']:.1f}s, peak RSS "
        f"{mem['VmHWM'] / GIB:.2f} GiB, planted top-1 {res['planted_hit_rate']:.3f}")
    return res


def failure_line(text: str) -> str:
    """The first line of `text` and its last error line (an exception message) in one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "Invalid" in ln or "Exception" in ln]
    return lines[0] + (" " + errors[-1] if errors else "") if lines else text


def disk_and_scan(art: Path, threads: int) -> dict:
    """What bounds a start, measured apart from the servers: the disk's sequential read rate of the index file
    (dropped from the page cache, then read whole in 8 MiB blocks, which leaves it cached) and the seconds of one
    exhaustive search of the memory-mapped Flat index for one random query, in page cache (in-process, as our
    server opens it; the faster of three, since other processes share the cores)."""
    import faiss

    path = art / FLAT
    drop_from_page_cache([path])
    block = bytearray(8 << 20)
    done, t0 = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(block):
            done += got
    read_s = time.perf_counter() - t0
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    from stepsearch.search.rerank import read_faiss

    index = read_faiss(path)  # memory-mapped, as our server opens it
    q = np.random.default_rng(0).standard_normal((1, DIM), dtype=np.float32)
    scans = []
    for _ in range(3):
        t0 = time.perf_counter()
        index.search(q, TOPK)
        scans.append(time.perf_counter() - t0)
    del index
    log(f"disk read {done / GIB / read_s:.2f} GiB/s; one Flat scan {min(scans):.2f} s (all: {scans})")
    return {"disk_read_bytes": done, "disk_read_s": read_s, "disk_read_gib_s": done / GIB / read_s,
            "flat_scan_s": min(scans), "flat_scans_s": scans, "scan_threads": faiss.omp_get_max_threads(),
            "load_avg_1m": os.getloadavg()[0]}


def startup_section(art: Path, planted: dict, args, logs: Path) -> list[dict]:
    ours = tuple(args.ours_variants)
    order = {"cold": ("search_r1_style", *ours), "warm": (*ours, "search_r1_style")}
    return [one_start(which, state, art, planted, args, logs) for state in args.starts for which in order[state]]


# ---------------------------------------------------------------- 3. Flat vs "+rerank" with our server
def throughput(srv: Server, questions: list[str], args) -> dict:
    n8 = args.clients * args.per_request
    batch, singles = questions[:n8], questions[n8:n8 + args.single_clients * args.single_per_client]
    r8 = run_clients(srv.url, split_clients(batch, args.clients, args.per_request))
    r1 = run_clients(srv.url, split_clients(singles, args.single_clients, 1))
    return {"batch": {k: r8[k] for k in ("qps", "p50_ms", "p99_ms", "n")},
            "single": {k: r1[k] for k in ("qps", "p50_ms", "p99_ms", "n")},
            "answers": [r8["answers"][q] for q in batch] + [r1["answers"][q] for q in singles]}


def recall_random(flat_dir: Path, rerank_dir: Path, n_queries: int, seed: int, threads: int, planted: dict,
                  nprobes: list[int]) -> dict:
    """In-process, through load_index (the server's load path): recall@3 vs Flat of `n_queries` random unit-vector
    queries, for the "+rerank" index served with the default nprobe and with each of `nprobes`; also the compressed
    first stage alone (default nprobe) and the planted queries' top-1 hit rate per nprobe."""
    import faiss

    from stepsearch.search.index import LoadOptions, load_index
    from stepsearch.search.rerank import DEFAULT_NPROBE, recall_at_k

    if threads > 0:
        faiss.omp_set_num_threads(threads)
    q = np.random.default_rng(seed + 7).standard_normal((n_queries, DIM), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    flat = load_index(flat_dir, LoadOptions(method="dense", encoder_mode="exact"))
    t0 = time.perf_counter()
    ref = flat.retriever.search_embeddings(q, TOPK).ids
    flat_s = time.perf_counter() - t0
    pq = flat.retriever.encoder.encode_queries(planted["queries"])  # (K, D), exact fp32
    del flat

    out = {"queries": n_queries, "flat_search_s": flat_s, "by_nprobe": []}
    for nprobe in dict.fromkeys([DEFAULT_NPROBE, *nprobes]):
        two = load_index(rerank_dir, LoadOptions(method="dense", encoder_mode="exact", nprobe=nprobe))
        t0 = time.perf_counter()
        ids = two.retriever.search_embeddings(q, TOPK).ids
        secs = time.perf_counter() - t0
        top1 = two.retriever.search_embeddings(pq, 1).ids[:, 0]
        row = {"nprobe": two.retriever.nprobe, "recall3": recall_at_k(ids, ref), "search_s": secs,
               "planted_top1": float(np.mean(top1 == np.asarray(planted["rows"])))}
        if nprobe == DEFAULT_NPROBE:  # the compressed first stage alone (IVF-PQ scores, no exact re-rank)
            out["first_stage_recall3"] = recall_at_k(two.retriever.index.index.search(q, TOPK)[1], ref)
            out["recall3"], out["rerank_search_s"] = row["recall3"], secs
        out["by_nprobe"].append(row)
        log(f"  nprobe {row['nprobe']}: recall@3 {row['recall3']:.3f}, planted top-1 {row['planted_top1']:.3f}")
        del two
    return out


def rerank_section(art: Path, n: int, planted: dict, args, logs: Path) -> dict:
    factory = args.rerank_factory if args.rerank_factory != "auto" else auto_factory(n)
    build = build_rerank(art, n, factory, args.build_threads)
    rerank_dir = Path(build["dir"])
    questions = load_questions()
    need = args.clients * args.per_request + args.single_clients * args.single_per_client
    if len(questions) < need:
        raise ValueError(f"need {need} distinct questions, found {len(questions)}")
    expect = [str(r) for r in planted["rows"]]
    res = {"factory": factory, "build_s": build["seconds"], "variant": "ours", "servers": {}}
    for name, path in (("flat", art / "ours_flat"), ("rerank", rerank_dir)):
        log(f"serving {name} ({path.name}): throughput")
        srv = start_ours(path, args.threads, logs, name=f"ours_{name}")
        try:
            srv.first_answer(planted["queries"][0], expect[0], args.start_timeout_s)
            top1 = srv.top1(planted["queries"])
            tp = throughput(srv, questions, args)
            mem = srv.memory()
        except (ServerExited, RuntimeError) as exc:  # exited, or a load client got a non-200 answer
            log(f"  {name}: FAILED: {failure_line(str(exc))}")
            res["servers"][name] = {"failed": failure_line(str(exc)), "output_tail": str(exc)[-3000:]}
            continue
        finally:
            srv.stop()
        res["servers"][name] = {**tp, "memory": mem, "planted_top1": top1,
                                "planted_hit_rate": float(np.mean([a == b for a, b in zip(top1, expect)]))}
        log(f"  {name}: 8x{args.per_request} {tp['batch']['qps']:.1f} q/s, {args.single_clients}x1 "
            f"{tp['single']['qps']:.1f} q/s, peak RSS {mem['VmHWM'] / GIB:.2f} GiB")
    flat, rr = res["servers"]["flat"], res["servers"]["rerank"]
    if "answers" in flat and "answers" in rr:
        res["real_question_top3_agreement"] = top3_agreement(rr.pop("answers"), flat.pop("answers"))
    res["index_bytes"] = {"flat": (art / FLAT).stat().st_size,
                          "rerank_faiss": (rerank_dir / "dense.faiss").stat().st_size,
                          "rerank_fp16": (rerank_dir / "emb.fp16").stat().st_size}
    log("recall@3 of random queries (in-process)")
    res["random_recall"] = recall_random(art / "ours_flat", rerank_dir, args.recall_queries, args.seed,
                                         args.threads, planted, args.nprobe_sweep)
    from stepsearch.search.rerank import DEFAULT_NPROBE, DEFAULT_RERANK_CANDIDATES

    res["nprobe"], res["rerank_candidates"] = DEFAULT_NPROBE, DEFAULT_RERANK_CANDIDATES
    return res


# ---------------------------------------------------------------- report
def resident(mem: dict, what: str) -> str:
    """Resident bytes of the memory-mapped index files ("index": flat.index, dense.faiss, emb.fp16) or corpus files
    ("corpus": corpus.arrow, the datasets cache) in a server's `memory()` record."""
    keys = ("flat.index", "dense.faiss", "emb.fp16") if what == "index" else ("corpus.arrow", "hf_datasets_cache")
    return gib(sum(v for k, v in mem.get("resident_files", {}).items() if any(x in k for x in keys)))


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


# "ours_rows_fix": results stored by an earlier version of this bench, which measured the per-row corpus lookup as a
# bench-side patch before corpus.ArrowCorpus.rows read record batch by record batch (kept to label those results)
VARIANT_LABEL = {"search_r1_style": "Search-R1-style", "ours": "ours",
                 "ours_transformers": "ours, --encoder_backend transformers",
                 "ours_rows_fix": "ours (earlier run, rows fix as a bench-side patch)"}


def targets(res: dict) -> list[dict]:
    """The issue's targets, one row per ours variant: {"metric", "value", "target", "met", ...raw numbers}."""
    starts = {(s["server"], s["state"]): s for s in res["starts"]}
    flat_bytes = res["generation"]["bytes"][FLAT]
    rows = []
    for variant in dict.fromkeys(s["server"] for s in res["starts"] if s["server"] != "search_r1_style"):
        label = VARIANT_LABEL[variant]
        for state in ("cold", "warm"):
            ours, sr1 = starts.get((variant, state)), starts.get(("search_r1_style", state))
            if ours is None or sr1 is None:
                continue
            key = {"kind": "first_answer_ratio", "variant": variant, "state": state}
            metric = f"time to first correct answer, {state}: {label} / Search-R1-style"
            if "failed" in ours or "failed" in sr1:
                rows.append({**key, "metric": metric, "value": "failed to start", "target": "<= 0.2", "met": False})
                continue
            ratio = ours["first_correct_s"] / sr1["first_correct_s"]
            rows.append({**key, "metric": metric + f" ({ours['first_correct_s']:.1f} s / {sr1['first_correct_s']:.1f} s)",
                         "value": f"{ratio:.3f}", "target": "<= 0.2", "met": ratio <= 0.2, "ratio": ratio})
        ok = [s for s in res["starts"] if s["server"] == variant and "failed" not in s]
        key = {"kind": "peak_rss", "variant": variant}
        metric = f"{label}: peak RSS (max over starts) vs index bytes + 1 GiB"
        if len(ok) < len([s for s in res["starts"] if s["server"] == variant]):
            rows.append({**key, "metric": metric, "value": "failed to start", "target": f"<= {gib(flat_bytes + GIB)}",
                         "met": False})
        else:
            peak = max(s["peak_rss"] for s in ok)
            rows.append({**key, "metric": metric, "value": gib(peak), "target": f"<= {gib(flat_bytes + GIB)}",
                         "met": peak <= flat_bytes + GIB, "peak_rss": peak, "bound": flat_bytes + GIB})
        pair = [s for s in res["starts"] if s["server"] in (variant, "search_r1_style")]
        same = all("failed" not in s and s["planted_hit_rate"] == 1.0 for s in pair) and \
            len({tuple(s["planted_top1"]) for s in pair}) == 1
        rows.append({"kind": "planted_top1", "variant": variant,
                     "metric": f"Search-R1-style and {label} return the planted row as top-1 for all "
                               f"{res['planted']} planted queries, every start", "value": "", "target": "all",
                     "met": same})
    return rows


def markdown(res: dict, json_name: str = "bench/results/retrieval_scale.json") -> str:
    n, g = res["n"], res["generation"]
    lines = [f"## Retrieval at scale: {n:,} passages (bench/retrieval_scale.py)", "",
             *([f"Command: `{res['command']}`"] if res.get("starts_command", res["command"]) == res["command"] and
               res.get("rerank_command", res["command"]) == res["command"] else
               [f"Commands: start-up `{res.get('starts_command')}`; two-stage index `{res.get('rerank_command')}`"]),
             "",
             f"Machine: {res['machine']}; load average at the start {res['load_start']}. Threads per server: "
             f"{res['threads'] or 'library default (all cores)'}.", "",
             f"Corpus: {n:,} synthetic passages in Search-R1's `{{\"id\",\"contents\"}}` JSONL "
             f"({gib(g['bytes'][CORPUS])}); `IndexFlatIP` of dimension {DIM} written with `faiss.write_index` "
             f"({gib(g['bytes'][FLAT])}): random unit vectors plus {res['planted']} planted real wiki-18 passages "
             f"with their real MiniLM vectors, at the rows `build_index --import_faiss` re-encodes to check the "
             f"encoder. D = {DIM} (MiniLM) because 5M x 768 x 4 B = 15.4 GB of e5 vectors would not fit this 24 GiB "
             f"machine beside the Search-R1-style server's in-RAM copy and the working sets. A correct answer = the "
             f"planted passage's title + first sentence, encoded as a query, returns its row as top-1 (own cosine "
             f"min {min(res['planted_own_cosine']):.3f}; the best random row reaches ~"
             f"{np.sqrt(2 * np.log(n) / DIM):.2f}). Generation {g['seconds']['total']:.0f} s (cached for reruns); "
             f"`build_index --import_faiss` {res['import']['seconds']:.0f} s (once, not part of start-up; writes "
             f"corpus.arrow {gib(res['import']['corpus_arrow_bytes'])}; encoder check min cosine "
             f"{res['import']['import_check']['min_cosine']:.5f} over {res['import']['import_check']['rows']} rows).",
             ""]
    if any(s["server"] == "ours_rows_fix" for s in res["starts"]) or \
            (res.get("rerank") or {}).get("variant") == "ours_rows_fix":
        lines += ["\"Earlier run, rows fix as a bench-side patch\": stored results of an earlier run, made before "
                  "`corpus.ArrowCorpus.rows` read record batch by record batch (it used pyarrow `Table.take` over the "
                  "whole multi-chunk table, which failed at this size); that run replaced the method from the bench "
                  "with one that reads only the requested rows, as the server now does itself.", ""]
    lines += ["### Targets", "", "| metric | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r['value']} | {r['target']} | {yes(r['met'])} |" for r in res["targets"]]
    lines += ["", "### Start-up detail", "",
              "Cold: the index file, corpus.jsonl and our corpus.arrow were dropped from the page cache "
              "(posix_fadvise DONTNEED; the 'in page cache' column is `fincore` just before the start) and the "
              "Search-R1-style server's datasets cache was deleted; warm: as the run before left it. Order: cold "
              "Search-R1-style, then ours; warm ours, then Search-R1-style. First answer "
              "= time from the process start to the first /retrieve answer (polled every 0.5 s); all planted = one "
              "request with every planted query, after it. Peak RSS = VmHWM; anon/file = RssAnon/RssFile at the "
              "end (file-backed pages are the memory-mapped index and corpus, and the shared libraries: the kernel "
              "can drop them under pressure); mapped index / corpus = the resident pages of those files' mappings "
              "(/proc/PID/smaps; the Search-R1-style server's index is in anonymous memory, its corpus is datasets' "
              "arrow copy).", "",
              "| server | start | load (1 min) | index in page cache | first answer s | first correct answer s | "
              "all planted s | peak RSS | anon / file RSS at end | mapped index / corpus resident | planted top-1 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in res["starts"]:
        cached = "n/a" if s["index_in_page_cache_bytes"] is None else gib(s["index_in_page_cache_bytes"])
        load = f"{s['load_avg_1m']:.1f}" if "load_avg_1m" in s else "n/a"
        if "failed" in s:
            lines.append(f"| {VARIANT_LABEL[s['server']]} | {s['state']} | {load} | {cached} | failed to start: "
                         f"`{s['failed'][:300]}` | | | | | | |")
            continue
        m = s["memory"]
        lines.append(f"| {VARIANT_LABEL[s['server']]} | {s['state']} | {load} | {cached} | {s['first_answer_s']:.1f} | "
                     f"{s['first_correct_s']:.1f} | {s['all_planted_s']:.1f} | {gib(s['peak_rss'])} | "
                     f"{gib(m['RssAnon'])} / {gib(m['RssFile'])} | {resident(m, 'index')} / {resident(m, 'corpus')} "
                     f"| {s['planted_hit_rate']:.3f} |")
    corpus_bytes = res["import"]["corpus_arrow_bytes"]
    touched = max([sum(v for k, v in s["memory"].get("resident_files", {}).items() if "corpus.arrow" in k)
                   for s in res["starts"] if s["server"] == "ours" and "failed" not in s] or [0])
    if touched >= 0.9 * corpus_bytes:
        lines += ["", f"Ours holds {gib(touched)} of its {gib(corpus_bytes)} corpus.arrow resident after answering "
                      f"a few queries: more than the rows asked for were read."]
    io = res.get("io")
    if io:
        lines += ["", f"What bounds a start: the disk reads {io['disk_read_bytes'] / GIB:.1f} GiB of the index file "
                      f"(dropped from the page cache first) at {io['disk_read_gib_s']:.2f} GiB/s here, so reading the "
                      f"whole {gib(g['bytes'][FLAT])} index takes about {g['bytes'][FLAT] / GIB / io['disk_read_gib_s']:.0f}"
                      f" s, which a cold start of either server pays before its first correct answer; one exhaustive "
                      f"search of the Flat index for one query (memory-mapped, in page cache, in-process, "
                      f"{io['scan_threads']} FAISS thread(s), fastest of {len(io.get('flat_scans_s', [0]))}, load "
                      f"average {io.get('load_avg_1m', float('nan')):.1f}) takes {io['flat_scan_s']:.2f} s, which "
                      f"every first answer needs (a Flat index has no shortcut)."]
    rr = res.get("rerank")
    if rr:
        lines += ["", f"### Low-memory two-stage index: `{rr['factory']}` vs Flat ({VARIANT_LABEL[rr['variant']]})", "",
                  f"`build_index --index_factory {rr['factory']}` over the same vectors: {rr['build_s']:.0f} s "
                  f"with {res['args']['build_threads'] or 'all'} thread(s), trained on build_index's sample of "
                  f"min(N, 262,144) vectors (IVF65536's k-means would take hours on these 2 cores). Served with the "
                  f"defaults nprobe {rr['nprobe']}, {rr['rerank_candidates']} candidates re-ranked exactly against "
                  f"fp16 vectors memory-mapped from emb.fp16. Throughput: {res['args']['clients']} clients x "
                  f"{res['args']['per_request']} queries/request, then {res['args']['single_clients']} single-query "
                  f"clients ({res['args']['single_per_client']} requests each), distinct real questions "
                  f"(bench/retrieval.py's load generator), each server alone on the machine.", "",
                  "| index | on disk | peak RSS | anon / file RSS at end | mapped index / corpus resident | "
                  f"{res['args']['clients']}x{res['args']['per_request']} q/s (p99 ms) | "
                  f"{res['args']['single_clients']}x1 q/s (p99 ms) | planted top-1 |",
                  "|---|---|---|---|---|---|---|---|"]
        b = rr["index_bytes"]
        disk = {"flat": gib(b["flat"]), "rerank": f"{gib(b['rerank_faiss'])} + fp16 {gib(b['rerank_fp16'])}"}
        for name, label in (("flat", "Flat (imported)"), ("rerank", rr["factory"])):
            x = rr["servers"][name]
            if "failed" in x:
                lines.append(f"| {label} | {disk[name]} | failed to start: `{x['failed'][:300]}` | | | | | |")
                continue
            m = x["memory"]
            lines.append(f"| {label} | {disk[name]} | {gib(m['VmHWM'])} | {gib(m['RssAnon'])} / {gib(m['RssFile'])} "
                         f"| {resident(m, 'index')} / {resident(m, 'corpus')} | {x['batch']['qps']:.1f} "
                         f"({x['batch']['p99_ms']:.0f}) | {x['single']['qps']:.1f} ({x['single']['p99_ms']:.0f}) | "
                         f"{x['planted_hit_rate']:.3f} |")
        rec = rr["random_recall"]
        agree = rr.get("real_question_top3_agreement")
        lines += ["", f"Recall@3 vs Flat (reported, not a target): {rec['recall3']:.3f} on {rec['queries']} random "
                      f"unit-vector queries (in-process, load_index; the compressed first stage alone: "
                      f"{rec['first_stage_recall3']:.3f}). Uniformly random vectors have no cluster structure, so a "
                      f"query's true neighbours sit in lists far from it: IVF's worst case, unlike real MiniLM "
                      f"vectors, where tests/search/test_rerank_index.py measures >= 0.99."
                  + (f" Top-3 agreement with Flat on the real questions above: {agree:.3f} (their top-3 are "
                     f"mostly random rows too)." if agree is not None else "")]
        if rec.get("by_nprobe"):
            lines += ["", f"In-process by nprobe ({rr['rerank_candidates']} candidates; Flat: {rec['queries']} "
                          f"queries in {rec['flat_search_s']:.1f} s):", "",
                      "| nprobe | recall@3 vs Flat, random queries | planted top-1 | search s for the random queries |",
                      "|---|---|---|---|"]
            lines += [f"| {r['nprobe']} | {r['recall3']:.3f} | {r['planted_top1']:.3f} | {r['search_s']:.1f} |"
                      for r in rec["by_nprobe"]]
    lines += ["", f"Raw numbers: {json_name} (key \"{n}\")."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=5_000_000, help="passages")
    p.add_argument("--planted", type=int, default=64, help="planted real passages (= --import_check_rows)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (= build_index --seed)")
    p.add_argument("--data_dir", default="/work/scale_data", help="scratch data (corpus, indexes, datasets cache)")
    p.add_argument("--stages", default="startup,rerank",
                   help="comma list of: startup, rerank; or prepare (generate, import and build the '+rerank' index "
                        "only, e.g. while the machine is busy; nothing is measured or written)")
    p.add_argument("--starts", default="cold,warm", help="startup states, in order: cold, warm")
    p.add_argument("--ours_variants", default="ours",
                   help=f"our servers to start, comma list of {', '.join(OURS_VARIANTS)} (ours_transformers: "
                        "--encoder_backend transformers, the query encoder built through transformers)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch/FAISS threads of each server (0: $OMP_NUM_THREADS if set, else all cores)")
    p.add_argument("--build_threads", type=int, default=0, help="threads of the build_index runs (0: as above)")
    p.add_argument("--rerank_factory", default="auto",
                   help="'+rerank' factory; auto: IVF4096,PQ32+rerank from 2M passages, IVF1024 from 100k, else IVF64")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per_request", type=int, default=64)
    p.add_argument("--single_clients", type=int, default=32)
    p.add_argument("--single_per_client", type=int, default=2)
    p.add_argument("--recall_queries", type=int, default=200)
    p.add_argument("--nprobe_sweep", default="256,1024",
                   help="in-process recall / planted top-1 of the '+rerank' index at these nprobe values too")
    p.add_argument("--start_timeout_s", type=float, default=3600)
    p.add_argument("--out", default=str(RESULTS / "retrieval_scale.md"))
    p.add_argument("--json", default=str(RESULTS / "retrieval_scale.json"))
    p.add_argument("--section", default=None, help="markdown section name (default: retrieval_scale for 5M, "
                                                   "retrieval_scale_n<N> otherwise)")
    p.add_argument("--rerender", action="store_true",
                   help="recompute the targets and the markdown of the stored run for --n (--json) and write both")
    p.add_argument("--serve_sr1", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--index", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.stages = [s for s in a.stages.split(",") if s]
    a.starts = [s for s in a.starts.split(",") if s]
    a.nprobe_sweep = [int(x) for x in a.nprobe_sweep.split(",") if x]
    a.ours_variants = [s for s in a.ours_variants.split(",") if s]
    if not a.ours_variants or set(a.ours_variants) - set(OURS_VARIANTS):
        raise SystemExit(f"unknown --ours_variants {a.ours_variants}; choose from {list(OURS_VARIANTS)}")
    if set(a.stages) - {"startup", "rerank", "prepare"} or set(a.starts) - {"cold", "warm"}:
        raise SystemExit(f"unknown --stages {a.stages} or --starts {a.starts}")
    if a.threads == 0 and os.environ.get("OMP_NUM_THREADS"):
        a.threads = int(os.environ["OMP_NUM_THREADS"])
    if a.build_threads == 0:
        a.build_threads = a.threads
    return a


def run(a, argv: list[str] | None) -> dict:
    from stepsearch.data.io import write_json_atomic

    load_start = "/".join(f"{x:.1f}" for x in os.getloadavg())
    art = Path(a.data_dir) / f"n{a.n}_k{a.planted}_s{a.seed}"
    logs = art / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gen = generate(art, a.n, a.planted, a.seed)
    planted = json.loads((art / PLANTED).read_text())
    res = {"n": a.n, "dim": DIM, "planted": a.planted, "seed": a.seed, "threads": a.threads,
           "command": ("OMP_NUM_THREADS=" + os.environ["OMP_NUM_THREADS"] + " " if os.environ.get("OMP_NUM_THREADS")
                       else "") + ".venv/bin/python bench/retrieval_scale.py " +
                      " ".join(argv if argv is not None else sys.argv[1:]),
           "load_start": load_start, "generation": gen, "planted_own_cosine": planted["own_cosine"],
           "planted_rows": planted["rows"], "args": {k: v for k, v in vars(a).items() if not k.startswith("serve")}}
    res["import"] = import_ours(art, a.planted, a.seed, a.build_threads)
    if "prepare" in a.stages:
        build_rerank(art, a.n, a.rerank_factory if a.rerank_factory != "auto" else auto_factory(a.n), a.build_threads)
        return res
    # a stage not run now keeps its stored results (and their command), so stages can run at different times
    stored = json.loads(Path(a.json).read_text()).get(str(a.n), {}) if Path(a.json).is_file() else {}
    res["starts"], res["starts_command"] = stored.get("starts", []), stored.get("starts_command")
    if stored.get("io"):
        res["io"] = stored["io"]
    if "rerank" not in a.stages and stored.get("rerank"):
        res["rerank"], res["rerank_command"] = stored["rerank"], stored.get("rerank_command")
    if "startup" in a.stages:
        res["io"] = disk_and_scan(art, a.threads)
        res["starts"], res["starts_command"] = startup_section(art, planted, a, logs), res["command"]
        res["machine"] = machine_line()
        report(res, a)  # a checkpoint: the start-up results survive a failure in the rerank stage
    if "rerank" in a.stages:
        res["rerank"], res["rerank_command"] = rerank_section(art, a.n, planted, a, logs), res["command"]
    res["machine"] = machine_line()
    return report(res, a)


def report(res: dict, a) -> dict:
    """Targets into `res`, `res` into the JSON (key N), the markdown section into --out."""
    from stepsearch.data.io import write_json_atomic

    res["targets"] = targets(res)
    json_path = Path(a.json)
    old = json.loads(json_path.read_text()) if json_path.is_file() else {}
    write_json_atomic(json_path, {**old, str(a.n): res})
    if res["starts"] or res.get("rerank"):
        section = a.section or ("retrieval_scale" if a.n == 5_000_000 else f"retrieval_scale_n{a.n}")
        text = markdown(res, str(json_path.resolve().relative_to(REPO)) if json_path.resolve().is_relative_to(REPO)
                        else str(json_path))
        write_section(Path(a.out), section, text)
        print(text)
    return res


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.rerender:
        report(json.loads(Path(a.json).read_text())[str(a.n)], a)
        return 0
    if a.serve_sr1:
        serve_sr1(a.corpus, a.index, a.port, a.threads)
        return 0
    run(a, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
