"""Exact inner-product search on GPUs: the `--faiss_gpu` path of the retrieval server (issue 8, GPU half).

`TorchFlatIndex` keeps the passage vectors of a flat index on one or more torch devices and answers
`search(x, k) -> (scores, ids)` like a FAISS `IndexFlatIP`:

    s(q, p) = <q, p>            q: (N, D) queries, P: (M, D) passages, both L2-normalised -> cosine
    top-k   = argmax_k over p of s(q, p), best first

- storage "fp16" halves the memory of fp32 (wiki-18 with e5-base: 21M x 768 -> 32 GB, one H100) and runs the
  GEMM on tensor cores; queries are rounded to fp16 too and products are accumulated in fp32 (cuBLAS), as FAISS's
  GpuIndexFlat does with useFloat16. Scores come back as fp32 where torch can ask cuBLAS for an fp32 output
  (`torch.mm(..., out_dtype=torch.float32)`), else rounded to fp16 (~5e-4 at cosine 0.8).
- The rows are cut into contiguous shards, one per device (all visible GPUs by default); each shard scores the
  queries one chunk of `chunk_rows` rows at a time (a (N, chunk_rows) fp32 score block), keeps a running top-k,
  and the shards' top-k lists are merged on the first device.

Only flat (exhaustive) indexes move to the GPU this way: `from_faiss` accepts `IndexFlat` and
`IndexScalarQuantizer` (SQfp16/SQ8: the decoded vectors) with the inner-product metric and refuses IVF/HNSW/PQ with
the fix. It needs no FAISS GPU build: an exact flat search is one GEMM plus a top-k, which torch (already needed by
the encoder and trainer) does on any CUDA device.

With FAISS's GPU build installed (the `faiss-gpu-cu12` wheel, the `gpu` extra) and a GPU visible to it,
`--faiss_gpu` uses FAISS itself instead (`to_faiss_gpus`): every type FAISS can clone to the GPU (Flat, SQ,
IVF-Flat, IVF-SQ, IVF-PQ; the first stage of a "+rerank" index), sharded over the GPUs (rows split, results merged:
Search-R1's setting) or replicated (`--faiss_gpu_replicate`: each GPU holds it all, queries split). `gpu_search_backend`
says which path a server takes.
"""
from __future__ import annotations

import numpy as np
import torch

STORAGES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# FAISS's score for a missing hit under the inner-product metric (k > number of vectors)
MISSING_SCORE = -float(np.finfo(np.float32).max)


