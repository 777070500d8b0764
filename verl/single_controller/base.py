"""The single-controller pattern without Ray: dispatch modes, the ``@register`` decorator, split/gather.

A worker class marks each public method with ``@register(Dispatch.X)``. A worker group (``LocalWorkerGroup``
here, ``RayWorkerGroup`` in ``ray.py``) exposes the same method names on the driver; a call splits its input
across the data-parallel ranks according to the mode, runs the method on every rank and merges the results,
so the driver code reads like local calls (as in veRL's single controller).
"""
from __future__ import annotations

import enum
import functools
from typing import Any, Callable, Sequence

from verl.protocol import DataProto

__all__ = ["Dispatch", "register", "get_dispatch_mode", "split_args", "merge_outputs", "WorkerGroup",
           "LocalWorkerGroup"]


class Dispatch(enum.Enum):
    """How a worker-group call maps its arguments onto ranks and merges the per-rank results."""
    ONE_TO_ALL = "one_to_all"              # same args to every rank; returns the list of per-rank results
    RANK_ZERO = "rank_zero"                # same args to every rank (collectives need all); returns rank 0's result
    DP_COMPUTE_PROTO = "dp_compute_proto"  # DataProto padded + chunked over ranks; outputs concatenated, unpadded
    DP_COMPUTE_LIST = "dp_compute_list"    # first arg is a list, split into contiguous parts; outputs concatenated


_ATTR = "_verl_dispatch_mode"


def register(dispatch_mode: Dispatch = Dispatch.ONE_TO_ALL) -> Callable:
    """Mark a worker method as callable through a worker group with the given dispatch mode."""
    if not isinstance(dispatch_mode, Dispatch):
        raise TypeError(f"register: dispatch_mode must be a Dispatch, got {dispatch_mode!r}; valid: "
                        f"{[d.name for d in Dispatch]}")

    def decorate(fn: Callable) -> Callable:
        setattr(fn, _ATTR, dispatch_mode)
        return fn
    return decorate


def get_dispatch_mode(worker_cls: type, method: str) -> Dispatch:
    fn = getattr(worker_cls, method, None)
    if fn is None or not hasattr(fn, _ATTR):
        registered = sorted(n for n in dir(worker_cls) if hasattr(getattr(worker_cls, n, None), _ATTR))
        raise AttributeError(f"{worker_cls.__name__}.{method} is not a registered worker method; "
                             f"registered: {registered}")
    return getattr(fn, _ATTR)


def _split_list(items: Sequence, world_size: int) -> tuple[list[list], int]:
    """Pad ``items`` by repeating the first element to a multiple of world_size, then cut into equal parts."""
    if not items:
        raise ValueError("DP_COMPUTE_LIST: cannot dispatch an empty list")
    pad = (-len(items)) % world_size
    padded = list(items) + [items[0]] * pad
    size = len(padded) // world_size
    return [padded[r * size:(r + 1) * size] for r in range(world_size)], pad


def split_args(mode: Dispatch, world_size: int, args: tuple, kwargs: dict) -> tuple[list[tuple], list[dict], int]:
    """Per-rank (args, kwargs) for ``mode`` and the number of padding rows added (0 unless split)."""
    if mode in (Dispatch.ONE_TO_ALL, Dispatch.RANK_ZERO):
        return [args] * world_size, [kwargs] * world_size, 0
    if not args:
        raise ValueError(f"{mode.name}: the first positional argument must be the data to split")
    data, rest = args[0], args[1:]
    if mode is Dispatch.DP_COMPUTE_PROTO:
        if not isinstance(data, DataProto):
            raise TypeError(f"DP_COMPUTE_PROTO: first argument must be a DataProto, got {type(data).__name__}")
        padded, pad = data.pad_to_divisor(world_size)
        parts = padded.chunk(world_size)
    else:
        parts, pad = _split_list(data, world_size)
    return [(part,) + rest for part in parts], [kwargs] * world_size, pad


