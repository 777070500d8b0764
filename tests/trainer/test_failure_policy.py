"""Issue 19: a step whose rollouts met too many environment failures aborts (no update, no save, the last
checkpoint kept, a metrics line with the count), and a damaged newest checkpoint falls back to the previous one
on resume. In-process workers (no Ray), the single-turn hooks of test_trainer_inprocess."""
from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pytest

from tests.trainer.test_trainer_inprocess import _config, _jsonl, files  # noqa: F401 (fixture)
from tests.trainer.test_trainer_inprocess import build_rollout_fn as single_turn_rollout_fn
from verl.trainer.main_ppo import run_ppo
from verl.trainer.ppo.ray_trainer import FAILED_SAMPLES_KEY, StepAborted
from verl.utils import checkpoint as ckpt

FAILING: set[int] = set()  # dataset indices whose rollout reports an environment failure


def build_rollout_fn(config: dict, tokenizer):
    """The single-turn hook, reporting rows whose index is in FAILING as failed (as the search agent reports
    trajectories with a failed retrieval)."""
    inner = single_turn_rollout_fn(config, tokenizer)

    def rollout(batch, backend, validate):
        out = inner(batch, backend, validate)
        out.meta_info[FAILED_SAMPLES_KEY] = sum(int(i) in FAILING for i in batch.non_tensor_batch["index"])
        return out
    return rollout


def _cfg(files, out, **trainer):
    train, val, model = files
    return _config(train, val, model, out, rollout_fn=f"{__name__}.build_rollout_fn", test_freq=-1, save_freq=1,
                   **trainer)


@pytest.mark.timeout(600)
def test_failed_rollouts_abort_the_step_and_keep_the_last_checkpoint(files, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    order = np.random.default_rng(1).permutation(12)  # data.seed 1: step s draws order[4(s-1):4s]
    monkeypatch.setattr(sys.modules[__name__], "FAILING", {int(order[4])})  # the hook is loaded by dotted path
    # Step 1: 0 of 4 failed. Step 2: 1 of 4 = 0.25 > 0.2 -> abort before any update or save.
    with pytest.raises(StepAborted, match=r"training step 2 aborted: 1 of 4 rollouts .*0\.250 > "
                                          r"trainer\.max_failed_rollout_share=0\.2"):
        run_ppo(_cfg(files, out, max_failed_rollout_share=0.2))
    assert ckpt.read_latest(out) == 1 and [s for s, _ in ckpt.list_step_dirs(out)] == [1]
    lines = _jsonl(os.path.join(out, "metrics.jsonl"))
    assert [m["step"] for m in lines] == [1, 2]
    assert lines[0]["rollout/failed_samples"] == 0.0 and "trainer/aborted" not in lines[0]
    assert lines[1]["rollout/failed_samples"] == 1.0 and lines[1]["rollout/failed_share"] == 0.25
    assert lines[1]["trainer/aborted"] == 1.0 and "actor/pg_loss" not in lines[1]
    # At the limit (1 of 4 = 0.25, not more than 0.25) the step runs; the rerun resumes from step 1.
    run_ppo(_cfg(files, out, max_failed_rollout_share=0.25))
    trace = _jsonl(os.path.join(out, "data_trace.jsonl"))
    assert [r["step"] for r in trace] == [1, 2, 2] and trace[2]["index"] == trace[1]["index"]
    assert ckpt.read_latest(out) == 2
    assert _jsonl(os.path.join(out, "metrics.jsonl"))[-1]["rollout/failed_samples"] == 1.0


@pytest.mark.timeout(600)
def test_resume_falls_back_when_the_newest_checkpoint_is_damaged(files, tmp_path, caplog):
    """The tester's case: trainer_state.pt of a checkpoint marked complete is truncated; torch.load used to raise."""
    out = str(tmp_path / "run")
    run_ppo(_cfg(files, out, max_ckpt_to_keep=3))
    state = os.path.join(ckpt.step_dir(out, 2), "trainer_state.pt")
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    with caplog.at_level(logging.WARNING):
        run_ppo(_cfg(files, out, max_ckpt_to_keep=3))
    assert "global_step_2 is marked complete but damaged" in caplog.text and "trainer_state.pt" in caplog.text
    trace = _jsonl(os.path.join(out, "data_trace.jsonl"))
    assert [r["step"] for r in trace] == [1, 2, 2]  # step 2 redone from step 1's state, with the same batch
    assert trace[2]["index"] == trace[1]["index"] and trace[2]["worker_rng"] == trace[1]["worker_rng"]
    assert ckpt.verify_checkpoint(ckpt.step_dir(out, 2)) == [] and ckpt.read_latest(out) == 2
