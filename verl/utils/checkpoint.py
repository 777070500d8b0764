"""Checkpoint layout, atomic writes, the ``latest`` marker, rotation and resume discovery.

Layout under ``trainer.default_local_dir``::

    global_step_{N}/
        actor/            model + optimizer (torch.distributed.checkpoint, resharding-safe), extra_rank_{r}.pt
        critic/           the same for the critic
        trainer_state.pt  driver RNG (python/numpy/torch), dataloader position, KL controller, global step
        hf/               the policy in HF format (config + tokenizer + safetensors)
        COMPLETE          written after everything above
    latest_checkpointed_iteration.txt   "N", replaced atomically after COMPLETE (written last)

A step directory without ``COMPLETE`` is half-written (the process died while saving) and is never resumed
from; a missing or stale ``latest`` marker falls back to the newest complete step directory, with a warning.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
COMPLETE_FILE = "COMPLETE"
_STEP_RE = re.compile(r"^global_step_(\d+)$")

__all__ = [
    "step_dir", "atomic_write_text", "atomic_torch_save", "mark_complete", "is_complete", "write_latest",
    "read_latest", "list_step_dirs", "find_resume_checkpoint", "rotate_checkpoints", "capture_rng_state",
    "restore_rng_state", "step_of",
]


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"global_step_{step}")


def step_of(path: str) -> int:
    """The N of a ``.../global_step_N`` directory."""
    m = _STEP_RE.match(os.path.basename(os.path.normpath(path)))
    if not m:
        raise ValueError(f"[checkpoint] '{path}' is not a global_step_N directory")
    return int(m.group(1))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory + fsync + os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_" + os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same directory, then os.replace (never a half-written file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_" + os.path.basename(path))
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def mark_complete(directory: str) -> None:
    atomic_write_text(os.path.join(directory, COMPLETE_FILE), "ok\n")


def is_complete(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, COMPLETE_FILE))


def write_latest(root: str, step: int) -> None:
    """Point the ``latest`` marker at ``global_step_{step}``; call only after ``mark_complete``."""
    if not is_complete(step_dir(root, step)):
        raise RuntimeError(f"[checkpoint] refusing to mark {step_dir(root, step)} as latest: it has no "
                           f"{COMPLETE_FILE} marker (the save did not finish)")
    atomic_write_text(os.path.join(root, LATEST_FILE), f"{step}\n")


def read_latest(root: str) -> int | None:
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        logger.warning("[checkpoint] %s holds %r, not a step number; ignoring it", path, text)
        return None
    return int(text)


def list_step_dirs(root: str) -> list[tuple[int, str]]:
    """All ``global_step_N`` directories under ``root`` as (N, path), ascending."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def _newest_complete(root: str) -> str | None:
    complete = [path for _, path in list_step_dirs(root) if is_complete(path)]
    return complete[-1] if complete else None


def find_resume_checkpoint(root: str, resume_mode: str) -> str | None:
    """The step directory to resume from, or None to start fresh.

    ``resume_mode``: ``disable`` -> None; ``auto`` -> the ``latest`` marker's step if that directory is complete,
    otherwise (missing marker, half-written or deleted directory) the newest complete step directory, with a
    warning; any other value is an explicit ``global_step_N`` path, which must be complete.
    """
    if resume_mode == "disable":
        return None
    if resume_mode != "auto":
        path = os.path.expanduser(resume_mode)
        if not is_complete(path):
            raise FileNotFoundError(f"[checkpoint] trainer.resume_mode={resume_mode!r} is not a complete checkpoint "
                                    f"directory (no {COMPLETE_FILE} marker); pick another global_step_N or use auto")
        return path
    latest = read_latest(root)
    fallback = _newest_complete(root)
    if latest is not None:
        path = step_dir(root, latest)
        if is_complete(path):
            if fallback is not None and step_of(fallback) > latest:
                logger.warning("[checkpoint] latest marker says step %d but %s is newer and complete; using the "
                               "marker (the newer save was not acknowledged)", latest, fallback)
            return path
        logger.warning("[checkpoint] latest marker points at %s, which is missing or half-written; falling back "
                       "to the newest complete checkpoint %s", path, fallback)
        return fallback
    if fallback is not None:
        logger.warning("[checkpoint] no %s in %s; resuming from the newest complete checkpoint %s",
                       LATEST_FILE, root, fallback)
    incomplete = [p for _, p in list_step_dirs(root) if not is_complete(p)]
    for path in incomplete:
        logger.warning("[checkpoint] skipping half-written checkpoint %s (no %s marker)", path, COMPLETE_FILE)
    return fallback


def rotate_checkpoints(root: str, max_to_keep: int) -> list[str]:
    """Delete the oldest complete step dirs beyond ``max_to_keep`` and half-written dirs older than the newest
    complete one; never the one ``latest`` points at. Returns the deleted paths. ``max_to_keep <= 0`` keeps all."""
    dirs = list_step_dirs(root)
    latest = read_latest(root)
    complete = [(s, p) for s, p in dirs if is_complete(p)]
    doomed = []
    if max_to_keep > 0 and len(complete) > max_to_keep:
        doomed += [p for s, p in complete[:-max_to_keep] if s != latest]
    if complete:
        newest = complete[-1][0]
        doomed += [p for s, p in dirs if not is_complete(p) and s < newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def capture_rng_state() -> dict:
    """The python, numpy and torch (CPU and, if present, CUDA) RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_fingerprint(state: dict | None = None) -> str:
    """A short hash of an RNG state (default: this process's) to compare states across runs in logs/tests."""
    import hashlib

    state = state or capture_rng_state()
    h = hashlib.sha256()
    h.update(repr(state["python"]).encode())
    h.update(np.asarray(state["numpy"][1]).tobytes())
    h.update(state["torch"].numpy().tobytes())
    return h.hexdigest()[:16]
