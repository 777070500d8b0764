"""A BERT query encoder in plain torch, loaded without `transformers` (issue 16: "the retriever starts in seconds").

Importing `transformers` and building the encoder through `AutoModel`/`AutoTokenizer` costs ~5 s of a server's
start on 2 cores; the encoders the retriever uses (MiniLM, e5) are plain BERT encoders, so the server builds them
here instead (`Encoder(backend="auto")`, the server's `--encoder_backend`):

    tokens  = [CLS] wordpieces(normalize(prefix + text))[:max_length - 2] [SEP]      (tokenizers, tokenizer.json)
    h_0     = LayerNorm(E_word[ids] + E_type[type_ids] + E_pos[0..T-1])                (B, T, D)
    a_l     = LayerNorm(h_{l-1} + W_o SDPA(Q, K, V; padding masked))                   per layer l = 1..L
    h_l     = LayerNorm(a_l + W_2 gelu(W_1 a_l))
    last_hidden_state = h_L                                                            (B, T, D)

The same arithmetic as transformers' `BertModel` (SDPA attention, exact-erf GELU, post-LayerNorm), so embeddings
equal transformers' (bit for bit on MiniLM in fp32 and bf16) and so do token ids (tests/search/test_native_bert.py);
pooling and normalisation stay in `encoders.Encoder`. `forward(packed=True)` runs everything but attention over the
real tokens of a padded batch only (the encoder's `sorted`/`fp16` modes: EncoderConfig.pack_tokens). Weights come
from `model.safetensors` (or `pytorch_model.bin`), the config from `config.json`, tokenisation from `tokenizer.json`
with `tokenizer_config.json`'s normalisation, as transformers 5's `BertTokenizer` builds it. `unsupported_reason`
says why a folder cannot be loaded this way (the caller then uses transformers).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

CONFIG, TOKENIZER, TOKENIZER_CONFIG = "config.json", "tokenizer.json", "tokenizer_config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in order of preference
SUPPORTED_ACTS = ("gelu",)  # transformers' "gelu" = exact erf GELU (torch.nn.functional.gelu)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT `config.json` the forward pass needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, raw: dict) -> "BertConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: raw[k] for k in names if k in raw})


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_folder(model_path: str) -> str | None:
    """A local folder holding the model: `model_path` itself, or the cached snapshot of a hub id (no download:
    None when the hub id is not in the local Hugging Face cache)."""
    if os.path.isdir(model_path):
        return model_path
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(model_path, CONFIG)
    return os.path.dirname(cached) if isinstance(cached, str) else None


def weights_file(folder: str) -> str | None:
    return next((os.path.join(folder, name) for name in WEIGHTS if os.path.isfile(os.path.join(folder, name))), None)


def unsupported_reason(model_path: str) -> str | None:
    """Why the BERT at `model_path` (folder or hub id) cannot be loaded by this module, or None when it can: it
    needs a local folder (or cached hub snapshot) with config.json of model_type "bert" (absolute positions, exact
    GELU, encoder only), tokenizer.json and one unsharded weights file."""
    folder = resolve_folder(model_path)
    if folder is None:
        return f"{model_path!r} is neither a local folder nor in the local Hugging Face cache"
    for name in (CONFIG, TOKENIZER):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"{folder} has no {name}"
    if weights_file(folder) is None:
        return f"{folder} has none of {WEIGHTS} (sharded or other weight files need transformers)"
    raw = read_json(os.path.join(folder, CONFIG))
    checks = [
        (raw.get("model_type") == "bert", f"model_type is {raw.get('model_type')!r}, not 'bert'"),
        (raw.get("hidden_act", "gelu") in SUPPORTED_ACTS,
         f"hidden_act {raw.get('hidden_act')!r} is not one of {SUPPORTED_ACTS}"),
        (raw.get("position_embedding_type", "absolute") == "absolute",
         f"position_embedding_type {raw.get('position_embedding_type')!r} is not 'absolute'"),
        (not raw.get("is_decoder") and not raw.get("add_cross_attention"), "it is a decoder / has cross-attention"),
        (all(k in raw for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps")),
         "config.json lacks a BERT size field"),
    ]
    if raw.get("hidden_size", 0) % max(raw.get("num_attention_heads", 1), 1):
        return f"hidden_size {raw['hidden_size']} is not a multiple of num_attention_heads"
    tok = read_json(os.path.join(folder, TOKENIZER))
    tok_model = (tok.get("model") or {}).get("type")
    checks += [(tok_model == "WordPiece", f"tokenizer.json model is {tok_model!r}, not WordPiece"),
               (tok.get("post_processor") is not None, "tokenizer.json has no post_processor ([CLS]/[SEP] template)")]
    return next((why for ok, why in checks if not ok), None)


# ---------------------------------------------------------------- tokenizer
class NativeTokenizer:
    """`tokenizers.Tokenizer` from tokenizer.json, set up as transformers' BertTokenizer uses it: vocabulary and
    [CLS] $A [SEP] post-processor from the file, BertNormalizer from tokenizer_config.json (do_lower_case,
    tokenize_chinese_chars, strip_accents), truncation to `max_length` tokens special tokens included, no padding
    (Encoder.pad pads)."""

    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]

    def __init__(self, folder: str, max_length: int):
        from tokenizers import Tokenizer, normalizers, pre_tokenizers

        self.tokenizer = Tokenizer.from_file(os.path.join(folder, TOKENIZER))
        tok_cfg_path = os.path.join(folder, TOKENIZER_CONFIG)
        tok_cfg = read_json(tok_cfg_path) if os.path.isfile(tok_cfg_path) else {}
        self.tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=tok_cfg.get("tokenize_chinese_chars", True),
            strip_accents=tok_cfg.get("strip_accents"), lowercase=tok_cfg.get("do_lower_case", True))
        self.tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        pad = tok_cfg.get("pad_token", "[PAD]")
        pad = pad.get("content", "[PAD]") if isinstance(pad, dict) else pad
        self.pad_token_id = self.tokenizer.token_to_id(pad)
        if self.pad_token_id is None:
            raise ValueError(f"[encoder] {folder}/{TOKENIZER} has no pad token {pad!r}")

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, [CLS]/[SEP] included, truncated to max_length (no padding)."""
        return [enc.ids for enc in self.tokenizer.encode_batch(texts)]


