"""The single-controller PPO loop with a task's hooks: one step is a list of named, timed phases.

    gen -> old_log_prob -> ref -> values -> reward -> kl -> adv -> update_critic -> update_actor -> sync_weights

(veRL's phase order; docs/method.md §1.10-1.11.) With ``rollout.enable_sleep_mode`` the rollout engine sleeps
(weights and KV cache released) from the start of ``old_log_prob`` to the start of ``sync_weights``, where it
wakes to receive the new weights; generation then finds it awake. The rollout and reward functions are the task's
hooks (``verl.hooks``), loaded by dotted path from the config (``trainer.rollout_fn`` / ``trainer.reward_fn``): the
engine never imports a task.
Advantages are computed on the driver on CPU tensors; everything heavy runs in the worker groups.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from verl.hooks import FAILED_SAMPLES_KEY, RewardFn, RewardResult, RolloutFn
from verl.protocol import DataProto
from verl.trainer.ppo import core_algos
from verl.utils import checkpoint as ckpt
from verl.utils.hydra_to_dataclass import AlgorithmConfig, TrainerConfig
from verl.workers.rollout.base import RolloutBackend

logger = logging.getLogger(__name__)

__all__ = ["RayPPOTrainer", "RewardResult", "RolloutFn", "RewardFn", "WorkerGroupRolloutBackend", "TrainerSpec",
           "FAILED_SAMPLES_KEY", "StepAborted"]  # the hook types are verl.hooks' (re-exported here)


class StepAborted(RuntimeError):
    """A training step (or validation) stopped before any update because too many rollouts failed; the metrics
    of the aborted step are in ``metrics``. The last checkpoint is left as it was."""

    def __init__(self, message: str, metrics: dict):
        super().__init__(message)
        self.metrics = metrics


class WorkerGroupRolloutBackend(RolloutBackend):
    """A RolloutBackend (docs/CONTRACTS.md) on the driver that sends ``generate`` to the actor-rollout worker
    group, splitting the prompts over the data-parallel ranks; it counts time and tokens for the metrics.

    ``replicas()``: one backend per rank, each calling that rank's engine alone, so that the async agent loop
    places every request on the least-busy rank instead of splitting the batch up front. The workers' rollout
    engines are separate unsharded copies (vLLM or HF), so one rank's ``generate`` needs no other rank;
    ``independent_ranks=False`` (a worker group whose ``generate`` is a collective) keeps the equal split.
    """

    def __init__(self, worker_group, independent_ranks: bool = True):
        from verl.workers.rollout.worker_group import GenerateClock, RankRolloutBackend

        self.wg = worker_group
        self.independent_ranks = independent_ranks
        self.clock = GenerateClock()
        ranks = range(worker_group.world_size)
        self._replicas = ([RankRolloutBackend(worker_group, rank, self.clock) for rank in ranks]
                          if independent_ranks and len(ranks) > 1 else [self])

    def reset_counters(self) -> None:
        self.clock.reset()

    @property
    def generate_s(self) -> float:
        """Wall seconds with at least one generate call running (on any rank)."""
        return self.clock.generate_s

    @property
    def generated_tokens(self) -> int:
        return self.clock.generated_tokens

    @property
    def calls(self) -> int:
        return self.clock.calls

    def generate(self, prompt_ids: list[list[int]], params) -> list:
        from verl.workers.rollout.worker_group import split_generate

        return self.clock.timed(lambda: split_generate(self.wg, prompt_ids, params))

    def replicas(self) -> list[RolloutBackend]:
        return list(self._replicas)

    def load_weights(self, state_dict) -> None:
        raise RuntimeError("WorkerGroupRolloutBackend: weights are pushed inside the workers "
                           "(ActorRolloutRefWorker.sync_rollout_weights), not from the driver")

    def sleep(self) -> None:
        self.wg.sleep_rollout()

    def wake_up(self) -> None:
        self.wg.wake_rollout()


@dataclass(frozen=True)
class TrainerSpec:
    """The typed settings the loop needs (built by main_ppo from the Hydra tree)."""
    trainer: TrainerConfig
    algorithm: AlgorithmConfig
    rollout_n: int = 1
    use_kl_loss: bool = False
    mask_observations_in_gae: bool = True
    rollout_sleep: bool = False
    """rollout.enable_sleep_mode: sleep the engine during the log-prob and update phases."""


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.float()
    return float((x.float() * mask).sum() / mask.sum().clamp(min=1.0))


def _stats(prefix: str, values: np.ndarray | torch.Tensor) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {}
    return {f"{prefix}/mean": float(v.mean()), f"{prefix}/max": float(v.max()), f"{prefix}/min": float(v.min())}


def _merge_rollout(batch: DataProto, gen: DataProto, metrics: dict) -> DataProto:
    """The rollout output plus any dataset non-tensor it did not carry over; its ``rollout_metrics`` (the task's
    statistics) move from meta_info into ``metrics``."""
    meta = dict(gen.meta_info)
    metrics.update(meta.pop("rollout_metrics", {}))
    extra = {k: v for k, v in batch.non_tensor_batch.items() if k not in gen.non_tensor_batch}
    return DataProto(batch=gen.batch, non_tensor_batch={**gen.non_tensor_batch, **extra}, meta_info=meta)


def _logprob_diff(rollout_log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor) -> dict:
    """``rollout/logprob_diff_{mean,max}``: |engine log-prob − actor log-prob| over the generated tokens.

    rollout_log_probs, old_log_probs: (B, T) float; mask: (B, T) response_mask (1 on generated tokens). The
    engine sampled with the weights of the last sync and the actor recomputes with its own, so a gap well above
    the engine's numeric noise (bf16: ~1e-2) means the engine holds other weights than the actor.
    """
    diff = (rollout_log_probs.float() - old_log_probs.float()).abs()
    keep = mask.bool()
    if not keep.any():
        return {}
    return {"rollout/logprob_diff_mean": float(diff[keep].mean()), "rollout/logprob_diff_max": float(diff[keep].max())}


def _mean_dicts(dicts: list[dict]) -> dict:
    """Average per-rank metric dicts key by key."""
    keys = sorted({k for d in dicts for k in d})
    return {k: float(np.mean([d[k] for d in dicts if k in d])) for k in keys}


def _is_score(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _per_source_means(sources: list[str], samples: list[dict], keys: tuple[str, ...] | None) -> dict:
    """``val/{source}/{key}`` and ``val/all/{key}``: the real mean over that source's samples of each score key,
    plus ``val/{source}/n``. sources: the samples' data_source; samples: the reward hook's per-sample dicts; keys:
    ``RewardResult.score_keys`` (None: every key whose values are all ints or floats, bools excluded). (The
    released code logged the last sample's score, docs/method.md §6.2 item 5.)"""
    if keys is None:
        names = {k for sample in samples for k in sample}
        keys = tuple(sorted(k for k in names if all(_is_score(s[k]) for s in samples if k in s)))
    metrics = {}
    for source in sorted(set(sources)) + ["all"]:
        rows = [sample for s, sample in zip(sources, samples) if source == "all" or s == source]
        for key in keys:
            values = [float(r[key]) for r in rows if key in r]
            if values:
                metrics[f"val/{source}/{key}"] = float(np.mean(values))
        metrics[f"val/{source}/n"] = float(len(rows))
    return metrics


class RayPPOTrainer:
    """Drives the worker groups through PPO steps, validation and checkpoints."""

    def __init__(self, spec: TrainerSpec, tokenizer, train_dataset, val_dataset, actor_wg, critic_wg,
                 rollout_fn: RolloutFn, reward_fn: RewardFn, tracker, config_dict: dict | None = None):
        self.spec = spec
        self.cfg = spec.trainer
        self.tokenizer = tokenizer
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.actor_wg = actor_wg
        self.critic_wg = critic_wg
        self.rollout_fn = rollout_fn
        self.reward_fn = reward_fn
        self.tracker = tracker
        self.config_dict = config_dict or {}
        self.backend = WorkerGroupRolloutBackend(actor_wg)
        alg = spec.algorithm
        self.kl_ctrl = core_algos.build_kl_controller(alg.kl_ctrl.type, alg.kl_ctrl.kl_coef, alg.kl_ctrl.target_kl,
                                                      alg.kl_ctrl.horizon)
        self.use_critic = core_algos.ADVANTAGE_ESTIMATORS[alg.adv_estimator].uses_critic
        self.use_ref = alg.use_kl_in_reward or spec.use_kl_loss
        self.global_step = 0
        self.engine_asleep = False
        self.total_steps = self.cfg.total_steps(self.train_dataset)
        self.root = self.cfg.default_local_dir
        if self.use_critic and critic_wg is None:
            raise ValueError(f"[algorithm] adv_estimator={alg.adv_estimator} needs a critic worker group")

    # ---- rollout engine sleep ---------------------------------------------------------------------------------
    def _sleep_engine(self, metrics: dict) -> None:
        """Release the engine's memory before FSDP's phases (only with rollout.enable_sleep_mode)."""
        if self.spec.rollout_sleep and not self.engine_asleep:
            metrics["perf/rollout_sleep_s"] = max(self.actor_wg.sleep_rollout())
            self.engine_asleep = True

    def _wake_engine(self, metrics: dict) -> None:
        if self.engine_asleep:
            metrics["perf/rollout_wake_s"] = max(self.actor_wg.wake_rollout())
            self.engine_asleep = False

    # ---- phases of one step ----------------------------------------------------------------------------------
    def _phase_generate(self, batch: DataProto, metrics: dict) -> DataProto:
        """Multi-turn rollout on the driver; ``generate`` calls go to the workers. uid = dataset index, set
        before the GRPO repeat, so the samples of one prompt share it."""
        self._wake_engine(metrics)  # normally already awake since the last weight sync
        n = self.spec.rollout_n
        batch = DataProto(batch=batch.batch, meta_info=batch.meta_info,
                          non_tensor_batch={**batch.non_tensor_batch, "uid": batch.non_tensor_batch["index"].copy()})
        if n > 1:
            batch = batch.repeat(n, interleave=True)
        self.backend.reset_counters()
        gen = _merge_rollout(batch, self.rollout_fn(batch, self.backend, validate=False), metrics)
        metrics["timing_s/generate"] = self.backend.generate_s
        self._check_failures(gen, metrics, "rollout", f"training step {self.global_step}")
        return gen

    def _check_failures(self, gen: DataProto, metrics: dict, prefix: str, where: str) -> None:
        """Add the hook's failed-row count to ``{prefix}/failed_samples`` (and the batch's share to
        ``{prefix}/failed_share``, the largest over batches); raise StepAborted when failed / B >
        ``trainer.max_failed_rollout_share``: an environment outage must not be trained on (or validated) silently."""
        failed = int(gen.meta_info.get(FAILED_SAMPLES_KEY, 0))
        share = failed / max(len(gen), 1)
        metrics[f"{prefix}/failed_samples"] = metrics.get(f"{prefix}/failed_samples", 0.0) + float(failed)
        metrics[f"{prefix}/failed_share"] = max(metrics.get(f"{prefix}/failed_share", 0.0), share)
        limit = self.cfg.max_failed_rollout_share
        if share > limit:
            raise StepAborted(
                f"[trainer] {where} aborted: {failed} of {len(gen)} rollouts had an environment failure (share "
                f"{share:.3f} > trainer.max_failed_rollout_share={limit}); this step is not saved and the "
                f"last checkpoint is kept. Check the rollout's environment (the services it calls), then rerun to "
                f"resume.", metrics)

    def _phase_old_log_prob(self, batch: DataProto, metrics: dict) -> DataProto:
        self._sleep_engine(metrics)
        out = self.actor_wg.compute_log_prob(batch)
        if "entropys" in out.batch:
            metrics["actor/entropy"] = _masked_mean(out.batch["entropys"], batch.batch["response_mask"])
            out = out.select(batch_keys=["old_log_probs"])
        if "rollout_log_probs" in batch.batch:
            metrics.update(_logprob_diff(batch.batch["rollout_log_probs"], out.batch["old_log_probs"],
                                         batch.batch["response_mask"]))
        return batch.union(out)

    def _phase_ref(self, batch: DataProto, metrics: dict) -> DataProto:
        return batch.union(self.actor_wg.compute_ref_log_prob(batch)) if self.use_ref else batch

    def _phase_values(self, batch: DataProto, metrics: dict) -> DataProto:
        return batch.union(self.critic_wg.compute_values(batch)) if self.use_critic else batch

    def _phase_reward(self, batch: DataProto, metrics: dict) -> DataProto:
        result = self.reward_fn(batch)
        metrics.update(result.metrics)
        scores = result.token_level_scores.float()
        return batch.union(DataProto.from_dict(tensors={"token_level_scores": scores}))

    def _phase_kl(self, batch: DataProto, metrics: dict) -> DataProto:
        """KL as a reward penalty (released StePPO) or rewards = scores (KL loss / no reference)."""
        scores = batch.batch["token_level_scores"]
        if self.spec.algorithm.use_kl_in_reward:
            rewards, kl_metrics = core_algos.apply_kl_penalty(
                scores, batch.batch["old_log_probs"], batch.batch["ref_log_probs"], batch.batch["response_mask"],
                self.kl_ctrl, self.spec.algorithm.kl_penalty)
            metrics.update(kl_metrics)
        else:
            rewards = scores
        return batch.union(DataProto.from_dict(tensors={"token_level_rewards": rewards}))

    def _phase_advantage(self, batch: DataProto, metrics: dict) -> DataProto:
        alg, b = self.spec.algorithm, batch.batch
        response_len = b["responses"].shape[1]
        inputs = core_algos.AdvantageInputs(
            token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"],
            values=b["values"] if self.use_critic else None, group_index=batch.non_tensor_batch["uid"],
            group_size=self.spec.rollout_n, skip_masked=self.spec.mask_observations_in_gae,
            whiten_mask=None if self.spec.mask_observations_in_gae else b["attention_mask"][:, -response_len:])
        adv, ret = core_algos.compute_advantage(alg.adv_estimator, inputs, alg)
        return batch.union(DataProto.from_dict(tensors={"advantages": adv, "returns": ret}))

    def _phase_update_critic(self, batch: DataProto, metrics: dict) -> DataProto:
        if self.use_critic:
            metrics.update(_mean_dicts(self.critic_wg.update_critic(batch)))
        return batch

    def _phase_update_actor(self, batch: DataProto, metrics: dict) -> DataProto:
        if self.global_step > self.cfg.critic_warmup:
            metrics.update(_mean_dicts(self.actor_wg.update_actor(batch)))
            metrics["actor/updated"] = 1.0
        else:
            metrics["actor/updated"] = 0.0
        return batch

    def _phase_sync_weights(self, batch: DataProto, metrics: dict) -> DataProto:
        self._wake_engine(metrics)
        if metrics.get("actor/updated"):
            metrics["perf/weight_sync_s"] = max(self.actor_wg.sync_rollout_weights())
        return batch

    def phases(self) -> list[tuple[str, Callable[[DataProto, dict], DataProto]]]:
        return [("gen", self._phase_generate), ("old_log_prob", self._phase_old_log_prob), ("ref", self._phase_ref),
                ("values", self._phase_values), ("reward", self._phase_reward), ("kl", self._phase_kl),
                ("adv", self._phase_advantage), ("update_critic", self._phase_update_critic),
                ("update_actor", self._phase_update_actor), ("sync_weights", self._phase_sync_weights)]

    def train_step(self, batch: DataProto) -> tuple[DataProto, dict]:
        """Run every phase on ``batch``; returns the final batch and the metrics with ``timing_s/{phase}``."""
        metrics: dict = {}
        for name, phase in self.phases():
            start = time.perf_counter()
            batch = phase(batch, metrics)
            metrics[f"timing_s/{name}"] = time.perf_counter() - start
        return batch, metrics

    def _run_step(self) -> dict:
        """One training iteration: draw the batch, trace it, run the phases, compute the metrics.

        ``timing_s/step`` covers all of it; ``timing_s/trainer_overhead`` is what the phases do not cover
        (batch loading, tracing, metric computation), the cost of the controller itself.
        """
        start = time.perf_counter()
        rng_before = ckpt.rng_fingerprint()
        batch = self.train_dataset.next_batch()
        self.global_step += 1
        self._trace_batch_with(batch, rng_before)
        batch, metrics = self.train_step(batch)
        metrics.update(self._data_metrics(batch))
        metrics.update(self._perf_metrics(batch, metrics, time.perf_counter() - start))
        metrics["timing_s/step"] = time.perf_counter() - start
        phase_total = sum(metrics[f"timing_s/{name}"] for name, _ in self.phases())
        metrics["timing_s/trainer_overhead"] = metrics["timing_s/step"] - phase_total
        metrics["perf/throughput"] = metrics["perf/total_tokens"] / metrics["timing_s/step"]
        metrics["train/epoch"] = float(self.train_dataset.epoch)
        return metrics

    # ---- metrics ---------------------------------------------------------------------------------------------
    def _data_metrics(self, batch: DataProto) -> dict:
        b = batch.batch
        mask = b["response_mask"].float()
        out = {}
        out.update(_stats("critic/score", b["token_level_scores"].sum(-1)))
        out.update(_stats("critic/rewards", b["token_level_rewards"].sum(-1)))
        out["critic/advantages/mean"] = _masked_mean(b["advantages"], mask)
        on_mask = b["advantages"][mask.bool()]
        if on_mask.numel():
            out["critic/advantages/max"] = float(on_mask.max())
            out["critic/advantages/min"] = float(on_mask.min())
        out["critic/returns/mean"] = _masked_mean(b["returns"], mask)
        if "values" in b:
            out["critic/values/mean"] = _masked_mean(b["values"], mask)
        out.update(_stats("response_length", mask.sum(-1)))
        response_len = b["responses"].shape[1]
        out.update(_stats("response_length_with_obs", b["attention_mask"][:, -response_len:].sum(-1)))
        out["response_length/clip_ratio"] = float((b["attention_mask"][:, -1] == 1).float().mean())
        # Task-specific statistics come from the rollout hook's meta_info["rollout_metrics"] only.
        return out

    def _perf_metrics(self, batch: DataProto, metrics: dict, elapsed_s: float) -> dict:
        tokens = float(batch.batch["attention_mask"].sum())
        out = {"perf/total_tokens": tokens,
               "perf/gen_tokens_per_s": self.backend.generated_tokens / max(self.backend.generate_s, 1e-9),
               "perf/generate_calls": float(self.backend.calls)}
        memory = list(self.actor_wg.peak_memory_gb())
        if self.critic_wg is not None:
            memory += list(self.critic_wg.peak_memory_gb())
        out["perf/max_memory_gb"] = max(memory)
        return out

    # ---- validation --------------------------------------------------------------------------------------------
    def validate(self) -> dict:
        """Greedy rollouts over the validation set: per data_source the mean of the reward hook's per-sample scores
        (``RewardResult.score_keys``), and a predictions dump."""
        if self.val_dataset is None:
            return {}
        self._wake_engine({})
        records, sources, samples, failures = [], [], [], {}
        score_keys: tuple[str, ...] | None = None
        for batch in self.val_dataset.iter_epoch():
            gen = _merge_rollout(batch, self.rollout_fn(batch, self.backend, validate=True), {})
            self._check_failures(gen, failures, "val_rollout", f"validation at step {self.global_step}")
            result = self.reward_fn(gen)
            records += self._prediction_records(gen, result)
            sources += [str(s) for s in gen.non_tensor_batch["data_source"]]
            samples += result.per_sample
            score_keys = result.score_keys
        metrics = {**_per_source_means(sources, samples, score_keys), **failures}
        if self.cfg.save_predictions:
            self._dump_predictions(records)
        return metrics

    def _prediction_records(self, gen: DataProto, result: RewardResult) -> list[dict]:
        """One row per sample: the trainer's ``id`` and ``data_source``, then the hook's per-sample dict, merged
        over the hook's ``prediction_records`` rows when it has that attribute (``verl.hooks.RewardFn``)."""
        nt = gen.non_tensor_batch
        if len(result.per_sample) != len(gen):
            raise ValueError(f"[trainer] reward_fn returned {len(result.per_sample)} per_sample dicts for "
                             f"{len(gen)} validation samples")
        records = [{"id": str(nt["id"][i]), "data_source": str(nt["data_source"][i]), **sample}
                   for i, sample in enumerate(result.per_sample)]
        hook = getattr(self.reward_fn, "prediction_records", None)
        if hook is not None:
            extra = list(hook(gen, result))
            if len(extra) != len(records):
                raise ValueError(f"[trainer] reward_fn.prediction_records returned {len(extra)} rows for "
                                 f"{len(records)} validation samples")
            records = [{**e, **r} for e, r in zip(extra, records)]
        return records

    def _dump_predictions(self, records: list[dict]) -> None:
        path = os.path.join(self.root, "predictions", f"step_{self.global_step}.jsonl")
        text = "".join(json.dumps(r, default=str) + "\n" for r in records)
        ckpt.atomic_write_text(path, text)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Workers' shards, then the driver state, then the HF export; ``COMPLETE`` and ``latest`` last."""
        directory = ckpt.step_dir(self.root, self.global_step)
        if os.path.exists(directory):
            shutil.rmtree(directory)  # a half-written save of this step from a crashed run
        os.makedirs(directory)
        self.actor_wg.save_checkpoint(directory)
        if self.critic_wg is not None:
            self.critic_wg.save_checkpoint(directory)
        state = {"global_step": self.global_step, "dataloader": self.train_dataset.state_dict(),
                 "rng": ckpt.capture_rng_state(), "kl_coef": self.kl_ctrl.value}
        ckpt.atomic_torch_save(state, os.path.join(directory, "trainer_state.pt"))
        if self.cfg.export_hf:
            self.actor_wg.export_hf(os.path.join(directory, "hf"))
        ckpt.mark_complete(directory)
        ckpt.write_latest(self.root, self.global_step)
        ckpt.rotate_checkpoints(self.root, self.cfg.max_ckpt_to_keep)
        return directory

    def load_checkpoint(self) -> str | None:
        path = ckpt.find_resume_checkpoint(self.root, self.cfg.resume_mode)
        if path is None:
            return None
        self.actor_wg.load_checkpoint(path)
        if self.critic_wg is not None:
            self.critic_wg.load_checkpoint(path)
        state_path = os.path.join(path, "trainer_state.pt")
        try:
            state = torch.load(state_path, weights_only=False)
        except Exception as err:  # verified above, so this is damage after the save, or another torch version
            raise RuntimeError(f"[checkpoint] cannot load {state_path}: {err}") from err
        self.global_step = int(state["global_step"])
        self.train_dataset.load_state_dict(state["dataloader"])
        self.kl_ctrl.value = float(state["kl_coef"])
        ckpt.restore_rng_state(state["rng"])
        logger.info("resumed from %s at global step %d", path, self.global_step)
        return path

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _is_due(self, freq: int) -> bool:
        return freq > 0 and (self.global_step % freq == 0 or self.global_step == self.total_steps)

    def fit(self) -> dict:
        """Train until ``total_steps``; returns the last step's metrics."""
        os.makedirs(self.root, exist_ok=True)
        self.load_checkpoint()
        self._record_workers()
        last: dict = {}
        if self.cfg.val_only or (self.cfg.val_before_train and self.global_step == 0):
            last = self.validate()
            self.tracker.log(last, step=self.global_step)
            if self.cfg.val_only:
                return last
        with _progress(self.cfg.progress_bar, self.global_step, self.total_steps) as bar:
            while self.global_step < self.total_steps:
                try:
                    last = self._run_step()
                except StepAborted as err:
                    self._log_aborted(err, err.metrics)
                if self._is_due(self.cfg.test_freq):
                    start = time.perf_counter()
                    try:
                        last.update(self.validate())
                    except StepAborted as err:
                        self._log_aborted(err, {**last, **err.metrics})
                    last["timing_s/validate"] = time.perf_counter() - start
                if self._is_due(self.cfg.save_freq):
                    start = time.perf_counter()
                    self.save_checkpoint()
                    last["timing_s/save_checkpoint"] = time.perf_counter() - start
                self.tracker.log(last, step=self.global_step)
                bar.update(1)
        return last

    def _log_aborted(self, err: StepAborted, metrics: dict) -> None:
        """Log the aborted step's line (it records how many rollouts failed) and re-raise; no checkpoint is saved,
        so a rerun resumes from the last one."""
        self.tracker.log({**metrics, "trainer/aborted": 1.0}, step=self.global_step)
        logger.error("%s", err)
        raise err

    def _record_workers(self) -> None:
        """Write ``workers.json``: where every rank of every worker group of this run runs (node id, host, pid)."""
        groups = {"actor_rollout_ref": self.actor_wg.node_info()}
        if self.critic_wg is not None:
            groups["critic"] = self.critic_wg.node_info()
        ckpt.atomic_write_text(os.path.join(self.root, "workers.json"), json.dumps(groups, indent=1) + "\n")

    def _trace_batch_with(self, batch: DataProto, driver_rng: str) -> None:
        """Append the step's prompt ids and RNG fingerprints to ``data_trace.jsonl`` (the resume checks use it)."""
        record = {"step": self.global_step, "index": [int(i) for i in batch.non_tensor_batch["index"]],
                  "id": [str(i) for i in batch.non_tensor_batch["id"]], "epoch": self.train_dataset.epoch,
                  "driver_rng": driver_rng, "worker_rng": list(self.actor_wg.rng_fingerprint())}
        with open(os.path.join(self.root, "data_trace.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def _progress(enabled: bool, initial: int, total: int) -> Iterator:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, desc="steps", disable=not enabled, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
