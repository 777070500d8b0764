"""Small worker classes for the single-controller tests (importable by Ray worker processes)."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from verl.protocol import DataProto
from verl.single_controller.base import Dispatch, register
from verl.single_controller.worker import Worker


class SquareWorker(Worker):
    """Squares ``x`` rows; reports its rank; all-reduces to prove the process group works."""

    def __init__(self, rank: int, world_size: int, offset: float = 0.0):
        super().__init__(rank, world_size)
        self.offset = offset

    @register(Dispatch.DP_COMPUTE_PROTO)
    def square(self, data: DataProto) -> DataProto:
        x = data.batch["x"]
        return DataProto.from_dict(tensors={"y": x * x + self.offset,
                                            "rank": torch.full((len(data),), self.rank)})

    @register(Dispatch.DP_COMPUTE_LIST)
    def tag(self, items: list) -> list:
        return [(item, self.rank) for item in items]

    @register(Dispatch.ONE_TO_ALL)
    def all_reduce_rank(self) -> float:
        t = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(t)
        return float(t)

    @register(Dispatch.RANK_ZERO)
    def whoami(self) -> int:
        return self.rank

    @register(Dispatch.ONE_TO_ALL)
    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