# ---------------------------------------------------------------- model
class NativeOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, T, D)


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Packed rows x (N, C) -> (n_rows, C): x at `rows` (N,), zeros elsewhere (the padding)."""
    return x.new_zeros(n_rows, x.shape[-1]).index_copy_(0, rows, x)


class NativeBertLayer(nn.Module):
    """One post-LayerNorm encoder layer: self-attention (Q, K, V in one matmul) and a GELU feed-forward."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.heads = cfg.num_attention_heads
        self.scale = (D // self.heads) ** -0.5
        self.qkv = nn.Linear(D, 3 * D)
        self.attn_out = nn.Linear(D, D)
        self.attn_norm = nn.LayerNorm(D, eps=eps)
        self.ffn_in = nn.Linear(D, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, D)
        self.ffn_norm = nn.LayerNorm(D, eps=eps)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None = None,
                batch_shape: tuple[int, int] | None = None) -> torch.Tensor:
        """h: (B, T, D), or packed (N, D): the real tokens only, `rows` (N,) their places in the flattened (B*T)
        batch of shape `batch_shape` (B, T). mask: (B, 1, 1, T) bool (True = attend) or None (no padding).
        Returns h's shape. Packed, the linear layers see N rows instead of B*T; attention runs padded."""
        D = h.shape[-1]
        B, T = h.shape[:2] if rows is None else batch_shape
        qkv = self.qkv(h)  # (B, T, 3D) or (N, 3D)
        if rows is not None:  # pad rows: zero q, k, v (their keys are masked, their outputs dropped below)
            qkv = scatter_rows(qkv, rows, B * T)
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, d)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, H, T, d)
        a = a.transpose(1, 2).reshape(B * T, D)
        a = a.view(B, T, D) if rows is None else a[rows]  # like h
        h = self.attn_norm(self.attn_out(a) + h)
        return self.ffn_norm(self.ffn_out(F.gelu(self.ffn_in(h))) + h)


