"""The real pretrained test model (docs/real_model.md): SmolLM2-135M-Instruct, converted by `make real-model`.

Fixtures (import them into a conftest.py to use them):

- ``real_model_dir``: the converted HF folder, ``$STEPSEARCH_REAL_MODEL`` or ``models/smollm2-135m-instruct``
  under the repository root.
- ``real_model``: ``(model, tokenizer)`` loaded once per session from that folder with plain ``from_pretrained``.

Without the folder a test SKIPS and says to run `make real-model`; with ``STEPSEARCH_REQUIRE_REAL_MODEL=1`` (CI)
it FAILS instead, so a CI job cannot pass by silently skipping every real-model test. ``require_real_model``
applies the same rule to other prerequisites (the installed wheel and converters of the conversion test).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO_ROOT / "models" / "smollm2-135m-instruct"
DIR_ENV = "STEPSEARCH_REAL_MODEL"
REQUIRE_ENV = "STEPSEARCH_REQUIRE_REAL_MODEL"
REQUIRED_FILES = ("config.json", "tokenizer_config.json")


def real_model_path() -> Path:
    """Where the converted model is expected: $STEPSEARCH_REAL_MODEL, else the `make real-model` output."""
    configured = os.environ.get(DIR_ENV)
    return Path(configured).expanduser() if configured else DEFAULT_DIR


def missing_reason(path: Path) -> str | None:
    """Why `path` is not a usable converted model folder, or None when it is."""
    absent = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if not absent:
        return None
    return (f"no converted real model at {path} ({', '.join(absent)} missing); run `make real-model` "
            f"(or set {DIR_ENV} to a converted folder)")


def require_real_model(reason: str | None) -> None:
    """Skip the calling test for `reason`, or fail it when STEPSEARCH_REQUIRE_REAL_MODEL=1; None does nothing."""
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} [{REQUIRE_ENV}=1: the real model is required]", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (skips, or fails under STEPSEARCH_REQUIRE_REAL_MODEL=1)."""
    path = real_model_path()
    require_real_model(missing_reason(path))
    return path


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    """(model, tokenizer) from the converted folder, in eval mode, loaded with plain from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(real_model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(real_model_dir))
    return model, tokenizer
