"""`python -m stepsearch.viz --predictions FILE --out report.html` (trajectory viewer) and
`python -m stepsearch.viz --metrics metrics.jsonl --out curves.png` (training curves)."""
from __future__ import annotations

import argparse

from stepsearch.data.io import read_jsonl
from stepsearch.viz.curves import plot_training_curves, read_metrics
from stepsearch.viz.report import write_report


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", help="predictions JSONL written by python -m stepsearch.eval")
    src.add_argument("--metrics", help="metrics JSONL written by the trainer (trainer.logger includes jsonl)")
    p.add_argument("--out", required=True, help="output .html (predictions) or .png (metrics)")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    if a.predictions:
        preds = read_jsonl(a.predictions)
        write_report(preds, a.out, title=a.title or f"StepSearch trajectories: {a.predictions}")
        print(f"wrote {a.out} ({len(preds)} questions)")
    else:
        keys = plot_training_curves(read_metrics(a.metrics), a.out, title=a.title or a.metrics)
        print(f"wrote {a.out} ({len(keys)} series)")
    return a.out


if __name__ == "__main__":
    main()
