"""Ray back end of the single controller: resource pools on placement groups, worker groups of Ray actors.

Every wait on Ray (placement group, actor start, method results) has a timeout and raises ``RayWaitTimeout``
with what was being waited for and what to check, instead of hanging (a request for more CPUs than are free
waits forever in Ray).
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from verl.single_controller.base import WorkerGroup

logger = logging.getLogger(__name__)

__all__ = ["RayWaitTimeout", "RayResourcePool", "RayWorkerGroup", "ray_get", "free_port"]


class RayWaitTimeout(TimeoutError):
    """A Ray wait ran past its timeout."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def ray_get(refs: Any, timeout_s: float, what: str) -> Any:
    """``ray.get`` with a timeout whose error names the wait and the usual causes."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise RayWaitTimeout(
            f"[ray] {what} did not finish within {timeout_s:.0f} s. Check `ray status` (a worker may wait for "
            f"resources or be stuck in a collective), raise ray.timeout_s, or look at the worker logs under "
            f"/tmp/ray/session_latest/logs") from exc


@dataclass(frozen=True)
class BundleSpec:
    num_cpus: float
    num_gpus: float


class RayResourcePool:
    """One placement group of ``world_size`` bundles (one per data-parallel rank); roles colocated on the same
    pool share its bundles, each actor taking a fraction of a bundle (``fraction``)."""

    def __init__(self, world_size: int, num_cpus_per_bundle: float, num_gpus_per_bundle: float,
                 timeout_s: float, name: str = "global_pool"):
        if world_size <= 0:
            raise ValueError(f"RayResourcePool: world_size must be > 0, got {world_size}")
        self.world_size = world_size
        self.bundle = BundleSpec(num_cpus_per_bundle, num_gpus_per_bundle)
        resources = {"CPU": num_cpus_per_bundle}
        if num_gpus_per_bundle > 0:
            resources["GPU"] = num_gpus_per_bundle
        self.pg = placement_group([dict(resources) for _ in range(world_size)], strategy="PACK", name=name)
        try:
            ray_get(self.pg.ready(), timeout_s, f"placement group '{name}' ({world_size} bundles of {resources})")
        except RayWaitTimeout as exc:
            available = ray.available_resources()
            remove_placement_group(self.pg)
            raise RayWaitTimeout(f"{exc}. Cluster has {available} free; lower trainer.dp_size / "
                                 f"ray.worker_num_cpus or start more nodes") from None

    def strategy(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=rank)

    def release(self) -> None:
        remove_placement_group(self.pg)


class RayWorkerGroup(WorkerGroup):
    """``world_size`` Ray actors of ``worker_cls`` on the bundles of ``pool``, each using ``fraction`` of one.

    Construction also sets up torch.distributed among the actors: rank 0 picks a free port on its node and
    every actor joins ``tcp://addr:port`` (gloo on CPU, NCCL on GPU).
    """

    def __init__(self, pool: RayResourcePool, worker_cls: type, name: str, init_kwargs: dict,
                 fraction: float, timeout_s: float):
        super().__init__(worker_cls, pool.world_size, name)
        self.timeout_s = timeout_s
        remote_cls = ray.remote(worker_cls)
        self.actors = [
            remote_cls.options(num_cpus=pool.bundle.num_cpus * fraction, num_gpus=pool.bundle.num_gpus * fraction,
                               scheduling_strategy=pool.strategy(rank), name=None)
            .remote(rank=rank, world_size=self.world_size, **init_kwargs)
            for rank in range(self.world_size)]
        addr, port = ray_get(self.actors[0].master_address.remote(), timeout_s, f"{name} rank 0 start-up")
        ray_get([a.init_distributed.remote(addr, port) for a in self.actors], timeout_s,
                f"{name} torch.distributed init at {addr}:{port}")

    def _execute(self, method, per_rank_args, per_rank_kwargs):
        refs = [getattr(actor, method).remote(*a, **k)
                for actor, a, k in zip(self.actors, per_rank_args, per_rank_kwargs)]
        return ray_get(refs, self.timeout_s, f"{self.name}.{method} on {self.world_size} rank(s)")

    def _execute_rank(self, rank, method, args, kwargs):
        ref = getattr(self.actors[rank], method).remote(*args, **kwargs)
        return ray_get(ref, self.timeout_s, f"{self.name}.{method} on rank {rank}")

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