def merge_outputs(mode: Dispatch, outputs: list, pad: int) -> Any:
    if mode is Dispatch.ONE_TO_ALL:
        return outputs
    if mode is Dispatch.RANK_ZERO:
        return outputs[0]
    if mode is Dispatch.DP_COMPUTE_PROTO:
        if all(isinstance(o, DataProto) for o in outputs):
            return DataProto.concat(outputs).unpad(pad)
        return outputs  # e.g. per-rank metric dicts of an update
    merged = [x for part in outputs for x in part]
    return merged[:len(merged) - pad] if pad else merged


class WorkerGroup:
    """Driver-side handle on ``world_size`` instances of one worker class; subclasses implement ``_execute``."""

    def __init__(self, worker_cls: type, world_size: int, name: str):
        self.worker_cls = worker_cls
        self.world_size = world_size
        self.name = name

    def _execute(self, method: str, per_rank_args: list[tuple], per_rank_kwargs: list[dict]) -> list:
        raise NotImplementedError(f"{type(self).__name__} must implement _execute (run a method on every rank)")

    def _execute_rank(self, rank: int, method: str, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement _execute_rank (run a method on one rank)")

    def call(self, method: str, *args, **kwargs) -> Any:
        mode = get_dispatch_mode(self.worker_cls, method)
        per_args, per_kwargs, pad = split_args(mode, self.world_size, args, kwargs)
        return merge_outputs(mode, self._execute(method, per_args, per_kwargs), pad)

    def call_per_rank(self, method: str, per_rank_args: Sequence[tuple],
                      per_rank_kwargs: Sequence[dict] | None = None) -> list:
        """Run a registered method on every rank at once, rank r with per_rank_args[r] as given (no dispatch
        split or merge); returns the per-rank results in rank order."""
        get_dispatch_mode(self.worker_cls, method)
        per_rank_kwargs = list(per_rank_kwargs) if per_rank_kwargs is not None else [{}] * self.world_size
        if len(per_rank_args) != self.world_size or len(per_rank_kwargs) != self.world_size:
            raise ValueError(f"{self.name}.{method}: call_per_rank needs {self.world_size} argument tuples, got "
                             f"{len(per_rank_args)} (and {len(per_rank_kwargs)} kwargs)")
        return self._execute(method, [tuple(a) for a in per_rank_args], per_rank_kwargs)

    def call_rank(self, rank: int, method: str, *args, **kwargs) -> Any:
        """Run a registered method on rank `rank` alone with these arguments as given (no dispatch split or
        merge); only for methods that need no other rank (no collective inside), e.g. one rank's own rollout
        engine. Calls on different ranks may run at the same time (from different threads)."""
        get_dispatch_mode(self.worker_cls, method)
        if not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"{self.name}.{method}: rank must be in [0, {self.world_size}), got {rank!r}")
        return self._execute_rank(rank, method, args, kwargs)

    def __getattr__(self, method: str) -> Callable:
        if method.startswith("_"):
            raise AttributeError(method)
        get_dispatch_mode(self.worker_cls, method)  # fail early on a typo
        return functools.partial(self.call, method)

    def shutdown(self) -> None:
        """Release the workers (no-op for in-process workers)."""


class LocalWorkerGroup(WorkerGroup):
    """One in-process worker (rank 0 of 1): the GPU smoke script and unit tests use this without Ray."""

    def __init__(self, worker_cls: type, name: str, *init_args, **init_kwargs):
        super().__init__(worker_cls, 1, name)
        self.workers = [worker_cls(*init_args, rank=0, world_size=1, **init_kwargs)]
        addr, port = self.workers[0].master_address()
        self.workers[0].init_distributed(addr, port)

    def _execute(self, method, per_rank_args, per_rank_kwargs):
        return [getattr(w, method)(*a, **k) for w, a, k in zip(self.workers, per_rank_args, per_rank_kwargs)]

    def _execute_rank(self, rank, method, args, kwargs):
        return getattr(self.workers[rank], method)(*args, **kwargs)
