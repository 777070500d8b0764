"""The small interface every rollout engine implements: token ids in, sampled token ids out.

A backend generates one continuation per prompt, stops at the first stop string (kept) or at EOS
(dropped), and can receive new weights from the trainer. The multi-turn agent loop only talks to this
interface, so the HF and vLLM engines (and the scripted engine of the tests) are interchangeable.
"""
from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Mapping, Sequence

import torch

FinishReason = Literal["stop", "length", "eos"]
_FINISH_REASONS = ("stop", "length", "eos")


@dataclass(frozen=True)
class SamplingConfig:
    """Per-call sampling settings (one value for the whole batch)."""

    max_new_tokens: int
    """Most new tokens per prompt in this call."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k filtering."""
    stop: tuple[str, ...] = ()
    """Generation of a row ends right after the token that completes the first of these strings (the task passes
    its own, e.g. the closing tags of its actions); empty: only EOS and ``max_new_tokens`` end it."""
    greedy: bool = False
    """Argmax decoding (validation); temperature/top_p/top_k are then ignored."""
    seed: int | None = None
    """The call's seed: an engine with one RNG per call (HF) seeds it with this; a per-request engine (vLLM) seeds
    prompt r with seed + r unless `row_seeds` is given. None: the engine's own RNG."""
    logprobs: bool = False
    """Also return the log-probability of every sampled token under the unmodified model distribution."""
    row_seeds: tuple[int, ...] | None = None
    """One seed per prompt of the call (a multi-turn agent: one per (row, turn) of its batch). A per-request
    engine (vLLM) samples prompt r from row_seeds[r] alone, so a row's tokens do not depend on the other rows of
    the call; an engine with one RNG per call (HF) ignores them and uses `seed`."""

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"[rollout] max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"[rollout] temperature must be > 0 when greedy=False, got {self.temperature}; "
                             "set greedy=True for argmax decoding")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"[rollout] top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"[rollout] top_k must be -1 (off) or >= 1, got {self.top_k}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise TypeError(f"[rollout] stop must be a tuple of non-empty strings, got {self.stop!r}")
        if self.row_seeds is not None:
            if isinstance(self.row_seeds, (str, bytes)) or not all(
                    isinstance(s, int) and not isinstance(s, bool) for s in self.row_seeds):
                raise TypeError(f"[rollout] row_seeds must be a tuple of ints (one per prompt), got {self.row_seeds!r}")
            object.__setattr__(self, "row_seeds", tuple(self.row_seeds))

    def seed_of_row(self, row: int, num_rows: int) -> int | None:
        """The seed of prompt `row` of a call of `num_rows` prompts on a per-request engine: row_seeds[row] when
        given (their number must be num_rows), else seed + row (None: unseeded)."""
        if self.row_seeds is not None:
            if len(self.row_seeds) != num_rows:
                raise ValueError(f"[rollout] row_seeds has {len(self.row_seeds)} seeds for {num_rows} prompts")
            return self.row_seeds[row]
        return None if self.seed is None else self.seed + row


@dataclass(frozen=True)
class GenerationOutput:
    """One generated continuation."""

    token_ids: list[int]
    """Sampled ids, cut right after the token that completes the first stop string; EOS not included."""
    log_probs: list[float] | None
    """Same length as token_ids when requested, else None."""
    finish_reason: FinishReason

    def __post_init__(self):
        if self.finish_reason not in _FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {_FINISH_REASONS}, got {self.finish_reason!r}")
        if self.log_probs is not None and len(self.log_probs) != len(self.token_ids):
            raise ValueError(f"log_probs has {len(self.log_probs)} entries for {len(self.token_ids)} tokens")


