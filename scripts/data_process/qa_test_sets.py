"""Evaluation sets -> parquet: HotpotQA, 2WikiMultihopQA, MuSiQue, Bamboogle (and NQ / TriviaQA / PopQA),
from FlashRAG JSONL (`id`, `question`, `golden_answers`), the original formats, or any plain JSON / JSONL / CSV
set whose fields you name. Deterministic: the same input gives the same rows in the same order.

    python scripts/data_process/qa_test_sets.py --local_dir data/eval \\
        --input hotpotqa:data/samples/hotpotqa_flashrag_dev_200.jsonl --input bamboogle:data/samples/bamboogle_test.jsonl
    # writes data/eval/hotpotqa_test.parquet and data/eval/bamboogle_test.parquet

Named fields (docs/data.md "Named fields"), for every input, or per input after a third ':':

    --input bamboogle:bamboogle.json --question_field Question --answer_field Answer
    --input bamboogle:bamboogle.json:question=Question,answer=Answer,decomposition=Decomposition
"""
import argparse
import logging
import sys

from stepsearch.data.conversions import EvalSetConfig, build_test_set
from stepsearch.data.io import DataError
from stepsearch.data.qa_sets import DATASETS, FieldMap, guess_dataset


def parse_inputs(specs: list[str]) -> list[tuple[str, str, FieldMap | None]]:
    """'dataset:path[:key=field,...]' (or a bare path whose file name starts with a dataset name)
    -> (dataset, path, the input's own FieldMap or None)."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition(":")
        if not sep or name not in DATASETS:
            name, path = guess_dataset(spec), spec
            if name is None:
                raise SystemExit(f"error: --input {spec!r}: write DATASET:PATH with DATASET in {list(DATASETS)}")
        fields = None
        head, sep, mapping = path.rpartition(":")
        if sep and "=" in mapping:
            try:
                fields = FieldMap.parse(mapping, f"--input {spec!r}")
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
            path = head
        out.append((name, path, fields))
    return out


def global_fields(a: argparse.Namespace) -> FieldMap | None:
    """The FieldMap of --question_field/--answer_field/--id_field/--decomposition_field, or None if none given."""
    named = {"question": a.question_field, "answer": a.answer_field, "id": a.id_field}
    kw = {k: v for k, v in named.items() if v}
    if a.decomposition_field:
        kw["decomposition"] = tuple(f for spec in a.decomposition_field for f in spec.split("+") if f)
    return FieldMap(**kw) if kw else None


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local_dir", required=True, help="output folder")
    ap.add_argument("--input", action="append", required=True,
                    help="DATASET:PATH, or DATASET:PATH:question=Q,answer=A[,id=I][,decomposition=D1+D2]; repeatable")
    ap.add_argument("--question_field", help="field (or CSV column) holding the question, for every input")
    ap.add_argument("--answer_field", help="field holding the answer: a str or a list of str")
    ap.add_argument("--id_field", help="field holding the record id (default: 'id'/'idx', else the position)")
    ap.add_argument("--decomposition_field", action="append",
                    help="field(s) holding the sub-questions, in hop order (F1+F2 or repeat the flag); they become "
                         "search keys, kept in the rows")
    ap.add_argument("--template", default="paper", choices=["paper", "released"])
    ap.add_argument("--split", default="test")
    ap.add_argument("--keep_evidence", action="store_true", help="keep support docs (original formats) in the rows")
    ap.add_argument("--sample_num", type=int)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args(argv)
    shared = global_fields(a)
    for dataset, path, own in parse_inputs(a.input):
        fields = own or shared
        keep = a.keep_evidence or bool(fields and fields.decomposition)  # named sub-questions are asked for keys
        cfg = EvalSetConfig(input=path, dataset=dataset, local_dir=a.local_dir, template=a.template, split=a.split,
                            keep_evidence=keep, sample_num=a.sample_num, seed=a.seed, fields=fields)
        try:
            out, stats = build_test_set(cfg)
        except (DataError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{dataset}: read {stats.read}, skipped {stats.skipped_unanswerable} unanswerable, wrote {stats.kept} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
