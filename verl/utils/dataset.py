"""RLHFDataset: parquet rows (docs/CONTRACTS.md "Dataset rows") -> DataProto batches.

Each row becomes tensors ``input_ids``/``attention_mask`` (P,) left-padded to ``max_prompt_length`` (the chat
template is applied when the tokenizer has one, docs/method.md §2.2), the engine's non-tensors
``verl.hooks.ENGINE_ROW_KEYS`` (``data_source``, ``index``: the GRPO uid, ``id``) and the task's non-tensors, which
the task's row adapter (``verl.hooks.RowAdapter``, ``trainer.row_adapter``) derives from the other columns; the
default adapter keeps every other column as an opaque object.

Batches are drawn in a deterministic order: epoch ``e`` visits the rows in ``permutation(seed + e)``. The
position (epoch, offset) is the whole iteration state, so ``state_dict``/``load_state_dict`` resume exactly.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from verl.hooks import ENGINE_ROW_KEYS, RowAdapter, passthrough_row_fields
from verl.protocol import DataProto, to_object_array

__all__ = ["RLHFDataset", "collate_rows"]

TENSOR_KEYS = ("input_ids", "attention_mask")


def _read_parquet_rows(files: Sequence[str]) -> tuple[list[dict], list[str]]:
    """All rows of all files as python dicts, plus a 'file:row' label per row for error messages."""
    import pyarrow.parquet as pq

    rows, where = [], []
    for path in files:
        if not os.path.exists(path):
            raise FileNotFoundError(f"[data] parquet file not found: {path}; fix data.train_files/val_files")
        table = pq.read_table(path)
        for i, row in enumerate(table.to_pylist()):
            rows.append(row)
            where.append(f"{path}:{i}")
    return rows, where


def _require(row: dict, key: str, where: str) -> Any:
    if key not in row or row[key] is None:
        raise KeyError(f"[data] {where}: row has no '{key}' field (keys: {sorted(row)}); "
                       f"see docs/CONTRACTS.md 'Dataset rows'")
    return row[key]


class RLHFDataset:
    """Rows of one or more parquet files, tokenized lazily, batched in a seeded, resumable order."""

    def __init__(self, files: Sequence[str] | str, tokenizer, max_prompt_length: int, batch_size: int,
                 shuffle: bool = True, seed: int = 1, drop_last: bool = True, prompt_key: str = "prompt",
                 truncation: str = "error", max_samples: int = -1,
                 row_adapter: RowAdapter = passthrough_row_fields):
        files = [files] if isinstance(files, str) else list(files)
        if not files:
            raise ValueError("[data] no parquet files given (data.train_files / data.val_files is empty)")
        self.rows, self.where = _read_parquet_rows(files)
        if max_samples > 0:
            self.rows, self.where = self.rows[:max_samples], self.where[:max_samples]
        if not self.rows:
            raise ValueError(f"[data] {files} contain no rows")
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.prompt_key = prompt_key
        self.truncation = truncation
        self.row_adapter = row_adapter
        if drop_last and len(self.rows) < batch_size:
            raise ValueError(f"[data] batch_size ({batch_size}) is larger than the dataset ({len(self.rows)} rows "
                             f"in {files}); lower data.train_batch_size")
        self.epoch = 0
        self.offset = 0

    # ---- rows -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def _prompt_text(self, row: dict, where: str) -> tuple[str, list[dict]]:
        """(text fed to the tokenizer, the prompt as {role, content} messages)."""
        messages = _require(row, self.prompt_key, where)
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise ValueError(f"[data] {where}: '{self.prompt_key}' must be a list of {{role, content}} messages")
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "\n".join(m["content"] for m in messages)
        return text, messages

    def _tokenize(self, text: str, where: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_length:
            if self.truncation == "error":
                raise ValueError(f"[data] {where}: prompt has {len(ids)} tokens > data.max_prompt_length "
                                 f"({self.max_prompt_length}); raise max_prompt_length or set data.truncation=left")
            ids = ids[-self.max_prompt_length:] if self.truncation == "left" else ids[:self.max_prompt_length]
        return ids

    def __getitem__(self, i: int) -> dict:
        """One row: ``input_ids``/``attention_mask`` (P,) long tensors, the engine's and the task's non-tensors."""
        row, where = self.rows[i], self.where[i]
        text, messages = self._prompt_text(row, where)
        ids = self._tokenize(text, where)
        pad = self.max_prompt_length - len(ids)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.tensor([pad_id] * pad + ids, dtype=torch.long)
        attention_mask = torch.tensor([0] * pad + [1] * len(ids), dtype=torch.long)
        data_source = _require(row, "data_source", where)
        index = (row.get("extra_info") or {}).get("index", i)
        columns = {k: v for k, v in row.items() if k != self.prompt_key}
        fields = self.row_adapter(columns, messages, where)
        clash = sorted(set(fields) & {*TENSOR_KEYS, *ENGINE_ROW_KEYS})
        if clash:
            name = getattr(self.row_adapter, "__qualname__", repr(self.row_adapter))
            raise ValueError(f"[data] {where}: the row adapter {name} returned {clash}, which the dataset sets "
                             f"itself ({TENSOR_KEYS + ENGINE_ROW_KEYS})")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "data_source": data_source,
                "index": int(index), "id": str(row.get("id") or f"{data_source}_{index}"), **fields}

    # ---- batches ----------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        """Row order of ``epoch``: a permutation seeded by (seed + epoch), or 0..N-1 without shuffling."""
        if not self.shuffle:
            return np.arange(len(self.rows))
        return np.random.default_rng(self.seed + epoch).permutation(len(self.rows))

    def batches_per_epoch(self) -> int:
        n, b = len(self.rows), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def next_batch(self) -> DataProto:
        """The next training batch; moves to the next epoch (new permutation) when this one is used up."""
        if self.offset >= self.batches_per_epoch():
            self.epoch, self.offset = self.epoch + 1, 0
        start = self.offset * self.batch_size
        idx = self._order(self.epoch)[start:start + self.batch_size]
        self.offset += 1
        return collate_rows([self[int(i)] for i in idx])

    def iter_epoch(self) -> Iterator[DataProto]:
        """Every batch of one pass in order (validation); does not touch the training position."""
        order = self._order(0)
        for b in range(self.batches_per_epoch()):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield collate_rows([self[int(i)] for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_rows": len(self.rows),
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_rows") != len(self.rows) or state.get("batch_size") != self.batch_size:
            raise ValueError(f"[data] checkpoint dataloader state was saved for {state.get('num_rows')} rows / batch "
                             f"{state.get('batch_size')}, but this dataset has {len(self.rows)} rows / batch "
                             f"{self.batch_size}; resume with the same data and data.train_batch_size")
        self.epoch, self.offset, self.seed = int(state["epoch"]), int(state["offset"]), int(state["seed"])


def collate_rows(rows: Sequence[dict]) -> DataProto:
    """Stack per-row dicts into a DataProto: tensors (B, P), every other key as an object array of length B (all
    rows must have the same keys)."""
    if not rows:
        raise ValueError("collate_rows: empty list of rows")
    keys = list(rows[0])
    for i, r in enumerate(rows):
        if set(r) != set(keys):
            raise ValueError(f"collate_rows: row {i} has keys {sorted(r)}, row 0 has {sorted(keys)}; the row "
                             f"adapter must return the same fields for every row")
    tensors = {k: torch.stack([r[k] for r in rows]) for k in TENSOR_KEYS}
    non_tensors = {k: to_object_array([r[k] for r in rows]) for k in keys if k not in TENSOR_KEYS}
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)
