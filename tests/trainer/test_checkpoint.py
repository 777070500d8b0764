"""Checkpoint discovery: the latest marker, half-written directories, rotation, RNG capture."""
import logging
import os
import random
import zlib

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


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    """Issue 19.7: a checkpoint marked complete whose trainer_state.pt was truncated is skipped with a warning."""
    root = str(tmp_path)
    _complete(root, 3)
    newest = _complete(root, 6)
    ckpt.write_latest(root, 6)
    state = os.path.join(newest, "trainer_state.pt")
    size = os.path.getsize(state)
    with open(state, "r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_resume_checkpoint(root, "auto") == ckpt.step_dir(root, 3)
    assert f"trainer_state.pt: {size // 2} bytes, {size} recorded" in caplog.text and "damaged" in caplog.text
    with pytest.raises(RuntimeError, match="is damaged.*trainer_state.pt"):
        ckpt.find_resume_checkpoint(root, newest)  # an explicit choice is not silently replaced


def test_same_size_corruption_and_missing_file_are_found(tmp_path):
    d = _complete(str(tmp_path), 1)
    os.makedirs(os.path.join(d, "actor"))
    with open(os.path.join(d, "actor", "shard.distcp"), "wb") as f:
        f.write(b"\x00" * 1000)
    table = ckpt.mark_complete(d)
    assert table["actor/shard.distcp"] == {"size": 1000, "crc32": zlib.crc32(b"\x00" * 1000)}
    assert sorted(table) == ["actor/shard.distcp", "trainer_state.pt"]
    assert ckpt.verify_checkpoint(d) == []
    with open(os.path.join(d, "actor", "shard.distcp"), "r+b") as f:
        f.seek(500)
        f.write(b"\x01")  # one flipped byte, same size
    os.remove(os.path.join(d, "trainer_state.pt"))
    problems = ckpt.verify_checkpoint(d)
    assert len(problems) == 2 and "shard.distcp: crc32 differs" in problems[0] and "trainer_state.pt: missing" in problems[1]


def test_old_style_marker_is_accepted_unverified(tmp_path, caplog):
    d = _complete(str(tmp_path), 1)
    with open(os.path.join(d, ckpt.COMPLETE_FILE), "w") as f:
        f.write("ok\n")
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_resume_checkpoint(str(tmp_path), "auto") == d
    assert "old-style marker" in caplog.text


def test_saves_are_fsynced_and_respect_the_umask(tmp_path, monkeypatch):
    """Every checkpoint file, each folder after its renames, and the files' modes follow the umask (not 0600)."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    old_mask = os.umask(0o027)
    try:
        root = str(tmp_path)
        d = ckpt.step_dir(root, 2)
        os.makedirs(os.path.join(d, "hf"))
        with open(os.path.join(d, "hf", "model.safetensors"), "wb") as f:  # written by another library
            f.write(b"weights")
        ckpt.atomic_torch_save({"step": 2}, os.path.join(d, "trainer_state.pt"))
        assert os.path.realpath(d) in synced  # the folder, after trainer_state.pt was renamed into it
        synced.clear()
        ckpt.mark_complete(d)
        ckpt.write_latest(root, 2)
    finally:
        os.umask(old_mask)
    real = {os.path.realpath(p) for p in (os.path.join(d, "hf", "model.safetensors"), os.path.join(d, "trainer_state.pt"),
                                          os.path.join(d, "hf"), d, root)}
    assert real <= set(synced)
    for name in ("trainer_state.pt", ckpt.COMPLETE_FILE):
        assert os.stat(os.path.join(d, name)).st_mode & 0o777 == 0o640
    assert os.stat(os.path.join(root, ckpt.LATEST_FILE)).st_mode & 0o777 == 0o640
