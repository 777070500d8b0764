"""Throughput of the data pipeline on real records (CPU): convert MuSiQue -> parquet, build the corpus, run the
checker, and convert a full FlashRAG dev set. The 100 bundled MuSiQue records are replicated with fresh ids to
reach --copies x 100 rows (their paragraphs then dedup to the same 1890 passages).

    .venv/bin/python bench/data_pipeline.py --copies 50 --flashrag /work/shared/data/2wikimultihopqa/flashrag_format/dev.jsonl
"""
import argparse
import json
import os
import platform
import tempfile
import time

from stepsearch.data.conversions import EvalSetConfig, MusiConfig, build_musi, build_test_set
from stepsearch.data.check import run_check
from stepsearch.data.training_corpus import build_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "samples", "musique_ans_train_100.json")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=50)
    ap.add_argument("--flashrag", default=os.path.join(REPO, "data", "samples", "2wiki_flashrag_dev_200.jsonl"))
    a = ap.parse_args()
    records = json.load(open(SAMPLE))
    with tempfile.TemporaryDirectory() as d:
        big = os.path.join(d, "musique_big.jsonl")
        with open(big, "w") as f:
            for c in range(a.copies):
                for r in records:
                    f.write(json.dumps({**r, "id": f"{r['id']}__copy{c}"}) + "\n")
        n = a.copies * len(records)
        (out, _), t_conv = timed(lambda: build_musi(MusiConfig(local_dir=d, input=big)))
        stats, t_corpus = timed(lambda: build_corpus([big], os.path.join(d, "musi.jsonl")))
        (reports, summary, _), t_check = timed(lambda: run_check(out, os.path.join(d, "musi.jsonl")))
        (qa_out, qa_stats), t_qa = timed(lambda: build_test_set(EvalSetConfig(input=a.flashrag, dataset="2wikimultihopqa",
                                                                             local_dir=d)))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)")
    print("| step | items | seconds | items/s |\n|---|---|---|---|")
    print(f"| musi_search (original MuSiQue -> parquet) | {n} rows | {t_conv:.2f} | {n / t_conv:.0f} |")
    print(f"| build_corpus ({stats.paragraphs_read} paragraphs -> {stats.passages_written}) | {stats.paragraphs_read} paragraphs | {t_corpus:.2f} | {stats.paragraphs_read / t_corpus:.0f} |")
    print(f"| check ({sum(summary.docs.values())} support docs) | {n} rows | {t_check:.2f} | {n / t_check:.0f} |")
    print(f"| qa_test_sets (FlashRAG) | {qa_stats.kept} rows | {t_qa:.2f} | {qa_stats.kept / t_qa:.0f} |")


if __name__ == "__main__":
    main()
