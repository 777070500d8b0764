"""The CPU end-to-end trainer (cpu_test: Ray, 2 data-parallel gloo workers, HF rollout, the warm-started tiny
policy, the real retrieval server over the MuSiQue sample) with agent.mode=async: the rollout runs one turn loop
per trajectory against the worker group (through BatchingEngine), PPO trains, validation dumps predictions with
their trajectory records, and `python -m stepsearch.rewards.score` on that dump gives back the trainer's token
rewards exactly."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.trainer.resume_runs import musi_server, read_jsonl, trainer_command, trainer_env  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def warm_policy(tmp_path_factory, musi_parquet):
    from tests.trainer.warm_start import build_warm_policy

    return build_warm_policy(str(tmp_path_factory.mktemp("warm_policy")), musi_parquet)


def _dense(pairs, width):
    """Token rewards as the trainer holds them: a float32 vector of the response width."""
    out = np.zeros(width, dtype=np.float32)
    for pos, value in pairs:
        out[pos] = value
    return out


def test_async_agent_trains_and_its_saved_rewards_rescore_exactly(tmp_path, musi_parquet, musi_server, warm_policy):
    out_dir = str(tmp_path / "run")
    cmd = trainer_command("cpu_test", warm_policy, musi_parquet, musi_server, out_dir, "agent.mode=async",
                          "trainer.total_training_steps=2", "trainer.save_freq=-1", "trainer.test_freq=2",
                          f"data.val_files=[{musi_parquet}]")
    done = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, timeout=1500, start_new_session=True)
    assert done.returncode == 0, done.stdout.decode()[-4000:] + done.stderr.decode()[-4000:]
    metrics = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    train = [m for m in metrics if "actor/pg_loss" in m]
    assert [m["step"] for m in train] == [1, 2]
    for m in train:
        for key in ("actor/pg_loss", "critic/vf_loss", "actor/grad_norm"):
            assert math.isfinite(m[key]), (key, m[key])
        assert m["search/num_searches/mean"] > 0 and 0 < m["rollout/engine_busy_fraction"] <= 1
    assert any(k.startswith("val/") for m in metrics for k in m)

    dump = os.path.join(out_dir, "predictions", "step_2.jsonl")
    rows = [json.loads(line) for line in open(dump)]
    assert rows and all(r.get("record") for r in rows)
    scored = tmp_path / "scored.jsonl"
    proc = subprocess.run([sys.executable, "-m", "stepsearch.rewards.score", "--input", dump, "--output", str(scored),
                           "--step-rewards-on-format-fail"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rescored = [json.loads(line) for line in scored.read_text().splitlines()]
    width = 512  # cpu_test agent.max_response_length
    assert max(float(np.abs(_dense(r["token_rewards"], width) - _dense(s["token_rewards"], width)).max())
               for r, s in zip(rows, rescored)) == 0.0
    assert sum(1 for r in rows for _, v in r["token_rewards"]) > len(rows)  # step rewards too, not only outcomes
