"""Hydra entry point of the PPO trainer.

    python -m verl.trainer.main_ppo --config-name ppo_trainer trainer.total_training_steps=2

The Hydra tree is converted once into frozen dataclasses (``build_run_config``); below that boundary nothing sees
a DictConfig. The task's hooks (``verl.hooks``) are loaded by dotted path (``trainer.row_adapter``/``rollout_fn``/
``reward_fn``); each is a factory ``f(config: dict, tokenizer) -> hook``; an empty ``row_adapter`` means
``verl.hooks.passthrough_row_fields``.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from verl.trainer.ppo.core_algos import ADVANTAGE_ESTIMATORS
from verl.utils.hydra_to_dataclass import (ActorRolloutRefConfig, AlgorithmConfig, DataConfig, FSDPConfig, ModelConfig,
                               OptimConfig, RayConfig, RolloutConfig, TrainerConfig, config_section, load_object,
                               to_container, to_dataclass, to_dataclass_at)

logger = logging.getLogger(__name__)

__all__ = ["RunConfig", "build_run_config", "load_hooks", "run_ppo", "main"]


@dataclass(frozen=True)
class RunConfig:
    """The whole typed configuration of a run."""
    data: DataConfig
    model: ModelConfig
    trainer: TrainerConfig
    algorithm: AlgorithmConfig
    ray: RayConfig
    rollout: RolloutConfig
    fsdp: FSDPConfig
    actor_optim: OptimConfig
    critic_optim: OptimConfig
    actor: Any   # verl.workers.worker_config.ActorConfig
    critic: Any  # verl.workers.worker_config.CriticConfig
    weight_bucket_mb: int


def _role_config(cls, tree: dict, path: str, world_size: int, rollout_n: int, use_remove_padding: bool,
                 subsections: tuple[str, ...] = ()):
    """ActorConfig/CriticConfig with the derived fields world_size, rollout_n and use_remove_padding set here;
    ``subsections`` (the critic's optim) are built elsewhere."""
    section = {k: v for k, v in config_section(tree, path).items() if k not in subsections}
    derived = {"world_size": world_size, "rollout_n": rollout_n, "use_remove_padding": use_remove_padding}
    for key in derived:
        if key in section:
            raise KeyError(f"[{path}] '{key}' is derived from trainer/rollout/actor_rollout_ref.model settings; "
                           f"remove it from the YAML")
    return to_dataclass(cls, {**section, **derived}, path)


_ARR_SECTIONS = ("actor", "model", "optim", "fsdp", "rollout")


def build_run_config(cfg: Any) -> RunConfig:
    """Validate the tree and build every frozen config (errors name the key). An absent key or section takes its
    default from configs/ppo_trainer.yaml, the one source (docs/configuration.md)."""
    from verl.workers.worker_config import ActorConfig, ActorRefModelConfig, CriticConfig

    cfg = to_container(cfg)
    trainer = to_dataclass_at(TrainerConfig, cfg, "trainer")
    rollout = to_dataclass_at(RolloutConfig, cfg, "actor_rollout_ref.rollout")
    algorithm = to_dataclass_at(AlgorithmConfig, cfg, "algorithm")
    if ADVANTAGE_ESTIMATORS[algorithm.adv_estimator].uses_groups and rollout.n < 2:
        raise ValueError(f"[algorithm] adv_estimator={algorithm.adv_estimator} needs actor_rollout_ref.rollout.n >= 2 "
                         f"(group size)")
    arr = config_section(cfg, "actor_rollout_ref")
    arr_top = to_dataclass(ActorRolloutRefConfig, {k: v for k, v in arr.items() if k not in _ARR_SECTIONS},
                           "actor_rollout_ref")
    world = trainer.world_size
    packing = to_dataclass_at(ActorRefModelConfig, cfg, "actor_rollout_ref.model").use_remove_padding
    run = RunConfig(
        data=to_dataclass_at(DataConfig, cfg, "data"), model=to_dataclass_at(ModelConfig, cfg, "model"),
        trainer=trainer, algorithm=algorithm, ray=to_dataclass_at(RayConfig, cfg, "ray"),
        rollout=rollout, fsdp=to_dataclass_at(FSDPConfig, cfg, "actor_rollout_ref.fsdp"),
        actor_optim=to_dataclass_at(OptimConfig, cfg, "actor_rollout_ref.optim"),
        critic_optim=to_dataclass_at(OptimConfig, cfg, "critic.optim"),
        actor=_role_config(ActorConfig, cfg, "actor_rollout_ref.actor", world, rollout.n, packing),
        critic=_role_config(CriticConfig, cfg, "critic", world, rollout.n, packing, subsections=("optim",)),
        weight_bucket_mb=arr_top.weight_bucket_mb)
    _validate_sizes(run)
    _validate_value_targets(run)
    return run


def _validate_value_targets(run: RunConfig) -> None:
    """Refuse a critic trained on targets that do not exist.

    With ``mask_observations_in_gae=true`` the GAE chain skips observation tokens and leaves their returns at 0;
    a value loss on those tokens would then regress V toward 0 wherever documents were injected.
    """
    uses_critic = ADVANTAGE_ESTIMATORS[run.algorithm.adv_estimator].uses_critic
    if uses_critic and run.algorithm.mask_observations_in_gae and run.critic.value_loss_on_observations:
        raise ValueError("[critic] value_loss_on_observations=true needs returns on observation tokens, but "
                         "algorithm.mask_observations_in_gae=true leaves them at 0 (V would be trained toward 0 "
                         "there); set critic.value_loss_on_observations=false, or "
                         "algorithm.mask_observations_in_gae=false for the released all-positions GAE")


def _validate_sizes(run: RunConfig) -> None:
    """World-size checks that need several sections at once."""
    rows = run.data.train_batch_size * run.rollout.n
    if rows % run.trainer.world_size:
        raise ValueError(f"[data] train_batch_size × rollout.n ({rows}) must be divisible by the data-parallel "
                         f"world size ({run.trainer.world_size})")
    if run.data.train_batch_size % run.actor.ppo_mini_batch_size:
        raise ValueError(f"[actor] ppo_mini_batch_size ({run.actor.ppo_mini_batch_size}) must divide "
                         f"data.train_batch_size ({run.data.train_batch_size})")
    if run.actor.temperature != run.rollout.temperature:
        raise ValueError(f"[actor] temperature ({run.actor.temperature}) must equal rollout.temperature "
                         f"({run.rollout.temperature}): old log-probs are computed at the sampling temperature")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_datasets(run: RunConfig, tokenizer, row_adapter):
    from verl.utils.dataset import RLHFDataset

    d = run.data
    train = RLHFDataset(d.train_files, tokenizer, d.max_prompt_length, d.train_batch_size, shuffle=d.shuffle,
                        seed=d.seed, drop_last=True, prompt_key=d.prompt_key, truncation=d.truncation,
                        row_adapter=row_adapter)
    val = None
    if d.val_files:
        val = RLHFDataset(d.val_files, tokenizer, d.max_prompt_length, d.val_batch_size, shuffle=False,
                          seed=d.seed, drop_last=False, prompt_key=d.prompt_key, truncation=d.truncation,
                          max_samples=d.val_max_samples, row_adapter=row_adapter)
    return train, val


def load_hooks(run: RunConfig, cfg_dict: dict, tokenizer):
    """(row adapter, rollout fn, reward fn): the task's hook factories named in ``trainer``, called once."""
    from verl.hooks import passthrough_row_fields

    t = run.trainer
    row_adapter = (load_object(t.row_adapter, "trainer.row_adapter")(cfg_dict, tokenizer) if t.row_adapter
                   else passthrough_row_fields)
    rollout_fn = load_object(t.rollout_fn, "trainer.rollout_fn")(cfg_dict, tokenizer)
    reward_fn = load_object(t.reward_fn, "trainer.reward_fn")(cfg_dict, tokenizer)
    return row_adapter, rollout_fn, reward_fn


def _worker_configs(run: RunConfig, total_steps: int):
    from verl.workers.fsdp_workers import WorkerConfig

    tokenizer_path = run.model.tokenizer_path or run.model.path
    use_ref = run.algorithm.use_kl_in_reward or run.actor.use_kl_loss
    common = dict(tokenizer_path=tokenizer_path, fsdp=run.fsdp, rollout=run.rollout, device=run.trainer.device,
                  attn_implementation=run.model.attn_implementation, total_steps=total_steps, seed=run.trainer.seed,
                  weight_bucket_mb=run.weight_bucket_mb)
    actor = WorkerConfig(model_path=run.model.path, role_config=run.actor, optim=run.actor_optim, use_ref=use_ref,
                         **common)
    critic = WorkerConfig(model_path=run.model.critic_path or run.model.path, role_config=run.critic,
                          optim=run.critic_optim, use_ref=False, **common)
    return actor, critic


def _init_ray(run: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
                                      "PYTHONPATH") if k in os.environ}
    kwargs: dict = {"include_dashboard": False, "runtime_env": {"env_vars": env}}
    if run.ray.address:
        ray.init(address=run.ray.address, **kwargs)
    else:  # a new local cluster, even when another job's cluster runs on this machine (ray.init() would join it)
        ray.init(address="local", num_cpus=run.ray.num_cpus, **kwargs)


