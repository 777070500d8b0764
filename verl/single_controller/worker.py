"""Base class of every worker run by a worker group: its rank, and joining the torch.distributed group."""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from verl.single_controller.base import Dispatch, register

__all__ = ["Worker"]


class Worker:
    """A plain class; a worker group constructs it with ``rank``/``world_size`` and then calls
    ``master_address`` on rank 0 and ``init_distributed`` on every rank."""

    def __init__(self, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"{type(self).__name__}: rank {rank} must be in [0, {world_size})")
        self.rank = rank
        self.world_size = world_size

    def master_address(self) -> tuple[str, int]:
        """(ip of this node, a free port) for the rendezvous of the process group."""
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        addr = "127.0.0.1"
        try:
            import ray
            if ray.is_initialized():
                addr = ray.util.get_node_ip_address()
        except ImportError:  # in-process workers (GPU smoke machine) have no Ray
            pass
        return addr, port

    @register(Dispatch.ONE_TO_ALL)
    def node_info(self) -> dict:
        """Where this rank runs: {"rank", "node_id" (the Ray node id, None without Ray), "hostname", "pid"}."""
        import os
        import socket

        node_id = None
        try:
            import ray
            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
        except ImportError:  # in-process workers (GPU smoke machine) have no Ray
            pass
        return {"rank": self.rank, "node_id": node_id, "hostname": socket.gethostname(), "pid": os.getpid()}

    def distributed_backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"

    def init_distributed(self, addr: str, port: int) -> None:
        """Join ``tcp://addr:port`` as ``rank`` (NCCL on GPU, gloo on CPU); a no-op if already joined with the
        same world size (two in-process workers of one rank share the default group)."""
        if dist.is_initialized():
            if dist.get_world_size() != self.world_size:
                raise RuntimeError(f"torch.distributed is already initialised with world size "
                                   f"{dist.get_world_size()}; {type(self).__name__} needs {self.world_size}")
            return
        dist.init_process_group(backend=self.distributed_backend(), init_method=f"tcp://{addr}:{port}",
                                rank=self.rank, world_size=self.world_size, timeout=datetime.timedelta(minutes=30))
