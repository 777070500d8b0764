"""Consistency checker for dataset rows against a retrieval corpus.

    python -m stepsearch.data.check --data FILE.parquet --corpus CORPUS.jsonl [--report OUT.json]

Why: information gain compares retrieved passages with `support_docs` (docs/method.md §1.6); a support doc that is
not a corpus passage can never be retrieved, so its gain is silently ~0. For each row and support doc this
reports whether the doc is in the corpus exactly, only after normalization (SQuAD-style, docs/method.md §1.3), or
not at all; it also flags degenerate `search_keys` and answers that appear in no support doc. It prints a
summary table and exits 1 when a failure fraction exceeds its threshold.
"""
from __future__ import annotations

import argparse
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass, field

from stepsearch.data.training_corpus import load_corpus_pairs
from stepsearch.data.formats import read_rows_parquet, support_doc_fields
from stepsearch.data.io import DataError, write_json_atomic

EXACT, NORMALIZED, MISSING = "exact", "normalized_only", "missing"
_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_UNRESOLVED = re.compile(r"#\d+")


def normalize(text: str) -> str:
    """docs/method.md §1.3: lower-case, drop ASCII punctuation, drop a/an/the, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


@dataclass(frozen=True)
class CheckThresholds:
    """Largest allowed fraction of each failure before the checker exits non-zero."""

    max_bad_doc_frac: float = 0.0      # support docs that are not exact corpus passages
    max_bad_key_frac: float = 0.0      # rows with degenerate search_keys (among rows that have docs or keys)
    max_answer_missing_frac: float = 0.1  # rows whose answer is in no support doc (aliases make this noisy)


class CorpusIndex:
    """Exact (title, text) and text lookups plus a normalized-text lookup over a corpus."""

    def __init__(self, triples):
        self.pairs, self.texts, self.norm = set(), set(), set()
        for _, title, text in triples:
            self.pairs.add((title, text))
            self.texts.add(text)
            self.norm.add(normalize(text))

    def __len__(self) -> int:
        return len(self.pairs)

    def status(self, title: str, text: str) -> str:
        """exact: the text (and the title, when the doc has one) equals a corpus passage; normalized_only:
        equal after normalization (or title differs); missing: neither."""
        if (title, text) in self.pairs or (not title and text in self.texts):
            return EXACT
        return NORMALIZED if text in self.texts or normalize(text) in self.norm else MISSING


def degenerate_key_problems(groups: list[list[str]], has_docs: bool) -> list[str]:
    """Problems with one row's search_keys; empty keys are only a problem for rows that carry support docs."""
    if not groups:
        return ["no search_keys groups"] if has_docs else []
    problems = []
    for i, group in enumerate(groups):
        if not group:
            problems.append(f"group {i} is empty")
        for key in group:
            if not normalize(key):
                problems.append(f"group {i}: blank key {key!r}")
            elif _UNRESOLVED.search(key):
                problems.append(f"group {i}: unresolved reference in {key!r}")
    normalized = [tuple(sorted(normalize(k) for k in g)) for g in groups]
    if len(set(normalized)) < len(normalized):
        problems.append("duplicate groups")
    return problems


@dataclass
class RowReport:
    index: int
    id: str
    doc_status: list[str] = field(default_factory=list)
    key_problems: list[str] = field(default_factory=list)
    answer_missing: bool = False


def check_row(i: int, row: dict, corpus: CorpusIndex) -> RowReport:
    docs = [support_doc_fields(d) for d in row["extra_info"]["support_docs"]]
    gt = row["reward_model"]["ground_truth"]
    rep = RowReport(index=i, id=str(row.get("id") or row["extra_info"]["index"]))
    rep.doc_status = [corpus.status(t, x) for t, x in docs]
    rep.key_problems = degenerate_key_problems(gt["search_keys"], has_docs=bool(docs))
    if docs:
        doc_norm = [normalize(t + " " + x) for t, x in docs]
        answers = [normalize(a) for a in gt["target"] if normalize(a)]
        rep.answer_missing = not any(a in d for a in answers for d in doc_norm)
    return rep


