"""Fixtures of the trainer tests: a tiny parquet from the data pipeline and a tiny tokenizer/model folder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MUSIQUE_SAMPLE = REPO / "data" / "samples" / "musique_ans_train_100.json"


@pytest.fixture(scope="session")
def musi_parquet(tmp_path_factory) -> str:
    """The 100-question MuSiQue sample converted by scripts/data_process/musi_search.py (the real pipeline)."""
    out = tmp_path_factory.mktemp("musi_data")
    subprocess.run([sys.executable, str(REPO / "scripts" / "data_process" / "musi_search.py"), "--local_dir",
                    str(out), "--input", str(MUSIQUE_SAMPLE)], check=True, capture_output=True, timeout=120)
    return str(out / "musi_answerable_train.parquet")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from verl.utils.tiny_model import build_tokenizer
    return build_tokenizer(extra_tokens=["<search>", "</search>", "<answer>", "</answer>"])
