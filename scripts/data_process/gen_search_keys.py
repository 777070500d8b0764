"""Generate search keys as in the paper's data pipeline (docs/method.md §4.1): an LLM behind any OpenAI-compatible
chat endpoint rewrites each sub-question into N queries; a query is kept only if at least ceil(M/2) of the M
retrieval sources return a valid hit for it (the hit contains the sub-answer or is a support doc).

    vllm serve Qwen/Qwen2.5-7B-Instruct --port 8001 &
    python scripts/data_process/gen_search_keys.py --input musique_ans_v1.0_train.jsonl \\
        --corpus data/musi/musi.jsonl --source bm25 --source dense --source http://127.0.0.1:8000/retrieve \\
        --base_url http://127.0.0.1:8001/v1 --model Qwen/Qwen2.5-7B-Instruct --output data/musi/musi_answerable_train.parquet

Resumable: finished rows go to OUTPUT.progress.jsonl and LLM answers to OUTPUT.llm_cache.jsonl; re-run the same
command to continue. The decomposition-based keys of musi_search.py stay the offline default.
"""
import argparse
import json
import logging
import sys

from stepsearch.data.conversions import write_examples
from stepsearch.data.training_corpus import load_corpus_pairs
from stepsearch.data.formats import read_rows_parquet, write_rows_parquet
from stepsearch.data.io import DataError, iter_records
from stepsearch.data.musique import convert_musique
from stepsearch.data.search_keys import (BM25Source, DenseSource, HTTPSource, KeyGenConfig, generate_keys,
                                         keys_summary, row_to_example)


def build_sources(specs: list[str], corpus: str | None):
    passages = [(t, x) for _, t, x in load_corpus_pairs(corpus)] if corpus else None
    sources = []
    for spec in specs:
        if spec.startswith("http://") or spec.startswith("https://"):
            sources.append(HTTPSource(spec))
        elif spec in ("bm25", "dense"):
            if passages is None:
                raise SystemExit(f"error: --source {spec} needs --corpus CORPUS.jsonl")
            sources.append(BM25Source(passages) if spec == "bm25" else DenseSource(passages))
        else:
            raise SystemExit(f"error: --source {spec!r}: use bm25, dense or a /retrieve URL")
    return sources


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="original MuSiQue / released JSONL, or a dataset parquet")
    ap.add_argument("--output", required=True, help="parquet with the generated keys")
    ap.add_argument("--corpus", help="corpus JSONL for the in-process bm25/dense sources")
    ap.add_argument("--source", action="append", default=[], help="bm25 | dense | URL of a /retrieve server; repeatable")
    ap.add_argument("--base_url", required=True, help="OpenAI-compatible API root, e.g. http://127.0.0.1:8001/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--api_key")
    ap.add_argument("--n_queries", type=int, default=3)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--min_votes", type=int, help="default ceil(M/2)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep_decomposition_key", action="store_true")
    ap.add_argument("--template", default="paper", choices=["paper", "released"], help="for JSON inputs")
    ap.add_argument("--data_source", default="musi")
    ap.add_argument("--split", default="train")
    a = ap.parse_args(argv)
    if not a.source:
        a.source = ["bm25", "dense"]
    cfg = KeyGenConfig(base_url=a.base_url, model=a.model, n_queries=a.n_queries, topk=a.topk, min_votes=a.min_votes,
                       concurrency=a.concurrency, temperature=a.temperature, seed=a.seed, api_key=a.api_key,
                       keep_decomposition_key=a.keep_decomposition_key)
    try:
        rows = read_rows_parquet(a.input) if a.input.endswith(".parquet") else None
        if rows is not None:
            examples = [row_to_example(r, f"{a.input}:row {i}") for i, r in enumerate(rows)]
        else:
            examples, _ = convert_musique(iter_records(a.input), a.split)
        if not examples:
            raise DataError(f"{a.input}: no usable questions (every record was skipped as unanswerable)")
        sources = build_sources(a.source, a.corpus)
        new, stats = generate_keys(examples, sources, cfg, a.output + ".progress.jsonl", a.output + ".llm_cache.jsonl")
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rows is not None:
        for row, ex in zip(rows, new):
            row["reward_model"]["ground_truth"]["search_keys"] = [list(g) for g in ex.search_keys]
        write_rows_parquet(rows, a.output)
    else:
        write_examples(new, a.output, a.data_source, a.split, a.template, keep_evidence=True)
    print(json.dumps(keys_summary(stats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
