"""Retrieval demo: build (or reuse) a MiniLM index over a bundled real wiki-18 sample, start Redis and the
retrieval server on loopback, send the sub-queries of a few real Bamboogle multi-hop questions, print the top hits,
then stop everything it started.

    .venv/bin/python scripts/retrieval_demo.py [--corpus data/samples/wiki18_bamboogle_passages.jsonl]
        [--index_dir data/cache/demo_index] [--topk 3] [--questions 4]

The default corpus holds the wiki-18 passages that e5 retrieved for Bamboogle in Search-R1's traces, so the
sub-queries below have real answers in it; `--corpus data/samples/wiki18_sample_1000.jsonl` works too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Sub-queries an agent would issue for the first Bamboogle questions (decomposed by hand for the demo).
SUB_QUERIES = {
    "test_0": ["year Citibank was founded", "president of the United States in 1812"],
    "test_1": ["first spacecraft to approach Uranus", "Voyager 2 launch rocket"],
    "test_2": ["company founded as Sound of Music", "Best Buy added to the S&P 500"],
    "test_3": ["most populous city in the United States", "first African American mayor of New York City"],
    "test_4": ["last monarch of the House of Hanover in Britain", "William IV death date"],
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=str(REPO / "data/samples/wiki18_bamboogle_passages.jsonl"))
    p.add_argument("--index_dir", default=str(REPO / "data/cache/demo_index"))
    p.add_argument("--questions", type=int, default=4, help="how many Bamboogle questions to run")
    p.add_argument("--topk", type=int, default=3)
    return p.parse_args()


def ensure_index(corpus: str, index_dir: str) -> None:
    from stepsearch.search.build_index import BuildConfig, build_index
    from stepsearch.search.index import IndexLoadError, check_corpus, read_manifest

    try:
        manifest = read_manifest(index_dir)
        check_corpus(manifest, corpus)
        if Path(manifest["corpus"]["path"]) != Path(corpus).resolve():
            raise IndexLoadError("index was built from another corpus")
        print(f"[demo] reusing the index at {index_dir} ({manifest['num_passages']} passages)")
    except IndexLoadError as why:
        print(f"[demo] building a MiniLM index over {corpus} ({why})")
        build_index(BuildConfig(corpus=corpus, out=index_dir, method="dense"))


def main() -> int:
    args = parse_args()
    from stepsearch.search.client import RetrievalClient
    from stepsearch.search.testing import start_redis, start_retrieval_server

    ensure_index(args.corpus, args.index_dir)
    questions = [json.loads(line) for line in open(REPO / "data/samples/bamboogle_test.jsonl")]
    questions = [q for q in questions if q["id"] in SUB_QUERIES][: args.questions]
    redis = server = None
    try:
        redis = start_redis()
        print(f"[demo] redis at {redis.url}; starting the retrieval server ...")
        server = start_retrieval_server(args.index_dir, redis.url)
        print(f"[demo] retrieval server at {server.url}/retrieve")
        client = RetrievalClient(server.url)
        for q in questions:
            print(f"\nQ: {q['question']}  (gold: {', '.join(q['golden_answers'])})")
            subs = SUB_QUERIES[q["id"]]
            t0 = time.perf_counter()
            for sub, hits in zip(subs, client.retrieve(subs, topk=args.topk)):
                print(f"  <search> {sub} </search>")
                for rank, hit in enumerate(hits, start=1):
                    doc = hit["document"]
                    print(f"    {rank}. [{hit['score']:.3f}] {doc['title']}: {doc['text'][:110]}...")
            print(f"  ({(time.perf_counter() - t0) * 1000:.0f} ms)")
        client.retrieve([s for q in questions for s in SUB_QUERIES[q["id"]]], topk=args.topk)  # again: cached
        import httpx

        stats = httpx.get(server.url + "/stats").json()
        print(f"\n[demo] server stats: {stats['requests']} requests, cache {stats['cache']}, "
              f"latency p50 {stats['latency_ms'].get('p50', 0):.1f} ms")
    finally:
        if server is not None:
            server.stop()
        if redis is not None:
            redis.stop()
        print("[demo] stopped the server and Redis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
