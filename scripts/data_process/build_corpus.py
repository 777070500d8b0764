"""MuSiQue paragraphs -> retrieval corpus JSONL `{"id", "title", "text", "contents"}` (deduplicated on
title+text, content-derived stable ids), so that support docs are exactly corpus passages.

    python scripts/data_process/build_corpus.py --input musique_ans_v1.0_train.jsonl --input musique_ans_v1.0_dev.jsonl \\
        --output data/musi/musi.jsonl
Inputs may be original MuSiQue JSON/JSONL, the released StepSearch JSONL, or dataset parquets of this package.
"""
import argparse
import sys

from stepsearch.data.training_corpus import build_corpus
from stepsearch.data.io import DataError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", action="append", required=True, help="repeatable")
    ap.add_argument("--output", required=True, help="corpus JSONL to write (atomically)")
    ap.add_argument("--supporting_only", action="store_true", help="only supporting paragraphs (default: all)")
    ap.add_argument("--id_prefix", default="musi")
    a = ap.parse_args(argv)
    try:
        stats = build_corpus(a.input, a.output, a.supporting_only, a.id_prefix)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"read {stats.paragraphs_read} paragraphs, dropped {stats.duplicates} duplicates, "
          f"wrote {stats.passages_written} passages -> {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
