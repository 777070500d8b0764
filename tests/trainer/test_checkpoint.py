"""Checkpoint discovery: the latest marker, half-written directories, rotation, RNG capture."""
import logging
import os
import random

import numpy as np
import pytest
import torch

from verl.utils import checkpoint as ckpt


def _complete(root, step):
    d = ckpt.step_dir(root, step)
    os.makedirs(d, exist_ok=True)
    ckpt.atomic_torch_save({"step": step}, os.path.join(d, "trainer_state.pt"))
    ckpt.mark_complete(d)
    return d


def test_latest_marker_wins_and_disable(tmp_path):
    root = str(tmp_path)
    _complete(root, 2)
    _complete(root, 4)
    ckpt.write_latest(root, 4)
    assert ckpt.find_resume_checkpoint(root, "auto") == ckpt.step_dir(root, 4)
    assert ckpt.find_resume_checkpoint(root, "disable") is None
    assert ckpt.find_resume_checkpoint(str(tmp_path / "empty"), "auto") is None
    assert ckpt.find_resume_checkpoint(root, ckpt.step_dir(root, 2)) == ckpt.step_dir(root, 2)


def test_missing_marker_falls_back_to_newest_complete_with_warning(tmp_path, caplog):
    root = str(tmp_path)
    _complete(root, 3)
    _complete(root, 6)
    os.makedirs(ckpt.step_dir(root, 9))  # half-written: the process died while saving step 9
    with caplog.at_level(logging.WARNING):
        found = ckpt.find_resume_checkpoint(root, "auto")
    assert found == ckpt.step_dir(root, 6)
    assert "no latest_checkpointed_iteration.txt" in caplog.text
    assert "skipping half-written checkpoint" in caplog.text and "global_step_9" in caplog.text


def test_marker_pointing_at_half_written_dir_falls_back(tmp_path, caplog):
    root = str(tmp_path)
    _complete(root, 3)
    _complete(root, 6)
    ckpt.write_latest(root, 6)
    os.remove(os.path.join(ckpt.step_dir(root, 6), ckpt.COMPLETE_FILE))  # e.g. torn copy of the directory
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_resume_checkpoint(root, "auto") == ckpt.step_dir(root, 3)
    assert "missing or half-written" in caplog.text
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.find_resume_checkpoint(root, ckpt.step_dir(root, 6))
    with pytest.raises(RuntimeError, match="refusing to mark"):
        ckpt.write_latest(root, 6)


def test_rotation_keeps_newest_and_latest(tmp_path):
    root = str(tmp_path)
    for step in (1, 2, 3, 4):
        _complete(root, step)
    os.makedirs(ckpt.step_dir(root, 0))  # stale half-written dir older than the newest complete one
    ckpt.write_latest(root, 4)
    deleted = ckpt.rotate_checkpoints(root, max_to_keep=2)
    assert sorted(os.path.basename(p) for p in deleted) == ["global_step_0", "global_step_1", "global_step_2"]
    assert [s for s, _ in ckpt.list_step_dirs(root)] == [3, 4]


def test_rng_capture_restore_roundtrip():
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    state = ckpt.capture_rng_state()
    fp = ckpt.rng_fingerprint(state)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    assert ckpt.rng_fingerprint() != fp
    ckpt.restore_rng_state(state)
    assert ckpt.rng_fingerprint() == fp
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
