"""DataProto: the one container that crosses worker boundaries.

A DataProto holds
- ``batch``: a dict of tensors that all share dim 0 = B (the batch);
- ``non_tensor_batch``: a dict of numpy object arrays, each of length B (strings, dicts, lists per row);
- ``meta_info``: a plain dict of batch-level values (temperature, global step, metrics, ...).

Every method returns a new DataProto and never mutates ``self`` (the containers are shallow-copied;
tensors are shared, not cloned, unless an operation such as indexing creates new ones).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from verl.utils.checkpoint import atomic_torch_save

__all__ = ["DataProto", "DataProtoItem", "to_object_array"]


def to_object_array(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """A numpy object array of length len(values) whose elements are the given values.

    ``np.array(list_of_lists, dtype=object)`` would build a 2-D array; this keeps one element per row.
    An ndarray that is already of object dtype is returned as it is.
    """
    if isinstance(values, np.ndarray):
        return values if values.dtype == object else values.astype(object)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _values_equal(a: Any, b: Any) -> bool:
    """Deep equality that understands tensors, ndarrays, dicts and sequences."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.shape != b.shape:
            return False
        if a.dtype == object or b.dtype == object:
            return all(_values_equal(x, y) for x, y in zip(a.ravel(), b.ravel()))
        return bool(np.array_equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_values_equal(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def _merge_meta(metas: Sequence[dict], what: str) -> dict:
    """Union of meta dicts; a key present in several with different values is an error."""
    merged: dict = {}
    for meta in metas:
        for k, v in meta.items():
            if k in merged and not _values_equal(merged[k], v):
                raise KeyError(f"DataProto.{what}: meta_info key '{k}' has different values "
                               f"({merged[k]!r} vs {v!r}); drop or rename it on one side first")
            merged.setdefault(k, v)
    return merged


@dataclass
class DataProtoItem:
    """One row of a DataProto: tensors without the batch dim, non-tensor values, and the shared meta."""
    batch: dict[str, torch.Tensor]
    non_tensor_batch: dict[str, Any]
    meta_info: dict


@dataclass
class DataProto:
    batch: dict[str, torch.Tensor] = field(default_factory=dict)
    non_tensor_batch: dict[str, np.ndarray] = field(default_factory=dict)
    meta_info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.batch = dict(self.batch or {})
        self.non_tensor_batch = dict(self.non_tensor_batch or {})
        self.meta_info = dict(self.meta_info or {})
        self._check_consistency()

    # ---- construction and checks -------------------------------------------------------------
    @classmethod
    def from_dict(cls, tensors: Mapping[str, torch.Tensor] | None = None,
                  non_tensors: Mapping[str, Sequence[Any] | np.ndarray] | None = None,
                  meta_info: dict | None = None) -> "DataProto":
        """Build from plain dicts; non-tensor lists become object arrays (one element per row)."""
        tensors = dict(tensors or {})
        for k, v in tensors.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"DataProto.from_dict: tensors['{k}'] must be a torch.Tensor, got "
                                f"{type(v).__name__}; pass lists and strings through non_tensors")
        non_tensors = {k: to_object_array(v) for k, v in (non_tensors or {}).items()}
        return cls(batch=tensors, non_tensor_batch=non_tensors, meta_info=dict(meta_info or {}))

    def _check_consistency(self) -> None:
        sizes: dict[str, int] = {}
        for k, v in self.batch.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"DataProto.batch['{k}'] must be a torch.Tensor, got {type(v).__name__}")
            if v.dim() == 0:
                raise ValueError(f"DataProto.batch['{k}'] is a 0-dim tensor; every tensor needs the batch "
                                 f"dim 0 (put batch-level scalars in meta_info)")
            sizes[f"batch['{k}']"] = v.shape[0]
        for k, v in self.non_tensor_batch.items():
            if not isinstance(v, np.ndarray) or v.dtype != object:
                raise TypeError(f"DataProto.non_tensor_batch['{k}'] must be a numpy object array, got "
                                f"{type(v).__name__}{'' if not isinstance(v, np.ndarray) else ' of ' + str(v.dtype)}; "
                                f"use DataProto.from_dict or to_object_array")
            if v.ndim == 0:
                raise ValueError(f"DataProto.non_tensor_batch['{k}'] is 0-dim; it needs length B")
            sizes[f"non_tensor_batch['{k}']"] = v.shape[0]
        if len(set(sizes.values())) > 1:
            listing = ", ".join(f"{name}={n}" for name, n in sizes.items())
            raise ValueError(f"DataProto: all entries must share the batch size (dim 0), got {listing}")

    def __len__(self) -> int:
        for v in self.batch.values():
            return v.shape[0]
        for v in self.non_tensor_batch.values():
            return v.shape[0]
        return 0

    def __repr__(self) -> str:
        tensors = ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in self.batch.items())
        return (f"DataProto(len={len(self)}, batch={{{tensors}}}, non_tensor_batch={list(self.non_tensor_batch)}, "
                f"meta_info={list(self.meta_info)})")

    # ---- indexing ------------------------------------------------------------------------------
    def __getitem__(self, item):
        """``dp[i]`` -> DataProtoItem; ``dp[i:j]``, ``dp[index array | list | tensor | bool mask]`` -> DataProto."""
        if isinstance(item, (int, np.integer)):
            n = len(self)
            if not -n <= int(item) < n:
                raise IndexError(f"DataProto index {item} out of range for batch size {n}")
            return DataProtoItem(batch={k: v[item] for k, v in self.batch.items()},
                                 non_tensor_batch={k: v[item] for k, v in self.non_tensor_batch.items()},
                                 meta_info=self.meta_info)
        if isinstance(item, slice):
            return DataProto(batch={k: v[item] for k, v in self.batch.items()},
                             non_tensor_batch={k: v[item] for k, v in self.non_tensor_batch.items()},
                             meta_info=self.meta_info)
        return self._take(item)

    def _take(self, indices) -> "DataProto":
        idx = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"DataProto boolean mask has shape {idx.shape}, expected ({len(self)},)")
            idx = np.nonzero(idx)[0]
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"DataProto index must be a 1-D integer or boolean array, got shape {idx.shape} "
                             f"of {idx.dtype}")
        n = len(self)
        if idx.size and (idx.max() >= n or idx.min() < -n):
            raise IndexError(f"DataProto index out of range: min {idx.min()}, max {idx.max()}, batch size {n}")
        t_idx = torch.as_tensor(idx, dtype=torch.long)
        return DataProto(batch={k: v[t_idx.to(v.device)] for k, v in self.batch.items()},
                         non_tensor_batch={k: v[idx] for k, v in self.non_tensor_batch.items()},
                         meta_info=self.meta_info)

    def __iter__(self) -> Iterator[DataProtoItem]:
        for i in range(len(self)):
            yield self[i]

    # ---- key operations ------------------------------------------------------------------------
    def select(self, batch_keys: Sequence[str] | None = None, non_tensor_batch_keys: Sequence[str] | None = None,
               meta_info_keys: Sequence[str] | None = None) -> "DataProto":
        """A new DataProto with only the named keys (None keeps all keys of that part)."""
        def pick(d: dict, keys, part: str) -> dict:
            if keys is None:
                return dict(d)
            missing = [k for k in keys if k not in d]
            if missing:
                raise KeyError(f"DataProto.select: {part} has no key(s) {missing}; available: {sorted(d)}")
            return {k: d[k] for k in keys}
        return DataProto(batch=pick(self.batch, batch_keys, "batch"),
                         non_tensor_batch=pick(self.non_tensor_batch, non_tensor_batch_keys, "non_tensor_batch"),
                         meta_info=pick(self.meta_info, meta_info_keys, "meta_info"))

    def union(self, other: "DataProto") -> "DataProto":
        """A new DataProto with the keys of both; a key in both must hold equal values (else KeyError)."""
        if len(self.batch) + len(self.non_tensor_batch) and len(other.batch) + len(other.non_tensor_batch) \
                and len(self) != len(other):
            raise ValueError(f"DataProto.union: batch sizes differ ({len(self)} vs {len(other)})")
        merged = []
        for part in ("batch", "non_tensor_batch"):
            mine, theirs = getattr(self, part), getattr(other, part)
            out = dict(mine)
            for k, v in theirs.items():
                if k in out and not _values_equal(out[k], v):
                    raise KeyError(f"DataProto.union: {part} key '{k}' is present in both with different values; "
                                   f"pop or rename it on one side first")
                out.setdefault(k, v)
            merged.append(out)
        return DataProto(batch=merged[0], non_tensor_batch=merged[1],
                         meta_info=_merge_meta([self.meta_info, other.meta_info], "union"))

    # ---- batch-dim operations --------------------------------------------------------------------
    @staticmethod
    def concat(data: Sequence["DataProto"]) -> "DataProto":
        """Concatenate along the batch dim; every part must have the same keys."""
        if not data:
            raise ValueError("DataProto.concat: got an empty list")
        first = data[0]
        for i, d in enumerate(data[1:], start=1):
            if set(d.batch) != set(first.batch) or set(d.non_tensor_batch) != set(first.non_tensor_batch):
                raise KeyError(f"DataProto.concat: part {i} has keys batch={sorted(d.batch)} "
                               f"non_tensor={sorted(d.non_tensor_batch)}, part 0 has batch={sorted(first.batch)} "
                               f"non_tensor={sorted(first.non_tensor_batch)}")
        batch = {}
        for k in first.batch:
            try:
                batch[k] = torch.cat([d.batch[k] for d in data], dim=0)
            except RuntimeError as e:
                shapes = [tuple(d.batch[k].shape) for d in data]
                raise ValueError(f"DataProto.concat: batch['{k}'] shapes {shapes} cannot be concatenated "
                                 f"along dim 0 (pad them to a common length first)") from e
        non_tensors = {k: np.concatenate([d.non_tensor_batch[k] for d in data], axis=0)
                       for k in first.non_tensor_batch}
        return DataProto(batch=batch, non_tensor_batch=non_tensors,
                         meta_info=_merge_meta([d.meta_info for d in data], "concat"))

    def chunk(self, chunks: int) -> list["DataProto"]:
        """Split into ``chunks`` equal parts; ``len(self) % chunks`` must be 0 (see pad_to_divisor)."""
        if not isinstance(chunks, int) or chunks <= 0:
            raise ValueError(f"DataProto.chunk: chunks must be a positive int, got {chunks!r}")
        if len(self) % chunks != 0:
            raise ValueError(f"DataProto.chunk: batch size {len(self)} is not divisible by chunks={chunks}; "
                             f"call pad_to_divisor({chunks}) first and unpad() the result")
        return self.split(len(self) // chunks) if len(self) else [self[0:0] for _ in range(chunks)]

    def split(self, size: int) -> list["DataProto"]:
        """Consecutive parts of ``size`` rows (the last may be shorter): used for mini/micro-batches."""
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"DataProto.split: size must be a positive int, got {size!r}")
        return [self[i:i + size] for i in range(0, len(self), size)]

    def pad_to_divisor(self, divisor: int) -> tuple["DataProto", int]:
        """Append copies of the leading rows (cyclically) until len is a multiple of ``divisor``.

        Returns (padded, pad_size); ``padded.unpad(pad_size)`` or the worker outputs' ``unpad`` restore B.
        """
        if not isinstance(divisor, int) or divisor <= 0:
            raise ValueError(f"DataProto.pad_to_divisor: divisor must be a positive int, got {divisor!r}")
        n = len(self)
        pad_size = (-n) % divisor
        if pad_size == 0:
            return self, 0
        if n == 0:
            raise ValueError("DataProto.pad_to_divisor: cannot pad an empty DataProto")
        pad_idx = np.arange(pad_size) % n
        return DataProto.concat([self, self._take(pad_idx)]), pad_size

    def unpad(self, pad_size: int) -> "DataProto":
        """Drop the last ``pad_size`` rows added by pad_to_divisor."""
        if pad_size < 0 or pad_size > len(self):
            raise ValueError(f"DataProto.unpad: pad_size {pad_size} must be in [0, {len(self)}]")
        return self if pad_size == 0 else self[: len(self) - pad_size]

    def repeat(self, times: int = 2, interleave: bool = True) -> "DataProto":
        """Repeat every row ``times`` times: interleaved (a a b b, for GRPO groups) or tiled (a b a b)."""
        if not isinstance(times, int) or times <= 0:
            raise ValueError(f"DataProto.repeat: times must be a positive int, got {times!r}")
        n = len(self)
        idx = np.repeat(np.arange(n), times) if interleave else np.tile(np.arange(n), times)
        return self._take(idx)

    # ---- devices and files -------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "DataProto":
        return DataProto(batch={k: v.to(device) for k, v in self.batch.items()},
                         non_tensor_batch=self.non_tensor_batch, meta_info=self.meta_info)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + os.replace) with torch.save; tensors are moved to CPU."""
        path = os.fspath(path)
        payload = {"batch": {k: v.detach().cpu() for k, v in self.batch.items()},
                   "non_tensor_batch": self.non_tensor_batch, "meta_info": self.meta_info}
        atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DataProto":
        """Read a file written by ``save`` (it unpickles object arrays: load only files you trust)."""
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
        if not isinstance(payload, dict) or set(payload) != {"batch", "non_tensor_batch", "meta_info"}:
            raise ValueError(f"DataProto.load: {path} was not written by DataProto.save")
        return cls(**payload)
