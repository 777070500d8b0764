"""Loopback load test: 16 clients x 500 requests against the real server, 0 errors, p99 reported."""
import asyncio
import json
import random
import time

import httpx
import numpy as np
import pytest

from stepsearch.search.corpus import iter_passages

N_CLIENTS, N_REQUESTS = 16, 500


async def client_loop(url: str, queries: list[str], seed: int, latencies: list, errors: list) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=60) as http:
        for _ in range(N_REQUESTS):
            body = {"queries": [rng.choice(queries)], "topk": 3, "return_scores": True}
            t0 = time.perf_counter()
            try:
                resp = await http.post(url + "/retrieve", json=body)
                ok = resp.status_code == 200 and len(resp.json()["result"][0]) == 3
            except httpx.HTTPError as exc:
                ok, resp = False, exc
            latencies.append((time.perf_counter() - t0) * 1000)
            if not ok:
                errors.append(str(resp))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_16_clients_x_500_requests_no_errors(retrieval_url, tmp_path):
    # A realistic mix: titles (repeat, so partly cached) plus real multi-hop questions.
    queries = sorted({p.title for p in iter_passages("data/samples/wiki18_sample_1000.jsonl")})
    queries += [json.loads(line)["question"] for line in open("data/samples/bamboogle_test.jsonl")]
    latencies: list[float] = []
    errors: list[str] = []

    async def run():
        await asyncio.gather(*(client_loop(retrieval_url, queries, seed, latencies, errors)
                               for seed in range(N_CLIENTS)))

    t0 = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies)
    stats = httpx.get(retrieval_url + "/stats").json()
    print(f"\nload test: {N_CLIENTS} clients x {N_REQUESTS} requests in {wall:.1f}s "
          f"({len(lat) / wall:.0f} req/s), errors {len(errors)}, latency ms p50 {np.percentile(lat, 50):.1f} "
          f"p99 {np.percentile(lat, 99):.1f} max {lat.max():.1f}; server cache hit rate "
          f"{stats['cache']['hit_rate']:.2f}, mean batch {stats['batch_sizes'].get('mean', 0):.1f}")
    assert len(lat) == N_CLIENTS * N_REQUESTS
    assert errors == []
