"""Hydra DictConfig -> frozen dataclasses, once, at each boundary.

Code below a boundary (trainer, workers, reward, agent) receives typed, frozen dataclasses and never a
DictConfig. Unknown keys are an error that names the key, the section and the valid fields, so a typo in an
override (``actor.ppo_epoch=2`` instead of ``ppo_epochs``) fails loudly instead of being ignored.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

T = TypeVar("T")

__all__ = [
    "to_container", "to_dataclass", "load_object", "DataConfig", "ModelConfig", "OptimConfig", "FSDPConfig",
    "RolloutConfig", "AlgorithmConfig", "KLControlConfig", "TrainerConfig", "RayConfig",
]


def to_container(node: Any) -> Any:
    """A DictConfig/ListConfig (or plain value) as plain python dicts/lists, interpolations resolved."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # the GPU smoke machine has no omegaconf; plain dicts only there
        return node
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn YAML values into the annotated type where that is lossless (lists -> tuples, ints -> floats)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):
        return to_dataclass(annotation, value, where)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def to_dataclass(cls: type[T], node: Any, where: str = "") -> T:
    """Build the (frozen) dataclass ``cls`` from a mapping, recursing into nested dataclass fields.

    Raises KeyError naming ``where`` and the unknown key(s), with the list of valid fields.
    """
    data = to_container(node)
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise TypeError(f"[{where or cls.__name__}] expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise KeyError(f"[{where or cls.__name__}] unknown key(s) {unknown}; valid keys of {cls.__name__}: "
                       f"{sorted(fields)}. Fix the YAML or the override.")
    kwargs = {k: _coerce(v, hints.get(k), f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def load_object(dotted: str, what: str) -> Any:
    """Import ``package.module.attr`` (e.g. a rollout or reward hook named in the config)."""
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"[{what}] '{dotted}' is not a dotted path 'package.module.name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"[{what}] cannot import module '{module_name}' (from '{dotted}'): {exc}") from exc
    if not hasattr(module, attr):
        raise AttributeError(f"[{what}] module '{module_name}' has no attribute '{attr}'")
    return getattr(module, attr)


def _check_positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"[{section}] {name} must be > 0, got {value}")


@dataclass(frozen=True)
class DataConfig:
    """Dataset files and prompt lengths (``data`` section)."""
    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()
    prompt_key: str = "prompt"
    max_prompt_length: int = 1024
    train_batch_size: int = 8
    val_batch_size: int = 16
    val_max_samples: int = -1
    shuffle: bool = True
    seed: int = 1
    truncation: str = "error"

    def __post_init__(self):
        _check_positive("data", max_prompt_length=self.max_prompt_length, train_batch_size=self.train_batch_size,
                        val_batch_size=self.val_batch_size)
        if self.truncation not in ("error", "left", "right"):
            raise ValueError(f"[data] truncation must be error|left|right, got {self.truncation!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Policy / critic weights (``model`` section). ``critic_path`` and ``tokenizer_path`` default to ``path``."""
    path: str = ""
    critic_path: str | None = None
    tokenizer_path: str | None = None
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        if not self.path:
            raise ValueError("[model] path is required (an HF model directory); set model.path=...")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up to a constant LR (docs/method.md §1.10 item 6)."""
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.0
    warmup_steps: int = -1

    def __post_init__(self):
        _check_positive("optim", lr=self.lr)
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"[optim] warmup_ratio must be in [0, 1], got {self.warmup_ratio}")


@dataclass(frozen=True)
class FSDPConfig:
    """FSDP2 (``fully_shard``) settings; ``enable=auto`` shards when the world size > 1 or on GPU."""
    enable: str = "auto"
    param_offload: bool = False
    optimizer_offload: bool = False
    mixed_precision: bool = True
    load_from_rank0: bool = True
    """With FSDP: rank 0 alone reads the checkpoint (on CPU); the other ranks build the model on the meta device
    and receive only their shards, so no rank but 0 ever holds a full copy. False: every rank loads it all."""

    def __post_init__(self):
        if self.enable not in ("auto", "true", "false", True, False):
            raise ValueError(f"[fsdp] enable must be auto|true|false, got {self.enable!r}")


@dataclass(frozen=True)
class RolloutConfig:
    """Rollout engine and sampling (``actor_rollout_ref.rollout``)."""
    backend: str = "hf"
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    seed: int = 0
    engine_kwargs: dict = field(default_factory=dict)
    enable_sleep_mode: bool = False
    """The trainer puts the engine to sleep (weights and KV cache released) before the log-prob and update
    phases and wakes it before the weight sync and generation (a no-op where the engine cannot sleep)."""

    def __post_init__(self):
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"[rollout] backend must be 'hf' or 'vllm', got {self.backend!r}")
        _check_positive("rollout", n=self.n, max_new_tokens=self.max_new_tokens)


@dataclass(frozen=True)
class KLControlConfig:
    type: str = "fixed"
    kl_coef: float = 0.001
    target_kl: float = 0.1
    horizon: int = 10000

    def __post_init__(self):
        if self.type not in ("fixed", "adaptive"):
            raise ValueError(f"[algorithm.kl_ctrl] type must be fixed|adaptive, got {self.type!r}")


@dataclass(frozen=True)
class AlgorithmConfig:
    """Advantage estimator and KL (``algorithm`` section, docs/method.md §1.10-1.11)."""
    adv_estimator: str = "gae"
    gamma: float = 1.0
    lam: float = 1.0
    use_kl_in_reward: bool = True
    kl_penalty: str = "kl"
    kl_ctrl: KLControlConfig = field(default_factory=KLControlConfig)
    norm_adv_by_std_in_grpo: bool = True
    mask_observations_in_gae: bool = True

    def __post_init__(self):
        from verl.trainer.ppo.core_algos import ADVANTAGE_ESTIMATORS

        if self.adv_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"[algorithm] adv_estimator must be one of {'|'.join(ADVANTAGE_ESTIMATORS)}, "
                             f"got {self.adv_estimator!r}")


@dataclass(frozen=True)
class TrainerConfig:
    """Loop, checkpoint and logging settings (``trainer`` section)."""
    project_name: str = "stepsearch"
    experiment_name: str = "run"
    logger: tuple[str, ...] = ("console", "jsonl")
    wandb_mode: str = "offline"
    default_local_dir: str = "outputs/run"
    total_training_steps: int = -1
    total_epochs: int = 1
    save_freq: int = -1
    test_freq: int = -1
    val_before_train: bool = False
    val_only: bool = False
    critic_warmup: int = 0
    resume_mode: str = "auto"
    max_ckpt_to_keep: int = 2
    nnodes: int = 1
    n_gpus_per_node: int = 0
    dp_size: int = 1
    device: str = "auto"
    seed: int = 1
    save_predictions: bool = True
    export_hf: bool = True
    rollout_fn: str = ""
    reward_fn: str = ""
    progress_bar: bool = True
    max_failed_rollout_share: float = 0.1

    @property
    def world_size(self) -> int:
        """Data-parallel ranks: every GPU of every node, or ``dp_size`` CPU workers."""
        return self.nnodes * self.n_gpus_per_node if self.n_gpus_per_node > 0 else self.dp_size

    def total_steps(self, train_dataset) -> int:
        """RL steps of the run: total_training_steps when set (> 0), else total_epochs x
        train_dataset.batches_per_epoch() (the dataset is only read then; it may be None otherwise)."""
        if self.total_training_steps > 0:
            return self.total_training_steps
        return self.total_epochs * train_dataset.batches_per_epoch()

    def __post_init__(self):
        if not self.resume_mode:
            raise ValueError("[trainer] resume_mode must be auto, disable or a checkpoint path, got ''")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"[trainer] device must be auto|cpu|cuda, got {self.device!r}")
        _check_positive("trainer", dp_size=self.dp_size, nnodes=self.nnodes)
        if self.total_training_steps <= 0 and self.total_epochs <= 0:
            raise ValueError("[trainer] set total_training_steps > 0 or total_epochs > 0")
        if not 0.0 <= self.max_failed_rollout_share <= 1.0:
            raise ValueError(f"[trainer] max_failed_rollout_share must be in [0, 1], got {self.max_failed_rollout_share}")
        unknown = set(self.logger) - {"console", "jsonl", "tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"[trainer] unknown logger(s) {sorted(unknown)}; valid: console, jsonl, tensorboard, wandb")


@dataclass(frozen=True)
class RayConfig:
    """How the driver joins Ray. ``address=null`` starts a local cluster with ``num_cpus``."""
    enable: bool = True
    address: str | None = None
    num_cpus: float | None = None
    worker_num_cpus: float = 0.5
    worker_num_gpus: float = 1.0
    timeout_s: float = 600.0
    init_timeout_s: float = 120.0
