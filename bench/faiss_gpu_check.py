"""FAISS's GPU build behind the retriever's `--faiss_gpu` (gpu_index.to_faiss_gpus), for a lent GPU machine.

For Flat, IVF-Flat and IVF-PQ over random unit vectors, each index moved to the GPU(s) (rows sharded and
replicated, fp16 and fp32 storage) is searched with the same queries as the CPU index it came from: top-k agreement
with the CPU results, queries/s at one batch, and which path `gpu_index.gpu_search_backend` picks.

    GPU_CHECKS=faiss bash scripts/gpu_checks.sh OUT     (the faiss-gpu-cu12 wheel in .whl-faiss/)
    python bench/faiss_gpu_check.py --out OUT/faiss_gpu.json [--n 1000000] [--dim 384]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FACTORIES = ("Flat", "IVF1024,Flat", "IVF1024,PQ32")
SETTINGS = (("shard", "fp16"), ("shard", "fp32"), ("replicate", "fp16"))


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed_search(index, xq: np.ndarray, k: int, repeats: int = 3) -> tuple[np.ndarray, float]:
    """(ids (Q, k), best queries/s over `repeats` searches of the whole batch)."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = index.search(xq, k)
        best = max(best, len(xq) / (time.perf_counter() - t0))
    return ids, best


def main() -> int:
    import faiss

    from stepsearch.search.gpu_index import faiss_gpu_count, gpu_search_backend, to_faiss_gpus
    from stepsearch.search.rerank import recall_at_k, set_nprobe

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=64)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    xb, xq = unit_rows(rng, a.n, a.dim), unit_rows(rng, a.queries, a.dim)
    res = {"faiss": faiss.__version__, "gpus": faiss_gpu_count(), "backend": gpu_search_backend(), "n": a.n,
           "dim": a.dim, "queries": a.queries, "k": a.k, "nprobe": a.nprobe, "runs": []}
    print(f"[faiss-gpu] FAISS {res['faiss']}, {res['gpus']} GPU(s), --faiss_gpu path: {res['backend']}", flush=True)
    for factory in FACTORIES:
        cpu = faiss.index_factory(a.dim, factory, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        if not cpu.is_trained:
            cpu.train(xb[:min(a.n, 256 * 1024)])
        cpu.add(xb)
        set_nprobe(cpu, a.nprobe)
        ref, cpu_qps = timed_search(cpu, xq, a.k, repeats=1)
        row = {"factory": factory, "build_s": time.perf_counter() - t0, "cpu_qps": cpu_qps, "gpu": []}
        for layout, storage in SETTINGS:
            try:
                gpu = to_faiss_gpus(cpu, storage=storage, shard=layout == "shard")
                ids, qps = timed_search(gpu, xq, a.k)
                row["gpu"].append({"layout": layout, "storage": storage, "qps": qps,
                                   "agreement_with_cpu": recall_at_k(ids, ref)})
                del gpu
            except Exception as exc:  # recorded, and the other settings still run
                row["gpu"].append({"layout": layout, "storage": storage, "error": f"{type(exc).__name__}: {exc}"})
            print(f"[faiss-gpu] {factory}: {row['gpu'][-1]}", flush=True)
        res["runs"].append(row)
    from stepsearch.data.io import write_json_atomic

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(a.out), res)
    return 0 if all("error" not in g for r in res["runs"] for g in r["gpu"]) and res["backend"] == "faiss" else 1


if __name__ == "__main__":
    sys.exit(main())