class RolloutBackend(abc.ABC):
    """Generate token ids with stop strings; load new weights; optionally release memory between phases."""

    @abc.abstractmethod
    def generate(self, prompt_ids: list[list[int]], params: SamplingConfig) -> list[GenerationOutput]:
        """One continuation per prompt (ids without padding), in order."""

    @abc.abstractmethod
    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy trainer weights (HF parameter names) into the engine."""

    def sleep(self) -> None:
        """Release engine memory (weights/KV cache) while the trainer runs; a no-op where unsupported."""

    def wake_up(self) -> None:
        """Undo `sleep`; a no-op where unsupported."""

    def replicas(self) -> list["RolloutBackend"]:
        """Independent engines behind this backend (data-parallel ranks, each with its own engine) that may each be
        called on their own and at the same time, for a caller that places requests by load (the async agent
        loop). Default: [self], one engine."""
        return [self]


def check_prompts(prompt_ids: Sequence[Sequence[int]]) -> None:
    """Raise a clear error for an empty batch or an empty prompt (engines fail obscurely on them)."""
    if len(prompt_ids) == 0:
        raise ValueError("[rollout] generate() got an empty batch of prompts")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"[rollout] prompt {i} is empty; every prompt needs at least one token")


class StopCutter:
    """Cuts a sampled id sequence at EOS and right after the token that completes the first stop string.

    Works on ids, never re-tokenizes: the stop test decodes prefixes of the ids. "Some stop string occurs in
    decode(ids[:k])" is monotone in k, so the cut point (the smallest such k) is found by bisection with
    O(log n) decodes instead of one decode per token.
    """

    def __init__(self, tokenizer, eos_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)

    def _has_stop(self, ids: Sequence[int], stop: Sequence[str]) -> bool:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return any(s in text for s in stop)

    def cut(self, ids: Sequence[int], stop: Sequence[str]) -> tuple[list[int], FinishReason]:
        """Returns (kept ids, finish reason) for one raw generation (which may run past its stop)."""
        ids = [int(t) for t in ids]
        finish: FinishReason = "length"
        for k, t in enumerate(ids):  # EOS first: nothing after it is the model's continuation
            if t in self.eos_token_ids:
                ids, finish = ids[:k], "eos"
                break
        if stop and self._has_stop(ids, stop):
            lo, hi = 1, len(ids)  # invariant: decode(ids[:hi]) holds a stop, decode(ids[:lo-1]) does not
            while lo < hi:
                mid = (lo + hi) // 2
                if self._has_stop(ids[:mid], stop):
                    hi = mid
                else:
                    lo = mid + 1
            return ids[:hi], "stop"
        return ids, finish


def eos_ids_of(tokenizer, generation_config=None) -> list[int]:
    """EOS ids from the tokenizer plus the model's generation config (Qwen chat models end on <|im_end|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(int(t) for t in extra)
    if not ids:
        raise ValueError("[rollout] the tokenizer has no eos_token_id and the model config names none; "
                         "set tokenizer.eos_token")
    return sorted(ids)


# ---- weight buckets (weight sync from the trainer into an engine) ------------------------------------------------
_LAYER_PREFIX = re.compile(r"^(.*?\blayers\.\d+)\.")


def layer_key(name: str) -> str:
    """The unit a weight bucket must keep whole: "model.layers.3" for decoder-layer tensors, else the tensor name."""
    m = _LAYER_PREFIX.match(name)
    return m.group(1) if m else name


def iter_weight_buckets(items: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                        bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (name, tensor) of about `bucket_bytes` each, cutting only between `layer_key` groups.

    `items` is a state dict or a stream of (name, tensor) pairs (e.g. the worker's all-gathered tensors, one at a
    time). A group larger than `bucket_bytes` becomes one bucket of its own, never split. A dict is grouped by
    key wherever its tensors sit; a stream must list each group's tensors contiguously (state-dict order does),
    and a group that reappears after it was closed raises, because its layer would arrive in two calls.
    Used by `ActorRolloutRefWorker.sync_rollout_weights` and `VLLMRolloutBackend.load_weights`: vLLM fuses q/k/v
    (and gate/up) and re-processes a layer once it is loaded, so a layer split over two calls is corrupted.
    """
    if bucket_bytes < 1:
        raise ValueError(f"[rollout] bucket_bytes must be >= 1, got {bucket_bytes}")
    if isinstance(items, Mapping):
        grouped: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for name, tensor in items.items():
            grouped.setdefault(layer_key(name), []).append((name, tensor))
        items = [pair for group in grouped.values() for pair in group]
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0

    def groups() -> Iterator[list[tuple[str, torch.Tensor]]]:
        closed: set[str] = set()
        key, group = None, []
        for name, tensor in items:
            k = layer_key(name)
            if k != key:
                if group:
                    closed.add(key)
                    yield group
                if k in closed:
                    raise ValueError(f"[rollout] weight group {k!r} is not contiguous ({name!r} comes after "
                                     f"other groups); its tensors would be split over two buckets")
                key, group = k, []
            group.append((name, tensor.detach()))
        if group:
            yield group

    for group in groups():
        group_size = sum(t.numel() * t.element_size() for _, t in group)
        if bucket and size + group_size > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(group)
        size += group_size
    if bucket:
        yield bucket
