"""Build bench/RESULTS.md from the per-benchmark sections in bench/results/*.md.

Each benchmark writes its own section (with the command that produced it) to bench/results/<name>.md, so
benchmarks can be rerun one at a time; this script joins them in a fixed order. Run: python bench/collect_results.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepsearch.data.io import write_text_atomic  # noqa: E402

ORDER = ["retrieval", "retrieval_serve_bf16", "retrieval_serve_avx2cap", "retrieval_serve_avx2strict",
         "retrieval_serve_avx2", "retrieval_load", "retrieval_scale", "retrieval_scale_xeon", "rewards", "rollout", "rollout_real", "rollout_async",
         "rollout_async_real", "core_algos", "packing", "packing_real", "ppo_step",
         "credit_assignment", "data_pipeline", "gpu_smoke", "gpu_server", "gpu_train_check"]

HEADER = """# Benchmark results

Every number here was measured side by side in one run, on the machine named in each section, by the command
given with it. Targets are ratios (ours against a reference run in the same process or on the same machine),
never absolute times. Sections are produced by the benchmarks themselves into `bench/results/<name>.md`;
`python bench/collect_results.py` joins them into this file.

"""


def main() -> None:
    here = Path(__file__).resolve().parent
    sections = {p.stem: p for p in (here / "results").glob("*.md")}
    names = [n for n in ORDER if n in sections] + sorted(set(sections) - set(ORDER))
    toc = "\n".join(f"- [{n}](#{n.replace('_', '-')}) (`bench/results/{n}.md`)" for n in names)
    body = "\n\n".join(sections[n].read_text().strip() for n in names)
    out = here / "RESULTS.md"
    write_text_atomic(out, HEADER + toc + "\n\n" + body + "\n")
    print(f"wrote {out} ({len(names)} sections)")


if __name__ == "__main__":
    main()
