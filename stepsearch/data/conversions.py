"""The conversions behind scripts/data_process/*.py: input files -> seed-format parquet (docs/method.md §4.3-4.4)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import numpy as np

from stepsearch.data.formats import QAExample, to_row, write_rows_parquet
from stepsearch.data.io import DataError, check_unique_ids, iter_records
from stepsearch.data.musique import ConvertStats, convert_musique
from stepsearch.data.prompts import TEMPLATES
from stepsearch.data.qa_sets import DATASETS, FieldMap, convert_qa_file

log = logging.getLogger(__name__)

# train.sh reads {local_dir}/musi_answerable_{train,test}.parquet; the released script defaulted to
# "musi_stepsearch", which train.sh never finds (docs/method.md §4.3 "Naming mismatch").
DEFAULT_SAVE_NAME = "musi_answerable"


@dataclass(frozen=True)
class MusiConfig:
    """musi_search.py options."""

    local_dir: str
    input: str | None = None          # default: {local_dir}/musi_answerable_{train|dev}.jsonl (released names)
    test: bool = False
    save_name: str = DEFAULT_SAVE_NAME
    template: str = "paper"
    sample_num: int | None = None
    seed: int = 1234
    data_source: str = "musi"
    answer_field: str = "final_answer"
    drop_evidence: bool = False       # released --test behaviour: empty search_keys and support_docs
    renumber_ids: bool = False        # ids musi_{split}_{i} as the released script writes, instead of the input's

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"[musi_search] template {self.template!r} unknown; valid: {sorted(TEMPLATES)}")
        if self.sample_num is not None and self.sample_num <= 0:
            raise ValueError(f"[musi_search] sample_num must be positive, got {self.sample_num}")

    @property
    def split(self) -> str:
        return "test" if self.test else "train"

    def input_path(self) -> str:
        return self.input or os.path.join(self.local_dir, f"musi_answerable_{'dev' if self.test else 'train'}.jsonl")

    def output_path(self) -> str:
        suffix = f"_{self.sample_num}" if self.sample_num else ""
        return os.path.join(self.local_dir, f"{self.save_name}_{self.split}{suffix}.parquet")


def sample_examples(examples: list[QAExample], sample_num: int | None, seed: int) -> list[QAExample]:
    """A seeded random subset of size sample_num, kept in input order (deterministic for a given seed)."""
    if not sample_num or sample_num >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=sample_num, replace=False))
    return [examples[i] for i in keep]


def write_examples(examples: list[QAExample], path: str, data_source: str, split: str, template: str,
                   keep_evidence: bool, source: str = "the input") -> int:
    """Check ids are unique, render rows (index = position) and write the parquet atomically; no examples is a
    DataError naming ``source`` (a 0-row parquet would only fail later, in the trainer)."""
    if not examples:
        raise DataError(f"{source}: no usable questions (every record was skipped as unanswerable); "
                        f"{path} was not written")
    check_unique_ids([(ex.id, ex.where) for ex in examples])
    rows = [to_row(ex, data_source, split, i, template, keep_evidence) for i, ex in enumerate(examples)]
    write_rows_parquet(rows, path)
    return len(rows)


def build_musi(cfg: MusiConfig) -> tuple[str, ConvertStats]:
    examples, stats = convert_musique(iter_records(cfg.input_path()), cfg.split, cfg.answer_field)
    examples = sample_examples(examples, cfg.sample_num, cfg.seed)
    if cfg.renumber_ids:
        examples = [replace(ex, id=f"{cfg.data_source}_{cfg.split}_{i}") for i, ex in enumerate(examples)]
    out = cfg.output_path()
    stats.kept = write_examples(examples, out, cfg.data_source, cfg.split, cfg.template, not cfg.drop_evidence,
                                cfg.input_path())
    log.info("musi_search: read %d, skipped %d unanswerable, wrote %d rows to %s",
             stats.read, stats.skipped_unanswerable, stats.kept, out)
    return out, stats


@dataclass(frozen=True)
class EvalSetConfig:
    """qa_test_sets.py options for one input file."""

    input: str
    dataset: str
    local_dir: str
    template: str = "paper"
    split: str = "test"
    keep_evidence: bool = False  # evaluation rows carry no keys/docs by default (reward = answer F1)
    sample_num: int | None = None
    seed: int = 1234
    fields: FieldMap | None = None  # named fields of a plain JSON/JSONL/CSV set; None = detect the format

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"[qa_test_sets] dataset {self.dataset!r} unknown; valid: {list(DATASETS)}")
        if self.template not in TEMPLATES:
            raise ValueError(f"[qa_test_sets] template {self.template!r} unknown; valid: {sorted(TEMPLATES)}")

    def output_path(self) -> str:
        suffix = f"_{self.sample_num}" if self.sample_num else ""
        return os.path.join(self.local_dir, f"{self.dataset}_{self.split}{suffix}.parquet")


def build_test_set(cfg: EvalSetConfig) -> tuple[str, ConvertStats]:
    examples, stats = convert_qa_file(cfg.input, cfg.fields)
    examples = sample_examples(examples, cfg.sample_num, cfg.seed)
    out = cfg.output_path()
    stats.kept = write_examples(examples, out, cfg.dataset, cfg.split, cfg.template, cfg.keep_evidence, cfg.input)
    log.info("qa_test_sets: %s: read %d, skipped %d unanswerable, wrote %d rows to %s",
             cfg.dataset, stats.read, stats.skipped_unanswerable, stats.kept, out)
    return out, stats
