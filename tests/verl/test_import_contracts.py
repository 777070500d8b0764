"""The import contracts of .importlinter (`lint-imports`, the import-linter package): verl never imports stepsearch,
and stepsearch imports verl only through the task interface. The tree must keep them, and a copy of the tree with
one bad import must break them (so the check can fail)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.timeout(120)  # import-linter is pinned in requirements.txt: no skip when it is missing


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the packages under ``root`` (found first on the path), with root's .importlinter."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / ".importlinter"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=100)


@pytest.fixture
def tree_copy(tmp_path) -> Path:
    """The two packages' Python files and the contract file, copied under tmp_path."""
    for package in ("verl", "stepsearch"):
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=lambda d, names: [n for n in names if n == "__pycache__"
                                                 or (os.path.isfile(os.path.join(d, n)) and not n.endswith(".py"))])
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")


def test_the_tree_keeps_both_contracts():
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout


def test_verl_importing_stepsearch_breaks_the_first(tree_copy):
    assert lint(tree_copy).returncode == 0  # the copy is the tree
    _append(tree_copy / "verl" / "utils" / "tracking.py", "import stepsearch")
    proc = lint(tree_copy)
    assert proc.returncode != 0
    assert "verl never imports stepsearch, directly or through another module BROKEN" in proc.stdout
    assert "verl.utils.tracking -> stepsearch" in proc.stdout


def test_stepsearch_importing_an_engine_internal_breaks_the_second(tree_copy):
    _append(tree_copy / "stepsearch" / "train.py", "from verl.trainer.ppo import core_algos")
    proc = lint(tree_copy)
    assert proc.returncode != 0
    assert "stepsearch imports verl only through the task interface BROKEN" in proc.stdout
    assert "stepsearch.train -> verl.trainer.ppo.core_algos" in proc.stdout
