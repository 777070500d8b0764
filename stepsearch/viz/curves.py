"""Training curves (PNG, matplotlib) from the trainer's metrics JSONL (`{"step": n, "role/name": value, ...}`).

Four panels: reward components (reward/*/mean), EM (training answer EM and every val/*em* key), response length,
and searches per question. A panel whose keys are absent says so instead of failing, so the plot works for
any subset of the trainer's metrics.
"""
from __future__ import annotations

import json
import math
import re
from typing import Sequence

import matplotlib

matplotlib.use("Agg")   # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from stepsearch.data.io import atomic_path  # noqa: E402

PANELS = (
    ("reward components", re.compile(r"^reward/[^/]+/mean$")),
    ("EM", re.compile(r"^(reward/answer_em/mean|val/.*\bem\b.*|val/.*/em|eval/.*em)$")),
    ("response length (tokens)", re.compile(r"^response_length/mean$")),
    ("searches per question", re.compile(r"^search/num_searches/mean$")),
)


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics JSONL; a malformed line raises ValueError naming path:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON in metrics file ({e.msg})") from None
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"{path}:{lineno}: each metrics line must be an object with a 'step' field")
            rows.append(row)
    return rows


def series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key, skipping rows without it and non-finite values."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def plot_training_curves(rows: Sequence[dict], out_png: str, title: str = "training") -> list[str]:
    """Write the 2x2 figure to out_png; returns the metric keys that were plotted."""
    keys = sorted({k for r in rows for k in r if k != "step"})
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    plotted = []
    for ax, (name, pattern) in zip(axes.flat, PANELS):
        matched = [k for k in keys if pattern.match(k)]
        for k in matched:
            xs, ys = series(rows, k)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=k)
                plotted.append(k)
        ax.set_title(name)
        ax.set_xlabel("step")
        if matched:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no such metrics logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return plotted