class NativeBert(nn.Module):
    """BERT encoder (no pooler head): (input_ids, attention_mask, token_type_ids) (B, T) -> last_hidden_state.
    Built on the meta device and filled by `load_native` (the embedding tables are plain parameters: nn.Embedding's
    random init on meta would import torch._dynamo, ~2 s)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        self.word_embeddings = nn.Parameter(torch.empty(cfg.vocab_size, D))  # (V, D)
        self.position_embeddings = nn.Parameter(torch.empty(cfg.max_position_embeddings, D))  # (P, D)
        self.token_type_embeddings = nn.Parameter(torch.empty(cfg.type_vocab_size, D))  # (2, D)
        self.embed_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(NativeBertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, packed: bool = False) -> NativeOutput:
        """input_ids, attention_mask ({0,1}, right-padded), token_type_ids (default 0): (B, T) long.
        Returns NativeOutput(last_hidden_state (B, T, D)) in the weights' dtype, as BertModel does.

        packed=True (a padded batch only): embeddings, linear layers, GELU and LayerNorms run over the N real tokens
        ((N, D), N = attention_mask.sum()), attention over the padded (B, H, T, T); pad positions of the output are
        0. The same arithmetic per token, so the same values up to the GEMMs' rounding (their row count differs);
        a batch of 32 real questions is ~40% padding, so this saves that share of the FLOPs."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"[encoder] {T} tokens exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}; lower max_length")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # no padding: no mask (transformers skips it too, so SDPA takes the same kernel)
        keep = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()  # (B, T)
        rows = keep.reshape(-1).nonzero().squeeze(1) if packed and keep is not None else None  # (N,)
        position_emb = self.position_embeddings[:T]  # (T, D)
        if rows is not None:
            input_ids, token_type_ids = input_ids.reshape(-1)[rows], token_type_ids.reshape(-1)[rows]  # (N,)
            position_emb = self.position_embeddings[rows % T]  # (N, D): flat row b*T + t is position t
        h = F.embedding(input_ids, self.word_embeddings) + F.embedding(token_type_ids, self.token_type_embeddings)
        h = self.embed_norm(h + position_emb)  # (B, T, D) or (N, D), BertEmbeddings' order of additions
        mask = None if keep is None else keep[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            h = layer(h, mask, rows, (B, T))
        if rows is not None:
            h = scatter_rows(h, rows, B * T).view(B, T, -1)
        return NativeOutput(h)


def hf_state_dict(raw: dict[str, torch.Tensor], cfg: BertConfig, source: str) -> dict[str, torch.Tensor]:
    """Map a transformers BertModel state dict (optionally under "bert.", old LayerNorm gamma/beta names) onto
    NativeBert's parameter names, in fp32; the pooler and any head are dropped. Errors name the missing tensor."""
    sd = {}
    for key, value in raw.items():
        key = key[len("bert."):] if key.startswith("bert.") else key
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        sd[key] = value

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise ValueError(f"[encoder] {source} has no tensor {name!r} (is it a BERT encoder checkpoint?)")
        return sd[name].float()

    out = {name: take(f"embeddings.{name}.weight")
           for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    out.update({f"embed_norm.{p}": take(f"embeddings.LayerNorm.{p}") for p in ("weight", "bias")})
    for i in range(cfg.num_hidden_layers):
        src = f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            out[f"layers.{i}.qkv.{p}"] = torch.cat([take(f"{src}attention.self.{x}.{p}")
                                                    for x in ("query", "key", "value")])
            for ours, theirs in (("attn_out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                                 ("ffn_in", "intermediate.dense"), ("ffn_out", "output.dense"),
                                 ("ffn_norm", "output.LayerNorm")):
                out[f"layers.{i}.{ours}.{p}"] = take(f"{src}{theirs}.{p}")
    return out


def load_weights(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_native(model_path: str, max_length: int) -> tuple[NativeTokenizer, NativeBert]:
    """(tokenizer, fp32 model in eval mode) for the BERT at `model_path`; check `unsupported_reason` first."""
    why = unsupported_reason(model_path)
    if why is not None:
        raise ValueError(f"[encoder] cannot load {model_path!r} without transformers: {why}")
    folder = resolve_folder(model_path)
    cfg = BertConfig.from_dict(read_json(os.path.join(folder, CONFIG)))
    if max_length > cfg.max_position_embeddings:
        raise ValueError(f"[encoder] max_length {max_length} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings} ({folder})")
    path = weights_file(folder)
    with torch.device("meta"):  # no random init of weights that are replaced at once (~0.2 s on CPU)
        model = NativeBert(cfg)
    model.load_state_dict(hf_state_dict(load_weights(path), cfg, path), strict=True, assign=True)
    return NativeTokenizer(folder, max_length), model.eval()