def faiss_gpu_count() -> int:
    """GPUs FAISS itself can use: 0 with faiss-cpu (no GPU symbols) or when its CUDA runtime finds no device."""
    import faiss

    if not hasattr(faiss, "GpuMultipleClonerOptions"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except RuntimeError:  # a CUDA runtime that cannot start
        return 0


def gpu_search_backend() -> str:
    """Who runs `--faiss_gpu` here: "faiss" (FAISS's GPU build sees a GPU) or "torch" (TorchFlatIndex)."""
    return "faiss" if faiss_gpu_count() > 0 else "torch"


def to_faiss_gpus(index, storage: str = "fp16", shard: bool = True):
    """A FAISS CPU index -> the same index on every GPU FAISS sees (`faiss.index_cpu_to_all_gpus`). storage "fp16":
    vectors (Flat, IVF-Flat) in fp16 and IVF-PQ's look-up tables in fp16, as Search-R1 sets `useFloat16`; "fp32":
    full precision (FAISS has no bf16 storage). shard: split the rows over the GPUs (else replicate). IVF nprobe is
    copied from the CPU index. Raises ValueError naming the index type where FAISS cannot clone it (HNSW, plain
    PQ)."""
    import faiss

    if storage not in ("fp16", "fp32"):
        raise ValueError(f"--gpu_storage {storage!r} has no FAISS GPU equivalent; use fp16 or fp32")
    if faiss_gpu_count() == 0:  # FAISS's cloner aborts the process when it has no GPU to clone to
        raise ValueError("FAISS sees no GPU (faiss-cpu, or no CUDA device); --faiss_gpu then needs a flat index, "
                         "searched through torch")
    options = faiss.GpuMultipleClonerOptions()
    options.shard = shard
    options.useFloat16 = storage == "fp16"
    try:
        return faiss.index_cpu_to_all_gpus(index, co=options)
    except RuntimeError as exc:
        kind = type(faiss.downcast_index(index)).__name__
        raise ValueError(f"FAISS cannot move a {kind} to the GPU ({str(exc).splitlines()[0]}); serve it on CPU "
                         f"(without --faiss_gpu) or build a Flat, SQ or IVF index") from None


def visible_gpus() -> list[str]:
    """['cuda:0', 'cuda:1', ...] for every GPU torch sees (empty on a CPU-only machine)."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


class TorchFlatIndex:
    """Exact inner-product top-k over (M, D) vectors sharded row-wise over `devices`.

    TorchFlatIndex(vectors (M, D) float32, devices=["cuda:0", ...], storage="fp16"|"bf16"|"fp32", chunk_rows=2**20)
    search(x (N, D) float32, k) -> (scores (N, k) float32, ids (N, k) int64), best first; ids -1 past M.
    Also runs on "cpu" devices (tests, and machines without a GPU), where fp16 storage is slow but exact to its
    rounding.
    """

    def __init__(self, vectors: np.ndarray | None = None, devices: list[str] | None = None, storage: str = "fp16",
                 chunk_rows: int = 1 << 20, dim: int | None = None):
        devices = list(devices) if devices else visible_gpus()
        if not devices:
            raise ValueError("[gpu_index] no GPU visible to torch (torch.cuda.is_available() is False); serve the "
                             "index on CPU (drop --faiss_gpu) or pass devices=['cpu']")
        if storage not in STORAGES:
            raise ValueError(f"[gpu_index] storage must be one of {sorted(STORAGES)}, got {storage!r}")
        if not isinstance(chunk_rows, int) or chunk_rows <= 0:
            raise ValueError(f"[gpu_index] chunk_rows must be a positive int, got {chunk_rows!r}")
        self.devices, self.storage, self.chunk_rows = devices, storage, chunk_rows
        self.dtype = STORAGES[storage]
        self.d = int(dim if dim is not None else vectors.shape[1])
        self.shards: list[torch.Tensor] = [torch.empty((0, self.d), dtype=self.dtype, device=dev) for dev in devices]
        self.ntotal = 0
        if vectors is not None:
            self.add(vectors)

    # ---- building ----
    def add(self, vectors: np.ndarray) -> None:
        """Append (n, D) vectors; each call's rows are split evenly over the devices (row order is kept: ids are
        assigned in the order added, shard by shard within a call, as `search` maps them back)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.d:
            raise ValueError(f"[gpu_index] vectors must be (n, {self.d}), got {vectors.shape}")
        if self.ntotal and len(self.devices) > 1:
            raise ValueError("[gpu_index] a sharded index is built by one add() call (or from_faiss); "
                             "append to a single-device index only")
        bounds = np.linspace(0, len(vectors), len(self.devices) + 1).astype(np.int64)
        for i, dev in enumerate(self.devices):
            part = torch.from_numpy(np.ascontiguousarray(vectors[bounds[i]:bounds[i + 1]], dtype=np.float32))
            self.shards[i] = torch.cat([self.shards[i], part.to(dev).to(self.dtype)])
        self.ntotal += len(vectors)

    @classmethod
    def from_faiss(cls, index, devices: list[str] | None = None, storage: str = "fp16",
                   chunk_rows: int = 1 << 20, copy_rows: int = 1 << 20) -> "TorchFlatIndex":
        """Copy a FAISS flat inner-product index (IndexFlat, IndexScalarQuantizer) to `devices`, `copy_rows` rows
        at a time (host memory stays at one block: wiki-18's fp32 vectors are 64 GB)."""
        import faiss

        index = faiss.downcast_index(index)
        if not isinstance(index, (faiss.IndexFlat, faiss.IndexScalarQuantizer)):
            raise ValueError(f"[gpu_index] only flat indexes move to the GPU (IndexFlat, SQfp16/SQ8), this one is "
                             f"{type(index).__name__}; build with --index_factory Flat (or SQfp16) for --faiss_gpu, "
                             "or serve IVF/HNSW indexes on CPU")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"[gpu_index] the index metric is {index.metric_type}, expected inner product "
                             f"({faiss.METRIC_INNER_PRODUCT}): StepSearch indexes score by cosine")
        out = cls(None, devices, storage, chunk_rows, dim=index.d)
        bounds = np.linspace(0, index.ntotal, len(out.devices) + 1).astype(np.int64)
        for i, dev in enumerate(out.devices):
            parts = [torch.from_numpy(index.reconstruct_n(int(s), int(min(copy_rows, bounds[i + 1] - s))))
                     .to(dev).to(out.dtype) for s in range(int(bounds[i]), int(bounds[i + 1]), copy_rows)]
            out.shards[i] = torch.cat(parts) if parts else out.shards[i]
        out.ntotal = int(index.ntotal)
        return out

    def memory_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.shards)

    # ---- search ----
    @torch.inference_mode()
    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """x: (N, D) float32 queries -> (scores (N, k) float32, ids (N, k) int64), best first (FAISS order)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"[gpu_index] queries must be (N, {self.d}), got {x.shape}")
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"[gpu_index] k must be a positive int, got {k!r}")
        q32 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        home = self.devices[0]
        best_s, best_i = [], []
        offset = 0
        for dev, shard in zip(self.devices, self.shards):
            q = q32.to(dev).to(self.dtype)  # (N, D)
            for start in range(0, len(shard), self.chunk_rows):
                block = shard[start:start + self.chunk_rows]  # (c, D)
                s = scores_fp32(q, block)  # (N, c) s(q, p) = <q, p>
                top_s, top_i = grouped_topk(s, k)  # (N, min(k, c))
                best_s.append(top_s.to(home))
                best_i.append((top_i + offset + start).to(home))
            offset += len(shard)
        n = len(x)
        if not best_s:  # empty index
            return np.full((n, k), MISSING_SCORE, np.float32), np.full((n, k), -1, np.int64)
        all_s, all_i = torch.cat(best_s, dim=1), torch.cat(best_i, dim=1)  # (N, sum kk)
        kk = min(k, all_s.shape[1])
        top_s, pos = all_s.topk(kk, dim=1)
        top_i = all_i.gather(1, pos)
        scores = np.full((n, k), MISSING_SCORE, np.float32)
        ids = np.full((n, k), -1, np.int64)
        scores[:, :kk], ids[:, :kk] = top_s.float().cpu().numpy(), top_i.cpu().numpy()
        return scores, ids


def grouped_topk(s: torch.Tensor, k: int, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of every row of s (N, c) -> (values (N, k'), column ids (N, k')), best first, k' = min(k, c).

    Same result as `s.topk(k)` (up to the choice among exactly tied values) in one max pass over s: cut each row
    into groups of `group` columns; the k best values lie in the k groups with the largest maxima (each of them
    lifts its group's max to >= the k-th best value, and only k values are that large), so a top-k over those
    k x group candidates finishes the job. On a GPU this is ~3x faster than topk over a million columns.
    """
    n, c = s.shape
    kk = min(k, c)
    full = (c // group) * group
    if full < 8 * group * kk:  # few columns: plain top-k
        return s.topk(kk, dim=1)
    grouped = s[:, :full].view(n, full // group, group)  # (N, G, group)
    top_groups = grouped.amax(dim=2).topk(kk, dim=1).indices  # (N, kk) the groups holding the top-k
    cand = grouped.gather(1, top_groups.unsqueeze(-1).expand(-1, -1, group)).reshape(n, kk * group)
    cand_ids = (top_groups.unsqueeze(-1) * group + torch.arange(group, device=s.device)).reshape(n, kk * group)
    if full < c:  # the last, partial group
        cand = torch.cat([cand, s[:, full:]], dim=1)
        cand_ids = torch.cat([cand_ids, torch.arange(full, c, device=s.device).expand(n, -1)], dim=1)
    vals, pos = cand.topk(kk, dim=1)
    return vals, cand_ids.gather(1, pos)


def scores_fp32(q: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """(N, D) x (c, D) -> (N, c) float32 inner products. fp16/bf16 inputs are multiplied on tensor cores with fp32
    accumulation; the fp32 output is kept where torch exposes it (CUDA `mm(out_dtype=)`), else upcast."""
    if block.dtype == torch.float32:
        return q @ block.T
    global _MM_OUT_DTYPE
    if block.is_cuda:
        if _MM_OUT_DTYPE is not False:
            try:
                out = torch.mm(q, block.T, out_dtype=torch.float32)
                _MM_OUT_DTYPE = True
                return out
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_OUT_DTYPE = False  # this torch has no fp32-output half GEMM: scores are rounded to q.dtype
        return (q @ block.T).float()
    return q.float() @ block.float().T  # CPU: half-precision GEMMs are slow or missing; same rounded inputs


_MM_OUT_DTYPE: bool | None = None  # does torch.mm(..., out_dtype=float32) work here? (None: not tried yet)
