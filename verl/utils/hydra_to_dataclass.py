"""Hydra DictConfig -> frozen dataclasses, once, at each boundary.

Code below a boundary (trainer, workers, reward, agent) receives typed, frozen dataclasses and never a
DictConfig. Unknown keys are an error that names the key, the section and the valid fields, so a typo in an
override (``actor.ppo_epoch=2`` instead of ``ppo_epochs``) fails loudly instead of being ignored.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

T = TypeVar("T")

DEFAULTS_YAML = Path(__file__).resolve().parents[2] / "configs" / "ppo_trainer.yaml"
"""The one source of every config default (docs/configuration.md): the base of every Hydra config in configs/."""

_INTERPOLATION = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


@functools.lru_cache(maxsize=1)
def _default_tree() -> dict:
    import yaml  # PyYAML: a dependency of transformers and omegaconf, so present wherever the trainer runs

    return yaml.safe_load(DEFAULTS_YAML.read_text())


def yaml_default_value(path: str) -> Any:
    """The value at dotted ``path`` (e.g. ``actor_rollout_ref.actor.entropy_coeff``) of configs/ppo_trainer.yaml,
    with ``${a.b}`` references to other keys resolved as Hydra would. KeyError names the missing key."""
    node: Any = _default_tree()
    for i, key in enumerate(path.split(".")):
        if not isinstance(node, dict) or key not in node:
            at = ".".join(path.split(".")[:i + 1])
            raise KeyError(f"[config defaults] {DEFAULTS_YAML.name} has no key '{at}' (looking up '{path}')")
        node = node[key]
    if isinstance(node, str) and _INTERPOLATION.search(node):
        return _INTERPOLATION.sub(lambda m: str(yaml_default_value(m.group(1))), node)
    return node


def yaml_default(path: str) -> Any:
    """A dataclass field whose default is the YAML value at ``path``: the literal lives in the YAML alone.

    Lists become tuples (the configs are frozen); a mapping gets a fresh copy per instance. The path is kept in the
    field's metadata (``"yaml"``), so tests/test_one_source_of_defaults.py can check that no field mirrors a YAML
    key with a literal default of its own."""
    value = yaml_default_value(path)
    meta = {"yaml": path}
    if isinstance(value, dict):
        return field(default_factory=functools.partial(copy.deepcopy, value), metadata=meta)
    return field(default=tuple(value) if isinstance(value, list) else value, metadata=meta)


def yaml_section_default(cls: type, path: str) -> Any:
    """A dataclass field whose default is ``cls`` built from the YAML section at ``path`` (e.g. a worker's optimizer
    settings when none are given: ``actor_rollout_ref.optim``)."""
    return field(default_factory=lambda: to_dataclass(cls, yaml_default_value(path), path), metadata={"yaml": path})

__all__ = [
    "DEFAULTS_YAML", "yaml_default", "yaml_default_value", "yaml_section_default", "to_container", "to_dataclass",
    "to_dataclass_at", "config_section",
    "load_object", "DataConfig", "ModelConfig", "OptimConfig", "FSDPConfig",
    "RolloutConfig", "AlgorithmConfig", "KLControlConfig", "TrainerConfig", "RayConfig", "ActorRolloutRefConfig",
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
    required = sorted(name for name, f in fields.items() if name not in data and f.init
                      and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if required:
        raise KeyError(f"[{where or cls.__name__}] missing required key(s) {required} (they have no default)")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def config_section(tree: Mapping[str, Any], path: str) -> dict:
    """The section at dotted ``path`` of ``tree`` as a plain dict; an absent section is an empty one, so each of its
    keys takes its default (the one source, configs/ppo_trainer.yaml), as an absent key within a section does."""
    node: Any = to_container(tree)
    for i, key in enumerate(path.split(".")):
        if not isinstance(node, Mapping):
            raise TypeError(f"[{'.'.join(path.split('.')[:i])}] expected a mapping, got {type(node).__name__}")
        if key not in node or node[key] is None:
            return {}
        node = node[key]
    if not isinstance(node, Mapping):
        raise TypeError(f"[{path}] expected a mapping, got {type(node).__name__}")
    return dict(node)


def to_dataclass_at(cls: type[T], tree: Mapping[str, Any], path: str) -> T:
    """``to_dataclass`` of the section at dotted ``path`` of ``tree`` (absent: every key at its default)."""
    return to_dataclass(cls, config_section(tree, path), path)


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
    train_files: tuple[str, ...] = yaml_default("data.train_files")
    val_files: tuple[str, ...] = yaml_default("data.val_files")
    prompt_key: str = yaml_default("data.prompt_key")
    max_prompt_length: int = yaml_default("data.max_prompt_length")
    train_batch_size: int = yaml_default("data.train_batch_size")
    val_batch_size: int = yaml_default("data.val_batch_size")
    val_max_samples: int = yaml_default("data.val_max_samples")
    shuffle: bool = yaml_default("data.shuffle")
    seed: int = yaml_default("data.seed")
    truncation: str = yaml_default("data.truncation")

    def __post_init__(self):
        _check_positive("data", max_prompt_length=self.max_prompt_length, train_batch_size=self.train_batch_size,
                        val_batch_size=self.val_batch_size)
        if self.truncation not in ("error", "left", "right"):
            raise ValueError(f"[data] truncation must be error|left|right, got {self.truncation!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Policy / critic weights (``model`` section). ``critic_path`` and ``tokenizer_path`` default to ``path``."""
    path: str = yaml_default("model.path")
    critic_path: str | None = yaml_default("model.critic_path")
    tokenizer_path: str | None = yaml_default("model.tokenizer_path")
    attn_implementation: str = yaml_default("model.attn_implementation")

    def __post_init__(self):
        if not self.path:
            raise ValueError("[model] path is required (an HF model directory); set model.path=...")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up to a constant LR (docs/method.md §1.10 item 6).

    The schema of two YAML sections whose values differ (``actor_rollout_ref.optim``, ``critic.optim``), so it
    takes the defaults of neither: ``lr`` has none (each role sets its own), and the rest are the plain optimizer
    settings of a hand-built config (no warm-up). configs/ppo_trainer.yaml sets every field in both sections, so a
    Hydra run never uses these (tests/test_one_source_of_defaults.py checks it)."""
    lr: float
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
    enable: str = yaml_default("actor_rollout_ref.fsdp.enable")
    param_offload: bool = yaml_default("actor_rollout_ref.fsdp.param_offload")
    optimizer_offload: bool = yaml_default("actor_rollout_ref.fsdp.optimizer_offload")
    mixed_precision: bool = yaml_default("actor_rollout_ref.fsdp.mixed_precision")
    load_from_rank0: bool = yaml_default("actor_rollout_ref.fsdp.load_from_rank0")
    """With FSDP: rank 0 alone reads the checkpoint (on CPU); the other ranks build the model on the meta device
    and receive only their shards, so no rank but 0 ever holds a full copy. False: every rank loads it all."""

    def __post_init__(self):
        if self.enable not in ("auto", "true", "false", True, False):
            raise ValueError(f"[fsdp] enable must be auto|true|false, got {self.enable!r}")


@dataclass(frozen=True)
class RolloutConfig:
    """Rollout engine and sampling (``actor_rollout_ref.rollout``)."""
    backend: str = yaml_default("actor_rollout_ref.rollout.backend")
    n: int = yaml_default("actor_rollout_ref.rollout.n")
    temperature: float = yaml_default("actor_rollout_ref.rollout.temperature")
    top_p: float = yaml_default("actor_rollout_ref.rollout.top_p")
    top_k: int = yaml_default("actor_rollout_ref.rollout.top_k")
    max_new_tokens: int = yaml_default("actor_rollout_ref.rollout.max_new_tokens")
    seed: int = yaml_default("actor_rollout_ref.rollout.seed")
    engine_kwargs: dict = yaml_default("actor_rollout_ref.rollout.engine_kwargs")
    enable_sleep_mode: bool = yaml_default("actor_rollout_ref.rollout.enable_sleep_mode")
    """The trainer puts the engine to sleep (weights and KV cache released) before the log-prob and update
    phases and wakes it before the weight sync and generation (a no-op where the engine cannot sleep)."""

    def __post_init__(self):
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"[rollout] backend must be 'hf' or 'vllm', got {self.backend!r}")
        _check_positive("rollout", n=self.n, max_new_tokens=self.max_new_tokens)


@dataclass(frozen=True)
class ActorRolloutRefConfig:
    """The keys of ``actor_rollout_ref`` outside its sections (actor, model, optim, fsdp, rollout)."""
    weight_bucket_mb: int = yaml_default("actor_rollout_ref.weight_bucket_mb")
    """vLLM weight sync: tensors go over in buckets of about this many MiB, cut only between decoder layers."""

    def __post_init__(self):
        _check_positive("actor_rollout_ref", weight_bucket_mb=self.weight_bucket_mb)


@dataclass(frozen=True)
class KLControlConfig:
    type: str = yaml_default("algorithm.kl_ctrl.type")
    kl_coef: float = yaml_default("algorithm.kl_ctrl.kl_coef")
    target_kl: float = yaml_default("algorithm.kl_ctrl.target_kl")
    horizon: int = yaml_default("algorithm.kl_ctrl.horizon")

    def __post_init__(self):
        if self.type not in ("fixed", "adaptive"):
            raise ValueError(f"[algorithm.kl_ctrl] type must be fixed|adaptive, got {self.type!r}")


@dataclass(frozen=True)
class AlgorithmConfig:
    """Advantage estimator and KL (``algorithm`` section, docs/method.md §1.10-1.11)."""
    adv_estimator: str = yaml_default("algorithm.adv_estimator")
    gamma: float = yaml_default("algorithm.gamma")
    lam: float = yaml_default("algorithm.lam")
    use_kl_in_reward: bool = yaml_default("algorithm.use_kl_in_reward")
    kl_penalty: str = yaml_default("algorithm.kl_penalty")
    kl_ctrl: KLControlConfig = field(default_factory=KLControlConfig)
    norm_adv_by_std_in_grpo: bool = yaml_default("algorithm.norm_adv_by_std_in_grpo")
    mask_observations_in_gae: bool = yaml_default("algorithm.mask_observations_in_gae")

    def __post_init__(self):
        from verl.trainer.ppo.core_algos import ADVANTAGE_ESTIMATORS

        if self.adv_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"[algorithm] adv_estimator must be one of {'|'.join(ADVANTAGE_ESTIMATORS)}, "
                             f"got {self.adv_estimator!r}")


@dataclass(frozen=True)
class TrainerConfig:
    """Loop, checkpoint and logging settings (``trainer`` section)."""
    project_name: str = yaml_default("trainer.project_name")
    experiment_name: str = yaml_default("trainer.experiment_name")
    logger: tuple[str, ...] = yaml_default("trainer.logger")
    wandb_mode: str = yaml_default("trainer.wandb_mode")
    default_local_dir: str = yaml_default("trainer.default_local_dir")
    total_training_steps: int = yaml_default("trainer.total_training_steps")
    total_epochs: int = yaml_default("trainer.total_epochs")
    save_freq: int = yaml_default("trainer.save_freq")
    test_freq: int = yaml_default("trainer.test_freq")
    val_before_train: bool = yaml_default("trainer.val_before_train")
    val_only: bool = yaml_default("trainer.val_only")
    critic_warmup: int = yaml_default("trainer.critic_warmup")
    resume_mode: str = yaml_default("trainer.resume_mode")
    max_ckpt_to_keep: int = yaml_default("trainer.max_ckpt_to_keep")
    nnodes: int = yaml_default("trainer.nnodes")
    n_gpus_per_node: int = yaml_default("trainer.n_gpus_per_node")
    dp_size: int = yaml_default("trainer.dp_size")
    device: str = yaml_default("trainer.device")
    seed: int = yaml_default("trainer.seed")
    save_predictions: bool = yaml_default("trainer.save_predictions")
    export_hf: bool = yaml_default("trainer.export_hf")
    row_adapter: str = yaml_default("trainer.row_adapter")
    rollout_fn: str = yaml_default("trainer.rollout_fn")
    reward_fn: str = yaml_default("trainer.reward_fn")
    progress_bar: bool = yaml_default("trainer.progress_bar")
    max_failed_rollout_share: float = yaml_default("trainer.max_failed_rollout_share")

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
    enable: bool = yaml_default("ray.enable")
    address: str | None = yaml_default("ray.address")
    num_cpus: float | None = yaml_default("ray.num_cpus")
    worker_num_cpus: float = yaml_default("ray.worker_num_cpus")
    worker_num_gpus: float = yaml_default("ray.worker_num_gpus")
    timeout_s: float = yaml_default("ray.timeout_s")
    init_timeout_s: float = yaml_default("ray.init_timeout_s")
