"""The demo's closing note: EM / F1 on held-out questions before and after RL, and the wall time.

    python -m stepsearch.envs.demo_summary --out runs/demo --wall_s 812
"""
from __future__ import annotations

import argparse
import json
import os

from stepsearch.data.io import write_json_atomic


def load_summary(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; the evaluation step of the demo did not finish")
    with open(path) as f:
        return json.load(f)["per_source"]["all"]


def summarize(out_dir: str, wall_s: float) -> dict:
    before = load_summary(os.path.join(out_dir, "eval_before", "summary.json"))
    after = load_summary(os.path.join(out_dir, "eval_after", "summary.json"))
    result = {"wall_s": wall_s, "n_test": after["n"],
              "before": {k: before[k] for k in ("em", "f1", "num_searches", "support_recall")},
              "after": {k: after[k] for k in ("em", "f1", "num_searches", "support_recall")},
              "em_gain": round(after["em"] - before["em"], 4)}
    write_json_atomic(os.path.join(out_dir, "demo_summary.json"), result)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--wall_s", type=float, required=True)
    a = p.parse_args(argv)
    r = summarize(a.out, a.wall_s)
    b, f = r["before"], r["after"]
    print(f"\n== StepSearch demo: {r['n_test']} held-out questions ==")
    print(f"  before RL (warm start): EM {b['em']:.3f}  F1 {b['f1']:.3f}  searches {b['num_searches']:.2f}  "
          f"support recall {b['support_recall']:.3f}")
    print(f"  after StePPO:           EM {f['em']:.3f}  F1 {f['f1']:.3f}  searches {f['num_searches']:.2f}  "
          f"support recall {f['support_recall']:.3f}")
    print(f"  EM gain {r['em_gain']:+.3f}; wall time {a.wall_s / 60:.1f} min")
    print(f"  learning curve: {a.out}/learning_curve.png   trajectories: {a.out}/report_after.html")
    return r


if __name__ == "__main__":
    main()
