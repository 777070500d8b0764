"""`python -m stepsearch.eval`: see stepsearch/eval/harness.py for what it writes."""
from __future__ import annotations

import argparse
import json
import logging

from stepsearch.eval.harness import EvalConfig, RetrievalFailuresExceeded, evaluate, rescore
from stepsearch.eval.metrics import markdown_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Greedy multi-turn evaluation with EM / F1 / cover-EM per data_source")
    p.add_argument("--data", nargs="+", default=[], help="parquet test set(s) in the seed format")
    p.add_argument("--model", help="HF folder of the policy (model + tokenizer)")
    p.add_argument("--retriever_url", help="retrieval server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--from-predictions", dest="from_predictions", help="re-score this predictions JSONL; no generation")
    p.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm", "scripted"))
    p.add_argument("--mode", default="auto", choices=("auto", "sync", "async"),
                   help="agent loop: auto = async on vllm (its async engine), sync otherwise")
    p.add_argument("--scripted_copy_prob", type=float, default=1.0, help="backend=scripted: P(copy the right doc)")
    p.add_argument("--max_response_length", type=int, default=EvalConfig.max_response_length)
    p.add_argument("--batch_size", type=int, default=EvalConfig.batch_size)
    p.add_argument("--max_prompt_length", type=int, default=EvalConfig.max_prompt_length)
    p.add_argument("--max_turns", type=int, default=EvalConfig.max_turns)
    p.add_argument("--topk", type=int, default=EvalConfig.topk)
    p.add_argument("--max_new_tokens", type=int, default=EvalConfig.max_new_tokens, help="new tokens per turn")
    p.add_argument("--max_obs_length", type=int, default=EvalConfig.max_obs_length)
    p.add_argument("--max_context_length", type=int, default=EvalConfig.max_context_length,
                   help="rolling context fed to the engine each turn (left-truncated beyond it)")
    p.add_argument("--engine_kwargs", type=json.loads, default={},
                   help='vLLM engine arguments as JSON, e.g. \'{"dtype": "float32", "kv_cache_memory_bytes": 4294967296}\'')
    p.add_argument("--max_samples", type=int, default=-1, help="first N rows of each file (-1: all)")
    p.add_argument("--index_dir", help="index folder, to record the manifest hash (else the server's identity)")
    p.add_argument("--seed", type=int, default=EvalConfig.seed)
    p.add_argument("--max_retrieval_failures", type=int, default=EvalConfig.max_retrieval_failures,
                   help="questions whose rollout had a failed retrieval (after the client's retries) that the run "
                        "tolerates; past it generation stops and the command exits 1 (default 0: any failure)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the CLI; returns the summary. Exits 1 (SystemExit with the reason) past --max_retrieval_failures."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    a = parse_args(argv)
    try:
        summary = _run(a)
    except RetrievalFailuresExceeded as err:
        raise SystemExit(str(err)) from None
    print(markdown_table(summary["per_source"]))
    print(json.dumps({"out": a.out, "all": summary["per_source"]["all"]}))
    return summary


def _run(a: argparse.Namespace) -> dict:
    if a.from_predictions:
        return rescore(a.from_predictions, a.out, max_retrieval_failures=a.max_retrieval_failures)
    missing = [n for n in ("data", "model", "retriever_url") if not getattr(a, n)]
    if missing:
        raise SystemExit(f"[eval] missing --{', --'.join(missing)} (or pass --from-predictions FILE)")
    cfg = EvalConfig(data=tuple(a.data), model=a.model, retriever_url=a.retriever_url, out=a.out,
                     backend=a.backend, mode=a.mode, batch_size=a.batch_size, max_prompt_length=a.max_prompt_length,
                     max_turns=a.max_turns, topk=a.topk, max_new_tokens=a.max_new_tokens,
                     max_obs_length=a.max_obs_length, max_context_length=a.max_context_length,
                     engine_kwargs=a.engine_kwargs, max_samples=a.max_samples, index_dir=a.index_dir,
                     seed=a.seed, scripted_copy_prob=a.scripted_copy_prob,
                     max_response_length=a.max_response_length, max_retrieval_failures=a.max_retrieval_failures)
    return evaluate(cfg)


if __name__ == "__main__":
    main()
