"""Worker classes run by the single controller (as Ray actors, or in-process for the GPU smoke script).

- ``ActorRolloutRefWorker``: the policy (an RL-core ``Actor`` on an FSDP2-sharded HF causal LM), its rollout
  engine (an HF or vLLM backend over a separate, unsharded copy of the weights, refreshed after every actor
  update) and the frozen reference policy.
- ``CriticWorker``: the value model (``CausalLMWithValueHead``) inside an RL-core ``Critic``.

Each worker joins a torch.distributed group (NCCL on GPU, gloo on CPU). With more than one rank, or on GPU,
the modules are wrapped with FSDP2 ``fully_shard`` per decoder layer and at the root (bf16 params with fp32
reductions on GPU; optional CPU offload). Methods take and return ``DataProto`` on CPU.

Why a separate rollout copy: sampling runs a different number of forward passes on every rank, which would
deadlock FSDP's all-gathers; an engine with its own full weights (like vLLM) samples independently.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from verl.protocol import DataProto
from verl.single_controller.base import Dispatch, register
from verl.single_controller.worker import Worker
from verl.utils.checkpoint import (atomic_torch_save, capture_rng_state, restore_rng_state,
                                   rng_fingerprint)
from verl.utils.hydra_to_dataclass import FSDPConfig, OptimConfig, RolloutConfig, yaml_default, yaml_section_default
from verl.utils.fs import follow_umask

logger = logging.getLogger(__name__)

__all__ = ["WorkerConfig", "ActorRolloutRefWorker", "CriticWorker", "resolve_device", "build_lr_scheduler",
           "load_sharded_causal_lm"]


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, built once on the driver from the Hydra tree (no DictConfig below here).

    ``role_config`` is the RL-core ``ActorConfig`` or ``CriticConfig`` with batch sizes already per rank.
    """
    model_path: str
    tokenizer_path: str
    role_config: Any
    optim: OptimConfig = yaml_section_default(OptimConfig, "actor_rollout_ref.optim")
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    use_ref: bool = True
    device: str = yaml_default("trainer.device")
    attn_implementation: str = yaml_default("model.attn_implementation")
    total_steps: int = 1
    seed: int = yaml_default("trainer.seed")
    weight_bucket_mb: int = yaml_default("actor_rollout_ref.weight_bucket_mb")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("[trainer] device=cuda but torch sees no GPU in this worker; use trainer.device=auto")
    return torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    """Linear warm-up over W = int(warmup_ratio * total_steps) updates to a constant LR (docs/method.md §1.10 item 6).

    Update u (0-based) uses lr · u / W while u < W, then lr: the released veRL schedule, so the first update has
    LR 0 and update W is the first at the full LR (W = 4: 0, 0.25, 0.5, 0.75, 1, 1, ...).
    """
    warmup = optim.warmup_steps if optim.warmup_steps >= 0 else int(optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        return min(1.0, step / warmup) if warmup > 0 else 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _use_fsdp(cfg: FSDPConfig, world_size: int, device: torch.device) -> bool:
    if cfg.enable in ("auto",):
        return world_size > 1 or device.type == "cuda"
    enabled = cfg.enable in (True, "true")
    if not enabled and world_size > 1:
        raise ValueError(f"[fsdp] enable=false with {world_size} data-parallel ranks would train unsynchronised "
                         f"replicas; set actor_rollout_ref.fsdp.enable=auto")
    return enabled


def _shard(module: torch.nn.Module, cfg: FSDPConfig, device: torch.device, world_size: int) -> None:
    """FSDP2: one ``fully_shard`` unit per decoder layer (found by class name), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    kw: dict = {"mesh": mesh}
    if device.type == "cuda" and cfg.mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.param_offload or cfg.optimizer_offload:
        kw["offload_policy"] = CPUOffloadPolicy()  # FSDP2 offloads params, grads and optimizer state together
    for sub in module.modules():
        if type(sub).__name__.endswith("DecoderLayer"):
            fully_shard(sub, **kw)
    fully_shard(module, **kw)


def load_sharded_causal_lm(model_path: str, attn_implementation: str, cfg: FSDPConfig, device: torch.device,
                           rank: int, world_size: int) -> torch.nn.Module:
    """An FSDP2-sharded fp32 causal LM whose checkpoint only rank 0 reads.

    Rank 0 loads the checkpoint on the CPU. Every rank builds the model on the meta device, shards it
    (``_shard``), allocates only its own shards on ``device`` and receives them from rank 0, one tensor at a time
    (``set_model_state_dict(..., broadcast_from_rank0=True)``). Buffers, which the state dict lacks when they
    are non-persistent (rotary ``inv_freq``), are broadcast from rank 0 as well. So rank r != 0 holds 1/world of
    the parameters plus one tensor in flight, never a full copy (3B fp32: 12 GB per rank otherwise).
    Collective: every rank of the group must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    full_state, buffers = {}, {}
    if rank == 0:
        source = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                      attn_implementation=attn_implementation)
        full_state = source.state_dict()
        buffers = dict(source.named_buffers())
    hf_config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    _shard(model, cfg, device, world_size)
    model.to_empty(device="cpu" if (cfg.param_offload or cfg.optimizer_offload) else device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            value = buffers[name].to(device) if rank == 0 else torch.empty(buffer.shape, dtype=buffer.dtype,
                                                                           device=device)
            dist.broadcast(value, src=0)
            buffer.copy_(value)
    return model


def _full_state_items(module: torch.nn.Module, device: torch.device):
    """(name, full tensor) for every entry of the (possibly sharded) state dict; a collective per tensor.

    With FSDP2 CPU offload the local shards sit on the CPU while the process group is NCCL, so each shard is
    moved to ``device`` before the all-gather.
    """
    from torch.distributed.tensor import DTensor

    for name, value in module.state_dict().items():
        if not isinstance(value, DTensor):
            yield name, value
            continue
        local = value.to_local()
        if local.device != device:
            value = DTensor.from_local(local.to(device), value.device_mesh, value.placements, run_check=False,
                                       shape=value.shape, stride=value.stride())
        yield name, value.full_tensor()


class _DistributedWorker(Worker):
    """Device, optimizer, RNG and checkpoint helpers shared by both workers."""

    def __init__(self, config: WorkerConfig, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.config = config
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed + rank)
        self.module: torch.nn.Module | None = None
        self.optimizer = None
        self.lr_scheduler = None

    def distributed_backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def init_distributed(self, addr: str, port: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        super().init_distributed(addr, port)

    def _build_optimizer(self) -> None:
        optim = self.config.optim
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, optim, self.config.total_steps)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def _save_state(self, directory: str) -> None:
        """Model + optimizer via torch.distributed.checkpoint (every rank writes its shard); scheduler, RNG and the
        Actor/Critic update counter (``_num_updates``, the seed of mini-batch shuffling) per rank. The driver
        marks the step directory complete only after every rank returned."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, "dcp"))
        extra = {"lr_scheduler": self.lr_scheduler.state_dict(), "rng": capture_rng_state(),
                 "world_size": self.world_size, "num_updates": self._role()._num_updates}
        atomic_torch_save(extra, os.path.join(directory, f"extra_rank_{self.rank}.pt"))
        dist.barrier()

    def _load_state(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(directory, "dcp"))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra_path = os.path.join(directory, f"extra_rank_{self.rank}.pt")
        if not os.path.exists(extra_path):
            raise FileNotFoundError(f"[checkpoint] {extra_path} is missing: the checkpoint was saved with a "
                                    f"different number of ranks; resume with the same trainer.dp_size")
        extra = torch.load(extra_path, weights_only=False)
        self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        restore_rng_state(extra["rng"])
        if "num_updates" in extra:
            self._role()._num_updates = int(extra["num_updates"])  # seeds the mini-batch shuffling
        else:
            logger.warning("[checkpoint] %s has no num_updates (an older checkpoint): mini-batch shuffling "
                           "restarts from update 0", extra_path)

    def _role(self):
        """The RL-core ``Actor``/``Critic`` whose update counter is checkpointed."""
        raise NotImplementedError

    @register(Dispatch.ONE_TO_ALL)
    def rng_fingerprint(self) -> str:
        return rng_fingerprint()

    @register(Dispatch.ONE_TO_ALL)
    def peak_memory_gb(self) -> float:
        """Peak GPU memory allocated (GiB), or the peak resident set size of the process on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def _to_device(self, data: DataProto) -> DataProto:
        return data.to(self.device)


class ActorRolloutRefWorker(_DistributedWorker):
    """Policy + rollout engine + reference policy on the same ranks (the colocated hybrid engine)."""

    def __init__(self, config: WorkerConfig, rank: int, world_size: int):
        super().__init__(config, rank, world_size)
        self.actor = None
        self.ref = None
        self.backend = None
        self.tokenizer = None
        self.hf_config = None

    def _load_causal_lm(self, trainable: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """A full copy on this rank (the unsharded path and the HF rollout copy)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.config.model_path, dtype=dtype,
                                                     attn_implementation=self.config.attn_implementation)
        model.to(self.device)
        if not trainable:
            model.requires_grad_(False)
            model.eval()
        return model

    def _load_fsdp_causal_lm(self, trainable: bool) -> torch.nn.Module:
        """A sharded model: read by rank 0 only (fsdp.load_from_rank0), else loaded in full, then sharded."""
        cfg = self.config
        if cfg.fsdp.load_from_rank0:
            model = load_sharded_causal_lm(cfg.model_path, cfg.attn_implementation, cfg.fsdp, self.device,
                                           self.rank, self.world_size)
            if not trainable:
                model.requires_grad_(False)
                model.eval()
            return model
        model = self._load_causal_lm(trainable)
        _shard(model, cfg.fsdp, self.device, self.world_size)
        return model

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        from transformers import AutoConfig

        from verl.utils.tokenizer import load_tokenizer
        from verl.workers.actor import Actor

        cfg = self.config
        self.tokenizer = load_tokenizer(cfg.tokenizer_path)
        self.hf_config = AutoConfig.from_pretrained(cfg.model_path)
        fsdp = _use_fsdp(cfg.fsdp, self.world_size, self.device)
        self.module = self._load_fsdp_causal_lm(trainable=True) if fsdp else self._load_causal_lm(trainable=True)
        self._build_optimizer()
        self.actor = Actor(self.module, self.optimizer, cfg.role_config, lr_scheduler=self.lr_scheduler)
        if cfg.use_ref:
            ref_module = (self._load_fsdp_causal_lm(trainable=False) if fsdp
                          else self._load_causal_lm(trainable=False))
            self.ref = Actor(ref_module, None, cfg.role_config)
        self.backend = self._build_rollout()
        self.sync_rollout_weights()

    def _build_rollout(self):
        cfg = self.config
        sleep = cfg.rollout.enable_sleep_mode
        if cfg.rollout.backend == "vllm":
            from verl.workers.rollout.vllm import VLLMRolloutBackend
            # load_format=dummy: the engine starts with random weights instead of reading the checkpoint again
            # (in its own dtype, on every rank); init_model's first sync fills in the actor's weights.
            engine_kwargs = {"load_format": "dummy", **dict(cfg.rollout.engine_kwargs)}
            return VLLMRolloutBackend(cfg.model_path, self.tokenizer, enable_sleep_mode=sleep, **engine_kwargs)
        from verl.workers.rollout.hf import HFRolloutBackend
        # bf16 on GPU, read as bf16 (no fp32 copy on the way); fp32 on CPU
        model = self._load_causal_lm(trainable=False,
                                     dtype=torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        return HFRolloutBackend(model, self.tokenizer, enable_sleep_mode=sleep)

    # ---- rollout ---------------------------------------------------------------------------------------------
    @register(Dispatch.DP_COMPUTE_LIST)
    def generate(self, prompt_ids: list[list[int]], params) -> list:
        """Sample continuations of this rank's share of the prompts (see RolloutBackend.generate).

        Without a seed, one is drawn from this worker's torch RNG (checkpointed), so every call samples
        differently and a resumed run samples exactly as the uninterrupted one would have.
        """
        if params.seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
        else:
            seed = params.seed + 7919 * self.rank
        return self.backend.generate(prompt_ids, dataclasses.replace(params, seed=seed))

    @register(Dispatch.ONE_TO_ALL)
    def wake_rollout(self) -> float:
        """Restore the engine's weights and KV cache (after ``sleep_rollout``); returns seconds taken."""
        start = time.perf_counter()
        self.backend.wake_up()
        return time.perf_counter() - start

    @register(Dispatch.ONE_TO_ALL)
    def sleep_rollout(self) -> float:
        """Release the engine's weights and KV cache for the training phases; returns seconds taken."""
        start = time.perf_counter()
        self.backend.sleep()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return time.perf_counter() - start

    @register(Dispatch.ONE_TO_ALL)
    def sync_rollout_weights(self) -> float:
        """Push the actor's current weights into the rollout engine in buckets; returns seconds taken.

        Every rank all-gathers each sharded tensor (a collective, same order everywhere) and loads full copies.
        With vLLM the tensors go over in buckets of about ``weight_bucket_mb`` cut only between decoder layers
        (``iter_weight_buckets``): a layer whose q/k/v arrive in two ``load_weights`` calls is corrupted.
        """
        from verl.workers.rollout.base import iter_weight_buckets

        start = time.perf_counter()
        items = _full_state_items(self.module, self.device)
        bucket_bytes = self.config.weight_bucket_mb * 2**20
        if self.config.rollout.backend == "vllm" and bucket_bytes > 0:  # <= 0: the whole state dict at once
            for bucket in iter_weight_buckets(items, bucket_bytes):
                self.backend.load_weights(dict(bucket))
        else:
            self.backend.load_weights({name: tensor.detach() for name, tensor in items})
        return time.perf_counter() - start

    # ---- training --------------------------------------------------------------------------------------------
    @register(Dispatch.DP_COMPUTE_PROTO)
    def compute_log_prob(self, data: DataProto) -> DataProto:
        """``old_log_probs`` (B, T) and ``entropys`` (B, T) of the responses under the current policy."""
        log_probs, entropy = self.actor.compute_log_prob(self._to_device(data), calculate_entropy=True)
        tensors = {"old_log_probs": log_probs.detach().cpu()}
        if entropy is not None:
            tensors["entropys"] = entropy.detach().cpu()
        return DataProto.from_dict(tensors=tensors)

    @register(Dispatch.DP_COMPUTE_PROTO)
    def compute_ref_log_prob(self, data: DataProto) -> DataProto:
        """``ref_log_probs`` (B, T) under the frozen reference policy."""
        if self.ref is None:
            raise RuntimeError("compute_ref_log_prob called but the worker was built with use_ref=false")
        log_probs, _ = self.ref.compute_log_prob(self._to_device(data))
        return DataProto.from_dict(tensors={"ref_log_probs": log_probs.detach().cpu()})

    @register(Dispatch.DP_COMPUTE_PROTO)
    def update_actor(self, data: DataProto) -> dict:
        """One PPO update over this rank's share; returns its metrics (the Actor steps the LR scheduler)."""
        return dict(self.actor.update_policy(self._to_device(data)))

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def _role(self):
        return self.actor

    @register(Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, directory: str) -> None:
        self._save_state(os.path.join(directory, "actor"))

    @register(Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, directory: str) -> None:
        self._load_state(os.path.join(directory, "actor"))
        self.sync_rollout_weights()

    @register(Dispatch.ONE_TO_ALL)
    def export_hf(self, out_dir: str) -> None:
        """Rank 0 writes the policy as an HF model dir (config + tokenizer + safetensors), atomically."""
        from transformers import AutoModelForCausalLM

        state = {name: t.detach().to("cpu", torch.float32) for name, t in _full_state_items(self.module, self.device)}
        if self.rank == 0:
            with torch.random.fork_rng(devices=[]):  # the random init must not move the checkpointed RNG
                model = AutoModelForCausalLM.from_config(self.hf_config, dtype=torch.float32)
            model.load_state_dict(state, strict=True)
            parent = os.path.dirname(os.path.abspath(out_dir))
            tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp_hf_")
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            follow_umask(tmp)  # mkdtemp made it 0700, safetensors its weights 0600
            if os.path.exists(out_dir):
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        dist.barrier()


class CriticWorker(_DistributedWorker):
    """The value model V(s_t) (a causal LM backbone with a scalar head) inside an RL-core ``Critic``."""

    def __init__(self, config: WorkerConfig, rank: int, world_size: int):
        super().__init__(config, rank, world_size)
        self.critic = None

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        from verl.models.value_model import CausalLMWithValueHead
        from verl.workers.critic import Critic

        cfg = self.config
        self.module = CausalLMWithValueHead.from_pretrained(cfg.model_path,
                                                            attn_implementation=cfg.attn_implementation)
        self.module.to(self.device)
        if _use_fsdp(cfg.fsdp, self.world_size, self.device):
            _shard(self.module, cfg.fsdp, self.device, self.world_size)
        self._build_optimizer()
        self.critic = Critic(self.module, self.optimizer, cfg.role_config, lr_scheduler=self.lr_scheduler)

    @register(Dispatch.DP_COMPUTE_PROTO)
    def compute_values(self, data: DataProto) -> DataProto:
        """``values`` (B, T): V at every response position."""
        values = self.critic.compute_values(self._to_device(data))
        return DataProto.from_dict(tensors={"values": values.detach().cpu()})

    @register(Dispatch.DP_COMPUTE_PROTO)
    def update_critic(self, data: DataProto) -> dict:
        return dict(self.critic.update_critic(self._to_device(data)))

    def _role(self):
        return self.critic

    @register(Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, directory: str) -> None:
        self._save_state(os.path.join(directory, "critic"))

    @register(Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, directory: str) -> None:
        self._load_state(os.path.join(directory, "critic"))