def build_worker_groups(run: RunConfig, total_steps: int):
    """(actor_rollout_ref group, critic group or None, release callable): Ray actors colocated on one pool of
    world-size bundles, or in-process workers when ray.enable=false."""
    from verl.single_controller.base import LocalWorkerGroup
    from verl.workers.fsdp_workers import ActorRolloutRefWorker, CriticWorker

    actor_cfg, critic_cfg = _worker_configs(run, total_steps)
    use_critic = ADVANTAGE_ESTIMATORS[run.algorithm.adv_estimator].uses_critic
    if not run.ray.enable:
        if run.trainer.world_size != 1:
            raise ValueError(f"[ray] enable=false runs one in-process worker; world size is {run.trainer.world_size}")
        actor = LocalWorkerGroup(ActorRolloutRefWorker, "actor_rollout_ref", config=actor_cfg)
        critic = LocalWorkerGroup(CriticWorker, "critic", config=critic_cfg) if use_critic else None
        return _init_models(actor, critic), critic, lambda: None
    from verl.single_controller.ray import RayResourcePool, RayWorkerGroup

    _init_ray(run)
    gpus = run.ray.worker_num_gpus if run.trainer.n_gpus_per_node > 0 else 0.0
    pool = RayResourcePool(run.trainer.world_size, run.ray.worker_num_cpus, gpus, run.ray.init_timeout_s)
    fraction = 0.5 if use_critic else 1.0
    actor = RayWorkerGroup(pool, ActorRolloutRefWorker, "actor_rollout_ref", {"config": actor_cfg}, fraction,
                           run.ray.timeout_s)
    critic = (RayWorkerGroup(pool, CriticWorker, "critic", {"config": critic_cfg}, fraction, run.ray.timeout_s)
              if use_critic else None)

    def release() -> None:
        for group in (actor, critic):
            if group is not None:
                group.shutdown()
        pool.release()
    return _init_models(actor, critic), critic, release


