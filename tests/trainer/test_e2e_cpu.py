"""End to end on CPU: Ray with 2 data-parallel gloo workers, a tiny warm-started policy, the real retrieval server
over a corpus built from the bundled MuSiQue sample, a parquet from the data pipeline, the `cpu_test` config.

The kill-and-resume plan of tests/trainer/resume_runs.py: run 1 trains StePPO steps 1-3 (checkpoint at step 2) and is
SIGKILLed during step 4; run 2 (resume_mode=auto) redoes step 3 and trains step 4 with the same batches, RNG states
and metrics. On top of that: losses are finite, the policy searches and earns step rewards, `check_retriever`
fails fast on a dead URL, and the HF export loads with AutoModelForCausalLM.

Why the warm start: a random tiny model almost never writes <search>…</search>, so its rollouts would have no
search rounds and no step rewards. tests/trainer/warm_start.py fine-tunes it for 100 steps on gold trajectories;
it then samples real search turns, and retrieval, rewards and PPO run unchanged.
"""
from __future__ import annotations

import math
import os

import pytest

from tests.trainer.resume_runs import (assert_exact_resume, kill_then_resume, musi_server,  # noqa: F401 (fixture)
                                       trainer_command)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def warm_policy(tmp_path_factory, musi_parquet):
    from tests.trainer.warm_start import build_warm_policy

    return build_warm_policy(str(tmp_path_factory.mktemp("warm_policy")), musi_parquet)


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_steppo_kill_resume_and_hf_export(tmp_path, musi_parquet, musi_server, warm_policy):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from verl.utils import checkpoint as ckpt

    from stepsearch.train import check_retriever

    check_retriever(musi_server)  # what train.sh runs first; a dead URL fails fast with a message
    with pytest.raises(SystemExit, match="no answer from http://127.0.0.1:9"):
        check_retriever("http://127.0.0.1:9", timeout_s=2.0)
    out_dir = str(tmp_path / "run")
    cmd = trainer_command("cpu_test", warm_policy, musi_parquet, musi_server, out_dir)

    def run1_checks() -> None:
        assert ckpt.read_latest(out_dir) == 2 and ckpt.is_complete(ckpt.step_dir(out_dir, 2))
        assert not os.path.exists(ckpt.step_dir(out_dir, 4))  # killed during step 4, before its save

    run1_metrics, _ = kill_then_resume(cmd, out_dir, tmp_path, after_run1=run1_checks)
    # Run 1: finite losses, real searches and non-zero step rewards in every step.
    for m in run1_metrics:
        for key in ("actor/pg_loss", "critic/vf_loss", "actor/grad_norm", "critic/grad_norm"):
            assert _finite(m[key]), (key, m[key])
        assert m["search/num_searches/mean"] > 0
        assert m["reward/step_reward/mean"] != 0.0
    assert_exact_resume(out_dir, run1_metrics)

    # The HF export of the resumed run's last save loads with transformers.
    model = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt.step_dir(out_dir, 4), "hf"))
    assert model.config.num_hidden_layers == 2
