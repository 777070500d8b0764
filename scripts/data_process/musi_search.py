"""MuSiQue -> StepSearch training/validation parquet (seed format; docs/method.md §4.3).

Accepts the released StepSearch JSONL (`question`, `final_answer`, `answer_aliases`, `sub_searchs`,
`sub_support_docs`) or original MuSiQue JSON/JSONL (`paragraphs`, `question_decomposition` with `#k`
references, `answer`, `answer_aliases`, `answerable`); the format is detected per record.

    python scripts/data_process/musi_search.py --local_dir data/musi                  # -> musi_answerable_train.parquet
    python scripts/data_process/musi_search.py --local_dir data/musi --test           # -> musi_answerable_test.parquet
    python scripts/data_process/musi_search.py --local_dir data/musi --input musique_ans_v1.0_train.jsonl
"""
import argparse
import logging
import sys

from stepsearch.data.conversions import DEFAULT_SAVE_NAME, MusiConfig, build_musi
from stepsearch.data.io import DataError
from stepsearch.data.prompts import TEMPLATES


def parse_args(argv=None) -> MusiConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local_dir", required=True, help="output folder (and default input folder)")
    ap.add_argument("--input", help="input JSON/JSONL (default: {local_dir}/musi_answerable_{train|dev}.jsonl)")
    ap.add_argument("--test", action="store_true", help="validation split: reads the dev file, writes *_test.parquet")
    ap.add_argument("--save_name", default=DEFAULT_SAVE_NAME, help="output file = {save_name}_{train|test}[_{N}].parquet")
    ap.add_argument("--template", default="paper", choices=sorted(TEMPLATES), help="prompt template (docs/data.md)")
    ap.add_argument("--sample_num", type=int, help="keep a seeded random subset of N rows")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--data_source", default="musi")
    ap.add_argument("--answer_name", default="final_answer", help="answer field of the released JSONL")
    ap.add_argument("--drop_evidence", action="store_true",
                    help="empty search_keys/support_docs (the released --test behaviour); by default they are kept")
    ap.add_argument("--renumber_ids", action="store_true",
                    help="ids musi_{split}_{i} (the released script's naming) instead of the input's ids")
    a = ap.parse_args(argv)
    return MusiConfig(local_dir=a.local_dir, input=a.input, test=a.test, save_name=a.save_name, template=a.template,
                      sample_num=a.sample_num, seed=a.seed, data_source=a.data_source, answer_field=a.answer_name,
                      drop_evidence=a.drop_evidence, renumber_ids=a.renumber_ids)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out, stats = build_musi(parse_args(argv))
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"read {stats.read} records, skipped {stats.skipped_unanswerable} unanswerable, wrote {stats.kept} rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
