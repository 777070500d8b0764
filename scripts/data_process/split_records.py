"""Seeded train / validation / test split of MuSiQue-style records, e.g. for the real-model run (docs/real_model.md).

    python scripts/data_process/split_records.py --input data/samples/musique_ans_train_100.json \\
        --input data/samples/musique_full_train_first100.jsonl --out runs/real/split --sizes 100,20,30

Unanswerable records (`"answerable": false`) are dropped and records are deduplicated on `id` (the first one kept);
the rest are shuffled with --seed and cut into train.jsonl, val.jsonl and test.jsonl (written atomically), so no
question is in two splits. A record count smaller than the sum of --sizes is an error.
"""
import argparse
import os
import random
import sys

from stepsearch.data.io import DataError, iter_records, write_jsonl_atomic

SPLITS = ("train", "val", "test")


def split_records(inputs: list[str], sizes: tuple[int, int, int], seed: int) -> dict[str, list[dict]]:
    """{split: records}: the answerable records of `inputs`, unique by id, shuffled with `seed`, cut by `sizes`."""
    records, seen = [], set()
    for path in inputs:
        for loc in iter_records(path, show_progress=False):
            rid = loc.record.get("id")
            if rid is None:
                raise DataError(f"{loc.where}: record without an 'id'")
            if loc.record.get("answerable", True) is False or rid in seen:
                continue
            seen.add(rid)
            records.append(loc.record)
    if len(records) < sum(sizes):
        raise DataError(f"{', '.join(inputs)}: {len(records)} answerable records with distinct ids, fewer than the "
                        f"{sum(sizes)} that --sizes {','.join(map(str, sizes))} asks for")
    random.Random(seed).shuffle(records)
    out, start = {}, 0
    for name, n in zip(SPLITS, sizes):
        out[name] = records[start:start + n]
        start += n
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", action="append", required=True, help="MuSiQue JSON/JSONL; repeatable")
    ap.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl, test.jsonl")
    ap.add_argument("--sizes", default="100,20,30", help="train,val,test record counts")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        sizes = tuple(int(s) for s in a.sizes.split(","))
        if len(sizes) != 3 or min(sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --sizes {a.sizes!r}: expected three positive counts train,val,test", file=sys.stderr)
        return 2
    try:
        splits = split_records(a.input, sizes, a.seed)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl_atomic(os.path.join(a.out, f"{name}.jsonl"), rows)
    print(" ".join(f"{name} {len(rows)}" for name, rows in splits.items()) + f" records -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
