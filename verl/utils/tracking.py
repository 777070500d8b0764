"""One logging interface over console, a metrics JSONL, TensorBoard and wandb (offline-capable).

``Tracking.log(metrics, step)`` sends the same flat ``role/name`` dict to every backend that is enabled in
``trainer.logger``. Only the driver (rank 0) owns a Tracking object. The console line shows a few headline keys:
the engine's (``ENGINE_CONSOLE_KEYS``) followed by the ones the task's hooks name (``console_metrics``,
``verl.hooks``), then every ``val/`` key.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

logger = logging.getLogger(__name__)

__all__ = ["Tracking", "format_console", "ENGINE_CONSOLE_KEYS"]

ENGINE_CONSOLE_KEYS = ("timing_s/step", "critic/score/mean", "actor/pg_loss", "critic/vf_loss", "response_length/mean",
                       "perf/throughput")
"""The trainer's own headline metrics, in console order."""


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def format_console(metrics: Mapping[str, Any], step: int, keys: Sequence[str] = ENGINE_CONSOLE_KEYS) -> str:
    """A one-line summary: the headline ``keys`` present, in their order, then the ``val/`` keys sorted, nothing
    else (the JSONL has all)."""
    parts = [f"step {step}"]
    for key in keys:
        if key in metrics:
            parts.append(f"{key}={float(_jsonable(metrics[key])):.4g}")
    for key in sorted(k for k in metrics if k.startswith("val/")):
        parts.append(f"{key}={float(_jsonable(metrics[key])):.4g}")
    return " | ".join(parts)


class Tracking:
    """Fan-out of scalar metrics to the configured backends."""

    def __init__(self, project: str, experiment: str, backends: Sequence[str], log_dir: str,
                 config: Mapping | None = None, wandb_mode: str = "offline",
                 console_keys: Sequence[str] = ENGINE_CONSOLE_KEYS):
        self.backends = tuple(backends)
        self.console_keys = tuple(console_keys)
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a") if "jsonl" in self.backends else None
        self._tb = None
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))
        self._wandb = None
        if "wandb" in self.backends:
            import wandb
            self._wandb = wandb.init(project=project, name=experiment, config=dict(config or {}),
                                     dir=log_dir, mode=wandb_mode)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        if "console" in self.backends:
            logger.info(format_console(clean, step, self.console_keys))
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
