"""Evaluation sets -> parquet: HotpotQA, 2WikiMultihopQA, MuSiQue, Bamboogle (and NQ / TriviaQA / PopQA),
from FlashRAG JSONL (`id`, `question`, `golden_answers`) or the original formats (SPEC.md §4.4). Deterministic:
the same input gives the same rows in the same order.

    python scripts/data_process/qa_test_sets.py --local_dir data/eval \\
        --input hotpotqa:data/samples/hotpotqa_flashrag_dev_200.jsonl --input bamboogle:data/samples/bamboogle_test.jsonl
    # writes data/eval/hotpotqa_test.parquet and data/eval/bamboogle_test.parquet
"""
import argparse
import logging
import sys

from stepsearch.data.build import EvalSetConfig, build_test_set
from stepsearch.data.io import DataError
from stepsearch.data.qa_sets import DATASETS, guess_dataset


def parse_inputs(specs: list[str]) -> list[tuple[str, str]]:
    """'dataset:path' (or a bare path whose file name starts with a dataset name) -> (dataset, path)."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition(":")
        if not sep or name not in DATASETS:
            name, path = guess_dataset(spec), spec
            if name is None:
                raise SystemExit(f"error: --input {spec!r}: write DATASET:PATH with DATASET in {list(DATASETS)}")
        out.append((name, path))
    return out


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local_dir", required=True, help="output folder")
    ap.add_argument("--input", action="append", required=True, help="DATASET:PATH, repeatable")
    ap.add_argument("--template", default="paper", choices=["paper", "released"])
    ap.add_argument("--split", default="test")
    ap.add_argument("--keep_evidence", action="store_true", help="keep support docs (original formats) in the rows")
    ap.add_argument("--sample_num", type=int)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args(argv)
    for dataset, path in parse_inputs(a.input):
        cfg = EvalSetConfig(input=path, dataset=dataset, local_dir=a.local_dir, template=a.template, split=a.split,
                            keep_evidence=a.keep_evidence, sample_num=a.sample_num, seed=a.seed)
        try:
            out, stats = build_test_set(cfg)
        except (DataError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{dataset}: read {stats.read}, skipped {stats.skipped_unanswerable} unanswerable, wrote {stats.kept} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