def _init_models(actor, critic):
    if critic is not None:
        critic.init_model()
    actor.init_model()
    return actor


def run_ppo(cfg: Any) -> dict:
    """Build everything from the config tree and train; returns the last step's metrics."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer, TrainerSpec
    from verl.utils.tokenizer import load_tokenizer
    from verl.utils.tracking import ENGINE_CONSOLE_KEYS, Tracking

    cfg_dict = to_container(cfg)
    run = build_run_config(cfg_dict)
    seed_everything(run.trainer.seed)
    tokenizer = load_tokenizer(run.model.tokenizer_path or run.model.path)
    row_adapter, rollout_fn, reward_fn = load_hooks(run, cfg_dict, tokenizer)
    train_ds, val_ds = _build_datasets(run, tokenizer, row_adapter)
    total_steps = run.trainer.total_steps(train_ds)
    actor_wg, critic_wg, release = build_worker_groups(run, total_steps)
    # a hook's optional console_metrics (verl.hooks): the task's headline keys, after the engine's
    task_keys = tuple(getattr(rollout_fn, "console_metrics", ())) + tuple(getattr(reward_fn, "console_metrics", ()))
    tracker = Tracking(run.trainer.project_name, run.trainer.experiment_name, run.trainer.logger,
                       run.trainer.default_local_dir, config=cfg_dict, wandb_mode=run.trainer.wandb_mode,
                       console_keys=ENGINE_CONSOLE_KEYS + task_keys)
    spec = TrainerSpec(trainer=run.trainer, algorithm=run.algorithm, rollout_n=run.rollout.n,
                       use_kl_loss=run.actor.use_kl_loss,
                       mask_observations_in_gae=run.algorithm.mask_observations_in_gae,
                       rollout_sleep=run.rollout.enable_sleep_mode)
    trainer = RayPPOTrainer(spec, tokenizer, train_ds, val_ds, actor_wg, critic_wg, rollout_fn, reward_fn, tracker,
                            config_dict=cfg_dict)
    try:
        return trainer.fit()
    finally:
        tracker.close()
        release()


def main() -> None:
    import hydra

    @hydra.main(config_path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs"),
                config_name="ppo_trainer", version_base="1.3")
    def _entry(cfg) -> None:
        run_ppo(cfg)
    _entry()


if __name__ == "__main__":
    main()