@dataclass
class CheckSummary:
    rows: int
    docs: Counter
    rows_with_bad_docs: int
    rows_with_key_problems: int
    rows_checked_for_keys: int
    rows_answer_missing: int
    rows_with_docs: int

    def fractions(self) -> dict[str, float]:
        n_docs = sum(self.docs.values())
        return {
            "bad_doc_frac": (n_docs - self.docs[EXACT]) / n_docs if n_docs else 0.0,
            "bad_key_frac": self.rows_with_key_problems / self.rows_checked_for_keys if self.rows_checked_for_keys else 0.0,
            "answer_missing_frac": self.rows_answer_missing / self.rows_with_docs if self.rows_with_docs else 0.0,
        }


def summarize(reports: list[RowReport]) -> CheckSummary:
    return CheckSummary(
        rows=len(reports),
        docs=Counter(s for r in reports for s in r.doc_status),
        rows_with_bad_docs=sum(any(s != EXACT for s in r.doc_status) for r in reports),
        rows_with_key_problems=sum(bool(r.key_problems) for r in reports),
        rows_checked_for_keys=sum(bool(r.doc_status) or bool(r.key_problems) for r in reports),
        rows_answer_missing=sum(r.answer_missing for r in reports),
        rows_with_docs=sum(bool(r.doc_status) for r in reports),
    )


def failures(summary: CheckSummary, th: CheckThresholds) -> list[str]:
    f = summary.fractions()
    limits = {"bad_doc_frac": th.max_bad_doc_frac, "bad_key_frac": th.max_bad_key_frac,
              "answer_missing_frac": th.max_answer_missing_frac}
    return [f"{k} = {f[k]:.4f} > {limits[k]}" for k in limits if f[k] > limits[k]]


def format_table(summary: CheckSummary, corpus_size: int) -> str:
    f = summary.fractions()
    lines = [
        "| check | count | fraction |", "|---|---|---|",
        f"| rows | {summary.rows} | |",
        f"| corpus passages | {corpus_size} | |",
        *(f"| support docs {s} | {summary.docs[s]} | {summary.docs[s] / max(1, sum(summary.docs.values())):.4f} |"
          for s in (EXACT, NORMALIZED, MISSING)),
        f"| rows with a non-exact support doc | {summary.rows_with_bad_docs} | |",
        f"| rows with degenerate search_keys | {summary.rows_with_key_problems} | {f['bad_key_frac']:.4f} |",
        f"| rows whose answer is in no support doc | {summary.rows_answer_missing} | {f['answer_missing_frac']:.4f} |",
    ]
    return "\n".join(lines)


def run_check(data_path: str, corpus_path: str) -> tuple[list[RowReport], CheckSummary, int]:
    corpus = CorpusIndex(load_corpus_pairs(corpus_path))
    reports = [check_row(i, row, corpus) for i, row in enumerate(read_rows_parquet(data_path))]
    return reports, summarize(reports), len(corpus)


def _problem_lines(reports: list[RowReport], limit: int) -> list[str]:
    lines = []
    for r in reports:
        bad = [f"doc {j}: {s}" for j, s in enumerate(r.doc_status) if s != EXACT]
        bad += r.key_problems + (["answer in no support doc"] if r.answer_missing else [])
        if bad:
            lines.append(f"row {r.index} (id {r.id}): " + "; ".join(bad))
    return lines[:limit] + ([f"... and {len(lines) - limit} more rows"] if len(lines) > limit else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset parquet (seed format)")
    ap.add_argument("--corpus", required=True, help="retrieval corpus JSONL")
    ap.add_argument("--max_bad_doc_frac", type=float, default=CheckThresholds.max_bad_doc_frac)
    ap.add_argument("--max_bad_key_frac", type=float, default=CheckThresholds.max_bad_key_frac)
    ap.add_argument("--max_answer_missing_frac", type=float, default=CheckThresholds.max_answer_missing_frac)
    ap.add_argument("--report", help="also write per-row results as JSON here")
    ap.add_argument("--show", type=int, default=20, help="problem rows to print")
    args = ap.parse_args(argv)
    th = CheckThresholds(args.max_bad_doc_frac, args.max_bad_key_frac, args.max_answer_missing_frac)
    try:
        reports, summary, n_corpus = run_check(args.data, args.corpus)
    except (DataError, FileNotFoundError) as e:  # one line naming file:row, as the other data tools print
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary, n_corpus))
    for line in _problem_lines(reports, args.show):
        print(line)
    if args.report:
        write_json_atomic(args.report, {"summary": summary.fractions(), "rows": [r.__dict__ for r in reports]})
    failed = failures(summary, th)
    for msg in failed:
        print(f"FAIL: {msg}", file=sys.stderr)
    if not failed:
        print("OK: all checks within thresholds")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
