"""The new rollout/loading keys: one default each (YAML = dataclass), on in the GPU recipes, refused when misspelt."""
import dataclasses

import pytest

from tests.trainer.test_config import _compose
from verl.trainer.main_ppo import build_run_config
from verl.utils.hydra_to_dataclass import FSDPConfig, RolloutConfig


def test_defaults_agree_with_the_dataclasses():
    run = build_run_config(_compose("ppo_trainer"))
    assert run.rollout.enable_sleep_mode is False == RolloutConfig().enable_sleep_mode
    assert run.fsdp.load_from_rank0 is True == FSDPConfig().load_from_rank0
    assert _compose("ppo_trainer").agent.logprobs is False


@pytest.mark.parametrize("name", ["stepsearch_qwen2.5_3b", "stepsearch_qwen2.5_7b"])
def test_gpu_recipes_sleep_the_engine_and_log_the_logprob_gap(name):
    cfg = _compose(name)
    run = build_run_config(cfg)
    assert run.rollout.backend == "vllm" and run.rollout.enable_sleep_mode and cfg.agent.logprobs


def test_misspelt_sleep_key_is_refused():
    with pytest.raises(KeyError, match="enable_sleep"):
        build_run_config(_compose("ppo_trainer", "+actor_rollout_ref.rollout.enable_sleep=true"))
    assert {f.name for f in dataclasses.fields(RolloutConfig)} >= {"enable_sleep_mode"}
